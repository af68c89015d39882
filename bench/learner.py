"""Learner benchmarks on the real SmolLM2-135M-Instruct. Prints figures; asserts nothing.

    .venv/bin/python -m bench.learner step      # DPO step time + peak memory: reference by disable_adapter() vs a copy
    .venv/bin/python -m bench.learner round     # wall time of one default round, split by phase, + the hot-swap pause
    .venv/bin/python -m bench.learner round --items 24 --round steps=8   # the same with RoundConfig overrides
    .venv/bin/python -m bench.learner round --items 24 --precisions fp32,auto  # one snapshot, a round per precision
    .venv/bin/python -m bench.learner round --items 24 --also lora_layers=10  # one snapshot: default, then overridden
    .venv/bin/python -m bench.learner round --warm  # a first round, then again with the reference cache it filled
    .venv/bin/python -m bench.learner api       # POST /api/train -> the new version's first item from /api/items/next
    .venv/bin/python -m bench.learner rollouts [--adapter DIR]  # a round's rollouts sampled merged vs unmerged
    .venv/bin/python -m bench.learner eval      # the evaluation's sampling: one mixed batch vs alone vs draws reused
    .venv/bin/python -m bench.learner bf16-weights  # DPO losses of first steps with a GPU's bf16 weights, on any device
    .venv/bin/python -m bench.learner all
    .venv/bin/python -m bench.learner --vs-trl  # one DPO step of prefloop vs TRL's DPOTrainer (pip install .[bench])

`step` runs each reference mode in its own process so that peak memory (max RSS on a CPU, max allocated on a GPU)
belongs to that mode alone. `round` and `api` label items with a simple preference (shorter answers first) so the
round has human pairs; `api` runs the server as a separate process with max_item_staleness 0, so the first item served
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
    return f"device: {name}, {d.precision} (PREFLOOP_PRECISION={os.environ.get('PREFLOOP_PRECISION', 'auto')})"


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


# --- vs-trl: one DPO step of prefloop and of TRL's DPOTrainer, interleaved ------------------------------------------
VS_TRL_PAIRS = 4  # 4 pairs = 8 sequences
VS_TRL_LENGTH = 192  # tokens per sequence (prompt + answer), the design's CPU timing size


def _vs_trl_data() -> list[dict]:
    """4 prompts with a chosen and a rejected answer each, long enough to fill 192 tokens with the chat template."""
    fox = "The quick brown fox jumps over the lazy dog. " * 40
    cat = "A small grey cat sleeps on a warm windowsill all afternoon. " * 40
    return [{"prompt": f"Question {i}: describe an animal.", "chosen": fox[i:], "rejected": cat[i:]}
            for i in range(VS_TRL_PAIRS)]


def _prefloop_stepper(path, device, rows, lora_config):
    """A closure running one prefloop DPO step (reference log-probs cached after the first step, as in a round)."""
    from peft import get_peft_model

    from learner.config import RoundConfig
    from learner.model import keep_lora_sums_fp32, load_base_model, load_tokenizer
    from learner.refcache import ReferenceLogps
    from learner.train import PairExample, PolicyContext, step_micro_losses

    tokenizer = load_tokenizer(path)
    model = get_peft_model(load_base_model(path, device), lora_config, adapter_name="policy")
    keep_lora_sums_fp32(model, device)  # as learner.round.build_model does
    model.train()
    config = RoundConfig(max_length=VS_TRL_LENGTH, batch_size=VS_TRL_PAIRS, rpo_alpha=0.0)  # TRL's sigmoid loss alone
    reference = ReferenceLogps(model, tokenizer.pad_token_id, None, 2 * VS_TRL_PAIRS)
    context = PolicyContext(model, tokenizer, config, reference)
    batch = [PairExample(r["prompt"], r["chosen"], r["rejected"], "human", group=str(i)) for i, r in enumerate(rows)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, eps=1e-5, weight_decay=0.0)

    def step() -> None:
        with device.compute():  # as a round runs (learner.round): bf16 autocast where the CPU has native bf16
            for loss, weight, _ in step_micro_losses(context, "dpo", batch):
                (loss * weight).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _trl_stepper(path, device, rows, lora_config, out_dir: Path):
    """A closure running one TRL DPOTrainer step: its own collation, loss and reference forward (TRL's defaults)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from learner.model import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(path)
    model = load_base_model(path, device)
    model.train()
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    args = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=VS_TRL_PAIRS, max_length=VS_TRL_LENGTH,
                     learning_rate=1e-5, beta=0.1, report_to=[], use_cpu=not device.is_cuda,
                     bf16=device.is_cuda or device.autocast is not None, save_strategy="no", logging_strategy="no",
                     max_grad_norm=1.0,
                     gradient_checkpointing=False)  # TRL turns it on by default; prefloop keeps activations too
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=lora_config)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call training_step directly
    batch = next(iter(trainer.get_train_dataloader()))
    lengths = batch["attention_mask"].sum(-1).tolist()
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def step() -> None:
        trainer.training_step(trainer.model, batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step, lengths


def bench_vs_trl(repeats: int) -> None:
    """prefloop's and TRL's DPO steps on SmolLM2, same data, LoRA, reference and precision, interleaved (A B A B ...)
    so a machine busy at one moment slows both; median seconds per step after one warm-up step each. Where the
    device autocasts to bf16 (a CPU with native bf16), prefloop in fp32 runs alongside: the mixed-precision gain."""
    import statistics

    from peft import LoraConfig

    from learner.model import Device, pick_device, resolve_model

    print(device_line())
    device = pick_device()
    path = resolve_model("smollm2", MODELS)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    rows = _vs_trl_data()
    with tempfile.TemporaryDirectory() as tmp:
        steppers = {"prefloop": _prefloop_stepper(path, device, rows, lora)}
        steppers["trl"], lengths = _trl_stepper(path, device, rows, lora, Path(tmp))
        if device.autocast is not None:
            fp32 = Device(device.torch_device, torch.float32)
            steppers["prefloop fp32"] = _prefloop_stepper(path, fp32, rows, lora)
        times: dict[str, list[float]] = {name: [] for name in steppers}
        for repeat in range(repeats + 1):  # repeat 0 warms up (prefloop computes its reference log-probs there)
            for name, step in steppers.items():
                if device.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step()
                if device.is_cuda:
                    torch.cuda.synchronize()
                if repeat:
                    times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"one DPO step, SmolLM2-135M, LoRA r=16 all-linear, {VS_TRL_PAIRS} pairs = {2 * VS_TRL_PAIRS} sequences "
          f"(TRL's rows: {min(lengths)}-{max(lengths)} tokens), reference = the base through the disabled adapter, "
          f"median of {repeats} interleaved repeats, both in {device.precision}:")
    print(f"  prefloop {median['prefloop']:6.2f} s/step (reference log-probs computed once, then cached)")
    print(f"  TRL      {median['trl']:6.2f} s/step (DPOTrainer defaults: a reference forward every step"
          f"{', bf16=True' if device.autocast is not None else ''})")
    print(f"  ratio prefloop / TRL: {median['prefloop'] / median['trl']:.2f} (goal <= 0.75)")
    if "prefloop fp32" in median:
        print(f"  prefloop in float32: {median['prefloop fp32']:6.2f} s/step; bf16 autocast / float32: "
              f"{median['prefloop'] / median['prefloop fp32']:.2f}")


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
    # The same prompts in every run (the newest first; the app's sampler breaks ties at random), so runs of two
    # commits train on the same rankings.
    for prompt in store.prompts.page(limit=n_items).prompts:
        _, answers = policy.sample(prompt.text, 4, SamplingParams(max_new_tokens=64), 0, seed=prompt.prompt_id)
        item = store.items.add(prompt.prompt_id, 0, {"k": 4},
                               [AnswerRecord(a.text, a.token_count, a.finish_reason, a.logprob_sum) for a in answers])
        order = sorted(item.answers, key=lambda a: (len(a.text), a.answer_id))
        store.labels.add_ranking(item.item_id, user.user_id, [a.answer_id for a in order], seconds=1.0)
    print(f"  sampled and ranked {n_items} items (K=4, 64 tokens) in {time.perf_counter() - started:.0f} s")
    return store, policy, token


