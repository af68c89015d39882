"""Learner benchmarks on the real SmolLM2-135M-Instruct. Prints figures; asserts nothing.

    .venv/bin/python -m bench.learner step      # DPO step time + peak memory: reference by disable_adapter() vs a copy
    .venv/bin/python -m bench.learner round     # wall time of one default round, split by phase, + the hot-swap pause
    .venv/bin/python -m bench.learner api       # POST /api/train -> the new version's first item from /api/items/next
    .venv/bin/python -m bench.learner all

`step` runs each reference mode in its own process so that peak memory (max RSS on a CPU, max allocated on a GPU)
belongs to that mode alone. `round` and `api` label items with a simple preference (shorter answers first) so the
round has human pairs; `api` runs the server as a separate process with max_staleness 0, so the first item served
after the deploy is one the new version sampled.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "prefloop-data" / "models"  # the default data dir's converted model, shared with the app


def device_line() -> str:
    from learner.model import pick_device

    d = pick_device()
    cpu = f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    name = torch.cuda.get_device_name() if d.is_cuda else cpu
    return f"device: {name}, dtype {d.dtype}"


# --- step: reference through the disabled adapter vs a second copy of the weights --------------------------------
def step_once(ref_mode: str, steps: int = 3) -> dict:
    from peft import LoraConfig, get_peft_model

    from learner.logprobs import encode_answer, sequence_logprobs
    from learner.losses import dpo_loss
    from learner.model import load_base_model, load_tokenizer, pick_device, resolve_model

    device = pick_device()
    path = resolve_model("smollm2", MODELS)
    tokenizer = load_tokenizer(path)
    base = load_base_model(path, device)
    reference = copy.deepcopy(base) if ref_mode == "copy" else None
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    # 4 pairs = 8 sequences of 192 tokens (the size of the design's CPU timing).
    filler = "The quick brown fox jumps over the lazy dog. " * 40
    encoded = [encode_answer(tokenizer, f"Question {i}: describe a fox.", filler[i:], 192) for i in range(8)]
    assert all(len(e.input_ids) == 192 for e in encoded)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, eps=1e-5)
    times = []
    if device.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        policy = sequence_logprobs(model, encoded, tokenizer.pad_token_id)
        with torch.no_grad():
            if reference is None:
                with model.disable_adapter():
                    ref = sequence_logprobs(model, encoded, tokenizer.pad_token_id)
            else:
                ref = sequence_logprobs(reference, encoded, tokenizer.pad_token_id)
        pc, pr = policy.split(4)
        rc, rr = ref.split(4)
        loss, _ = dpo_loss(pc.logps, pr.logps, rc.logps, rr.logps, beta=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.is_cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.is_cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"ref": ref_mode, "step_s": sum(times) / len(times), "peak_mib": peak,
            "peak_kind": "max allocated (GPU)" if device.is_cuda else "max RSS of the process"}


def bench_step() -> None:
    print(device_line())
    print("DPO step: LoRA r=16 all-linear, 4 pairs = 8 sequences x 192 tokens, mean of 3 steps after 1 warm-up")
    for mode in ("adapter", "copy"):
        out = subprocess.run([sys.executable, "-m", "bench.learner", "_step", mode], capture_output=True, text=True,
                             cwd=ROOT)
        if out.returncode != 0:
            print(out.stderr[-2000:])
            raise SystemExit(1)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        label = "disable_adapter() reference" if mode == "adapter" else "separate reference copy  "
        print(f"  {label}: {r['step_s']:6.2f} s/step   peak {r['peak_mib']:7.0f} MiB ({r['peak_kind']})")


# --- round: a labelled store, one default round in-process, the swap ----------------------------------------------
def labelled_store(data_dir: Path, n_items: int):
    """A store with n_items sampled by SmolLM2 and ranked shortest-first by one annotator."""
    from app.policy import PolicyService
    from learner.sampling import SamplingParams
    from storage.items import AnswerRecord
    from storage.store import Store

    store = Store.open(data_dir)
    store.seed_starter_prompts()
    if not (data_dir / "models" / "smollm2").exists() and (MODELS / "smollm2").exists():
        (data_dir / "models").mkdir(parents=True, exist_ok=True)
        os.symlink(MODELS.resolve() / "smollm2", data_dir / "models" / "smollm2")
    policy = PolicyService.load("smollm2", data_dir / "models")
    user, _, token = store.users.add("bench", "admin", "bench-password")
    started = time.perf_counter()
    for prompt in store.prompts.least_sampled(n_items):
        _, answers = policy.sample(prompt.text, 4, SamplingParams(max_new_tokens=64), seed=prompt.prompt_id)
        item = store.items.add(prompt.prompt_id, 0, {"k": 4},
                               [AnswerRecord(a.text, a.token_count, a.finish_reason, a.logprob_sum) for a in answers])
        order = sorted(item.answers, key=lambda a: (len(a.text), a.answer_id))
        store.labels.add_ranking(item.item_id, user.user_id, [a.answer_id for a in order], seconds=1.0)
    print(f"  sampled and ranked {n_items} items (K=4, 64 tokens) in {time.perf_counter() - started:.0f} s")
    return store, policy, token


def bench_round(n_items: int) -> None:
    from learner.config import RoundConfig
    from learner.round import run_round
    from storage.exports import write_snapshot

    print(device_line())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store, policy, _ = labelled_store(tmp / "data", n_items)
        write_snapshot(store, tmp / "snapshot", parent_version=0, base_model=str(policy.base_model_dir))
        config = RoundConfig()
        started = time.perf_counter()
        metrics = run_round(tmp / "snapshot", policy.base_model_dir, None, tmp / "v1", config)
        wall = time.perf_counter() - started
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in metrics["timings_s"].items())
        print(f"one default round (DPO, {config.steps} steps, batch {config.batch_size} pairs, reward "
              f"{config.reward_steps} steps, rollouts {config.rollout_prompts}x{config.rollout_n} every "
              f"{config.sync_every} steps): {wall:.0f} s wall")
        print(f"  phases: {phases}")
        print(f"  gate: {metrics['gate']}; win-rate vs parent {metrics.get('win_rate_vs_parent')}, "
              f"KL {metrics.get('kl_to_reference')}, RM held-out accuracy {metrics.get('reward_heldout_accuracy')}")
        start = time.perf_counter()
        policy.deploy(1, tmp / "v1" / "adapter")
        print(f"  hot-swap pause (load the adapter + switch, under the model lock): "
              f"{(time.perf_counter() - start) * 1000:.0f} ms")
        store.close()


# --- api: POST /api/train until the new version answers /api/items/next ------------------------------------------
def bench_api(n_items: int) -> None:
    import httpx

    from app.server import free_port

    print(device_line())
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        store, _, token = labelled_store(data_dir, n_items)
        store.close()
        port = free_port()
        env = {**os.environ, "PREFLOOP_MAX_STALENESS": "0", "PREFLOOP_BUFFER_SIZE": "2"}
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--data-dir", str(data_dir), "--port",
                                   str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {token}"}, timeout=60)
        try:
            _wait(lambda: c.get("/api/health").status_code == 200, 300)
            # The gate is opened (min_win_rate 0) so the round deploys whatever it learns: this measures latency.
            started = time.perf_counter()
            run_id = c.post("/api/train", json={"algorithm": "dpo", "min_win_rate": 0.0}).json()["run_id"]
            _wait(lambda: c.get(f"/api/runs/{run_id}").json()["status"] not in ("queued", "running"), 1800)
            run = c.get(f"/api/runs/{run_id}").json()
            deployed_at = time.perf_counter()
            print(f"round {run['status']} in {deployed_at - started:.0f} s (version {run['version']})")
            while True:
                r = c.get("/api/items/next")
                if r.status_code == 200:
                    break
                time.sleep(0.2)
            answered = time.perf_counter()
            print("POST /api/train -> first item of the new version from GET /api/items/next: "
                  f"{answered - started:.0f} s"
                  f" (of which {answered - deployed_at:.1f} s after the deploy: sampling the first new item)")
        finally:
            server.terminate()
            server.wait(30)


def _wait(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception:  # the server is still starting
            pass
        time.sleep(0.5)
    raise SystemExit(f"timed out after {timeout} s")


def main() -> None:
    if sys.argv[1:2] == ["_step"]:
        print(json.dumps(step_once(sys.argv[2])))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["step", "round", "api", "all"])
    p.add_argument("--items", type=int, default=12, help="labelled items (rankings) the rounds learn from")
    a = p.parse_args()
    if a.what in ("step", "all"):
        bench_step()
    if a.what in ("round", "all"):
        bench_round(a.items)
    if a.what in ("api", "all"):
        bench_api(a.items)


if __name__ == "__main__":
    main()
