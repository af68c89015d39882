"""Labels/s the store sustains through the REST API with 1 and with 16 concurrent writers, and the p50/p99 latency
of `GET /api/items/next` + `POST /api/items/{id}/ranking` with 16 concurrent clients.

    .venv/bin/python -m bench.labels [--items 3000] [--seconds 20] [--model smollm2|DIR]

The server runs as a separate process (`prefloop serve`, background sampling off) on a free loopback port, over a
data dir pre-filled with items, so the figures measure the label path, not generation. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from app.server import free_port
from storage.items import AnswerRecord
from storage.store import Store


def prefill(data_dir: Path, n_items: int, n_users: int) -> list[str]:
    with Store.open(data_dir) as store:
        store.seed_starter_prompts()
        prompts = store.prompts.least_sampled(1000)
        tokens = [store.users.add(f"bench{i}", "annotator", f"bench{i}-password")[2] for i in range(n_users)]
        for i in range(n_items):
            answers = [AnswerRecord(f"answer {j} to item {i}", 5, "eos", -3.0) for j in range(4)]
            store.items.add(prompts[i % len(prompts)].prompt_id, 0, {"k": 4}, answers)
    return tokens


def worker(url: str, token: str, until: float, latencies: dict, lock: threading.Lock, errors: list) -> None:
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=30) as c:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            r = c.get("/api/items/next")
            t1 = time.perf_counter()
            if r.status_code == 204:
                return
            if r.status_code != 200:
                errors.append(r.status_code)
                continue
            item = r.json()
            r = c.post(f"/api/items/{item['item_id']}/ranking",
                       json={"ranking": [a["answer_id"] for a in item["answers"]]})
            t2 = time.perf_counter()
            with lock:
                if r.status_code != 201:
                    errors.append(r.status_code)
                    continue
                latencies["next"].append(t1 - t0)
                latencies["ranking"].append(t2 - t1)
                latencies["both"].append(t2 - t0)


def run_clients(url: str, tokens: list[str], seconds: float) -> tuple[int, float, dict, list]:
    latencies = {"next": [], "ranking": [], "both": []}
    errors: list = []
    lock = threading.Lock()
    until = time.perf_counter() + seconds
    threads = [threading.Thread(target=worker, args=(url, t, until, latencies, lock, errors)) for t in tokens]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies["both"]), time.perf_counter() - start, latencies, errors


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=4000)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--models-cache", type=Path, default=Path("prefloop-data/models"),
                   help="reuse the converted model of the default data dir")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        tokens = prefill(data_dir, a.items, 16)
        if a.model == "smollm2" and (a.models_cache / "smollm2").is_dir():
            (data_dir / "models").mkdir(parents=True, exist_ok=True)
            os.symlink((a.models_cache / "smollm2").resolve(), data_dir / "models" / "smollm2")
        port = free_port()
        env = {**os.environ, "PREFLOOP_PREFETCH": "false"}
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--data-dir", str(data_dir),
                                   "--port", str(port), "--model", a.model], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while True:
                try:
                    if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
            print(f"machine: {os.cpu_count()} cores; server: separate process, uvicorn, DuckDB file; "
                  f"{a.seconds:.0f} s per run; client: python threads + httpx (the client shares these cores)")
            for n in (1, 16):
                done, wall, lat, errors = run_clients(url, tokens[:n], a.seconds)
                print(f"{n:>2} writer(s): {done / wall:7.1f} labels/s ({done} rankings in {wall:.1f} s), "
                      f"errors {len(errors)}; latency ms p50/p99: next {pct(lat['next'], 50):.1f}/"
                      f"{pct(lat['next'], 99):.1f}, ranking {pct(lat['ranking'], 50):.1f}/"
                      f"{pct(lat['ranking'], 99):.1f}, next+ranking {pct(lat['both'], 50):.1f}/"
                      f"{pct(lat['both'], 99):.1f}")
            labels = httpx.get(f"{url}/api/health").json()["labels"]
            print(f"labels in the store after both runs: {labels}")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
