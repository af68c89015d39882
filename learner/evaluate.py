"""Evaluation of a trained policy on held-out prompts, and the gate that decides whether the new version may become
a deployment candidate.

Every win-rate carries its n (comparisons) and a 95% interval (learner.stats). The KL to the reference is exact per
token along the policy's sampled answers: sum over t of KL(π(·|x,y<t) || ref(·|x,y<t)) over the full vocabulary,
both distributions at the sampling temperature (the answers were drawn at it; top-p is left out: it truncates the
two distributions differently and would make the KL infinite). Every term is a KL, so the sum is never negative,
unlike the sampled estimate log π(y) - log ref(y) it replaces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from learner.config import RoundConfig
from learner.errors import TokenizationError
from learner.logprobs import EncodedAnswer, answer_logits, encode_answer, layout
from learner.reward import RewardModel, score
from learner.rollouts import BASE_MODEL, Rollout, sample_batch
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


def evaluate_policy(model, reward_model: RewardModel | None, tokenizer, prompts: Sequence[str], config: RoundConfig,
                    reference: str | None, parent: str | None, seed: int, merge: bool = False) -> dict:
    """Sample `eval_n` answers per held-out prompt from the policy (the active adapter), the parent (adapter
    `parent`, None = the base model) and the base model; compare them with the reward model when there is a trained
    one (else no win-rates: an untrained reward model's preferences are noise, and only the policy is sampled); the
    exact KL on the policy's. The models' answers come from ONE sampling batch (peft's mixed-adapter batches: the
    frozen weights' matmuls shared): on a 2-core CPU 0.82x the time of three calls (docs/benchmarks.md).
    `merge`: the policy alone (no trained reward model) is sampled with its adapter merged into a copy of the
    weights (`learner.rollouts.sample_batch`)."""
    params = config.sampling
    n = config.eval_n
    prompts = list(prompts)
    if reward_model is None:
        policy = sample_batch(model, tokenizer, prompts, n, params, seed=seed, merge=merge)
    else:
        models = [model.active_adapter, BASE_MODEL] + ([parent] if parent is not None else [])
        groups = sample_batch(model, tokenizer, prompts * len(models), n, params, seed=seed,
                              adapters=[m for m in models for _ in prompts])
        policy = groups[:len(prompts)]
    batch = max(2 * config.batch_size, 1)
    flat = [r for g in policy for r in g]
    kl, kl_per_token, entropy = _kl_and_entropy(model, tokenizer, flat, reference, config, batch)
    metrics = {
        "eval_prompts": len(prompts),
        "eval_answers": len(flat),
        "kl_to_reference": kl,
        "kl_to_reference_per_token": kl_per_token,
        "entropy": entropy,
        "mean_answer_length": sum(r.token_count for r in flat) / len(flat),
        "eos_rate": sum(r.finish_reason == "eos" for r in flat) / len(flat),
    }
    if reward_model is None:
        return metrics
    scored = _scores(reward_model, groups, batch)  # every model's answers in one call, in `models`' order
    per_model = len(prompts)
    policy_scores, base_scores, *parent_scores = (scored[i:i + per_model] for i in range(0, len(scored), per_model))
    parent_scores = parent_scores[0] if parent_scores else base_scores  # version 0's parent is the base model

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


def gate(history: Sequence[dict], failure: str | None, eval_metrics: dict | None, config: RoundConfig,
         check_win_rate: bool) -> dict:
    """{"passed", "reason", "win_rate_check"}: NaN/inf anywhere or an exact KL over max_kl rejects the version; the
    reward model's win-rate vs parent refuses it only when the interval's upper bound is under min_win_rate.
    `check_win_rate` is False when the policy did not change (algorithm "reward") or the reward model was never
    trained (its win-rates are noise)."""
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
        return {**verdict, "passed": False, "reason": f"KL to reference {kl:.3g} > max_kl {config.max_kl}"}
    rate = eval_metrics.get("win_rate_vs_parent")
    if check_win_rate and rate is not None:
        check = win_rate_check(rate, config)
        verdict["win_rate_check"] = check
        if check["refuses"]:
            return {**verdict, "passed": False,
                    "reason": f"win-rate vs parent {rate['value']:.3g}: 95% CI upper bound {rate['ci95'][1]:.3g} "
                              f"< min_win_rate {config.min_win_rate} (n={rate['n']})"}
    return verdict
