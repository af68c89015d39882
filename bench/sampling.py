"""Tokens/s of K answers in ONE batched generate call vs K sequential calls (same model, same settings).

    .venv/bin/python -m bench.sampling [--model smollm2|DIR] [--k 4] [--max-new-tokens 64] [--repeats 3]

Prints the figures; asserts nothing. The model is converted/cached under --data-dir like the app does.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from learner.model import load_base_model, load_tokenizer, pick_device, resolve_model
from learner.sampling import SamplingParams, sample_answers

PROMPTS = ["What is 17 + 25?", "Give three tips for sleeping better.", "Explain what a hash table is.",
           "Write a haiku about autumn."]


def run(model_name: str, data_dir: Path, k: int, max_new_tokens: int, repeats: int) -> None:
    torch.set_num_threads(torch.get_num_threads())
    device = pick_device()
    path = resolve_model(model_name, data_dir / "models")
    model, tokenizer = load_base_model(path, device), load_tokenizer(path)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    sample_answers(model, tokenizer, "warm up", 1, SamplingParams(max_new_tokens=4))
    rows = {"batched": [], "sequential": []}
    for r in range(repeats):
        prompt = PROMPTS[r % len(PROMPTS)]
        t = time.perf_counter()
        answers = sample_answers(model, tokenizer, prompt, k, params, seed=r)
        rows["batched"].append((sum(a.token_count for a in answers), time.perf_counter() - t))
        t = time.perf_counter()
        answers = [sample_answers(model, tokenizer, prompt, 1, params, seed=r * 100 + i)[0] for i in range(k)]
        rows["sequential"].append((sum(a.token_count for a in answers), time.perf_counter() - t))
    print(f"model={model_name} device={device.torch_device} dtype={device.dtype} k={k} "
          f"max_new_tokens={max_new_tokens} repeats={repeats} threads={torch.get_num_threads()}")
    for mode, runs in rows.items():
        tokens = sum(n for n, _ in runs)
        seconds = sum(s for _, s in runs)
        print(f"{mode:>10}: {tokens / seconds:7.1f} tokens/s   {statistics.median(s for _, s in runs):6.2f} s "
              f"per item (median)   {tokens / len(runs):.0f} tokens per item")
    speedup = (sum(n for n, _ in rows["batched"]) / sum(s for _, s in rows["batched"])) / (
        sum(n for n, _ in rows["sequential"]) / sum(s for _, s in rows["sequential"]))
    print(f"batched / sequential throughput: {speedup:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-dir", type=Path, default=Path("prefloop-data"))
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    run(a.model, a.data_dir, a.k, a.max_new_tokens, a.repeats)


if __name__ == "__main__":
    main()
