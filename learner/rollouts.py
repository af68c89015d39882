"""The policy's training data: human labels as examples, and on-policy examples the round makes itself.

On-policy: sample N answers for several prompts in one sampling batch, score them with the reward model, and
turn each prompt's answers into examples (best vs worst for DPO, around the median for KTO). Every answer keeps its
finish reason, so one cut at max_new_tokens is scored and trained without an eos. How the two kinds mix in each
step is learner/data.py's plan.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import pandas as pd
import torch

from learner.data import EVAL, TRAIN, PromptSplit, hash_fraction
from learner.errors import TokenizationError
from learner.logprobs import encode_answer, finish_ended
from learner.model import autocast_weights
from learner.reward import RewardModel, score
from learner.sampling import SamplingParams, encode_prompt, sample_many
from learner.train import PairExample, UnaryExample, eval_mode, mergeable, merged_adapter


@dataclass(frozen=True)
class Rollout:
    """One sampled answer."""

    prompt: str
    text: str
    token_count: int
    finish_reason: str  # "eos" or "length"


def sample_batch(model, tokenizer, prompts: Sequence[str], n: int, params: SamplingParams,
                 seed: int | None = None, merge: bool = False) -> list[list[Rollout]]:
    """`n` answers for each prompt from ONE sampling batch (`learner.sampling.sample_many`: every prompt repeated n
    times, left-padded), from the model's active adapter. The model is put in eval mode for the call (LoRA dropout
    off) and restored after. `merge`: with the active adapter merged into a copy of the weights
    (`learner.train.merged_adapter`: faster; not inside `use_adapter(model, None)`, where no adapter is active).
    Under autocast the frozen weights are cast once for the call, not at every token (`autocast_weights`)."""
    merging = merge and mergeable(model, model.active_adapter)
    with eval_mode(model), merged_adapter(model, model.active_adapter) if merging else nullcontext(), \
            autocast_weights(model):
        answers = sample_many(model, tokenizer, list(prompts), n, params, seed=seed)
    return [[Rollout(prompt, a.text, a.token_count, a.finish_reason) for a in item]
            for prompt, item in zip(prompts, answers)]


def best_vs_worst(prompt: str, answers: Sequence[Rollout], scores: Sequence[float]) -> list[PairExample]:
    """The highest- vs the lowest-scored answer; nothing when they tie (no preference to learn)."""
    best = max(range(len(answers)), key=lambda i: scores[i])
    worst = min(range(len(answers)), key=lambda i: scores[i])
    if scores[best] == scores[worst] or answers[best].text == answers[worst].text:
        return []
    b, w = answers[best], answers[worst]
    return [PairExample(prompt, b.text, w.text, source="onpolicy", chosen_ended=b.finish_reason == "eos",
                        rejected_ended=w.finish_reason == "eos", group=f"onpolicy:{prompt}")]


def ordered_pairs(prompt: str, answers: Sequence[Rollout], scores: Sequence[float]) -> list[PairExample]:
    """Every pair of distinct answers with distinct scores, the higher-scored chosen (6 from 4 answers, as a human
    ranking of 4 gives), widest margin first. A text sampled twice counts once. One group: a step takes them
    together, their answers in one forward pass."""
    first: dict[str, int] = {}  # each text's first index
    for i, a in enumerate(answers):
        first.setdefault(a.text, i)
    order = sorted(first.values(), key=lambda i: scores[i], reverse=True)
    pairs = [(hi, lo) for a, hi in enumerate(order) for lo in order[a + 1:] if scores[hi] != scores[lo]]
    pairs.sort(key=lambda p: scores[p[1]] - scores[p[0]])  # widest margin first
    ended = [a.finish_reason == "eos" for a in answers]
    return [PairExample(prompt, answers[hi].text, answers[lo].text, source="onpolicy", chosen_ended=ended[hi],
                        rejected_ended=ended[lo], group=f"onpolicy:{prompt}") for hi, lo in pairs]


def around_median(prompt: str, answers: Sequence[Rollout], scores: Sequence[float]) -> list[UnaryExample]:
    """Answers above the prompt's median score are desirable, below undesirable; those on the median dropped."""
    median = statistics.median(scores)
    return [UnaryExample(prompt, a.text, desirable=s > median, source="onpolicy", ended=a.finish_reason == "eos",
                         group=f"onpolicy:{prompt}")
            for a, s in zip(answers, scores, strict=True) if s != median]


OnPolicyBuilder = Callable[[str, Sequence[Rollout], Sequence[float]], list]
PAIR_BUILDERS: dict[str, OnPolicyBuilder] = {"best_worst": best_vs_worst, "all": ordered_pairs}  # rollout_pairs


def onpolicy_builder(algorithm: str, rollout_pairs: str) -> OnPolicyBuilder:
    """How a prompt's scored rollouts become examples: DPO pairs as `rollout_pairs` says, KTO around the median."""
    return PAIR_BUILDERS[rollout_pairs] if algorithm == "dpo" else around_median


def examples_per_prompt(algorithm: str, rollout_pairs: str, n: int) -> int:
    """Examples one prompt's n rollouts are planned to give (what a regeneration's prompt count is sized with)."""
    return n * (n - 1) // 2 if onpolicy_builder(algorithm, rollout_pairs) is ordered_pairs else 1


