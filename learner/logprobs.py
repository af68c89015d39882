"""Summed log-probs of answers given prompts: the one helper every loss, the reward model and evaluation use.

An answer is scored as the chat template renders it: the prompt with the assistant's turn opened, then the
answer's tokens, then the eos token that ends the turn when the model chose to stop (finish_reason "eos";
`learner.sampling` counts it the same way). An answer cut at max_new_tokens (finish_reason "length") gets no eos:
training must not teach the model to stop where it never did. Only answer tokens (eos included) are scored.
Sequences are right-padded, and the answers of a batch (chosen and rejected together) go through ONE forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from learner.errors import TokenizationError
from learner.sampling import chat_messages, encode_prompt


@dataclass(frozen=True)
class EncodedAnswer:
    """Token ids of prompt + answer (+ eos), and where the answer starts."""

    input_ids: tuple[int, ...]
    prompt_length: int  # index of the first answer token
    truncated: bool  # the answer was cut from the end to fit max_length (its eos is then missing)
    ended: bool = True  # the answer ended with eos when sampled (finish_reason "eos"), so an eos is scored

    @property
    def answer_length(self) -> int:
        return len(self.input_ids) - self.prompt_length


def finish_ended(finish_reason: str) -> bool:
    """Whether an answer with this finish_reason ended with eos ("eos") or was cut at max_new_tokens ("length")."""
    if finish_reason not in ("eos", "length"):
        raise TokenizationError(f"finish_reason must be 'eos' or 'length', got {finish_reason!r}")
    return finish_reason == "eos"


def encode_answer(tokenizer, prompt: str | list[dict], answer: str, max_length: int,
                  ended: bool = True) -> EncodedAnswer:
    """Tokenize prompt and prompt + answer (+ eos when `ended`); raise TokenizationError when they do not line up.

    The full text is tokenized in one piece (as the model would read it), so a merge across the prompt/answer
    boundary, or a template that renders differently as text than as ids, would shift the answer mask onto
    prompt tokens: we check that the prompt's ids are a prefix of the full ids instead of trusting it
    (TRL issues #1153 and #2054). Answers are cut from the end to fit `max_length`; a prompt that leaves no
    room for one answer token is an error, never dropped silently.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    prompt_text = tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=False)
    full_ids = list(tokenizer(prompt_text + answer, add_special_tokens=False)["input_ids"])
    if ended:
        full_ids.append(tokenizer.eos_token_id)
    n = len(prompt_ids)
    if full_ids[:n] != prompt_ids:
        mismatch = next(i for i, (a, b) in enumerate(zip(prompt_ids, full_ids + [None] * n)) if a != b)
        raise TokenizationError(
            f"the prompt's tokens are not a prefix of prompt + answer (first difference at token {mismatch} of {n}): "
            f"the tokenizer merges across the boundary or its chat template renders differently as text; "
            f"answer starts {answer[:40]!r}"
        )
    if n >= max_length:
        raise TokenizationError(
            f"the prompt has {n} tokens with its chat template, max_length is {max_length}: no room for the answer; "
            "raise max_length or shorten the prompt"
        )
    return EncodedAnswer(tuple(full_ids[:max_length]), n, truncated=len(full_ids) > max_length, ended=ended)


