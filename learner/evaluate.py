"""Evaluation of a trained policy on held-out prompts, judged by the reward model, and the gate that decides
whether the new version may become a deployment candidate."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from learner.config import RoundConfig
from learner.errors import TokenizationError
from learner.logprobs import encode_answer, sequence_logprobs
from learner.reward import RewardModel, score
from learner.rollouts import Rollout, sample_batch
from learner.train import use_adapter


def win_rate(scores: Sequence[Sequence[float]], other: Sequence[Sequence[float]]) -> float:
    """P(an answer beats another model's answer to the same prompt), ties counting half, over all such pairs."""
    wins = total = 0.0
    for mine, theirs in zip(scores, other, strict=True):
        for a in mine:
            for b in theirs:
                wins += 1.0 if a > b else 0.5 if a == b else 0.0
                total += 1
    return wins / total if total else 0.5


def _scores(reward_model: RewardModel, groups: list[list[Rollout]], batch_size: int) -> list[list[float]]:
    flat = [r for g in groups for r in g]
    values = iter(score(reward_model, [r.prompt for r in flat], [r.text for r in flat], batch_size=batch_size))
    return [[next(values) for _ in g] for g in groups]


@torch.no_grad()
def _kl_and_entropy(model, tokenizer, rollouts: list[Rollout], reference: str | None, max_length: int,
                    batch_size: int) -> tuple[float, float]:
    """Mean over sampled answers of log π(y) - log π_ref(y), and the token-weighted mean next-token entropy."""
    encoded = []
    for r in rollouts:
        try:
            encoded.append(encode_answer(tokenizer, r.prompt, r.text, max_length))
        except TokenizationError:  # the rare boundary merge; the other answers still estimate the KL
            continue
    kl_terms, entropy_sum, tokens = [], 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        policy = sequence_logprobs(model, chunk, tokenizer.pad_token_id, with_entropy=True)
        with use_adapter(model, reference):
            ref = sequence_logprobs(model, chunk, tokenizer.pad_token_id)
        kl_terms.extend((policy.logps - ref.logps).tolist())
        entropy_sum += float((policy.entropy * policy.token_counts).sum())
        tokens += int(policy.token_counts.sum())
    kl = sum(kl_terms) / len(kl_terms) if kl_terms else float("nan")
    return kl, entropy_sum / tokens if tokens else float("nan")


def evaluate_policy(model, reward_model: RewardModel, tokenizer, prompts: Sequence[str], config: RoundConfig,
                    reference: str | None, parent: str | None, seed: int) -> dict:
    """Sample `eval_n` answers per held-out prompt from the policy (the active adapter), the parent (adapter
    `parent`, None = the base model) and the base model, and compare them with the reward model.

    The KL is the sampled estimate E_y~π[log π(y) - log π_ref(y)] on the policy's answers; they are drawn at the
    sampling temperature and top-p, so it is the KL of the model as deployed, not at temperature 1.
    """
    params = config.sampling
    n = config.eval_n
    policy = sample_batch(model, tokenizer, prompts, n, params, seed=seed)
    with use_adapter(model, None):
        base = sample_batch(model, tokenizer, prompts, n, params, seed=seed + 1)
    if parent is None:
        parent_samples = base  # version 0's parent is the base model
    else:
        with use_adapter(model, parent):
            parent_samples = sample_batch(model, tokenizer, prompts, n, params, seed=seed + 2)
    batch = max(2 * config.batch_size, 1)
    policy_scores = _scores(reward_model, policy, batch)
    base_scores = _scores(reward_model, base, batch)
    parent_scores = base_scores if parent is None else _scores(reward_model, parent_samples, batch)
    flat = [r for g in policy for r in g]
    kl, entropy = _kl_and_entropy(model, tokenizer, flat, reference, config.max_length, batch)

    def mean(groups):
        values = [v for g in groups for v in g]
        return sum(values) / len(values)

    return {
        "eval_prompts": len(prompts),
        "reward_mean": mean(policy_scores),
        "reward_mean_parent": mean(parent_scores),
        "reward_mean_base": mean(base_scores),
        "win_rate_vs_parent": win_rate(policy_scores, parent_scores),
        "win_rate_vs_base": win_rate(policy_scores, base_scores),
        "kl_to_reference": kl,
        "entropy": entropy,
        "mean_answer_length": sum(r.token_count for r in flat) / len(flat),
        "eos_rate": sum(r.finish_reason == "eos" for r in flat) / len(flat),
    }


def _non_finite(values: dict) -> str | None:
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            return key
    return None


def gate(history: Sequence[dict], failure: str | None, eval_metrics: dict | None, config: RoundConfig,
         check_win_rate: bool) -> dict:
    """{"passed": bool, "reason": str | None}: NaN/inf anywhere, KL over max_kl, or a win-rate vs parent under
    min_win_rate rejects the version. `check_win_rate` is False when the policy did not change (algorithm
    "reward") or the reward model never saw a human pair (its win-rates are noise)."""
    if failure is not None:
        return {"passed": False, "reason": f"training stopped: {failure}"}
    for record in history:
        key = _non_finite(record)
        if key is not None:
            return {"passed": False, "reason": f"{key} is {record[key]} at step {record.get('step')}"}
    if eval_metrics is not None:
        key = _non_finite(eval_metrics)
        if key is not None:
            return {"passed": False, "reason": f"evaluation metric {key} is {eval_metrics[key]}"}
        kl = eval_metrics["kl_to_reference"]
        if kl > config.max_kl:
            return {"passed": False, "reason": f"sampled KL to reference {kl:.3g} > max_kl {config.max_kl}"}
        rate = eval_metrics["win_rate_vs_parent"]
        if check_win_rate and rate < config.min_win_rate:
            return {"passed": False,
                    "reason": f"win-rate vs parent {rate:.3g} < min_win_rate {config.min_win_rate}"}
    return {"passed": True, "reason": None}
