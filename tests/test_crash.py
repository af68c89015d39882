"""kill -9 of the server while 16 simulated annotators submit: after a restart on the same data dir (DuckDB replays
its WAL) every ranking the API acknowledged with 201 is stored exactly once. kill -9 of the server during a training
round: after a restart the registry is as it was, the old version serves, and the run is marked failed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from processes import alive, children, wait_for

from app.personas import PERSONAS
from app.server import free_port
from app.simulate import Simulator
from storage.items import AnswerRecord
from storage.store import Store

ANNOTATORS = 16


def prepare(data_dir: Path, n_items: int) -> tuple[str, list[str]]:
    """Accounts and some ready items (the server's prefetcher samples more while it runs)."""
    with Store.open(data_dir) as store:
        store.seed_starter_prompts()
        admin = store.users.add("boss", "admin", "boss-password")[2]
        tokens = [store.users.add(f"crash{i}", "annotator", f"crash{i}-password")[2] for i in range(ANNOTATORS)]
        prompts = store.prompts.least_sampled(n_items)
        for i in range(n_items):
            answers = [AnswerRecord(" ".join(["w"] * (j + 1)), j + 1, "eos", -1.0) for j in range(4)]
            store.items.add(prompts[i % len(prompts)].prompt_id, 0, {"k": 4}, answers)
    return admin, tokens


def start_server(data_dir: Path, port: int, model: Path, log: Path, buffer_size: int = 40,
                 max_new_tokens: int = 8) -> subprocess.Popen:
    """`prefloop serve` as its own process on the tiny model; returns once /api/health answers."""
    env = {**os.environ, "PREFLOOP_BUFFER_SIZE": str(buffer_size), "PREFLOOP_MAX_NEW_TOKENS": str(max_new_tokens),
           "PREFLOOP_DEVICE": "cpu"}
    with open(log, "ab") as out:
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--data-dir", str(data_dir),
                                   "--port", str(port), "--model", str(model)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300  # generous: a loaded 2-core machine starts torch and the model slowly
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.kill()
    raise AssertionError(f"the server did not come up:\n{log.read_text()[-3000:]}")


def test_kill_9_loses_no_acknowledged_label(tmp_path, tiny_model_dir):
    data_dir = tmp_path / "data"
    admin, tokens = prepare(data_dir, n_items=60)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log, acked_log = tmp_path / "server.log", tmp_path / "acked.jsonl"
    server = start_server(data_dir, port, tiny_model_dir, server_log)
    try:
        with open(acked_log, "a", encoding="utf-8") as log:
            simulator = Simulator(url, tokens, PERSONAS["concise"], labels=10**6, timeout=150, poll=0.2, log=log,
                                  request_timeout=10)
            sim = threading.Thread(target=simulator.run, kwargs={"report": lambda line: None, "every": 60})
            sim.start()
            try:
                wait_for(lambda: simulator.summary.rankings >= 40, 60)
                server.send_signal(signal.SIGKILL)  # mid-run: requests are in flight
                server.wait(30)
                at_kill = simulator.summary.rankings
                server = start_server(data_dir, port, tiny_model_dir, server_log)  # the annotators keep retrying
                wait_for(lambda: simulator.summary.rankings >= at_kill + 40, 60)
            finally:
                simulator.stop()
                sim.join(60)
        assert not sim.is_alive()
        acknowledged = [json.loads(line)["ranking_id"] for line in acked_log.read_text().splitlines()]
        assert sorted(acknowledged) == sorted(simulator.summary.acknowledged)
        r = httpx.get(f"{url}/api/export", params={"format": "rankings"},
                      headers={"authorization": f"Bearer {admin}"}, timeout=60)
        assert r.status_code == 200
        rows = [json.loads(line) for line in r.text.splitlines() if line]
        stored = Counter(row["ranking_id"] for row in rows)
        assert [ranking_id for ranking_id in acknowledged if stored[ranking_id] != 1] == []
        assert max(stored.values()) == 1
        assert max(Counter((row["item_id"], row["annotator_id"]) for row in rows).values()) == 1
        assert all(len(row["answer_ids"]) == 4 for row in rows)  # no half-written ranking survived
        assert httpx.get(f"{url}/api/health", timeout=10).json()["labels"] == len(rows)
    finally:
        server.kill()
        server.wait(30)


def test_kill_9_during_a_round_leaves_the_registry_and_the_old_version(tmp_path, tiny_model_dir):
    data_dir = tmp_path / "data"
    admin, tokens = prepare(data_dir, n_items=6)
    with Store.open(data_dir) as store:  # a few rankings, so the round has human pairs
        user = store.users.get("crash0").user_id
        for item_id in range(1, 5):
            store.labels.add_ranking(item_id, user, [a.answer_id for a in store.items.get(item_id).answers])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    boss = {"authorization": f"Bearer {admin}"}
    server_log = tmp_path / "server.log"
    server = start_server(data_dir, port, tiny_model_dir, server_log)
    try:
        r = httpx.post(f"{url}/api/train", headers=boss, timeout=30,
                       json={"steps": 500, "batch_size": 2, "max_new_tokens": 8, "rollout_n": 2, "eval_n": 2,
                             "rollouts_min_reward_accuracy": None})  # on-policy fill keeps it at 500 steps
        run_id = r.json()["run_id"]
        wait_for(lambda: httpx.get(f"{url}/api/runs/{run_id}", headers=boss).json()["progress"] > 0, 300)
        spawned = children(server.pid)
        assert spawned, "the round runs in a subprocess of the server"
        server.send_signal(signal.SIGKILL)
        server.wait(30)
        wait_for(lambda: not any(alive(pid) for pid in spawned), 30)  # the round died with its server
        server = start_server(data_dir, port, tiny_model_dir, server_log)
        run = httpx.get(f"{url}/api/runs/{run_id}", headers=boss).json()
        assert run["status"] == "failed" and "stopped" in run["error"]
        assert [v["version"] for v in httpx.get(f"{url}/api/versions", headers=boss).json()] == [0]
        assert httpx.get(f"{url}/api/health").json()["policy_version"] == 0
        assert not (data_dir / "versions" / "v1").exists()
        r = httpx.post(f"{url}/api/train", headers=boss, timeout=30, json={"steps": 1})
        assert r.status_code == 202  # the next round starts normally
    finally:
        server.kill()
        server.wait(30)
