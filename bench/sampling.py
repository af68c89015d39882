"""Tokens/s of prefloop's sampler (`learner.sampling.sample_many`, a KV-cached loop) vs transformers' `generate` on
the same batch, settings and precision, interleaved in one run; and of one batch vs K sequential one-answer calls.

    .venv/bin/python -m bench.sampling [--model smollm2|DIR] [--items 6] [--k 4] [--max-new-tokens 64] [--repeats 3]

`--items` prompts x K answers make one batch (the server samples `batch_items` items per call, a round's rollouts
4-8 prompts). Prints the figures; asserts nothing. The model is converted/cached under --data-dir like the app does.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from learner.model import load_base_model, load_tokenizer, pick_device, resolve_model
from learner.sampling import SamplingParams, encode_prompt, eos_token_ids, left_padded, sample_many

PROMPTS = ["What is 17 + 25?", "Give three tips for sleeping better.", "Explain what a hash table is.",
           "Write a haiku about autumn.", "How do I boil an egg?", "Describe a cat in two sentences.",
           "Why is the sky blue?", "Name three uses of a paperclip."]


@torch.no_grad()
def generate_peer(model, tokenizer, prompts: list[str], k: int, params: SamplingParams, seed: int) -> int:
    """What sample_many did before its loop: ONE `generate` call with the same rows, top-p and temperature (top_k
    off); returns the answer tokens drawn (up to each row's eos)."""
    rows = [ids for ids in (encode_prompt(tokenizer, p) for p in prompts) for _ in range(k)]
    input_ids, attention_mask = left_padded(tokenizer, rows, next(model.parameters()).device)
    torch.manual_seed(seed)
    eos = sorted(eos_token_ids(tokenizer, model))
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                         temperature=params.temperature, top_p=params.top_p, top_k=0,
                         max_new_tokens=params.max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                         remove_invalid_values=True)
    tokens = 0
    for row in out[:, input_ids.shape[1]:].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        tokens += ends[0] if ends else len(row)
    return tokens


def run(model_name: str, data_dir: Path, items: int, k: int, max_new_tokens: int, repeats: int) -> None:
    device = pick_device()
    path = resolve_model(model_name, data_dir / "models")
    model, tokenizer = load_base_model(path, device), load_tokenizer(path)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    with device.compute():
        sample_many(model, tokenizer, ["warm up"], 1, SamplingParams(max_new_tokens=4))
    modes = {
        "prefloop, one batch": lambda prompts, seed: sum(
            a.token_count for g in sample_many(model, tokenizer, prompts, k, params, seed=seed) for a in g),
        "generate, one batch": lambda prompts, seed: generate_peer(model, tokenizer, prompts, k, params, seed),
        "prefloop, K x items one-answer calls": lambda prompts, seed: sum(
            sample_many(model, tokenizer, [p], 1, params, seed=seed * 100 + i)[0][0].token_count
            for p in prompts for i in range(k)),
    }
    runs: dict[str, list[tuple[int, float]]] = {m: [] for m in modes}
    for r in range(repeats):
        prompts = [PROMPTS[(r * items + i) % len(PROMPTS)] for i in range(items)]
        for mode, sample in modes.items():  # interleaved: the machine's load falls on every mode alike
            started = time.perf_counter()
            with device.compute():
                tokens = sample(prompts, r)
            runs[mode].append((tokens, time.perf_counter() - started))
    print(f"model={model_name} device={device.torch_device} precision={device.precision} items={items} k={k} "
          f"rows={items * k} max_new_tokens={max_new_tokens} repeats={repeats} threads={torch.get_num_threads()}")
    rate = {}
    for mode, rows in runs.items():
        tokens, seconds = sum(n for n, _ in rows), sum(s for _, s in rows)
        rate[mode] = tokens / seconds
        print(f"  {mode:>38}: {rate[mode]:7.1f} tokens/s   {statistics.median(s for _, s in rows):6.2f} s per batch "
              f"(median)   {tokens / len(rows) / items:.0f} tokens per item")
    ratio = rate["prefloop, one batch"] / rate["generate, one batch"]
    print(f"  prefloop / generate throughput (same batch): {ratio:.2f}x")
    print(f"  one batch / one-answer calls (prefloop): "
          f"{rate['prefloop, one batch'] / rate['prefloop, K x items one-answer calls']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-dir", type=Path, default=Path("prefloop-data"))
    p.add_argument("--items", type=int, default=6)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    run(a.model, a.data_dir, a.items, a.k, a.max_new_tokens, a.repeats)


if __name__ == "__main__":
    main()
