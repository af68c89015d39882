"""A training round as a job: snapshot dir + base model dir + parent version dir + RoundConfig -> a version dir.

    python -m learner.round --snapshot DIR --base DIR [--parent DIR] --out DIR [--config FILE.json] [--set k=v]

prints one JSON object per line on stdout: {"event": "progress", "phase", "step", "total", "loss", "progress"}
while it runs, then {"event": "done", "status": "candidate"|"rejected", "reason"} (or {"event": "error", ...}).
The same module runs under `accelerate launch -m learner.round ...` on several GPUs.

Version directory: adapter/ (the policy LoRA), reward/ (reward LoRA + head), metrics.json, config.json; written
to `<out>.partial` and renamed to `<out>` only when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from learner.config import RoundConfig
from learner.errors import LearnerError
from learner.evaluate import evaluate_policy, gate
from learner.losses import kto_weight_warning
from learner.model import Device, load_base_model, load_tokenizer, pick_device
from learner.reward import (
    attach_reward_model,
    items_from_pairs,
    pair_accuracy,
    save_reward_model,
    split_items,
    train_reward_model,
)
from learner.rollouts import HUMAN_DATA, ExamplePool, human_examples, onpolicy_examples, split_prompts
from learner.train import OBJECTIVES, PolicyContext, train_loop, training_adapter

log = logging.getLogger(__name__)

POLICY, PARENT = "policy", "parent"  # adapter names on the one PeftModel (the reward model's is "reward")
PHASES = {"reward": (0.0, 0.25), "rollouts": (0.25, 0.85), "policy": (0.25, 0.85), "eval": (0.85, 1.0)}
Progress = Callable[[dict], None]


@dataclass
class Snapshot:
    """The Parquet files storage writes for a round, and its meta.json."""

    pairs: pd.DataFrame
    unary: pd.DataFrame
    prompts: pd.DataFrame
    meta: dict


SNAPSHOT_COLUMNS = {
    "pairs.parquet": ["item_id", "policy_version", "prompt", "chosen_answer_id", "chosen", "rejected_answer_id",
                      "rejected"],
    "unary.parquet": ["item_id", "policy_version", "prompt", "completion", "label"],
    "prompts.parquet": ["prompt_id", "prompt"],
}


def read_snapshot(snapshot_dir: Path) -> Snapshot:
    snapshot_dir = Path(snapshot_dir)
    frames = {}
    for name, columns in SNAPSHOT_COLUMNS.items():
        path = snapshot_dir / name
        if not path.is_file():
            raise LearnerError(f"snapshot {snapshot_dir} has no {name}")
        frame = pd.read_parquet(path)
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise LearnerError(f"{path} lacks the columns {', '.join(missing)}")
        frames[name] = frame
    meta_path = snapshot_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return Snapshot(frames["pairs.parquet"], frames["unary.parquet"], frames["prompts.parquet"], meta)


def within_staleness(frame: pd.DataFrame, parent_version: int, max_staleness: int | None) -> pd.DataFrame:
    """Labels on answers generated at most `max_staleness` versions before the parent (None: all of them)."""
    if max_staleness is None:
        return frame
    staleness = parent_version - frame["policy_version"]
    return frame[staleness.notna() & (staleness <= max_staleness)]


def staleness_stats(frame: pd.DataFrame, parent_version: int) -> dict:
    staleness = (parent_version - frame["policy_version"]).dropna().astype(int)
    if staleness.empty:
        return {"mean": None, "max": None, "counts": {}}
    return {"mean": float(staleness.mean()), "max": int(staleness.max()),
            "counts": {str(k): int(v) for k, v in staleness.value_counts().sort_index().items()}}


def _report(progress: Progress | None, phase: str, step: int, total: int, loss: float | None = None,
            within: float | None = None, metrics: dict | None = None) -> None:
    """One progress event; `within` is how far through its phase the round is (default step / total).
    A training step's other metrics (reward margin, KL, grad norm...) ride along under their own names."""
    if progress is None:
        return
    start, end = PHASES[phase]
    if within is None:
        within = step / total if total else 1.0
    extra = {k: v for k, v in (metrics or {}).items() if k not in ("step", "loss")}
    event = {**extra, "phase": phase, "step": step, "total": total, "loss": loss,
             "progress": round(start + (end - start) * within, 4)}
    progress(_json_safe(event))


