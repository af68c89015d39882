"""A round on two processes, as `accelerate launch --num_processes N -m learner.round` runs it on several GPUs: here
torchrun on the CPU (gloo), with the tiny model. Each process trains on its own share of every step and the LoRA
gradients are averaged; only the first process reports and writes the version."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_round import TINY, assert_complete, lora_weights, write_snapshot


def run_on_two_processes(tmp_path, tiny_model_dir, overrides: dict) -> tuple[dict, list[dict]]:
    snapshot = write_snapshot(tmp_path / "snapshot", n_items=8)
    config = tmp_path / "round.json"
    config.write_text(json.dumps({**TINY, **overrides}))
    out = tmp_path / "v1"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "learner.round", "--snapshot", str(snapshot), "--base", str(tiny_model_dir),
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
