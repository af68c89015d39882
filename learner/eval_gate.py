"""Phases (c) evaluation and (d) gate of a round (learner.phases has the setup, (a) reward model and (b) policy):
what the round measures of the policy it trained, on eval prompts and held-out human pairs, and whether that version
may deploy. With `kl_checkpoints`, an evaluation over max_kl falls back to the latest kept step within it."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from learner.config import RoundConfig
from learner.evaluate import (
    EVAL_ANSWERS,
    EvalAnswers,
    eval_answers_key,
    evaluate_policy,
    gate,
    kl_drift_warning,
    load_eval_answers,
    sample_eval_answers,
    save_eval_answers,
)
from learner.phases import (
    PARENT,
    POLICY,
    PolicyOutcome,
    RewardOutcome,
    RoundSetup,
    heldout_pairs,
    implicit_reward_accuracy,
    make_reference,
    reference_adapter,
    warn,
)
from learner.refcache import base_model_key
from learner.rollouts import sample_batch
from learner.stats import Proportion
from learner.train import OBJECTIVES

# --- (c) evaluation --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalOutcome:
    generation: dict | None  # evaluate_policy's metrics on the eval prompts (main process only)
    reward_heldout_accuracy: Proportion | None
    policy_heldout_accuracy: Proportion | None  # implicit reward: chosen's log-ratio to the reference above rejected's
    answers: EvalAnswers | None = None  # what the metrics compared (main process only)
    answers_key: str | None = None  # their draw's identity (`eval_answers_key`), stored beside the policy's answers


def eval_answers(setup: RoundSetup, config: RoundConfig, compare: bool) -> tuple[EvalAnswers, str]:
    """The policy's answers to the eval prompts, and with `compare` the base's and the parent's: the base's drawn once
    per base model and kept in the reference cache directory, the parent's taken from its version directory (its own
    round's draw) when the key matches, so a round in a chain samples only its policy."""
    params, seed = config.sampling, config.eval_seed
    key = eval_answers_key(setup.eval_prompts, config.eval_n, params, seed,
                           base_model_key(setup.base_model_dir, setup.device.precision))
    base_file = Path(setup.ref_cache_dir) / f"eval-base-{key}.json" if setup.ref_cache_dir is not None else None
    parent_file = setup.parent_dir / EVAL_ANSWERS if setup.parent_dir is not None else None
    base = load_eval_answers(base_file, key) if compare else None
    parent_answers = load_eval_answers(parent_file, key) if compare else None
    answers = sample_eval_answers(setup.model, setup.tokenizer, setup.eval_prompts, config.eval_n, params, seed,
                                  compare, PARENT if setup.parent_dir is not None else None,
                                  merge=setup.device.merges_for_sampling, base=base, parent_answers=parent_answers)
    if base_file is not None and answers.base is not None and "base" not in answers.reused:
        save_eval_answers(base_file, key, answers.base)
    return answers, key


def eval_phase(setup: RoundSetup, config: RoundConfig, reward: RewardOutcome, policy: PolicyOutcome) -> EvalOutcome:
    """Generation on the eval prompts (and, when the final step is over max_kl, the latest kept checkpoint within
    it: `within_kl`), then held-out human metrics of the reward model and of the policy the round keeps."""
    reward_accuracy = reward.heldout_accuracy  # None for an untrained head: its accuracy is a coin flip
    model = setup.model
    policy_accuracy = None
    generation = answers = key = None
    if policy.failure is None and reward.failure is None:
        model.set_adapter(POLICY, inference_mode=True)
        model.eval()
        if setup.eval_prompts and setup.accelerator.is_main_process:
            setup.report("eval", 0, 1)
            answers, key, generation = measure_policy(setup, config, reward)
            if policy.checkpoints and generation["kl_to_reference"] > config.max_kl:
                answers, key, generation = within_kl(setup, config, reward, policy, (answers, key, generation))
            setup.report("eval", 1, 1)
        heldout = heldout_pairs(setup, config)
        if heldout and config.algorithm in OBJECTIVES:
            reference = policy.reference or make_reference(setup, config)
            policy_accuracy = implicit_reward_accuracy(setup, config, reference, heldout)
    return EvalOutcome(generation, reward_accuracy, policy_accuracy, answers, key)