def build_model(base_model_dir: Path, parent_dir: Path | None, config: RoundConfig, device: Device):
    """The base model once, with the trainable "policy" adapter (the parent's, or a fresh LoRA for version 0)
    and a frozen copy of the parent's as "parent" (win-rate vs parent, and the reference with ref_sync)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_base_model(base_model_dir, device)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules, task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)  # the same fresh LoRA on every process under accelerate launch
    if parent_dir is None:
        model = get_peft_model(base, lora, adapter_name=POLICY)
    else:
        # Continue the parent's adapter (is_trainable), not a fresh LoRA stacked on top of it.
        model = PeftModel.from_pretrained(base, str(parent_dir / "adapter"), adapter_name=POLICY, is_trainable=True)
        model.load_adapter(str(parent_dir / "adapter"), adapter_name=PARENT, is_trainable=False)
    return model, lora


def run_round(snapshot_dir: Path, base_model_dir: Path, parent_dir: Path | None, out_dir: Path, config: RoundConfig,
              progress: Progress | None = None) -> dict:
    """Run one round and write the version directory; returns its metrics (incl. "gate" and "status")."""
    from accelerate import Accelerator

    snapshot_dir, base_model_dir, out_dir = Path(snapshot_dir), Path(base_model_dir), Path(out_dir)
    parent_dir = Path(parent_dir) if parent_dir is not None else None
    if out_dir.exists():
        raise LearnerError(f"{out_dir} already exists; a version directory is written once")
    snapshot = read_snapshot(snapshot_dir)
    if parent_dir is not None and "parent_version" not in snapshot.meta:
        raise LearnerError(f"{snapshot_dir}/meta.json has no parent_version, needed to measure staleness")
    parent_version = int(snapshot.meta.get("parent_version", 0))
    device = pick_device()
    accelerator = Accelerator(cpu=not device.is_cuda)
    device = Device(accelerator.device, device.dtype)
    main_process = accelerator.is_main_process
    progress = progress if main_process else None
    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}
    warnings_: list[str] = []

    tokenizer = load_tokenizer(base_model_dir)
    model, lora = build_model(base_model_dir, parent_dir, config, device)

    # --- (a) reward model: Bradley-Terry on all human pairs, warm-started from the parent's
    started = time.monotonic()
    parent_reward = parent_dir / "reward" if parent_dir is not None and (parent_dir / "reward").is_dir() else None
    reward_model = attach_reward_model(model, tokenizer, config.max_length, lora_config=lora, reward_dir=parent_reward)
    items = items_from_pairs(snapshot.pairs)
    reward_train, reward_heldout = split_items(items, config.reward_heldout_fraction)
    reward_result = None
    if reward_train and config.reward_steps:
        reward_result = train_reward_model(
            reward_model, reward_train, config.reward_steps, config.reward_batch_items, config.reward_learning_rate,
            config.adam_eps, config.max_grad_norm, config.reward_centering, seed=config.seed,
            accelerator=accelerator,
            on_step=lambda r: _report(progress, "reward", r["step"] + 1, config.reward_steps, r["loss"], metrics=r))
    # A diverged reward model ends the round here: its scores would steer the policy anywhere.
    failure = f"reward model {reward_result.failure}" if reward_result and reward_result.failure else None
    reward_ready = bool(reward_train) or parent_reward is not None
    if not reward_ready:
        warnings_.append("no human pairs yet: the reward model is untrained, so no on-policy rollouts and no "
                         "win-rate gate this round")
        log.warning(warnings_[-1])
    timings["reward"] = time.monotonic() - started

    # --- (b) policy: human labels within max_staleness + on-policy examples, one loop, the objective by name
    started = time.monotonic()
    human, dropped, human_frame = [], {}, snapshot.pairs.iloc[0:0]
    if config.algorithm in HUMAN_DATA:
        table = getattr(snapshot, HUMAN_DATA[config.algorithm][0])
        human_frame = within_staleness(table, parent_version, config.max_staleness)
        human, dropped = human_examples(human_frame, config.algorithm, tokenizer, config.max_length)
    rollout_prompts, eval_prompts = split_prompts(snapshot.prompts, config.eval_fraction, config.eval_prompts,
                                                  tokenizer, config.max_length)
    onpolicy_stats = {"regenerations": 0, "answers": 0, "examples": 0, "dropped_tokenization": 0}
    regenerations = math.ceil(config.steps / config.sync_every)
    rng = random.Random(config.seed + 7919 * accelerator.process_index)

    def regenerate(step: int) -> list:
        index = onpolicy_stats["regenerations"]
        _report(progress, "rollouts", index, regenerations, within=step / config.steps)
        prompts = rng.sample(rollout_prompts, min(config.rollout_prompts, len(rollout_prompts)))
        batch = onpolicy_examples(model, reward_model, tokenizer, prompts, config.algorithm, config.rollout_n,
                                  config.sampling, config.max_length, seed=config.seed * 100003 + step)
        onpolicy_stats["regenerations"] += 1
        onpolicy_stats["answers"] += batch.answers
        onpolicy_stats["examples"] += len(batch.examples)
        onpolicy_stats["dropped_tokenization"] += batch.dropped_tokenization
        _report(progress, "rollouts", index + 1, regenerations, within=step / config.steps)
        return batch.examples

    # The reference: the base model through the disabled adapter, or the frozen parent adapter with ref_sync.
    reference = PARENT if config.ref_sync and parent_dir is not None else None
    history = []
    if config.algorithm in OBJECTIVES and config.steps and failure is None:
        use_rollouts = reward_ready and config.rollout_prompts > 0 and bool(rollout_prompts)
        pool = ExamplePool(human, regenerate if use_rollouts else None, config.sync_every,
                           seed=config.seed + accelerator.process_index)
        if config.algorithm == "kto":
            n_desirable = sum(e.desirable for e in human)
            warning = kto_weight_warning(n_desirable, len(human) - n_desirable, config.desirable_weight,
                                         config.undesirable_weight) if human else None
            if warning:
                warnings_.append(warning)
                log.warning(warning)
        context = PolicyContext(model, tokenizer, config, reference)
        objective = OBJECTIVES[config.algorithm]

        def step_loss(step: int):
            batch = pool.batch(step, config.batch_size)
            if config.algorithm == "kto" and len(batch) < 2:
                raise LearnerError("KTO needs batches of >= 2 answers (its z_ref pairs answers with other "
                                   f"prompts), but only {len(batch)} example(s) are available")
            return objective(context, batch)

        policy_params = [p for n, p in model.named_parameters() if f".{POLICY}." in n]
        with training_adapter(model, POLICY):
            result = train_loop(
                policy_params, step_loss, config.steps, config.learning_rate, config.adam_eps, config.max_grad_norm,
                accelerator=accelerator,
                on_step=lambda r: _report(progress, "policy", r["step"] + 1, config.steps, r["loss"], metrics=r))
        history, failure = result.history, result.failure and f"policy {result.failure}"
    timings["policy"] = time.monotonic() - started

    # --- (c) evaluation on held-out prompts, (d) the gate
    started = time.monotonic()
    eval_metrics = None
    reward_accuracy = pair_accuracy(reward_model, reward_heldout) if reward_heldout else None
    if failure is None and eval_prompts and main_process:
        _report(progress, "eval", 0, 1)
        model.set_adapter(POLICY, inference_mode=True)
        eval_metrics = evaluate_policy(model, reward_model, tokenizer, eval_prompts, config,
                                       reference=reference, parent=PARENT if parent_dir is not None else None,
                                       seed=config.seed + 1)
        _report(progress, "eval", 1, 1)
    timings["eval"] = time.monotonic() - started
    reward_history = reward_result.history if reward_result else []
    verdict = gate(history + reward_history, failure, eval_metrics, config,
                   check_win_rate=reward_ready and config.algorithm != "reward")

    metrics = {
        "status": "candidate" if verdict["passed"] else "rejected",
        "gate": verdict,
        "algorithm": config.algorithm,
        "parent_version": parent_version,
        "labels_used": len(human),
        "staleness": staleness_stats(human_frame, parent_version),
        "dropped_examples": dropped,
        "onpolicy": onpolicy_stats,
        "reward_heldout_accuracy": reward_accuracy,
        "reward_train_items": len(reward_train),
        "reward_heldout_items": len(reward_heldout),
        "reward_trained": reward_result is not None,
        "reward_warm_start": parent_reward is not None,
        "reward_history": reward_history,
        "history": history,
        **(eval_metrics or {}),
        "warnings": warnings_,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    metrics = _json_safe(metrics)
    if main_process:
        _write_version(out_dir, model, reward_model, parent_dir, metrics, config, parent_version, snapshot)
    accelerator.wait_for_everyone()
    return metrics


def _write_version(out_dir: Path, model, reward_model, parent_dir: Path | None, metrics: dict, config: RoundConfig,
                   parent_version: int, snapshot: Snapshot) -> None:
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by a round that died half-way
    partial.mkdir(parents=True)
    if config.algorithm == "reward" and parent_dir is not None:
        shutil.copytree(parent_dir / "adapter", partial / "adapter")  # the policy is the parent's, byte for byte
    else:
        model.save_pretrained(partial, selected_adapters=[POLICY])  # peft writes a named adapter to partial/policy
        os.replace(partial / POLICY, partial / "adapter")
    save_reward_model(reward_model, partial / "reward")
    (partial / "metrics.json").write_text(json.dumps(metrics, indent=2))
    round_config = {**config.to_dict(), "parent_version": parent_version, "snapshot": snapshot.meta}
    (partial / "config.json").write_text(json.dumps(_json_safe(round_config), indent=2))
    os.replace(partial, out_dir)


def _json_safe(value):
    """NaN/inf become null (strict JSON for the Admin's plots; the gate's reason already names them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m learner.round", description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, required=True, help="snapshot directory written by storage")
    parser.add_argument("--base", type=Path, required=True, help="base model directory (HF format)")
    parser.add_argument("--parent", type=Path, default=None, help="parent version directory; omit for the base")
    parser.add_argument("--out", type=Path, required=True, help="the new version directory (must not exist)")
    parser.add_argument("--config", type=Path, default=None, help="a JSON file of RoundConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field (VALUE read as JSON, else as a string); repeatable")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints JSON lines on stdout and returns the exit status."""
    args = _parse_args(argv)
    # Under accelerate launch / torchrun only rank 0 speaks. Read from the launcher's env rather than an accelerate
    # state: creating one here, before run_round's Accelerator(cpu=...), would fix the wrong distributed setup.
    main_process = os.environ.get("RANK", "0") == "0"

    def emit(event: dict) -> None:
        if main_process:
            print(json.dumps(event), flush=True)

    try:
        values = json.loads(args.config.read_text()) if args.config else {}
        for item in args.set:
            key, _, raw = item.partition("=")
            try:
                values[key] = json.loads(raw)
            except json.JSONDecodeError:
                values[key] = raw
        config = RoundConfig.from_dict(values)
        metrics = run_round(args.snapshot, args.base, args.parent, args.out, config,
                            progress=lambda p: emit({"event": "progress", **p}))
    except LearnerError as exc:
        emit({"event": "error", "error": str(exc)})
        return 1
    emit({"event": "done", "status": metrics["status"], "reason": metrics["gate"]["reason"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
