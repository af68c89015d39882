"""The round's setup and its first two phases, (a) reward model and (b) policy (learner.eval_gate has (c) evaluation
and (d) gate): each phase a function of the round's setup and the config, returning a small frozen record that the
next phases and metrics.json read."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from learner.config import RoundConfig
from learner.data import (
    HELDOUT,
    TRAIN,
    PromptSplit,
    human_plan,
    onpolicy_count,
    policy_steps,
    rollout_prompt_count,
)
from learner.errors import LearnerError
from learner.logprobs import encode_answer
from learner.losses import kto_weight_warning
from learner.model import Device
from learner.onpolicy_stream import onpolicy_stream
from learner.refcache import ReferenceLogps, base_model_key
from learner.reward import (
    RewardModel,
    items_from_pairs,
    pair_accuracy,
    train_reward_model,
    trained_pairs,
)
from learner.rollouts import HUMAN_DATA, examples_per_prompt, human_examples
from learner.stats import Proportion, proportion
from learner.train import (
    MIN_BATCH,
    OBJECTIVES,
    PairExample,
    PolicyContext,
    eval_mode,
    step_micro_losses,
    train_loop,
    training_adapter,
    use_adapter,
)

log = logging.getLogger(__name__)

POLICY, PARENT = "policy", "parent"  # adapter names on the one PeftModel (the reward model's is "reward")
PHASES = {"reward": (0.0, 0.25), "rollouts": (0.25, 0.85), "policy": (0.25, 0.85), "eval": (0.85, 1.0)}


@dataclass(frozen=True)
class RoundSetup:
    """What every phase reads: the data, the one PeftModel, and where the round runs."""

    pairs: pd.DataFrame  # pairs.parquet with a "role" column (train / heldout / eval, by prompt)
    unary: pd.DataFrame
    split: PromptSplit
    rollout_prompts: list[str]
    eval_prompts: list[str]
    model: object  # the base model with every adapter the round uses: policy, parent, reward (`learner.round.prepare`)
    tokenizer: object
    lora: object
    reward_model: RewardModel  # the reward adapter and head: the parent's to warm-start from, or fresh
    parent_dir: Path | None
    base_model_dir: Path
    ref_cache_dir: Path | None
    accelerator: object
    device: Device  # where the model runs and its precision (the round's phases run inside device.compute())
    report: Callable[..., None]  # report(phase, step, total, loss=None, within=None, metrics=None)
    warnings: list[str] = field(default_factory=list)

    def trained_on(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame["role"] == TRAIN]

    def held_out(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame[frame["role"] == HELDOUT]


def warn(setup: RoundSetup, warning: str) -> None:
    """A round warning: in the version's metrics and in the log."""
    setup.warnings.append(warning)
    log.warning(warning)


def reference_adapter(setup: RoundSetup, config: RoundConfig) -> str | None:
    """The reference: the base model through the disabled adapter (None), or the frozen parent with ref_sync."""
    return PARENT if config.ref_sync and setup.parent_dir is not None else None


# --- (a) reward model ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RewardOutcome:
    reward_model: RewardModel
    ready: bool  # trained on at least one human pair, this round or before: only then may it judge
    picks_rollouts: bool  # ready, and (with rollouts_min_reward_accuracy) shown good enough to pick on-policy pairs
    heldout_accuracy: Proportion | None  # pair accuracy on the held-out human labels; None untrained or none held out
    trained_pairs: int  # human pairs it has learned from over all rounds (saved beside it)
    train_items: int
    heldout_items: tuple
    warm_start: bool
    history: list
    failure: str | None


def parent_reward_dir(parent_dir: Path | None) -> Path | None:
    """The parent version's reward model, which this round's warm-starts from; None for version 0."""
    return parent_dir / "reward" if parent_dir is not None and (parent_dir / "reward").is_dir() else None