def measure_policy(setup: RoundSetup, config: RoundConfig, reward: RewardOutcome,
                   earlier: tuple[EvalAnswers, str] | None = None) -> tuple[EvalAnswers, str, dict]:
    """The policy adapter's eval answers, their draw's key and `evaluate_policy`'s metrics (exact KL, win-rates).
    `earlier`: this round's first measurement (answers, key): only the policy is sampled again, the base's and the
    parent's answers (loaded or sampled once) are the ones it compared."""
    if earlier is None:
        answers, key = eval_answers(setup, config, compare=reward.ready)
    else:
        answers, key = earlier
        policy = sample_batch(setup.model, setup.tokenizer, setup.eval_prompts, config.eval_n, config.sampling,
                              seed=config.eval_seed, merge=setup.device.merges_for_sampling)
        answers = replace(answers, policy=policy)
    generation = evaluate_policy(setup.model, reward.reward_model if reward.ready else None, setup.tokenizer,
                                 answers, config, reference=reference_adapter(setup, config))
    return answers, key, generation


def within_kl(setup: RoundSetup, config: RoundConfig, reward: RewardOutcome, policy: PolicyOutcome,
              final: tuple[EvalAnswers, str, dict]) -> tuple[EvalAnswers, str, dict]:
    """The final step's KL is over max_kl: measure the kept checkpoints, latest first, and keep the first within it
    (its weights stay in the policy adapter, so the version directory saves them); none within it: the final
    weights and measurements, which the gate refuses. Either way the metrics say what was tried
    (`kl_checkpoints`)."""
    final_weights = [p.detach().clone() for p in policy.params]
    steps = len(policy.history)
    tried = [{"step": steps, "kl_to_reference": final[2]["kl_to_reference"]}]
    for step, weights in reversed(policy.checkpoints):
        restore_weights(policy.params, weights)
        answers, key, generation = measure_policy(setup, config, reward, earlier=final[:2])
        kl = generation["kl_to_reference"]
        tried.append({"step": step + 1, "kl_to_reference": kl})
        if kl <= config.max_kl:  # NaN compares False: never kept
            warning = (f"the final step's KL to reference {tried[0]['kl_to_reference']:.3g} was over max_kl "
                       f"{config.max_kl:g}: the version keeps the policy after step {step + 1} of {steps} "
                       f"(KL {kl:.3g}; kl_checkpoints)")
            warn(setup, warning)
            return answers, key, {**generation, "kl_checkpoints": {"kept_step": step + 1, "steps": steps,
                                                                   "tried": tried}}
    restore_weights(policy.params, final_weights)
    answers, key, generation = final
    return answers, key, {**generation, "kl_checkpoints": {"kept_step": None, "steps": steps, "tried": tried}}


def restore_weights(params: list, saved: list) -> None:
    """Copy `saved` (a checkpoint's CPU copies, or the final step's) back into the policy adapter's `params`."""
    for param, kept in zip(params, saved, strict=True):
        param.data.copy_(kept.to(param.device))


# --- (d) gate --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GateOutcome:
    passed: bool
    reason: str | None
    verdict: dict  # gate()'s full answer, with the win-rate check's n, interval and error rates


def gate_phase(setup: RoundSetup, config: RoundConfig, reward: RewardOutcome, policy: PolicyOutcome,
               evaluation: EvalOutcome) -> GateOutcome:
    """The gate's verdict; a version it passes whose KL to the base model nears max_kl gets a warning."""
    failure = reward.failure or policy.failure
    drift_from = parent_kl(setup.parent_dir, config)
    verdict = gate(policy.history + reward.history, failure, evaluation.generation, config,
                   check_win_rate=reward.ready and config.algorithm != "reward", parent_kl=drift_from)
    if verdict["passed"] and evaluation.generation is not None and reference_adapter(setup, config) is None:
        warning = kl_drift_warning(evaluation.generation["kl_to_reference"], drift_from, config.max_kl)
        if warning:
            warn(setup, warning)
    return GateOutcome(verdict["passed"], verdict["reason"], verdict)


def parent_kl(parent_dir: Path | None, config: RoundConfig) -> float | None:
    """The parent's KL to the base model (its metrics.json) when this round is measured against the base model too:
    None with ref_sync (the reference is the parent), without a parent, or when the parent's round had ref_sync."""
    if config.ref_sync or parent_dir is None:
        return None
    try:
        metrics = json.loads((parent_dir / "metrics.json").read_text())
        parent_config = json.loads((parent_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = metrics.get("kl_to_reference")
    if parent_config.get("ref_sync") or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
