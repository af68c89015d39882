"""Evaluation of a trained policy on held-out prompts, and the gate that decides whether the new version may become
a deployment candidate.

Every win-rate carries its n (comparisons) and a 95% interval (learner.stats). The KL to the reference is exact per
token along the policy's sampled answers: sum over t of KL(π(·|x,y<t) || ref(·|x,y<t)) over the full vocabulary,
both distributions at the sampling temperature (the answers were drawn at it; top-p is left out: it truncates the
two distributions differently and would make the KL infinite). Every term is a KL, so the sum is never negative,
unlike the sampled estimate log π(y) - log ref(y) it replaces.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from learner.config import KL_BUDGET_WARN, KL_DRIFT_REMEDY, KL_STEP_REMEDY, RoundConfig
from learner.errors import TokenizationError
from learner.logprobs import EncodedAnswer, answer_logits, encode_answer, layout
from learner.params import SamplingParams
from learner.refcache import write_atomically
from learner.reward import RewardModel, score
from learner.rollouts import Rollout, sample_batch
from learner.stats import Proportion, proportion, refusal_probability
from learner.train import use_adapter


def win_rate(scores: Sequence[Sequence[float]], other: Sequence[Sequence[float]]) -> Proportion:
    """P(an answer beats another model's answer to the same prompt), ties counting half, over all such pairs (n);
    the Wilson interval treats the comparisons as independent, which answers to one prompt are not."""
    wins = total = 0.0
    for mine, theirs in zip(scores, other, strict=True):
        for a in mine:
            for b in theirs:
                wins += 1.0 if a > b else 0.5 if a == b else 0.0
                total += 1
    return proportion(wins, int(total))


def _scores(reward_model: RewardModel, groups: list[list[Rollout]], batch_size: int) -> list[list[float]]:
    flat = [r for g in groups for r in g]
    values = iter(score(reward_model, [r.prompt for r in flat], [r.text for r in flat], batch_size=batch_size,
                        ended=[r.finish_reason == "eos" for r in flat]))
    return [[next(values) for _ in g] for g in groups]


@torch.no_grad()
def exact_kl(model, encoded: Sequence[EncodedAnswer], pad_token_id: int, reference: str | None,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per answer (B,): sum over its positions of KL(π_T(·|y<t) || ref_T(·|y<t)) over the full vocabulary, with
    π_T = softmax(logits / T); also (B,) the summed next-token entropy at T = 1 and (B,) the positions counted.

    Naive equivalent, per answer with tokens from index s:
        p, q = softmax(policy(ids).logits[t - 1] / T), softmax(ref(ids).logits[t - 1] / T)
        sum(sum(p * (log p - log q)) for t in range(s, len(ids)))
    """
    batch = layout(model, encoded, pad_token_id)

    def logits() -> torch.Tensor:  # (N, vocab) at the N answer positions
        return answer_logits(model, batch).float()

    policy = logits()
    with use_adapter(model, reference):
        ref = logits()
    log_p = torch.log_softmax(policy / temperature, dim=-1)
    log_q = torch.log_softmax(ref / temperature, dim=-1)
    # Each term is a KL, >= 0; float rounding can leave -1e-7 where the two agree.
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0)
    log_p1 = torch.log_softmax(policy, dim=-1)
    entropy = -(log_p1.exp() * log_p1).sum(-1)
    return batch.per_answer(per_token), batch.per_answer(entropy), batch.counts


def _kl_and_entropy(model, tokenizer, rollouts: list[Rollout], reference: str | None, config: RoundConfig,
                    batch_size: int) -> tuple[float, float, float]:
    """(mean exact KL per answer, the same per token, token-weighted mean next-token entropy) of the answers."""
    encoded = []
    for r in rollouts:
        try:
            encoded.append(encode_answer(tokenizer, r.prompt, r.text, config.max_length, r.finish_reason == "eos"))
        except TokenizationError:  # the rare boundary merge; the other answers still measure the KL
            continue
    kl_sum = entropy_sum = tokens = 0.0
    for start in range(0, len(encoded), batch_size):
        kl, entropy, counts = exact_kl(model, encoded[start:start + batch_size], tokenizer.pad_token_id, reference,
                                       config.temperature)
        kl_sum += float(kl.sum())
        entropy_sum += float(entropy.sum())
        tokens += float(counts.sum())
    if not encoded:
        return float("nan"), float("nan"), float("nan")
    return kl_sum / len(encoded), kl_sum / tokens if tokens else float("nan"), (
        entropy_sum / tokens if tokens else float("nan"))


EVAL_ANSWERS = "eval_answers.json"  # in a version directory: its policy's answers to the eval prompts


@dataclass(frozen=True)
class EvalAnswers:
    """The answers an evaluation compares: each model's `eval_n` answers per eval prompt, in the prompts' order."""

    policy: list[list[Rollout]]
    base: list[list[Rollout]] | None  # None: nothing to compare with (no trained reward model)
    parent: list[list[Rollout]] | None  # the parent adapter's; the base's for version 0 (its parent is the base)
    reused: tuple[str, ...] = ()  # "base", "parent": drawn in an earlier round, loaded (same key), not sampled


