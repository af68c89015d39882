"""Load: N concurrent simulated annotators for S seconds against `prefloop serve` in its own process; prints the
p50/p99 latency of next-item and submit, the errors (must be 0) and the labels lost (must be 0).

    .venv/bin/python -m bench.load [--annotators 50] [--seconds 120] [--mode prefilled|prefetch]
                                   [--model smollm2|tiny|DIR] [--items 8000] [--think 0]

prefilled (default): the data dir holds --items ready items and background sampling is off, so the figures measure
    the label path (as bench/labels.py does). The server is otherwise the default one.
prefetch: no items up front; the server's real prefetcher samples them with --model while the annotators work
    (`tiny`: a 2-layer random Llama with SmolLM2's tokenizer, built here; `smollm2`: the real one, slow on a CPU).
    Annotators then wait on generation: the 204 answers ("nothing waits") are counted, not errors.

Annotators are app.simulate's threads (persona `concise`, one account each) in this process, so the client shares
the machine's cores with the server. Labels lost = rankings the server acknowledged (201) that the rankings export
does not hold; duplicates = ranking ids the export holds twice. Prints; asserts nothing; exit 1 if errors or losses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from app.personas import get_persona
from app.server import free_port
from app.simulate import Simulator
from storage.items import AnswerRecord
from storage.store import Store


def build_tiny_model(out: Path) -> Path:
    """A 2-layer random Llama (hidden 32) with SmolLM2's real tokenizer, as tests/conftest.py builds it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from learner.model import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prefill(data_dir: Path, n_items: int, n_users: int) -> tuple[list[str], str]:
    """Annotator tokens and an admin token; `n_items` ready items with short, distinct answers."""
    with Store.open(data_dir) as store:
        store.seed_starter_prompts()
        prompts = store.prompts.least_sampled(1000)
        tokens = [store.users.add(f"load{i}", "annotator", f"load{i}-password")[2] for i in range(n_users)]
        admin = store.users.add("load-admin", "admin", "load-admin-password")[2]
        for i in range(n_items):
            answers = [AnswerRecord(" ".join(["word"] * (j + 1)) + f" {i}", j + 2, "eos", -3.0) for j in range(4)]
            store.items.add(prompts[i % len(prompts)].prompt_id, 0, {"k": 4}, answers)
    return tokens, admin


def start_server(data_dir: Path, model: str, env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(data_dir.parent / "server.log", "wb") as log:  # the child holds its own copy of the descriptor
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--data-dir", str(data_dir),
                                   "--port", str(port), "--model", model], env={**os.environ, **env},
                                  stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            server.wait()
            tail = (data_dir.parent / "server.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"the server did not start; the end of its log:\n{tail}")  # its dir may be a temp one
        time.sleep(0.5)


def pct(values: list[float], q: int) -> str:
    if len(values) < 2:
        return "n/a"
    return f"{statistics.quantiles(values, n=100, method='inclusive')[q - 1] * 1000:.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--annotators", type=int, default=50)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--mode", choices=["prefilled", "prefetch"], default="prefilled")
    p.add_argument("--model", default="smollm2", help="smollm2 (default), tiny (built here) or a HF model dir")
    p.add_argument("--items", type=int, default=8000, help="ready items in prefilled mode (more than get ranked)")
    p.add_argument("--think", type=float, default=0.0, help="seconds each annotator pauses after a label")
    p.add_argument("--poll", type=float, default=0.5, help="seconds an annotator waits after a 204 (nothing waits)")
    p.add_argument("--max-new-tokens", type=int, help="answer length cap of the server (default: the server's)")
    p.add_argument("--models-cache", type=Path, default=Path("prefloop-data/models"),
                   help="reuse the converted SmolLM2 of the default data dir")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        n_items = a.items if a.mode == "prefilled" else 0
        tokens, admin = prefill(data_dir, n_items, a.annotators)
        model = a.model
        if model == "tiny":
            model = str(build_tiny_model(Path(tmp) / "tiny"))
        elif model == "smollm2" and (a.models_cache / "smollm2").is_dir():
            (data_dir / "models").mkdir(parents=True, exist_ok=True)
            os.symlink((a.models_cache / "smollm2").resolve(), data_dir / "models" / "smollm2")
        env = {"PREFLOOP_PREFETCH": "false"} if a.mode == "prefilled" else {}
        if a.max_new_tokens:
            env["PREFLOOP_MAX_NEW_TOKENS"] = str(a.max_new_tokens)
        started = time.monotonic()
        server, url = start_server(data_dir, model, env)
        try:
            print(f"machine: {os.cpu_count()} cores; server: `prefloop serve` in its own process (model {a.model}, "
                  f"{a.mode}, {n_items} items up front) up in {time.monotonic() - started:.0f} s; client: "
                  f"{a.annotators} annotator threads + httpx in one process (sharing the cores), think "
                  f"{a.think} s, poll {a.poll} s; {a.seconds:.0f} s")
            simulator = Simulator(url, tokens, get_persona("concise"), labels=10**9, timeout=a.seconds, poll=a.poll,
                                  think=a.think)
            s = simulator.run(report=print, every=max(a.seconds / 6, 5))
            r = httpx.get(f"{url}/api/export", params={"format": "rankings"},
                          headers={"authorization": f"Bearer {admin}"}, timeout=300)
            r.raise_for_status()
            stored = Counter(json.loads(line)["ranking_id"] for line in r.text.splitlines() if line)
        finally:
            server.terminate()
            server.wait(60)
    lost = set(s.acknowledged) - set(stored)
    duplicates = sum(n > 1 for n in stored.values())
    lat = s.latencies
    served = len(lat["next"]) - s.empty_polls
    print(f"{s.rankings} rankings in {s.seconds:.1f} s = {s.rankings / s.seconds:.1f} labels/s; "
          f"next-item calls {len(lat['next'])} ({served} items, {s.empty_polls} x 204 nothing waits)")
    print(f"latency ms p50/p99: next-item {pct(lat['next'], 50)}/{pct(lat['next'], 99)}, "
          f"submit {pct(lat['ranking'], 50)}/{pct(lat['ranking'], 99)}")
    print(f"errors: {s.errors}; labels lost: {len(lost)}; duplicated: {duplicates}; "
          f"stored rankings {sum(stored.values())}, acknowledged {len(s.acknowledged)}")
    for message in s.error_messages:
        print(f"  error: {message}")
    return 1 if s.errors or lost or duplicates else 0


if __name__ == "__main__":
    sys.exit(main())
