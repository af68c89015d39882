"""A training round as a job: snapshot dir + base model dir + parent version dir + RoundConfig -> a version dir.

    python -m learner.round --snapshot DIR --base DIR [--parent DIR] --out DIR [--config FILE.json] [--set k=v]
                            [--ref-cache DIR]

prints one JSON object per line on stdout: {"event": "progress", "phase", "step", "total", "loss", "progress"}
and {"event": "warning", "message"} for each warning while it runs, then {"event": "done", "status":
"candidate"|"rejected", "reason"} (or {"event": "error", ...}).
The same module runs under `accelerate launch -m learner.round ...` on several GPUs.

Version directory: adapter/ (the policy LoRA), reward/ (reward LoRA + head, prefloop's format), reward-hf/ (the same
reward model as a sequence-classification PEFT adapter + tokenizer), metrics.json, config.json, and README.md model
cards (in the directory and in each adapter folder); adapters name their base portably (a hub id, never a local
path). Written to `<out>.partial` and renamed to `<out>` only when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch

from learner.config import RoundConfig, advisories
from learner.data import PromptSplit, hash_fraction
from learner.errors import ConfigError, LearnerError
from learner.eval_gate import eval_phase, gate_phase
from learner.evaluate import EVAL_ANSWERS, save_eval_answers
from learner.lifetime import die_with_parent
from learner.model import (
    Device,
    autocast_weights,
    base_model_info,
    keep_lora_sums_fp32,
    load_base_model,
    load_tokenizer,
    pick_device,
    save_adapter,
    set_base_name,
)
from learner.model_card import write_cards
from learner.phases import (
    PARENT,
    PHASES,
    POLICY,
    RoundSetup,
    parent_reward_dir,
    policy_phase,
    reward_phase,
    warn,
)
from learner.reward import attach_reward_model, save_hf_reward_adapter, save_reward_model
from learner.rollouts import split_prompts, usable_prompts

log = logging.getLogger(__name__)

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
                      "rejected", "chosen_finish_reason", "rejected_finish_reason", "staleness"],
    "unary.parquet": ["item_id", "policy_version", "prompt", "completion", "label", "finish_reason", "staleness"],
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
            raise LearnerError(f"{path} lacks the columns {', '.join(missing)} (written by an older prefloop?)")
        frames[name] = frame
    meta_path = snapshot_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return Snapshot(frames["pairs.parquet"], frames["unary.parquet"], frames["prompts.parquet"], meta)


def staleness_stats(frame: pd.DataFrame) -> dict:
    """The staleness (deployed versions along the serving lineage) of the labels used."""
    staleness = frame["staleness"].dropna().astype(int)
    if staleness.empty:
        return {"mean": None, "max": None, "counts": {}}
    return {"mean": float(staleness.mean()), "max": int(staleness.max()),
            "counts": {str(k): int(v) for k, v in staleness.value_counts().sort_index().items()}}


def _reporter(progress: Progress | None):
    def report(phase: str, step: int, total: int, loss: float | None = None, within: float | None = None,
               metrics: dict | None = None) -> None:
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
    return report


def lora_config(config: RoundConfig, base):
    """The LoRA of a new adapter (policy or reward model) on `base`: `lora_target_modules` in every layer, or with
    `lora_layers` in the top N only (peft's `layers_to_transform`, which takes module names, not "all-linear" or a
    regular expression: those are resolved to the names of the linear layers they pick)."""
    from peft import LoraConfig

    targets, layers = config.lora_target_modules, None
    if config.lora_layers:
        count = int(base.config.num_hidden_layers)
        if config.lora_layers > count:
            raise ConfigError(f"lora_layers must be at most the model's {count} layers, got {config.lora_layers}")
        layers = list(range(count - config.lora_layers, count))
        targets = linear_module_names(base, targets)
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, layers_to_transform=layers, task_type="CAUSAL_LM")


def linear_module_names(base, targets: str) -> list[str]:
    """The last name parts of `base`'s linear layers that `targets` picks as peft would: "all-linear" every linear
    layer but the output layer, any other string as a regular expression matched against the whole module name."""
    output = base.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in base.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not output
             and (targets == "all-linear" or re.fullmatch(targets, name))}
    if not names:
        raise ConfigError(f"lora_target_modules {targets!r} picks no linear layer of the model")
    return sorted(names)


def build_model(base_model_dir: Path, parent_dir: Path | None, config: RoundConfig, device: Device):
    """The base model once, with the trainable "policy" adapter (the parent's, or a fresh LoRA for version 0)
    and a frozen copy of the parent's as "parent" (win-rate vs parent, and the reference with ref_sync)."""
    from peft import PeftModel, get_peft_model

    base = load_base_model(base_model_dir, device)
    lora = lora_config(config, base)
    torch.manual_seed(config.seed)  # the same fresh LoRA on every process under accelerate launch
    if parent_dir is None:
        model = get_peft_model(base, lora, adapter_name=POLICY)
    else:
        # Continue the parent's adapter (is_trainable), not a fresh LoRA stacked on top of it.
        model = PeftModel.from_pretrained(base, str(parent_dir / "adapter"), adapter_name=POLICY, is_trainable=True)
        model.load_adapter(str(parent_dir / "adapter"), adapter_name=PARENT, is_trainable=False)
    keep_lora_sums_fp32(model, device)
    return model, lora


def _with_roles(frame: pd.DataFrame, split: PromptSplit) -> pd.DataFrame:
    return frame.assign(role=[split.role(p) for p in frame["prompt"]])


def prepare(snapshot: Snapshot, base_model_dir: Path, parent_dir: Path | None, config: RoundConfig, accelerator,
            device: Device, progress: Progress | None, ref_cache_dir: Path | None) -> RoundSetup:
    """Load the model with every adapter the round uses (policy, parent, reward: none is added later, see
    `autocast_weights`) and split the data: eval prompts, held-out labels and training labels, all by prompt."""
    tokenizer = load_tokenizer(base_model_dir)
    model, lora = build_model(base_model_dir, parent_dir, config, device)
    reward_model = attach_reward_model(model, tokenizer, config.max_length, lora_config=lora,
                                       reward_dir=parent_reward_dir(parent_dir))
    keep_lora_sums_fp32(model, device)  # the reward adapter's layers, if it targets other modules
    usable = usable_prompts(snapshot.prompts, tokenizer, config.max_length)
    labelled = list(snapshot.pairs["prompt"]) + list(snapshot.unary["prompt"])
    fallback = min(usable, key=hash_fraction) if usable and config.eval_prompts else None
    split = PromptSplit.build(usable + labelled, config.eval_fraction, config.heldout_fraction, fallback, labelled)
    rollout_prompts, eval_prompts = split_prompts(usable, split, config.eval_prompts)
    return RoundSetup(_with_roles(snapshot.pairs, split), _with_roles(snapshot.unary, split), split, rollout_prompts,
                      eval_prompts, model, tokenizer, lora, reward_model, parent_dir, base_model_dir, ref_cache_dir,
                      accelerator, device, _reporter(progress if accelerator.is_main_process else None))


def run_round(snapshot_dir: Path, base_model_dir: Path, parent_dir: Path | None, out_dir: Path, config: RoundConfig,
              progress: Progress | None = None, ref_cache_dir: Path | None = None) -> dict:
    """Run one round (reward model, policy, evaluation, gate) and write the version directory; returns its metrics
    (incl. "gate" and "status"). `ref_cache_dir` keeps the base model's reference log-probs across rounds."""
    from accelerate import Accelerator

    snapshot_dir, base_model_dir, out_dir = Path(snapshot_dir), Path(base_model_dir), Path(out_dir)
    parent_dir = Path(parent_dir) if parent_dir is not None else None
    if out_dir.exists():
        raise LearnerError(f"{out_dir} already exists; a version directory is written once")
    snapshot = read_snapshot(snapshot_dir)
    parent_version = int(snapshot.meta.get("parent_version", 0))
    chosen = pick_device()
    accelerator = Accelerator(cpu=not chosen.is_cuda)
    device = replace(chosen, torch_device=accelerator.device)
    torch.manual_seed(config.seed)
    setup = prepare(snapshot, base_model_dir, parent_dir, config, accelerator, device, progress, ref_cache_dir)
    for advice in advisories(config):
        warn(setup, advice)
    timings: dict[str, float] = {}

    # Every forward pass of the round (training, scoring, sampling) in the device's precision, the frozen weights cast
    # to it once for the round, not at every matmul (`autocast_weights`: the same values; every adapter is attached).
    with device.compute(), autocast_weights(setup.model):
        started = time.monotonic()
        reward = reward_phase(setup, config)
        timings["reward"] = time.monotonic() - started
        started = time.monotonic()
        policy = policy_phase(setup, config, reward)
        timings["policy"] = time.monotonic() - started
        started = time.monotonic()
        evaluation = eval_phase(setup, config, reward, policy)
        timings["eval"] = time.monotonic() - started
    verdict = gate_phase(setup, config, reward, policy, evaluation)

    heldout_pairs = setup.held_out(setup.pairs)
    metrics = _json_safe({
        "status": "candidate" if verdict.passed else "rejected",
        "gate": verdict.verdict,
        "algorithm": config.algorithm,
        "parent_version": parent_version,
        "labels_used": policy.labels_used,
        "staleness": staleness_stats(policy.human_frame),
        "dropped_examples": policy.dropped,
        "data": policy.data,
        "heldout": {"prompts": len(setup.split.heldout), "pairs": len(heldout_pairs),
                    "rankings": int(heldout_pairs["item_id"].nunique()), "eval_prompts_used": len(setup.eval_prompts),
                    "untrained_below": setup.split.untrained_below,
                    "split": "by a hash of the prompt text: eval / heldout / train prompts never share labels"},
        "reward_heldout_accuracy": _figure(evaluation.reward_heldout_accuracy),
        "policy_heldout_accuracy": _figure(evaluation.policy_heldout_accuracy),
        "reward_train_items": reward.train_items,
        "reward_heldout_items": len(reward.heldout_items),
        "reward_trained": bool(reward.history),
        "reward_ready": reward.ready,
        "reward_trained_pairs": reward.trained_pairs,
        "reward_warm_start": reward.warm_start,
        "reward_history": reward.history,
        "history": policy.history,
        **(evaluation.generation or {}),
        "warnings": setup.warnings,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "precision": device.precision,
        "device": device.torch_device.type,  # "cpu" or "cuda": where the round ran (the server's --device)
    })
    if accelerator.is_main_process:
        _write_version(out_dir, setup, reward, evaluation, metrics, config, parent_version, snapshot)
    accelerator.wait_for_everyone()
    return metrics


def _figure(value) -> dict | None:
    return None if value is None else value.to_dict()


def _write_version(out_dir: Path, setup: RoundSetup, reward, evaluation, metrics: dict, config: RoundConfig,
                   parent_version: int, snapshot: Snapshot) -> None:
    """The version directory, portable: adapters name the base by hub id (learner.model.base_model_info), not by
    this machine's path, and README.md cards describe it; written to `<out>.partial`, renamed when complete."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by a round that died half-way
    partial.mkdir(parents=True)
    base = base_model_info(setup.base_model_dir)
    if config.algorithm == "reward" and setup.parent_dir is not None:
        shutil.copytree(setup.parent_dir / "adapter", partial / "adapter")  # the parent's policy, byte for byte
        set_base_name(partial / "adapter", base.name)  # (a parent written before names were portable)
    else:
        save_adapter(setup.model, POLICY, partial / "adapter", base.name)
    save_reward_model(reward.reward_model, partial / "reward", pairs_trained=reward.trained_pairs,
                      base_name=base.name)
    reward_hf = save_hf_reward_adapter(partial / "reward", partial / "reward-hf", setup.tokenizer, base.name)
    (partial / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if evaluation.answers is not None:  # the policy's eval answers: the next round's parent draw, and for people
        save_eval_answers(partial / EVAL_ANSWERS, evaluation.answers_key, evaluation.answers.policy)
    round_config = _json_safe({**config.to_dict(), "parent_version": parent_version, "base_model": base.name,
                               "snapshot": snapshot.meta})
    (partial / "config.json").write_text(json.dumps(round_config, indent=2))
    write_cards(partial, base, metrics, round_config, snapshot.meta, reward_hf)
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


class _WarningEvents(logging.Handler):
    """Each warning logged under `learner` as {"event": "warning", "message"} on stdout."""

    def __init__(self, emit: Callable[[dict], None]) -> None:
        super().__init__(logging.WARNING)
        self.emit_event = emit

    def emit(self, record: logging.LogRecord) -> None:
        self.emit_event({"event": "warning", "message": record.getMessage()})


def follow_threads(path: Path) -> int:
    """Use as many torch CPU threads as `path` says (a positive int); a missing or unreadable file changes nothing.
    Returns the threads in use."""
    try:
        wanted = int(path.read_text().strip())
    except (OSError, ValueError):
        return torch.get_num_threads()
    if wanted >= 1 and wanted != torch.get_num_threads():
        torch.set_num_threads(wanted)
    return torch.get_num_threads()


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m learner.round", description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", type=Path, required=True, help="snapshot directory written by storage")
    parser.add_argument("--base", type=Path, required=True, help="base model directory (HF format)")
    parser.add_argument("--parent", type=Path, default=None, help="parent version directory; omit for the base")
    parser.add_argument("--out", type=Path, required=True, help="the new version directory (must not exist)")
    parser.add_argument("--config", type=Path, default=None, help="a JSON file of RoundConfig fields")
    parser.add_argument("--ref-cache", type=Path, default=None,
                        help="keeps the base model's reference log-probs across rounds (e.g. the models dir)")
    parser.add_argument("--threads-file", type=Path, default=None,
                        help="a file holding the number of CPU threads to use, read again at every step (the app "
                             "rewrites it: every core while its generator idles, the others while it samples)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field (VALUE read as JSON, else as a string); repeatable")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints JSON lines on stdout and returns the exit status."""
    args = _parse_args(argv)
    # Libraries' deprecation notices (peft reading transformers' `is_gradient_checkpointing`...) are for whoever
    # upgrades them, not for the admin watching the round: stderr is the Admin's log tail. Only when run as a program.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Under accelerate launch / torchrun only rank 0 speaks. Read from the launcher's env rather than an accelerate
    # state: creating one here, before run_round's Accelerator(cpu=...), would fix the wrong distributed setup.
    main_process = os.environ.get("RANK", "0") == "0"
    if "LOCAL_RANK" in os.environ:
        die_with_parent()  # the launcher's process: killed with it (torchrun starts each in a session of its own)

    def emit(event: dict) -> None:
        if main_process:
            print(json.dumps(event), flush=True)

    def on_progress(event: dict) -> None:
        if args.threads_file is not None:
            follow_threads(args.threads_file)
        emit({"event": "progress", **event})

    # The learner's warnings (logging.warning: the KTO weight rule, no trained reward model...) as events too, so the
    # app shows them while the round runs; metrics.json keeps them as "warnings" afterwards.
    logging.getLogger("learner").addHandler(_WarningEvents(emit))

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
                            progress=on_progress, ref_cache_dir=args.ref_cache)
    except LearnerError as exc:
        emit({"event": "error", "error": str(exc)})
        return 1
    emit({"event": "done", "status": metrics["status"], "reason": metrics["gate"]["reason"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