def bench_round(n_items: int, overrides: dict | None = None, precisions: list[str] | None = None,
                also: dict | None = None, warm: bool = False) -> None:
    """One default round on n_items rankings; with `precisions` (e.g. fp32,auto) the same snapshot is trained once
    per precision, so the figures differ by the precision alone (the items are sampled once, in the default's);
    with `also` (RoundConfig overrides) once more with them on top, so two configs' figures differ by them alone.
    `warm`: the rounds share a reference cache directory, as the server's rounds do (`--ref-cache`), and the first
    config runs once more at the end, finding what the first run left there: the base model's eval answers and the
    reference log-probs of every human answer (a later round in the app finds those of the labels it saw before)."""
    from learner.config import RoundConfig
    from storage.exports import write_snapshot

    print(device_line())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store, policy, _ = labelled_store(tmp / "data", n_items)
        write_snapshot(store, tmp / "snapshot", parent_version=0, base_model=str(policy.base_model_dir))
        variants = [overrides or {}] + ([{**(overrides or {}), **also}] if also else [])
        ref_cache = tmp / "ref-cache" if warm else None
        outs = []
        for i, variant in enumerate(variants + ([variants[0]] if warm else [])):
            config = RoundConfig.from_dict(variant)
            named = ", ".join(f"{k}={v}" for k, v in variant.items())
            title = f"round with {named}" if named else "default round"
            again = " again, the reference cache warm" if i == len(variants) else ""
            print(f"one {title}{again} on {n_items} rankings (DPO, {config.steps} steps, batch {config.batch_size} "
                  f"pairs, reward {config.reward_steps} steps, rollouts {config.rollout_prompts}x{config.rollout_n} "
                  f"every {config.sync_every} steps)")
            for precision in precisions or [None]:
                out = tmp / f"v1-{i}-{precision or 'default'}"
                _round_figures(tmp / "snapshot", policy.base_model_dir, out, config, precision, ref_cache)
                outs.append(out)
        start = time.perf_counter()
        policy.load_adapter(1, outs[-1] / "adapter")
        print(f"  hot-swap load (the adapter merged into a serving copy, on the worker's control lane: requests "
              f"for the serving version go on meanwhile): "
              f"{(time.perf_counter() - start) * 1000:.0f} ms")
        store.close()


