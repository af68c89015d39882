"""Generation throughput and what annotators feel, in one run: do annotators wait for the model?

    .venv/bin/python -m bench.serving [--part engine|annotators|all] [--repeats 2] [--max-new-tokens 64]
                                      [--annotators 8] [--think 10] [--seconds 120] [--warmup 90]

engine: items/s and tokens/s of K=4 answers per item for 1, 4 and 8 items per generate call, the version's LoRA
    adapter merged into a copy of the weights vs served unmerged (SmolLM2-135M, one LoRA r=16 all-linear adapter,
    the same prompts and seeds, repeats interleaved so every mode sees the same machine). Under bf16 autocast with
    fp32 weights (a CPU with native bf16) also `fp32`: the merged copy with its weights left in fp32, which autocast
    casts at every matmul (how copies were served before they were kept in bf16).
annotators: `prefloop serve` in its own process (default backend: the policy worker process; SmolLM2 with that
    adapter deployed as version 1) and N simulated annotators (app.simulate, persona `concise`) who each think T s
    per ranking, for S s in each of three conditions: idle; while a Demo chat streams 256-token answers back to back;
    while a default training round runs (the round's own top-up of the buffer included). Prints the share of
    annotator time spent waiting for an item, labels/min, and p50/p99 of next-item and submit.
Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from app.generation.backend import ItemRequest
from app.generation.transformers_backend import TransformersBackend
from app.personas import get_persona
from app.simulate import Simulator
from bench.load import pct, start_server
from learner.model import load_base_model, pick_device, resolve_model
from learner.sampling import SamplingParams
from storage.store import Store

PROMPTS = [json.loads(line)["prompt"] for line in
           (Path(__file__).resolve().parents[1] / "storage" / "starter_prompts.jsonl").read_text().splitlines()
           if line.strip()]
BATCHES = (1, 4, 8)
K = 4


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA r=16 all-linear adapter (alpha 32) with small random B weights, as a trained round leaves one."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_base_model(model_dir, pick_device("cpu")),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.002)
    model.save_pretrained(out)
    return out


def engine(model_dir: Path, adapter: Path, repeats: int, max_new_tokens: int) -> None:
    device = pick_device()
    params = SamplingParams(max_new_tokens=max_new_tokens)
    backends = {"merged": TransformersBackend(model_dir, device, merge=True),
                "unmerged": TransformersBackend(model_dir, device, merge=False)}
    if backends["merged"].cast is not None:  # fp32 weights under bf16 autocast: also the copies as they were before
        backends["fp32"] = TransformersBackend(model_dir, device, merge=True, cast=False)  # cast at every matmul
    for backend in backends.values():
        backend.load_version(1, adapter)
        backend.sample_items([ItemRequest("warm up", 2, 1, 0)], SamplingParams(max_new_tokens=4))
    runs: dict[tuple[str, int], list[tuple[int, int, float]]] = {}
    prompt_index = 0
    for repeat in range(repeats):
        for n in BATCHES:
            prompts = [PROMPTS[(prompt_index + i) % len(PROMPTS)] for i in range(n)]
            prompt_index += n
            for mode, backend in backends.items():  # the same prompts and seed for both modes, back to back
                requests = [ItemRequest(p, K, 1, seed=1000 * repeat + n) for p in prompts]
                started = time.perf_counter()
                items = backend.sample_items(requests, params)
                seconds = time.perf_counter() - started
                tokens = sum(a.token_count for answers in items for a in answers)
                runs.setdefault((mode, n), []).append((n, tokens, seconds))
    print(f"engine: SmolLM2-135M on {device.torch_device} ({device.dtype}), {torch.get_num_threads()} torch threads, "
          f"LoRA r=16 all-linear as version 1, K={K} x max {max_new_tokens} new tokens, {repeats} repeats "
          f"interleaved, load average at start {os.getloadavg()[0]:.1f}")
    baseline = _rate(runs[("unmerged", 1)])[0]
    print(f"{'mode':>9} {'items/call':>10} {'items/s':>8} {'tokens/s':>9} {'s/item':>7} {'vs unmerged x1':>15}")
    for (mode, n), rows in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        items_s, tokens_s = _rate(rows)
        print(f"{mode:>9} {n:>10} {items_s:8.3f} {tokens_s:9.1f} {1 / items_s:7.2f} {items_s / baseline:14.2f}x")


def _rate(rows: list[tuple[int, int, float]]) -> tuple[float, float]:
    items, tokens, seconds = (sum(r[i] for r in rows) for i in range(3))
    return items / seconds, tokens / seconds


def prepare(data_dir: Path, adapter: Path, annotators: int, models_cache: Path) -> tuple[list[str], str]:
    """A data dir with annotator accounts, an admin, the starter prompts and `adapter` deployed as version 1."""
    with Store.open(data_dir) as store:
        store.seed_starter_prompts()
        tokens = [store.users.add(f"serve{i}", "annotator", f"serve{i}-password")[2] for i in range(annotators)]
        admin = store.users.add("serve-admin", "admin", "serve-admin-password")[2]
        version_dir = data_dir / "versions" / "v1"
        (version_dir / "adapter").mkdir(parents=True)
        for f in adapter.iterdir():
            (version_dir / "adapter" / f.name).write_bytes(f.read_bytes())
        store.versions.add(1, 0, "dpo", "candidate", str(version_dir), {}, {}, 0)
        store.versions.deploy(1)
        store.settings.set("deploy_policy", "immediate")
    if (models_cache / "smollm2").is_dir():
        (data_dir / "models").mkdir(parents=True, exist_ok=True)
        os.symlink((models_cache / "smollm2").resolve(), data_dir / "models" / "smollm2")
    return tokens, admin


def annotators(adapter: Path, n: int, think: float, seconds: float, warmup: float, models_cache: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        tokens, admin = prepare(data_dir, adapter, n, models_cache)
        started = time.monotonic()
        server, url = start_server(data_dir, "smollm2", {})
        boss = httpx.Client(base_url=url, headers={"authorization": f"Bearer {admin}"}, timeout=600)
        try:
            print(f"annotators: `prefloop serve` (worker backend, version 1 deployed) up in "
                  f"{time.monotonic() - started:.0f} s; {n} simulated annotators x think {think:.0f} s, "
                  f"{seconds:.0f} s per condition, after {warmup:.0f} s of warm-up; client threads share the "
                  "machine's cores")
            time.sleep(warmup)  # a bench, not a test: the buffer fills from empty before the first annotator arrives
            print(f"{'condition':>10} {'waiting':>8} {'labels/min':>10} {'next p50/p99 ms':>16} "
                  f"{'submit p50/p99 ms':>18} {'204s':>5}")
            _condition("idle", url, tokens, think, seconds)
            with _demo_chat(url, admin):
                _condition("demo chat", url, tokens, think, seconds)
            run = boss.post("/api/train", json={"algorithm": "dpo"})
            run.raise_for_status()
            _condition("round", url, tokens, think, seconds)
            state = boss.get(f"/api/runs/{run.json()['run_id']}").json()
            print(f"  the round was {state['status']} at {100 * (state.get('progress') or 0):.0f}% when the "
                  f"condition ended")
            if state["status"] in ("queued", "running"):
                boss.post(f"/api/runs/{run.json()['run_id']}/cancel")
        finally:
            boss.close()
            server.terminate()
            server.wait(120)


def _condition(name: str, url: str, tokens: list[str], think: float, seconds: float) -> None:
    simulator = Simulator(url, tokens, get_persona("concise"), labels=10**9, timeout=seconds, poll=0.5, think=think)
    s = simulator.run(report=lambda *_: None, every=seconds)
    waiting = s.waiting_seconds / (len(tokens) * s.seconds)
    lat = s.latencies
    latency = (f"{pct(lat['next'], 50):>7}/{pct(lat['next'], 99):<8} "
               f"{pct(lat['ranking'], 50):>8}/{pct(lat['ranking'], 99):<9}")
    errors = f"  errors: {s.errors} {s.error_messages[:2]}" if s.errors else ""
    print(f"{name:>10} {100 * waiting:7.1f}% {60 * s.rankings / s.seconds:10.1f} {latency} {s.empty_polls:5d}{errors}")


class _demo_chat:
    """Back-to-back 256-token /api/generate calls as the admin, in a thread, for the duration of the block."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url, token
        self.stop = threading.Event()
        self.answers: list[float] = []

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {self.token}"}, timeout=600) as c:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                r = c.post("/api/generate", json={"prompt": "Tell me a long story about a lighthouse keeper.",
                                                  "max_new_tokens": 256})
                if r.status_code == 200:
                    self.answers.append(time.perf_counter() - t0)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(600)
        if self.answers:
            print(f"  demo chat: {len(self.answers)} answers of up to 256 tokens, median "
                  f"{statistics.median(self.answers):.1f} s each")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["engine", "annotators", "all"], default="all")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--annotators", type=int, default=8)
    p.add_argument("--think", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--warmup", type=float, default=90.0)
    p.add_argument("--models-cache", type=Path, default=Path("prefloop-data/models"),
                   help="where the converted SmolLM2 lives (converted there on first use)")
    a = p.parse_args()
    model_dir = resolve_model("smollm2", a.models_cache)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(model_dir, Path(tmp) / "adapter")
        if a.part in ("engine", "all"):
            engine(model_dir, adapter, a.repeats, a.max_new_tokens)
        if a.part in ("annotators", "all"):
            annotators(adapter, a.annotators, a.think, a.seconds, a.warmup, a.models_cache)


if __name__ == "__main__":
    main()