def eval_answers_key(prompts: Sequence[str], n: int, params: SamplingParams, seed: int, model_key: str) -> str:
    """The identity of a draw of eval answers: two draws with one key are the same draw of one model (each model is
    sampled alone, with this seed, so a stored draw is exactly what sampling it again gives). `model_key`: the base
    model and precision (`learner.refcache.base_model_key`); which adapter answered is where the draw is kept."""
    payload = json.dumps({"prompts": list(prompts), "n": n, "params": asdict(params), "seed": seed,
                          "model": model_key}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def load_eval_answers(path: Path | None, key: str) -> list[list[Rollout]] | None:
    """A stored draw with this key, or None (no file, another key, or a file that does not parse: sample again)."""
    if path is None or not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("key") != key:
            return None
        return [[Rollout(**r) for r in group] for group in stored["answers"]]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def save_eval_answers(path: Path, key: str, answers: Sequence[Sequence[Rollout]]) -> None:
    """Write a draw atomically (`learner.refcache.write_atomically`)."""
    rows = [[asdict(r) for r in group] for group in answers]
    write_atomically(path, json.dumps({"key": key, "answers": rows}))


def sample_eval_answers(model, tokenizer, prompts: Sequence[str], n: int, params: SamplingParams, seed: int,
                        compare: bool, parent: str | None, merge: bool = False,
                        base: list[list[Rollout]] | None = None,
                        parent_answers: list[list[Rollout]] | None = None) -> EvalAnswers:
    """`n` answers per prompt from the policy (the active adapter), and with `compare` from the base model and the
    parent adapter (`parent`; None: version 0, whose parent is the base), each model sampled alone with `seed`.
    `base` / `parent_answers`: those models' draws from an earlier round with the same key (the base never changes;
    the parent's draw is the one its own round stored), used instead of sampling again: a round with both samples
    one model of three. `merge`: each adapter merged into a copy of the weights while it samples (faster)."""
    prompts = list(prompts)
    policy = sample_batch(model, tokenizer, prompts, n, params, seed=seed, merge=merge)
    if not compare:
        return EvalAnswers(policy, None, None)
    reused = []
    if base is None:
        with use_adapter(model, None):
            base = sample_batch(model, tokenizer, prompts, n, params, seed=seed)
    else:
        reused.append("base")
    if parent is None:
        parent_answers = base
    elif parent_answers is None:
        with use_adapter(model, parent):
            parent_answers = sample_batch(model, tokenizer, prompts, n, params, seed=seed, merge=merge)
    else:
        reused.append("parent")
    return EvalAnswers(policy, base, parent_answers, tuple(reused))


def evaluate_policy(model, reward_model: RewardModel | None, tokenizer, answers: EvalAnswers, config: RoundConfig,
                    reference: str | None) -> dict:
    """The exact KL to the reference (adapter `reference`, None = the base model) along the policy's eval answers,
    their length and eos rate; with a trained reward model, the policy's answers compared with the parent's and the
    base's (no win-rates without one: an untrained reward model's preferences are noise)."""
    batch = max(2 * config.batch_size, 1)
    flat = [r for g in answers.policy for r in g]
    kl, kl_per_token, entropy = _kl_and_entropy(model, tokenizer, flat, reference, config, batch)
    metrics = {
        "eval_prompts": len(answers.policy),
        "eval_answers": len(flat),
        "eval_answers_reused": list(answers.reused),
        "kl_to_reference": kl,
        "kl_to_reference_per_token": kl_per_token,
        "entropy": entropy,
        "mean_answer_length": sum(r.token_count for r in flat) / len(flat),
        "eos_rate": sum(r.finish_reason == "eos" for r in flat) / len(flat),
    }
    if reward_model is None or answers.base is None:
        return metrics
    parent_is_base = answers.parent is answers.base
    groups = answers.policy + answers.base + ([] if parent_is_base else answers.parent)
    scored = _scores(reward_model, groups, batch)  # every model's answers in one call
    per_model = len(answers.policy)
    policy_scores, base_scores, *parent_scores = (scored[i:i + per_model] for i in range(0, len(scored), per_model))
    parent_scores = base_scores if parent_is_base else parent_scores[0]

    def mean(scores):
        values = [v for g in scores for v in g]
        return sum(values) / len(values)

    return {
        **metrics,
        "reward_mean": mean(policy_scores),
        "reward_mean_parent": mean(parent_scores),
        "reward_mean_base": mean(base_scores),
        "win_rate_vs_parent": win_rate(policy_scores, parent_scores).to_dict(),
        "win_rate_vs_base": win_rate(policy_scores, base_scores).to_dict(),
    }


def _non_finite(values: dict) -> str | None:
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            return key
    return None


WORSE_BY = 0.15  # the gate reports how often it passes a version this much below min_win_rate


def win_rate_check(rate: dict, config: RoundConfig) -> dict:
    """The advisory win-rate check: the figure with its n and interval, the rule, and the rule's error rates at this
    n (exact binomial, comparisons taken as independent)."""
    n, threshold = rate["n"], config.min_win_rate
    worse = max(0.0, threshold - WORSE_BY)
    return {
        "n": n, "win_rate": rate["value"], "ci95": rate["ci95"], "min_win_rate": threshold,
        "refuses": bool(n) and rate["ci95"][1] < threshold,
        "rule": "refuse only when the 95% upper bound is below min_win_rate (advisory: the canary decides better)",
        "refusal_rate_at_min_win_rate": round(refusal_probability(n, threshold, threshold), 4),
        f"pass_rate_at_{worse:.2f}": round(1 - refusal_probability(n, worse, threshold), 4),
        "statement": f"win-rate check: n={n} comparisons, 95% CI [{rate['ci95'][0]:.2f}, {rate['ci95'][1]:.2f}]",
    }


def kl_drift_warning(kl: float, parent_kl: float | None, max_kl: float) -> str | None:
    """A passed version's warning that its lineage is running out of KL budget (the KL measured against the base
    model), from KL_BUDGET_WARN of max_kl on; it says when a next round taking this round's step again would pass
    max_kl. `parent_kl`: the parent's KL to the same reference, None when unknown. None below KL_BUDGET_WARN."""
    if not math.isfinite(kl) or kl > max_kl or kl < KL_BUDGET_WARN * max_kl:
        return None
    step = kl - parent_kl if parent_kl is not None else None
    soon = step is not None and kl + step > max_kl
    text = f"KL to the base model {kl:.3g} nats/answer is {kl / max_kl:.0%} of max_kl {max_kl:g}"
    if step is not None:
        text += f" ({step:+.3g} from the parent's {parent_kl:.3g})"
    text += ": a next round at this pace would pass it" if soon else ": a round past it is refused"
    return f"{text}; {KL_DRIFT_REMEDY}"


def kl_refusal(kl: float, parent_kl: float | None, config: RoundConfig) -> str:
    """The gate's reason for a KL over max_kl, with what the admin can do about it: a lineage that had already used
    over half the budget (the parent's KL) drifted there; a round whose own step took over half of it jumped; a round
    can be both (`structured` at 128 labels, seed 1: 7.73 then 16.2)."""
    reason = f"KL to reference {kl:.3g} > max_kl {config.max_kl}"
    if parent_kl is None:  # no parent, or measured from it (ref_sync): the KL is this round's step
        return f"{reason} in one round: {KL_STEP_REMEDY}"
    step, half = kl - parent_kl, config.max_kl / 2
    advice = []
    if parent_kl > half:
        advice.append(f"the lineage had used {parent_kl / config.max_kl:.0%} of it: {KL_DRIFT_REMEDY}")
    if step > half:
        advice.append(f"this round alone took {step / config.max_kl:.0%} of it: {KL_STEP_REMEDY}")
    return f"{reason} (the parent's {parent_kl:.3g}, {step:+.3g} in this round); " + "; ".join(advice)


def gate(history: Sequence[dict], failure: str | None, eval_metrics: dict | None, config: RoundConfig,
         check_win_rate: bool, parent_kl: float | None = None) -> dict:
    """{"passed", "reason", "win_rate_check"}: NaN/inf anywhere or an exact KL over max_kl rejects the version; the
    reward model's win-rate vs parent refuses it only when the interval's upper bound is under min_win_rate.
    `check_win_rate` is False when the policy did not change (algorithm "reward") or the reward model was never
    trained (its win-rates are noise). `parent_kl`, the parent's KL to the same reference (None when unknown), says
    in a KL refusal whether the lineage drifted there or this round jumped."""
    verdict = {"passed": True, "reason": None, "win_rate_check": None}
    if failure is not None:
        return {**verdict, "passed": False, "reason": f"training stopped: {failure}"}
    for record in history:
        key = _non_finite(record)
        if key is not None:
            return {**verdict, "passed": False, "reason": f"{key} is {record[key]} at step {record.get('step')}"}
    if eval_metrics is None:
        return verdict
    key = _non_finite(eval_metrics)
    if key is not None:
        return {**verdict, "passed": False, "reason": f"evaluation metric {key} is {eval_metrics[key]}"}
    kl = eval_metrics["kl_to_reference"]
    if kl > config.max_kl:
        return {**verdict, "passed": False, "reason": kl_refusal(kl, parent_kl, config)}
    rate = eval_metrics.get("win_rate_vs_parent")
    if check_win_rate and rate is not None:
        check = win_rate_check(rate, config)
        verdict["win_rate_check"] = check
        if check["refuses"]:
            return {**verdict, "passed": False,
                    "reason": f"win-rate vs parent {rate['value']:.3g}: 95% CI upper bound {rate['ci95'][1]:.3g} "
                              f"< min_win_rate {config.min_win_rate} (n={rate['n']})"}
    return verdict