def reward_phase(setup: RoundSetup, config: RoundConfig) -> RewardOutcome:
    """Bradley-Terry on the training prompts' human pairs, warm-started from the parent's reward model."""
    parent_reward = parent_reward_dir(setup.parent_dir)
    reward_model = setup.reward_model
    train_items = items_from_pairs(setup.trained_on(setup.pairs))
    heldout_items = tuple(items_from_pairs(setup.held_out(setup.pairs)))
    result = None
    if train_items and config.reward_steps:
        result = train_reward_model(
            reward_model, train_items, config.reward_steps, config.reward_batch_items, config.reward_learning_rate,
            config.adam_eps, config.max_grad_norm, config.reward_centering, seed=config.seed,
            accelerator=setup.accelerator,
            on_step=lambda r: setup.report("reward", r["step"] + 1, config.reward_steps, r["loss"], metrics=r))
    pairs_now = sum(len(i.pairs) for i in train_items) if result is not None else 0
    total_pairs = trained_pairs(parent_reward) + pairs_now
    if total_pairs == 0:
        warn(setup, "no human pairs trained the reward model yet: no on-policy rollouts and no win-rate check this "
                    "round")
    failure = f"reward model {result.failure}" if result and result.failure else None
    ready = total_pairs > 0
    accuracy = pair_accuracy(reward_model, heldout_items) if ready and heldout_items and failure is None else None
    picks = ready and rollouts_allowed(accuracy, config.rollouts_min_reward_accuracy)
    if ready and not picks:
        shown = "no held-out labels" if accuracy is None else (
            f"{accuracy.value:.2f} [{accuracy.ci95[0]:.2f}, {accuracy.ci95[1]:.2f}], n = {accuracy.n}")
        warn(setup, f"the reward model's held-out pair accuracy ({shown}) is not shown to reach "
                    f"rollouts_min_reward_accuracy {config.rollouts_min_reward_accuracy}: this round trains on human "
                    "labels only (no on-policy pairs)")
    return RewardOutcome(reward_model, ready, picks, accuracy, total_pairs, len(train_items), heldout_items,
                         parent_reward is not None, result.history if result else [], failure)


def rollouts_allowed(accuracy: Proportion | None, minimum: float | None) -> bool:
    """Whether a reward model with this held-out accuracy may pick on-policy pairs: always without a minimum;
    with one, only when the accuracy's 95% lower bound reaches it (no held-out labels: not shown, so no)."""
    if minimum is None:
        return True
    return accuracy is not None and accuracy.n > 0 and accuracy.ci95[0] >= minimum


# --- (b) policy ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PolicyOutcome:
    history: list
    failure: str | None
    labels_used: int
    human_frame: pd.DataFrame
    dropped: dict
    data: dict  # what the steps learned from: epochs, shares, on-policy regenerations and reuse
    reference: ReferenceLogps | None
    params: list = field(default_factory=list)  # the policy adapter's trained weights (restored by eval_gate)
    checkpoints: list = field(default_factory=list)  # (step, CPU copies of `params` after it): config.kl_checkpoints


