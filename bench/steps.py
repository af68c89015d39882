"""Where one decode step's time goes: the model's forward alone vs the whole sampling step (`sample_many`), and the
host's time vs the device's (torch.profiler), for each attention backend asked for.

    .venv/bin/python -m bench.steps [--model smollm2|DIR] [--items 1,8] [--k 4] [--max-new-tokens 64]
                                   [--sdpa default,no-cudnn]

Why: on the H200 (2026-12-04, docs/benchmarks.md "On a GPU") a step of 32 rows of SmolLM2-135M took 38.5 ms of
forward passes while the GPU itself worked ~4 ms of it: the host launching ~1,450 kernels a step was the wait, and
cuDNN's attention cost ~440 us of host time per call (30 a step). `--sdpa no-cudnn` turns that backend off
(`torch.backends.cuda.enable_cudnn_sdp(False)`: flash / memory-efficient attention instead) to show what it costs.
On a CPU the same script runs (the backends are a CUDA matter there; `--sdpa default` only). Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from learner.model import load_base_model, load_tokenizer, pick_device, resolve_model
from learner.sampling import SamplingParams, encode_prompt, left_padded, sample_many

PROMPTS = [f"Give me some tips about topic {i}." for i in range(64)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(device: torch.device, work) -> float:
    """Wall seconds of `work()`, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def forward_steps(model, tokenizer, prompts: list[str], k: int, steps: int, compute) -> None:
    """`steps` KV-cached forward passes of the batch sample_many would decode (one token a row each), no sampling:
    the model's share of a decode step."""
    from transformers import StaticCache

    from learner.sampling import cache_argument

    device = next(model.parameters()).device
    rows = [ids for ids in (encode_prompt(tokenizer, p) for p in prompts) for _ in range(k)]
    input_ids, attention_mask = left_padded(tokenizer, rows, device)
    cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + steps)
    name = cache_argument(model)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    for _ in range(steps):
        with compute():
            logits = model(**inputs, **{name: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=-1)
        positions = positions[:, -1:] + 1
        inputs = dict(input_ids=logits.argmax(-1, keepdim=True), attention_mask=attention_mask, position_ids=positions)


def host_and_device_ms(device: torch.device, work) -> tuple[float, float, int]:
    """(host ms, device ms, kernel launches) of `work()` by torch.profiler: the operators' self time on the host,
    the kernels' on the device (0 on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        work()
        synchronize(device)
    events = prof.key_averages()
    host = sum(e.self_cpu_time_total for e in events) / 1000
    on_device = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 1000
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"))
    return host, on_device, launches


def measure(model, tokenizer, device: torch.device, compute, prompts: list[str], k: int,
            params: SamplingParams) -> tuple[float, ...]:
    """(forward ms/step, sampling ms/step, host ms/step, device ms/step, launches/step) of one batch."""
    forward = lambda: forward_steps(model, tokenizer, prompts, k, params.max_new_tokens, compute)  # noqa: E731

    def sample():
        with compute():
            return sample_many(model, tokenizer, prompts, k, params, seed=0)

    forward()  # warm-up: the first call pays allocation and kernel selection
    sample()
    forward_s = seconds(device, forward)
    answers = []
    sample_s = seconds(device, lambda: answers.extend(a for item in sample() for a in item))
    # the batch ends when every row has: the steps it took are its longest answer's (its eos included)
    ran = max(a.token_count + (a.finish_reason == "eos") for a in answers)
    host, on_device, launches = host_and_device_ms(device, sample)
    return (1000 * forward_s / params.max_new_tokens, 1000 * sample_s / ran, host / ran, on_device / ran,
            launches / ran)


def set_sdpa(device: torch.device, choice: str) -> None:
    if choice not in ("default", "no-cudnn"):
        raise SystemExit(f"--sdpa takes default and no-cudnn, got {choice!r}")
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(choice == "default")
    elif choice != "default":
        raise SystemExit("--sdpa no-cudnn is a CUDA setting; on a CPU use --sdpa default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data-dir", type=Path, default=Path("prefloop-data"))
    parser.add_argument("--items", default="1,8", help="items per call, comma-separated (K rows each)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sdpa", default="default", help="attention backends to compare: default,no-cudnn (CUDA)")
    parser.add_argument("--compute", default="device,plain",
                        help="device: under the device's autocast, as the app samples (TransformersBackend); plain: "
                             "in the weights' dtype, no autocast")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    path = resolve_model(args.model, args.data_dir / "models")
    device = pick_device(precision=args.precision)
    model, tokenizer = load_base_model(path, device), load_tokenizer(path)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    print(f"{path.name} on {device.torch_device} ({device.dtype}, autocast {device.autocast}), K={args.k} x "
          f"{params.max_new_tokens} steps, top_p {params.top_p}, {torch.get_num_threads()} torch threads")
    print(f"{'sdpa':>9} {'compute':>7} {'rows':>4} {'forward ms/step':>15} {'sample ms/step':>14} {'host ms/step':>12} "
          f"{'device ms/step':>14} {'launches/step':>13}")
    contexts = {"device": device.compute, "plain": nullcontext}
    for choice, mode, items in itertools.product(args.sdpa.split(","), args.compute.split(","),
                                                 [int(n) for n in args.items.split(",")]):
        if mode not in contexts:
            raise SystemExit(f"--compute takes device and plain, got {mode!r}")
        set_sdpa(device.torch_device, choice)
        figures = measure(model, tokenizer, device.torch_device, contexts[mode], PROMPTS[:items], args.k, params)
        columns = zip(figures, (15, 14, 12, 14, 13), (1, 1, 1, 1, 0))
        print(f"{choice:>9} {mode:>7} {items * args.k:>4} " + " ".join(f"{v:>{w}.{d}f}" for v, w, d in columns))
    set_sdpa(device.torch_device, "default")


if __name__ == "__main__":
    main()