def _round_figures(snapshot: Path, base_model_dir: Path, out: Path, config, precision: str | None,
                   ref_cache: Path | None = None) -> None:
    """Run one round (in `precision`, else PREFLOOP_PRECISION's; `ref_cache`: the server's `--ref-cache`) and print
    its time, data and held-out figures."""
    from learner.round import run_round

    previous = os.environ.get("PREFLOOP_PRECISION")
    if precision is not None:
        os.environ["PREFLOOP_PRECISION"] = precision
    try:
        started = time.perf_counter()
        metrics = run_round(snapshot, base_model_dir, None, out, config, ref_cache_dir=ref_cache)
        wall = time.perf_counter() - started
    finally:
        if previous is None:
            os.environ.pop("PREFLOOP_PRECISION", None)
        else:
            os.environ["PREFLOOP_PRECISION"] = previous
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in metrics["timings_s"].items())
    print(f"  [{metrics['precision']}] {wall:.0f} s wall; phases: {phases}")
    data = metrics["data"]
    print(f"    data: {data['steps']} steps, {data['human_uses']} human / {data['onpolicy_uses']} on-policy example "
          f"uses, on-policy {data['onpolicy']}; reference log-probs {data['reference_logps']}; eval answers "
          f"reused {metrics.get('eval_answers_reused') or 'none'}")

    def figure(key: str) -> str:
        f = metrics.get(key)
        return "n/a" if not f else f"{f['value']:.2f} (n={f['n']}, 95% CI [{f['ci95'][0]:.2f}, {f['ci95'][1]:.2f}])"

    losses = [round(h["loss"], 3) for h in metrics["history"] if h.get("loss") is not None]
    print(f"    gate: passed={metrics['gate']['passed']} reason={metrics['gate']['reason']}; "
          f"KL {metrics.get('kl_to_reference')}; policy losses {losses}")
    for key in ("win_rate_vs_parent", "reward_heldout_accuracy", "policy_heldout_accuracy"):
        print(f"    {key}: {figure(key)}")


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
        env = {**os.environ, "PREFLOOP_MAX_ITEM_STALENESS": "0", "PREFLOOP_BUFFER_SIZE": "2"}
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--data-dir", str(data_dir), "--port",
                                   str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {token}"}, timeout=60)
        try:
            _wait(lambda: c.get("/api/health").status_code == 200, 300)
            c.patch("/api/settings", json={"deploy_policy": "immediate"}).raise_for_status()  # no canary: latency
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


ROLLOUT_PROMPTS = ["Explain how tides work.", "Write a haiku about rain.", "What is a good breakfast?",
                   "How do I learn to swim?", "Name three uses of vinegar.", "Why is the sky blue?",
                   "Give three tips for a job interview."]


