"""The policy's training data: human labels as examples, and on-policy examples the round makes itself.

On-policy: sample N answers for several prompts in one batched generate, score them with the reward model, and
turn each prompt's answers into examples (best vs worst for DPO, around the median for KTO). `ExamplePool` mixes
both and regenerates the on-policy part every `sync_every` optimizer steps (arXiv 2506.21495: 1 = online,
large = offline).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from learner.errors import LearnerError, TokenizationError
from learner.logprobs import encode_answer
from learner.reward import RewardModel, score
from learner.sampling import SamplingParams, encode_prompt, eos_token_ids
from learner.train import PairExample, UnaryExample, hash_fraction, in_heldout


@dataclass(frozen=True)
class Rollout:
    """One sampled answer."""

    prompt: str
    text: str
    token_count: int
    finish_reason: str  # "eos" or "length"


@torch.no_grad()
def sample_batch(model, tokenizer, prompts: Sequence[str], n: int, params: SamplingParams,
                 seed: int | None = None) -> list[list[Rollout]]:
    """`n` answers for each prompt from ONE generate call: every prompt repeated n times, left-padded.

    Left padding keeps each row's last prompt token at the same position, where generation continues.
    The model is put in eval mode for the call (LoRA dropout off) and restored after.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    rows = [ids for ids in (encode_prompt(tokenizer, p) for p in prompts) for _ in range(n)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention_mask[i, width - len(ids):] = 1
    if seed is not None:
        torch.manual_seed(seed)
    eos_ids = eos_token_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    try:
        sequences = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=True,
            temperature=params.temperature, top_p=params.top_p, top_k=0, max_new_tokens=params.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos_ids),
            # Weights mid-training can overflow the logits (a learning rate far too high); sampling must not crash
            # outside the gate: the next loss is then non-finite and the round is rejected for it.
            remove_invalid_values=True,
        )
    finally:
        model.train(was_training)
    new_tokens = sequences[:, width:].tolist()
    out: list[list[Rollout]] = [[] for _ in prompts]
    for i, tokens in enumerate(new_tokens):
        ended = [j for j, t in enumerate(tokens) if t in eos_ids]
        length = ended[0] if ended else len(tokens)
        text = tokenizer.decode(tokens[:length], skip_special_tokens=True).strip()
        out[i // n].append(Rollout(prompts[i // n], text, length, "eos" if ended else "length"))
    return out


def best_vs_worst(prompt: str, answers: Sequence[str], scores: Sequence[float]) -> list[PairExample]:
    """The highest- vs the lowest-scored answer; nothing when they tie (no preference to learn)."""
    best = max(range(len(answers)), key=lambda i: scores[i])
    worst = min(range(len(answers)), key=lambda i: scores[i])
    if scores[best] == scores[worst] or answers[best] == answers[worst]:
        return []
    return [PairExample(prompt, answers[best], answers[worst], source="onpolicy")]


def around_median(prompt: str, answers: Sequence[str], scores: Sequence[float]) -> list[UnaryExample]:
    """Answers above the prompt's median score are desirable, below undesirable; those on the median dropped."""
    median = statistics.median(scores)
    return [UnaryExample(prompt, a, desirable=s > median, source="onpolicy")
            for a, s in zip(answers, scores, strict=True) if s != median]


OnPolicyBuilder = Callable[[str, Sequence[str], Sequence[float]], list]
ONPOLICY_BUILDERS: dict[str, OnPolicyBuilder] = {"dpo": best_vs_worst, "kto": around_median}


@dataclass
class OnPolicyBatch:
    """Examples built from one regeneration, with what it cost and what was dropped."""

    examples: list
    answers: int  # answers sampled
    dropped_tokenization: int  # answers whose tokens did not line up with the prompt's (see learner.logprobs)


def onpolicy_examples(model, reward_model: RewardModel, tokenizer, prompts: Sequence[str], algorithm: str,
                      n: int, params: SamplingParams, max_length: int, seed: int | None = None) -> OnPolicyBatch:
    """Sample `n` answers per prompt from the model's active adapter, score them, and build examples."""
    rollouts = sample_batch(model, tokenizer, prompts, n, params, seed=seed)
    build = ONPOLICY_BUILDERS[algorithm]
    examples, dropped = [], 0
    for prompt, group in zip(prompts, rollouts, strict=True):
        texts = []
        for r in group:
            try:
                reward_model.encode(prompt, r.text)
            except TokenizationError:  # a rare boundary merge: skip this answer, count it, keep the round going
                dropped += 1
                continue
            texts.append(r.text)
        if len(texts) < 2:
            continue
        scores = score(reward_model, [prompt] * len(texts), texts, batch_size=max(len(texts), 1))
        examples.extend(build(prompt, texts, scores))
    return OnPolicyBatch(examples, answers=sum(len(g) for g in rollouts), dropped_tokenization=dropped)


# --- human labels ---------------------------------------------------------------------------------------------

HUMAN_DATA: dict[str, tuple[str, Callable[[pd.DataFrame], list]]] = {
    # algorithm: (snapshot table, rows -> examples)
    "dpo": ("pairs", lambda f: [PairExample(r.prompt, r.chosen, r.rejected, "human") for r in f.itertuples()]),
    "kto": ("unary", lambda f: [UnaryExample(r.prompt, r.completion, bool(r.label), "human") for r in f.itertuples()]),
}


def human_examples(frame: pd.DataFrame, algorithm: str, tokenizer, max_length: int) -> tuple[list, dict[str, int]]:
    """Examples from a snapshot table, and counts of those dropped by reason: one label whose tokens do not line
    up (or whose prompt is too long) must not fail every future round, so it is left out and counted instead."""
    examples, dropped = [], {}
    for example in HUMAN_DATA[algorithm][1](frame):
        try:
            for prompt, answer in example.texts():
                encode_answer(tokenizer, prompt, answer, max_length)
        except TokenizationError as exc:
            reason = "prompt_too_long" if "no room" in str(exc) else "tokenization"
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        examples.append(example)
    return examples, dropped


def split_prompts(prompts: pd.DataFrame, eval_fraction: float, eval_prompts: int, tokenizer,
                  max_length: int) -> tuple[list[str], list[str]]:
    """(rollout prompts, eval prompts): a fixed split by a hash of prompt_id, at most `eval_prompts` held out;
    prompts too long for max_length are left out of both. When no prompt hashes into the held-out fraction
    (a tiny prompt set), the one with the smallest hash is held out."""
    usable = [(str(r.prompt_id), r.prompt) for r in prompts.itertuples()
              if len(encode_prompt(tokenizer, r.prompt)) < max_length - 1]
    heldout = [p for p in usable if in_heldout(p[0], eval_fraction)]
    if not heldout and usable and eval_prompts:
        heldout = [min(usable, key=lambda p: hash_fraction(p[0]))]
    heldout = sorted(heldout, key=lambda p: hash_fraction(p[0]))[:eval_prompts]
    eval_ids = {p[0] for p in heldout}
    return [p[1] for p in usable if p[0] not in eval_ids], [p[1] for p in heldout]


class ExamplePool:
    """Human examples plus on-policy ones regenerated every `sync_every` steps; batches drawn shuffled
    (KTO's z_ref needs answers from different prompts in a batch, TRL issue #2554)."""

    def __init__(self, human: list, regenerate: Callable[[int], list] | None, sync_every: int, seed: int):
        self.human, self.onpolicy = human, []
        self.regenerate, self.sync_every = regenerate, sync_every
        self.rng = random.Random(seed)

    def batch(self, step: int, size: int) -> list:
        if self.regenerate is not None and step % self.sync_every == 0:
            # A regeneration where every prompt tied keeps the previous on-policy examples rather than none.
            self.onpolicy = self.regenerate(step) or self.onpolicy
        pool = self.human + self.onpolicy
        if not pool:
            raise LearnerError("no training examples: no human labels within max_staleness and the on-policy "
                               "rollouts gave none (no prompts in prompts.parquet, or rollout_prompts = 0?)")
        return self.rng.sample(pool, min(size, len(pool)))
