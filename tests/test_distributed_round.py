"""A round on two processes, as `accelerate launch --num_processes N -m learner.round` runs it on several GPUs: here
torchrun on the CPU (gloo), with the tiny model. Each process trains on its own share of every step and the LoRA
gradients are averaged; only the first process reports and writes the version."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace

import pytest
from processes import alive, children, wait_for
from test_round import TINY, assert_complete, lora_weights, write_snapshot
from test_train_api import QUICK, label_items

from app.scheduler import round_launcher
from learner.config import RoundConfig


def run_on_two_processes(tmp_path, tiny_model_dir, overrides: dict) -> tuple[dict, list[dict]]:
    snapshot = write_snapshot(tmp_path / "snapshot", n_items=8)
    config = tmp_path / "round.json"
    config.write_text(json.dumps({**TINY, **overrides}))
    out = tmp_path / "v1"
    done = subprocess.run([*round_launcher(2), "--snapshot", str(snapshot), "--base", str(tiny_model_dir),
                           "--out", str(out), "--config", str(config)],
                          capture_output=True, text=True, timeout=300,  # a process left waiting hangs: fail instead
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = assert_complete(out)
    assert any(bool(w.abs().sum()) for name, w in lora_weights(out).items() if "lora_B" in name)  # it trained
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return metrics, events


def test_a_round_of_human_labels_alone_gives_every_process_a_share_of_every_step(tmp_path, tiny_model_dir):
    """No rollouts (as when the guard skips them): 15 human pairs, one epoch. A step with one pair would leave one
    process with nothing to train on while the other waited for its gradients forever (it did)."""
    metrics, events = run_on_two_processes(tmp_path, tiny_model_dir, {"steps": 100, "onpolicy_fraction": 0.0})
    data = metrics["data"]
    assert data["processes"] == 2 and data["human_examples"] == 15
    assert data["steps"] == 7  # 15 pairs // (1 per process x 2 processes)
    assert data["human_uses"] == 15 and data["onpolicy_uses"] == 0  # each pair once, over both processes
    assert any("shared by 2 processes" in w for w in metrics["warnings"])
    policy_steps = [e["step"] for e in events if e.get("event") == "progress" and e.get("phase") == "policy"]
    assert policy_steps == list(range(1, 8))  # one process reports
    assert [e["status"] for e in events if e.get("event") == "done"] == ["candidate"]


def test_a_round_with_rollouts_counts_what_every_process_trained_on(tmp_path, tiny_model_dir):
    metrics, events = run_on_two_processes(tmp_path, tiny_model_dir, {})
    data = metrics["data"]
    assert data["processes"] == 2 and data["steps"] == TINY["steps"]
    assert data["human_uses"] == data["human_examples"] == 15  # human_epochs 1, over both processes
    assert data["onpolicy_uses"] == data["onpolicy"]["uses"] > 0
    assert 0.3 < data["onpolicy_share"] < 0.7  # onpolicy_fraction 0.5 of every step, on each process
    assert [e["status"] for e in events if e.get("event") == "done"] == ["candidate"]


def test_the_processes_of_a_round_die_with_their_launcher(tmp_path, tiny_model_dir):
    """torchrun starts each process in a session of its own; killed (as by the server's death), it cannot stop them,
    so each process ends itself when its launcher dies."""
    snapshot = write_snapshot(tmp_path / "snapshot", n_items=8)
    config = tmp_path / "round.json"
    config.write_text(json.dumps({**TINY, "steps": 5000}))
    launcher = subprocess.Popen([*round_launcher(2), "--snapshot", str(snapshot), "--base", str(tiny_model_dir),
                                 "--out", str(tmp_path / "v1"), "--config", str(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in launcher.stdout:  # until the processes train
            if '"phase": "policy"' in line:
                break
        workers = children(launcher.pid)
        assert len(workers) == 2 and all(alive(pid) for pid in workers)
        launcher.kill()
        launcher.wait(30)
        wait_for(lambda: not any(alive(pid) for pid in workers), 30, "the round's processes to end")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(30)
    assert not (tmp_path / "v1").exists()


@pytest.fixture
def serve_config(serve_config):
    return replace(serve_config, round_processes=2)


def test_the_server_runs_a_round_on_round_processes_and_cancels_it_whole(ctx, accounts, sample_items):
    """(A whole round on two processes is the tests above; this one is the server's launcher and its Cancel.)"""
    label_items(ctx, sample_items, 4)
    serving = ctx.deployments.serving
    run_id = ctx.scheduler.start(RoundConfig.from_dict({**QUICK, "steps": 5000}))
    wait_for(lambda: ctx.store.runs.get(run_id).phase == "policy", 300, "the round to train")
    launcher = ctx.scheduler.process
    workers = children(launcher.pid)
    assert len(workers) == 2
    ctx.scheduler.cancel(run_id)
    assert ctx.scheduler.wait(run_id, timeout=120) == "cancelled"
    wait_for(lambda: not any(alive(pid) for pid in workers), 60, "the round's processes to end")
    assert ctx.deployments.serving == serving and not (ctx.config.versions_dir / "v2").exists()