def checkpoint_steps(steps: int, count: int) -> list[int]:
    """The 0-based steps after which a round keeps its policy adapter: `count` evenly spaced before the last step
    (12 steps, 3: after steps 3, 6 and 9, i.e. indices 2, 5, 8)."""
    return sorted({steps * j // (count + 1) - 1 for j in range(1, count + 1)} - {-1, steps - 1})


def within_staleness(frame: pd.DataFrame, max_label_staleness: int | None) -> pd.DataFrame:
    """Labels whose answers are at most `max_label_staleness` deployed versions old along the serving lineage (the
    snapshot's `staleness` column; a label with none has no known lineage and counts as too stale). None: all."""
    if max_label_staleness is None:
        return frame
    return frame[frame["staleness"].notna() & (frame["staleness"] <= max_label_staleness)]


def make_reference(setup: RoundSetup, config: RoundConfig) -> ReferenceLogps:
    adapter = reference_adapter(setup, config)
    cache_file = None
    if adapter is None and setup.ref_cache_dir is not None:  # only the base model is the same in every round
        name = f"{base_model_key(setup.base_model_dir, setup.device.precision)}-{config.max_length}.jsonl"
        cache_file = Path(setup.ref_cache_dir) / name
    return ReferenceLogps(setup.model, setup.tokenizer.pad_token_id, adapter, 2 * config.batch_size, cache_file)


def plan_steps(setup: RoundSetup, config: RoundConfig, human: list,
               use_rollouts: bool) -> tuple[int, list[list[int]], list[int], int]:
    """(steps, this process's human example indices per step, on-policy examples wanted per step, prompts per
    regeneration): every human example `human_epochs` times, `onpolicy_fraction` of each step on-policy."""
    acc = setup.accelerator
    minimum = MIN_BATCH[config.algorithm]
    steps = policy_steps(config.steps, config.human_epochs * len(human), minimum, use_rollouts,
                         config.onpolicy_fill_steps, acc.num_processes)
    if steps == 0:
        raise LearnerError("no training examples: no human labels within max_label_staleness on training prompts "
                           "(a ranking whose answers are all tied gives no pair) and no on-policy rollouts (no "
                           "trained reward model, no prompts, or rollout_prompts = 0)")
    if steps < config.steps:
        warn(setup, fewer_steps(steps, config, len(human), use_rollouts, acc.num_processes))
    plan = human_plan([e.group for e in human], config.human_epochs, steps, config.seed, acc.process_index,
                      acc.num_processes)
    wanted = [max(onpolicy_count(len(chunk), config.onpolicy_fraction, config.batch_size), minimum - len(chunk))
              if use_rollouts else 0 for chunk in plan]
    prompts = rollout_prompt_count(config.rollout_prompts, wanted, config.sync_every, config.onpolicy_max_uses,
                                   examples_per_prompt(config.algorithm, config.rollout_pairs, config.rollout_n))
    return steps, plan, wanted, prompts


def policy_phase(setup: RoundSetup, config: RoundConfig, reward: RewardOutcome) -> PolicyOutcome:
    """DPO or KTO on the training prompts' human labels within max_label_staleness (human_epochs passes) mixed with
    on-policy examples (onpolicy_fraction of each step, regenerated every sync_every steps)."""
    empty = PolicyOutcome([], None, 0, setup.pairs.iloc[0:0], {}, {}, None)
    if config.algorithm not in OBJECTIVES or not config.steps or reward.failure is not None:
        return empty
    table = getattr(setup, HUMAN_DATA[config.algorithm][0])
    human_frame = within_staleness(setup.trained_on(table), config.max_label_staleness)
    human, dropped = human_examples(human_frame, config.algorithm, setup.tokenizer, config.max_length)
    acc = setup.accelerator
    use_rollouts = (reward.picks_rollouts and config.rollout_prompts > 0 and bool(setup.rollout_prompts)
                    and (config.onpolicy_fraction > 0 or not human))
    steps, plan, wanted, prompts = plan_steps(setup, config, human, use_rollouts)
    reference = make_reference(setup, config)
    judge = choose_rollout_judge(setup, config, reward, reference) if use_rollouts else None
    stream = onpolicy_stream(setup, config, reward.reward_model, prompts, steps, judge, reference)
    if config.algorithm == "kto" and human:
        n_desirable = sum(e.desirable for e in human)
        warning = kto_weight_warning(n_desirable, len(human) - n_desirable, config.desirable_weight,
                                     config.undesirable_weight)
        if warning:
            warn(setup, warning)
    context = PolicyContext(setup.model, setup.tokenizer, config, reference)
    shuffle = random.Random(config.seed + acc.process_index)
    counts = {"human": 0, "onpolicy": 0}

    def step_loss(step: int):
        examples = [human[i] for i in plan[step]]
        onpolicy = stream.take(step, wanted[step]) if use_rollouts else []
        counts["human"] += len(examples)
        counts["onpolicy"] += len(onpolicy)
        examples += onpolicy
        if config.algorithm == "kto":
            shuffle.shuffle(examples)  # z_ref pairs each answer with the next one's prompt: mix the prompts
            if 0 < len(examples) < 2:
                raise LearnerError(f"KTO needs batches of >= 2 answers (its z_ref pairs answers with other prompts), "
                                   f"but only {len(examples)} example(s) are available")
        yield from step_micro_losses(context, config.algorithm, examples)

    params = [p for n, p in setup.model.named_parameters() if f".{POLICY}." in n]
    # One process only: the eval that picks a checkpoint runs on the main process, the others would keep other weights.
    keep_after = set(checkpoint_steps(steps, config.kl_checkpoints)) if acc.num_processes == 1 else set()
    if config.kl_checkpoints and acc.num_processes > 1:
        warn(setup, f"kl_checkpoints is ignored on {acc.num_processes} processes (one process only): a final KL "
                    "over max_kl refuses the round")
    checkpoints: list = []

    def on_step(record: dict) -> None:
        setup.report("policy", record["step"] + 1, steps, record["loss"], metrics=record)
        if record["step"] in keep_after:
            checkpoints.append((record["step"], [p.detach().to("cpu", copy=True) for p in params]))

    with training_adapter(setup.model, POLICY):
        result = train_loop(params, step_loss, steps, config.learning_rate, config.adam_eps, config.max_grad_norm,
                            accelerator=acc, on_step=on_step)
    if acc.is_main_process:
        reference.save()
    onpolicy = {**stream.stats(), **stream.regenerate.costs()} if use_rollouts else None
    # Every process trained on its own share: the round's counts are their sums (seconds stay this process's).
    counts = summed_over_processes(acc, counts)
    if onpolicy is not None:
        onpolicy.update(summed_over_processes(acc, {k: onpolicy[k] for k in ONPOLICY_COUNTS}))
        onpolicy["mean_uses_per_example"] = round(onpolicy["uses"] / onpolicy["examples"], 3) if onpolicy[
            "examples"] else None
    used = counts["human"] + counts["onpolicy"]
    data = {"steps": steps, "processes": acc.num_processes, "human_epochs": config.human_epochs,
            "human_examples": len(human), "human_uses": counts["human"], "onpolicy_uses": counts["onpolicy"],
            "onpolicy_share": round(counts["onpolicy"] / used, 4) if used else None,
            "onpolicy": onpolicy,
            "rollout_judge": judge,
            "reference_logps": reference.stats()}
    return PolicyOutcome(result.history, result.failure and f"policy {result.failure}", len(human), human_frame,
                         dropped, data, reference, params, checkpoints)


# The on-policy stream's counts that add up over processes (each samples and trains on its own share).
ONPOLICY_COUNTS = ("examples", "uses", "answers", "dropped_tokenization", "prompts_per_regeneration")


def summed_over_processes(acc, counts: dict[str, int]) -> dict[str, int]:
    """`counts` summed over every process of an `accelerate launch` (each process calls this alike); as they are on
    one process."""
    if acc.num_processes == 1:
        return dict(counts)
    keys = list(counts)
    total = acc.reduce(torch.tensor([float(counts[k]) for k in keys], device=acc.device), reduction="sum")
    return {k: int(round(v)) for k, v in zip(keys, total.tolist(), strict=True)}


def fewer_steps(steps: int, config: RoundConfig, human: int, rollouts: bool, processes: int = 1) -> str:
    """Why a round takes fewer optimizer steps than `steps` asks: its human examples are seen human_epochs times and
    nothing fills the steps past them."""
    why = "onpolicy_fill_steps is off" if rollouts else "no on-policy pairs fill the rest this round"
    shared = f" shared by {processes} processes" if processes > 1 else ""
    return (f"this round takes {steps} of its {config.steps} optimizer steps: {human} human examples x human_epochs "
            f"{config.human_epochs}{shared} reach no further, and {why}")


def choose_rollout_judge(setup: RoundSetup, config: RoundConfig, reward: RewardOutcome,
                         reference: ReferenceLogps) -> dict:
    """Which scores rank the rollouts (`rollout_judge`), and the held-out accuracies it was chosen by: with "auto",
    the policy's implicit reward where the parent policy (the policy adapter before this round's first step) ranks
    the held-out human pairs strictly better than this round's reward model, else the reward model. A policy that
    starts the round as its own reference (no parent: a fresh LoRA; `ref_sync`: the parent is the reference) has an
    implicit reward of 0 for every answer, up to float rounding that must not decide: the reward model judges.
    With "policy", the policy's implicit reward judges every round where it is not 0 by construction; both held-out
    accuracies are still measured and recorded, for the record (they decide nothing there)."""
    rule = config.rollout_judge
    if rule == "reward_model":
        return {"judge": "reward_model", "rule": rule}
    if setup.parent_dir is None or reference_adapter(setup, config) is not None:
        return {"judge": "reward_model", "rule": rule,
                "why": "the policy starts this round as its reference: its implicit reward is 0"}
    heldout, rm = heldout_pairs(setup, config), reward.heldout_accuracy
    if heldout and rm is not None:
        with eval_mode(setup.model), use_adapter(setup.model, POLICY):
            policy = implicit_reward_accuracy(setup, config, reference, heldout)
        measured = {"reward_model_heldout_accuracy": rm.to_dict(), "policy_heldout_accuracy": policy.to_dict()}
        judge = "policy" if rule == "policy" or policy.value > rm.value else "reward_model"
        return {"judge": judge, "rule": rule, **measured}
    if rule == "policy":
        return {"judge": "policy", "rule": rule}
    return {"judge": "reward_model", "rule": rule, "why": "no held-out human pairs to compare the two judges on"}


# --- held-out pairs: what both judges are measured on (the rollout judge here, the evaluation in learner.eval_gate)

def heldout_pairs(setup: RoundSetup, config: RoundConfig) -> list[PairExample]:
    """The held-out prompts' human pairs as examples (never trained on): what both judges are measured on."""
    return human_examples(setup.held_out(setup.pairs), "dpo", setup.tokenizer, config.max_length)[0]


@torch.no_grad()
def implicit_reward_accuracy(setup: RoundSetup, config: RoundConfig, reference: ReferenceLogps,
                             pairs: list[PairExample]) -> Proportion:
    """Share of held-out human pairs where log π(chosen) - log ref(chosen) > log π(rejected) - log ref(rejected)
    (DPO's implicit reward, arXiv 2305.18290 Eq. 5, up to β), with n and a Wilson interval. Each distinct answer
    goes through the policy once (a ranking's pairs share its answers; the reference memoises its own)."""
    from learner.logprobs import distinct_sequence_logprobs

    encoded = [encode_answer(setup.tokenizer, p, a, config.max_length, e) for x in pairs for p, a, e in x.texts()]
    policy = distinct_sequence_logprobs(setup.model, encoded, setup.tokenizer.pad_token_id, 2 * config.batch_size)
    ratio = (policy.logps - reference(encoded)).view(len(pairs), 2)
    return proportion(int((ratio[:, 0] > ratio[:, 1]).sum()), len(pairs))