@dataclass
class OnPolicyBatch:
    """Examples built from one regeneration, with what it cost and what was dropped."""

    examples: list
    answers: int  # answers sampled
    dropped_tokenization: int  # answers whose tokens did not line up with the prompt's (see learner.logprobs)


Scorer = Callable[[str, Sequence[Rollout]], list[float]]  # a prompt's rollouts -> one score each (higher: better)


def reward_model_scorer(reward_model: RewardModel) -> Scorer:
    """The reward model's scores, one forward pass per prompt."""
    def scores(prompt: str, rollouts: Sequence[Rollout]) -> list[float]:
        return score(reward_model, [prompt] * len(rollouts), [r.text for r in rollouts],
                     batch_size=max(len(rollouts), 1), ended=[r.finish_reason == "eos" for r in rollouts])
    return scores


def implicit_reward_scorer(model, tokenizer, reference: Callable[[Sequence], torch.Tensor], max_length: int,
                           batch_size: int) -> Scorer:
    """The policy's implicit reward, log pi(answer) - log ref(answer) (DPO's, arXiv 2305.18290 Eq. 5, up to beta),
    with pi the model's active adapter as it is at the call (eval mode, no gradient) and `reference` the round's
    memoised reference log-probs (`learner.refcache.ReferenceLogps`: the pair later trained on reuses them)."""
    from learner.logprobs import distinct_sequence_logprobs

    def scores(prompt: str, rollouts: Sequence[Rollout]) -> list[float]:
        encoded = [encode_answer(tokenizer, prompt, r.text, max_length, r.finish_reason == "eos") for r in rollouts]
        with eval_mode(model), torch.no_grad():
            policy = distinct_sequence_logprobs(model, encoded, tokenizer.pad_token_id, batch_size).logps
        return (policy.float() - reference(encoded).float()).tolist()
    return scores


def onpolicy_examples(model, reward_model: RewardModel, tokenizer, prompts: Sequence[str], algorithm: str,
                      n: int, params: SamplingParams, max_length: int, seed: int | None = None,
                      merge: bool = False, scorer: Scorer | None = None,
                      rollout_pairs: str = "best_worst") -> OnPolicyBatch:
    """Sample `n` answers per prompt from the model's active adapter (`merge`: merged, see `sample_batch`), score
    them (`scorer`; the reward model's by default), and build examples (DPO: `rollout_pairs`, see RoundConfig)."""
    scorer = scorer or reward_model_scorer(reward_model)
    rollouts = sample_batch(model, tokenizer, prompts, n, params, seed=seed, merge=merge)
    build = onpolicy_builder(algorithm, rollout_pairs)
    examples, dropped = [], 0
    for prompt, group in zip(prompts, rollouts, strict=True):
        kept = []
        for r in group:
            try:
                reward_model.encode(prompt, r.text, r.finish_reason == "eos")
            except TokenizationError:  # a rare boundary merge: skip this answer, count it, keep the round going
                dropped += 1
                continue
            kept.append(r)
        if len(kept) < 2:
            continue
        examples.extend(build(prompt, kept, scorer(prompt, kept)))
    return OnPolicyBatch(examples, answers=sum(len(g) for g in rollouts), dropped_tokenization=dropped)


# --- human labels ---------------------------------------------------------------------------------------------

def _pairs(frame: pd.DataFrame) -> list[PairExample]:
    return [PairExample(r.prompt, r.chosen, r.rejected, "human", finish_ended(r.chosen_finish_reason),
                        finish_ended(r.rejected_finish_reason), group=str(r.item_id)) for r in frame.itertuples()]


def _unary(frame: pd.DataFrame) -> list[UnaryExample]:
    return [UnaryExample(r.prompt, r.completion, bool(r.label), "human", finish_ended(r.finish_reason),
                         group=str(r.item_id)) for r in frame.itertuples()]


HUMAN_DATA: dict[str, tuple[str, Callable[[pd.DataFrame], list]]] = {
    # algorithm: (snapshot table, rows -> examples)
    "dpo": ("pairs", _pairs),
    "kto": ("unary", _unary),
}


def human_examples(frame: pd.DataFrame, algorithm: str, tokenizer, max_length: int) -> tuple[list, dict[str, int]]:
    """Examples from a snapshot table, and counts of those dropped by reason: one label whose tokens do not line
    up (or whose prompt is too long) must not fail every future round, so it is left out and counted instead."""
    examples, dropped = [], {}
    for example in HUMAN_DATA[algorithm][1](frame):
        try:
            for prompt, answer, ended in example.texts():
                encode_answer(tokenizer, prompt, answer, max_length, ended)
        except TokenizationError as exc:
            reason = "prompt_too_long" if "no room" in str(exc) else "tokenization"
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        examples.append(example)
    return examples, dropped


def usable_prompts(prompts: pd.DataFrame, tokenizer, max_length: int) -> list[str]:
    """The prompts of prompts.parquet that leave room for an answer within max_length."""
    return [r.prompt for r in prompts.itertuples() if len(encode_prompt(tokenizer, r.prompt)) < max_length - 1]


def split_prompts(usable: list[str], split: PromptSplit, eval_prompts: int) -> tuple[list[str], list[str]]:
    """(rollout prompts, eval prompts): rollouts only on training prompts; at most `eval_prompts` of the split's
    eval prompts (the same ones every round: the smallest hashes first)."""
    held = sorted((p for p in usable if split.role(p) == EVAL), key=hash_fraction)[:eval_prompts]
    return [p for p in usable if split.role(p) == TRAIN], held