def collate(encoded: Sequence[EncodedAnswer], pad_token_id: int,
            device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (input_ids, attention_mask, answer_mask), each (B, T); answer_mask is True on answer tokens."""
    width = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    answer_mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, e in enumerate(encoded):
        input_ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[row, :len(e.input_ids)] = 1
        answer_mask[row, e.prompt_length:len(e.input_ids)] = True
    return input_ids.to(device), attention_mask.to(device), answer_mask.to(device)


@dataclass
class SequenceLogprobs:
    """Per-sequence results of one forward pass."""

    logps: Tensor  # (B,) sum of log p(answer token) over the answer, eos included
    token_counts: Tensor  # (B,) answer tokens scored (IPO normalises by it)
    entropy: Tensor | None = None  # (B,) mean next-token entropy (nats) over the answer's positions

    def split(self, n: int) -> tuple[SequenceLogprobs, SequenceLogprobs]:
        """The first n sequences and the rest (e.g. chosen and rejected from one forward pass)."""
        def part(s: slice) -> SequenceLogprobs:
            return SequenceLogprobs(self.logps[s], self.token_counts[s],
                                    None if self.entropy is None else self.entropy[s])
        return part(slice(0, n)), part(slice(n, None))


def sequence_logprobs(model, encoded: Sequence[EncodedAnswer], pad_token_id: int,
                      with_entropy: bool = False) -> SequenceLogprobs:
    """Summed answer log-probs of B encoded sequences in one forward pass (gradients flow unless under no_grad).

    Naive equivalent, per sequence ids with answer from index s:
        logits = model(ids).logits[0]
        sum(log_softmax(logits[t - 1])[ids[t]] for t in range(s, len(ids)))
    Logits are only materialised at the positions that predict an answer token (`answer_logits`): the output layer
    and the softmax over the vocabulary are the largest part of a step after the transformer's layers, and the
    prompts' and the padding's part of them is never used.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask, answer_mask = collate(encoded, pad_token_id, device)
    mask = answer_mask[:, 1:]  # position t predicts token t + 1
    logits = answer_logits(model, input_ids, attention_mask, mask).float()  # (N, vocab), N answer tokens in all
    targets = input_ids[:, 1:][mask]
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    counts = mask.sum(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            logp = torch.log_softmax(logits.detach(), dim=-1)
            entropy = sum_per_answer(-(logp.exp() * logp).sum(-1), mask) / counts.clamp(min=1)
    return SequenceLogprobs(sum_per_answer(token_logps, mask), counts, entropy)


def sum_per_answer(values: Tensor, mask: Tensor) -> Tensor:
    """(B,) sums of per-position `values` (N,), given in the row-major order of `mask`'s (B, T - 1) True entries (as
    `answer_logits` returns its rows)."""
    rows = mask.nonzero()[:, 0]
    return torch.zeros(mask.shape[0], device=values.device, dtype=values.dtype).index_add(0, rows, values)


def transformer_body(model):
    """The causal LM inside `model` (a PeftModel, LoRA layers injected, or the plain model) and its transformer body
    (the decoder stack, whose output is the final-norm hidden state); the body is the causal LM itself where it has
    no separate one."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm, getattr(causal_lm, "base_model", causal_lm)


# Config fields by which a causal LM's forward changes its logits after the output layer (Gemma 2's soft-capping,
# Cohere's and Granite's scales): such models are scored through their own forward.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def answer_logits(model, input_ids: Tensor, attention_mask: Tensor, mask: Tensor) -> Tensor:
    """(N, vocab) logits at the N positions where `mask` (B, T - 1) is True, in row-major order: the transformer's
    last hidden states at those positions only go through the output layer. A PeftModel (LoRA layers injected) or a
    plain causal LM; a model whose forward transforms its logits (`_LOGIT_TRANSFORMS`), or that has no separate
    transformer body, is run whole and its logits picked."""
    causal_lm, body = transformer_body(model)
    head, config = causal_lm.get_output_embeddings(), causal_lm.config
    transforms = any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)
    if body is causal_lm or head is None or transforms:
        first = int(mask.any(0).nonzero()[0])  # logits from the earliest answer position on (`logits_to_keep`)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       logits_to_keep=input_ids.shape[1] - first).logits
        return logits[:, :-1][mask[:, first:]]
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return head(hidden[:, :-1][mask])


def distinct_sequence_logprobs(model, encoded: Sequence[EncodedAnswer], pad_token_id: int,
                               batch_size: int | None = None) -> SequenceLogprobs:
    """`sequence_logprobs` of `encoded`, each distinct sequence through the model once (the pairs of one ranking
    share its answers: K answers, C(K,2) pairs), `batch_size` distinct sequences per pass (None: one pass), the
    results in the order of `encoded`."""
    position: dict[tuple, int] = {}
    unique: list[EncodedAnswer] = []
    for e in encoded:
        key = (e.prompt_length, e.input_ids)  # where the answer starts is part of what is scored
        if key not in position:
            position[key] = len(unique)
            unique.append(e)
    size = batch_size or len(unique)
    parts = [sequence_logprobs(model, unique[i:i + size], pad_token_id) for i in range(0, len(unique), size)]
    logps, counts = torch.cat([p.logps for p in parts]), torch.cat([p.token_counts for p in parts])
    index = torch.tensor([position[e.prompt_length, e.input_ids] for e in encoded], device=logps.device)
    return SequenceLogprobs(logps[index], counts[index])


def answer_logprobs(model, tokenizer, prompts: Sequence[str | list[dict]], answers: Sequence[str], max_length: int,
                    with_entropy: bool = False, ended: Sequence[bool] | None = None) -> SequenceLogprobs:
    """Encode (prompt, answer) pairs (each with eos unless `ended` says it was cut) and score them in one pass."""
    ended = [True] * len(answers) if ended is None else ended
    encoded = [encode_answer(tokenizer, p, a, max_length, e) for p, a, e in zip(prompts, answers, ended, strict=True)]
    return sequence_logprobs(model, encoded, tokenizer.pad_token_id, with_entropy=with_entropy)