def bench_rollouts(adapter_dir: str | None, repeats: int) -> None:
    """One regeneration of a default round on 24 rankings (7 prompts x 4 answers, 64 new tokens), sampled from a
    LoRA adapter unmerged and merged into a copy of the weights (`learner.train.merged_adapter`), interleaved; under
    bf16 autocast also merged with the weights left in fp32 (autocast casts them at every matmul, as rounds did before
    `learner.model.autocast_weights` cast them once per call); then how far each computation's next-token
    distributions are from the exact one (fp32, unmerged) along those answers.
    `adapter_dir`: a version's adapter (e.g. prefloop-data/versions/v1/adapter); else a fresh LoRA moved off zero."""
    from learner.config import RoundConfig
    from learner.model import pick_device
    from learner.rollouts import sample_batch
    from learner.sampling import sample_many
    from learner.train import eval_mode, merged_adapter

    print(device_line())
    device, config = pick_device(), RoundConfig()
    model, tokenizer, which = _rollout_model(adapter_dir, device, config)
    params = config.sampling
    print(f"a round's regeneration: {len(ROLLOUT_PROMPTS)} prompts x {config.rollout_n} answers, "
          f"{params.max_new_tokens} new tokens, from {which}")

    def sample(merge: bool, seed: int):
        return sample_batch(model, tokenizer, ROLLOUT_PROMPTS, config.rollout_n, params, seed=seed, merge=merge)

    def fp32_weights(seed: int):  # what sample_batch(merge=True) did before autocast_weights
        with eval_mode(model), merged_adapter(model, model.active_adapter):
            return sample_many(model, tokenizer, ROLLOUT_PROMPTS, config.rollout_n, params, seed=seed)

    ways = {"unmerged": lambda seed: sample(False, seed), "merged": lambda seed: sample(True, seed)}
    if device.casts_weights is not None:
        ways["merged, fp32 weights cast at every matmul"] = fp32_weights
    times = {way: [] for way in ways}
    for r in range(repeats):
        for way, run in ways.items():
            with device.compute():
                started = time.perf_counter()
                answers = run(seed=r)
                seconds = time.perf_counter() - started
            times[way].append(seconds)
            tokens = sum(a.token_count for g in answers for a in g)
            print(f"  repeat {r + 1}: {way:42s} {seconds:6.2f} s, {tokens} tokens, {tokens / seconds:6.1f} tokens/s",
                  flush=True)
    median = {way: sorted(t)[len(t) // 2] for way, t in times.items()}
    print("  median: " + ", ".join(f"{way} {m:.2f} s ({m / median['unmerged']:.2f}x)" for way, m in median.items()))
    with device.compute():
        answers = sample(False, seed=repeats)
    _print_fidelity(model, tokenizer, device, config, answers)


EVAL_PROMPTS = ROLLOUT_PROMPTS[:4]  # a default round's eval_prompts


def bench_eval(repeats: int) -> None:
    """The evaluation's sampling (4 eval prompts x eval_n 2 answers x 64 new tokens, per model): the policy, the
    parent and the base in one mixed-adapter batch (how rounds sampled before reuse), the three each alone (a round
    with nothing stored: the first round on a base model, or a parent without eval_answers.json), and the policy
    alone (a round in a chain: the base's and the parent's draws reused); interleaved repeats."""
    from learner.config import RoundConfig
    from learner.evaluate import sample_eval_answers
    from learner.model import pick_device
    from learner.sampling import sample_many

    print(device_line())
    device, config = pick_device(), RoundConfig()
    model, tokenizer, which = _rollout_model(None, device, config)
    model.add_adapter("parent", copy.deepcopy(model.peft_config["policy"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".parent." in name and "lora_B" in name:
                param.normal_(0.0, 0.01)
    model.set_adapter("policy")
    params, n, merge = config.sampling, config.eval_n, device.merges_for_sampling
    print(f"eval sampling: {len(EVAL_PROMPTS)} prompts x {n} answers x 3 models, {params.max_new_tokens} new tokens; "
          f"policy and parent {which}; adapters merged while sampling alone: {merge}")

    def mixed():
        rows = EVAL_PROMPTS * 3
        return sample_many(model, tokenizer, rows, n, params, seed=1,
                           adapters=[a for a in ("policy", "__base__", "parent") for _ in EVAL_PROMPTS])

    stored = {}

    def alone():
        answers = sample_eval_answers(model, tokenizer, EVAL_PROMPTS, n, params, 1, True, "parent", merge=merge)
        stored.update(base=answers.base, parent=answers.parent)
        return answers

    def chained():
        return sample_eval_answers(model, tokenizer, EVAL_PROMPTS, n, params, 1, True, "parent", merge=merge,
                                   base=stored["base"], parent_answers=stored["parent"])

    ways = {"one mixed batch of 3 models": mixed, "3 models each alone": alone, "policy alone, 2 draws reused": chained}
    times = {w: [] for w in ways}
    for r in range(repeats):
        for way, run in ways.items():
            with device.compute():
                model.eval()
                started = time.perf_counter()
                run()
                times[way].append(time.perf_counter() - started)
            print(f"  repeat {r + 1}: {way:30s} {times[way][-1]:6.2f} s", flush=True)
    median = {w: sorted(t)[len(t) // 2] for w, t in times.items()}
    first = median["one mixed batch of 3 models"]
    print("  median: " + ", ".join(f"{w} {m:.2f} s ({m / first:.2f}x)" for w, m in median.items()))


def _rollout_model(adapter_dir: str | None, device, config):
    """(PeftModel with the adapter "policy" as a round builds it, tokenizer, what the adapter is in words)."""
    from peft import PeftModel, get_peft_model

    from learner.model import keep_lora_sums_fp32, load_base_model, load_tokenizer
    from learner.round import lora_config

    path = MODELS / "smollm2"
    tokenizer, base = load_tokenizer(path), load_base_model(path, device)
    if adapter_dir:
        model = PeftModel.from_pretrained(base, adapter_dir, adapter_name="policy", is_trainable=True)
        which = f"the adapter in {adapter_dir}"
    else:
        model = get_peft_model(base, lora_config(config, base), adapter_name="policy")
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.01)
        which = "a fresh LoRA with lora_B ~ N(0, 0.01)"
    keep_lora_sums_fp32(model, device)
    return model, tokenizer, which


def _print_fidelity(model, tokenizer, device, config, answers) -> None:
    """Per-token KL from the exact next-token distributions (fp32, adapter unmerged) to each other computation's,
    along the sampled answers, with the adapter's own effect (KL to the base model) for scale."""
    from contextlib import nullcontext

    from learner.logprobs import collate, encode_answer
    from learner.train import merged_adapter, use_adapter

    encoded = [encode_answer(tokenizer, p, a.text, config.max_length, a.finish_reason == "eos")
               for p, group in zip(ROLLOUT_PROMPTS, answers) for a in group]
    ids, attention, answer_mask = collate(encoded, tokenizer.pad_token_id, torch.device("cpu"))
    mask = answer_mask[:, 1:].float()

    def log_probs(autocast: bool, how: str) -> torch.Tensor:
        around = {"unmerged": nullcontext, "merged": lambda: merged_adapter(model, "policy"),
                  "base": lambda: use_adapter(model, None)}[how]
        model.eval()
        with torch.no_grad(), around(), (device.compute() if autocast else nullcontext()):
            out = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        return torch.log_softmax(out, dim=-1)

    def kl(p: torch.Tensor, q: torch.Tensor) -> float:
        return float(((p.exp() * (p - q)).sum(-1) * mask).sum() / mask.sum())

    exact = log_probs(False, "unmerged")
    print(f"  per-token KL(exact || computation) along {int(mask.sum())} sampled answer tokens (exact: fp32 weights "
          f"and matmuls, adapter unmerged):")
    print(f"    fp32 merged {kl(exact, log_probs(False, 'merged')):.2e}")
    if device.autocast is not None:
        print(f"    {device.precision}: unmerged {kl(exact, log_probs(True, 'unmerged')):.2e}, "
              f"merged {kl(exact, log_probs(True, 'merged')):.2e}; the base model's own rounding (fp32 vs "
              f"autocast base) {kl(log_probs(False, 'base'), log_probs(True, 'base')):.2e}")
    print(f"    the adapter's effect for scale: KL(exact || fp32 base) {kl(exact, log_probs(False, 'base')):.2e}")


def bench_bf16_weights(steps: int = 2) -> None:
    """The DPO loss over a fresh LoRA's first steps (4 pairs of the model's own answers, the round's lr and AdamW) in
    fp32, with bf16 weights and no autocast (how a GPU computed before `cuda_device`), and with bf16 weights under
    bf16 autocast with fp32 LoRA sums (how it computes now), on this machine's device: a CPU without native bf16
    emulates it (slowly: ~20 minutes on 2 AVX2 cores)."""
    from learner.config import RoundConfig
    from learner.logprobs import encode_answer, sequence_logprobs
    from learner.losses import dpo_loss
    from learner.model import Device, load_base_model, load_tokenizer, resolve_model
    from learner.round import build_model
    from learner.sampling import sample_many

    config = RoundConfig()
    where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model("smollm2", MODELS)
    tokenizer = load_tokenizer(path)
    prompts = ["Write a short poem about the sea.", "Explain photosynthesis simply.",
               "Give three tips for sleeping well.", "What is a hash table?"]
    answers = sample_many(load_base_model(path, Device(where, torch.float32)), tokenizer, prompts, 2, config.sampling,
                          seed=1)
    encoded = [encode_answer(tokenizer, p, a[j].text, config.max_length, a[j].finish_reason == "eos")
               for j in (0, 1) for p, a in zip(prompts, answers)]  # chosen: first answers, rejected: second
    print(f"bf16 weights: DPO loss of a fresh LoRA r={config.lora_r}, 4 pairs, lr {config.learning_rate}, on {where}")
    bf16 = torch.bfloat16
    for name, device in [("fp32 (exact)", Device(where, torch.float32)),
                         ("bf16 weights, no autocast", Device(where, bf16)),
                         ("bf16 weights, bf16 autocast, fp32 LoRA sums", Device(where, bf16, bf16))]:
        model, _ = build_model(path, None, config, device)  # a round's fresh LoRA (fp32 sums under autocast only)
        with torch.no_grad(), device.compute(), model.disable_adapter():
            ref = sequence_logprobs(model, encoded, tokenizer.pad_token_id).logps.float()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, eps=config.adam_eps)
        losses = []
        for _ in range(steps + 1):
            with device.compute():
                logps = sequence_logprobs(model, encoded, tokenizer.pad_token_id).logps.float()
            loss = dpo_loss(logps[:4], logps[4:], ref[:4], ref[4:], beta=config.beta)[0]
            losses.append(round(float(loss), 4))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
        print(f"  {name:45s} losses at steps 0..{steps}: {losses}", flush=True)


def main() -> None:
    if sys.argv[1:2] == ["_step"]:
        print(json.dumps(step_once(sys.argv[2])))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", default=None,
                   choices=["step", "round", "api", "rollouts", "eval", "bf16-weights", "all"])
    p.add_argument("--items", type=int, default=12, help="labelled items (rankings) the rounds learn from")
    p.add_argument("--vs-trl", action="store_true", help="one DPO step of prefloop vs TRL's DPOTrainer, interleaved")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats of --vs-trl, rollouts and eval")
    p.add_argument("--adapter", metavar="DIR", help="rollouts: a version's adapter dir (default: a fresh LoRA)")
    p.add_argument("--precisions", metavar="P,P", help="round: train the same snapshot once per precision "
                   "(e.g. fp32,auto), sampled once in the default's")
    p.add_argument("--round", action="append", default=[], metavar="KEY=JSON",
                   help="RoundConfig override for `round`, e.g. steps=8 (repeatable)")
    p.add_argument("--also", action="append", default=[], metavar="KEY=JSON",
                   help="round: train the same snapshot again with these overrides on top (repeatable)")
    p.add_argument("--warm", action="store_true", help="round: the rounds share a reference cache, as the server's "
                   "do, and the first config runs again at the end with what it left there")
    a = p.parse_args()
    if a.what is None and not a.vs_trl:
        p.error("name a benchmark (step, round, api, rollouts, eval, bf16-weights, all) or pass --vs-trl")
    if a.vs_trl:
        bench_vs_trl(a.repeats)
    if a.what in ("step", "all"):
        bench_step()
    if a.what in ("round", "all"):
        from bench.loop_results import round_overrides  # one parser of KEY=JSON for every benchmark

        bench_round(a.items, round_overrides(a.round), a.precisions.split(",") if a.precisions else None,
                    round_overrides(a.also), a.warm)
    if a.what in ("api", "all"):
        bench_api(a.items)
    if a.what in ("rollouts", "all"):
        bench_rollouts(a.adapter, a.repeats)
    if a.what in ("eval", "all"):
        bench_eval(a.repeats)
    if a.what == "bf16-weights":  # not in "all": an emulated bf16 CPU takes ~20 minutes
        bench_bf16_weights()


if __name__ == "__main__":
    main()
