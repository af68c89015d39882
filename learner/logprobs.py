"""Summed log-probs of answers given prompts: the one helper every loss, the reward model and evaluation use.

An answer is scored as the chat template renders it: the prompt with the assistant's turn opened, then the
answer's tokens, then the eos token that ends the turn when the model chose to stop (finish_reason "eos";
`learner.sampling` counts it the same way). An answer cut at max_new_tokens (finish_reason "length") gets no eos:
training must not teach the model to stop where it never did. Only answer tokens (eos included) are scored.
The answers of a batch (chosen and rejected together) go through ONE forward pass, answers to the same prompt sharing
one copy of its tokens (`shared_prompt_layout`; right-padded rows where the attention takes no custom mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from learner.errors import TokenizationError
from learner.model import takes_position_ids
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


@dataclass(frozen=True)
class Layout:
    """B encoded answers laid out for one forward pass.

    `input_ids` (R, T); `attention_mask` either (R, T) padding (one answer per row) or (R, 1, T, T), True (or 0.0) =
    may attend (answers sharing their prompt); `position_ids` (R, T) with the 4D mask, else None. `rows`, `cols` (N,)
    the positions whose next-token distribution scores an answer token, `targets` (N,) those tokens, `owner` (N,) the
    index in `encoded` of the answer each belongs to; `last` (2, B) each answer's last token (row, column).
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor | None
    rows: Tensor
    cols: Tensor
    targets: Tensor
    owner: Tensor
    last: Tensor
    size: int  # B

    def per_answer(self, values: Tensor) -> Tensor:
        """(B,) sums of per-position `values` (N,), in the order of `rows`/`cols`, over each answer's positions."""
        return torch.zeros(self.size, device=values.device, dtype=values.dtype).index_add(0, self.owner, values)

    @property
    def counts(self) -> Tensor:
        """(B,) positions scored per answer."""
        return torch.bincount(self.owner, minlength=self.size)

    def forward_kwargs(self) -> dict:
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}
        if self.position_ids is not None:
            kwargs["position_ids"] = self.position_ids
        return kwargs


def _long(values, device) -> Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def padded_layout(encoded: Sequence[EncodedAnswer], pad_token_id: int, device: torch.device | str = "cpu") -> Layout:
    """One right-padded row per answer (`collate`): what every attention implementation takes."""
    input_ids, attention_mask, answer_mask = collate(encoded, pad_token_id, device)
    mask = answer_mask[:, 1:]  # position t predicts token t + 1
    rows, cols = mask.nonzero(as_tuple=True)
    last = _long([list(range(len(encoded))), [len(e.input_ids) - 1 for e in encoded]], device)
    return Layout(input_ids, attention_mask, None, rows, cols, input_ids[:, 1:][mask], rows, last, len(encoded))


# A group's attention is a full (masked) square: at SmolLM2's width its cost per token is ~1/3000 of the linear
# layers' per token of the group's length, so a group stops at 512 tokens (<= 17%; a K=4 ranking of 64-token answers
# is ~300) and the prompt is repeated for the next answers: many long answers to one prompt would otherwise cost more
# in attention than their shared prompt saves.
MAX_GROUP_TOKENS = 512


def shared_prompt_layout(encoded: Sequence[EncodedAnswer], pad_token_id: int, device: torch.device | str = "cpu",
                         max_group_tokens: int = MAX_GROUP_TOKENS) -> Layout:
    """Answers to the same prompt share ONE copy of the prompt's tokens. A group is the prompt followed by each of its
    answers; every answer attends to the prompt and to itself (causally), never to its siblings, and its positions
    continue from the prompt's end, so each answer is scored as it would be alone after its prompt. Groups are packed
    into rows (first fit, longest first; rows as wide as the longest group) and never attend to each other.

    A K=4 ranking's answers after one SmolLM2 prompt (~40 tokens with the chat template, answers up to 65): ~30%
    fewer tokens through the model than four padded rows, for the same values up to float rounding."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for index, e in enumerate(encoded):
        by_prompt.setdefault(tuple(e.input_ids[:e.prompt_length]), []).append(index)
    groups: list[list] = []  # [length, prompt, answers]: a prompt's answers while they fit in max_group_tokens
    for prompt, members in by_prompt.items():
        group = None
        for i in members:
            size = encoded[i].answer_length
            if group is None or group[0] + size > max_group_tokens:  # an answer longer than that gets its own
                group = [len(prompt), prompt, []]
                groups.append(group)
            group[0] += size
            group[2].append(i)
    groups.sort(key=lambda g: g[0], reverse=True)
    width = groups[0][0]
    free: list[int] = []  # per row: the width its groups leave
    row_groups: list[list] = []
    for group in groups:  # first fit, longest first
        r = next((r for r, space in enumerate(free) if space >= group[0]), len(free))
        if r == len(free):
            free.append(width)
            row_groups.append([])
        free[r] -= group[0]
        row_groups[r].append(group)
    ids, positions, group_of, answer_of = ([[] for _ in free] for _ in range(4))  # per row; answer_of -1: prompt
    rows, cols, targets, owner = [], [], [], []
    last = [[0] * len(encoded), [0] * len(encoded)]
    for r, in_row in enumerate(row_groups):
        for g, (_, prompt, members) in enumerate(in_row):
            n = len(prompt)
            prompt_end = len(ids[r]) + n - 1
            ids[r] += prompt
            positions[r] += range(n)
            group_of[r] += [g] * n
            answer_of[r] += [-1] * n
            for i in members:
                tokens = list(encoded[i].input_ids[n:])
                k, at = len(tokens), len(ids[r])
                predictors = [prompt_end, *range(at, at + k)]  # token j of the answer is predicted by predictors[j]
                rows += [r] * k
                cols += predictors[:k]
                targets += tokens
                owner += [i] * k
                last[0][i], last[1][i] = r, predictors[k]  # its last token (the prompt's, for an empty answer)
                ids[r] += tokens
                positions[r] += range(n, n + k)
                group_of[r] += [g] * k
                answer_of[r] += [i] * k

    def padded(per_row: list[list[int]], fill: int) -> Tensor:
        return torch.tensor([row + [fill] * (width - len(row)) for row in per_row], dtype=torch.long)

    group_of, answer_of = padded(group_of, -1), padded(answer_of, -1)  # padding: group -1
    query_group, key_group = group_of.unsqueeze(2), group_of.unsqueeze(1)
    key_answer = answer_of.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = ((query_group == key_group) & (query_group >= 0) & causal
               & ((key_answer == -1) | (key_answer == answer_of.unsqueeze(2))))
    allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no row of the softmax is empty
    return Layout(padded(ids, pad_token_id).to(device), allowed.unsqueeze(1).to(device),
                  padded(positions, 0).to(device), _long(rows, device),
                  _long(cols, device), _long(targets, device), _long(owner, device), _long(last, device),
                  len(encoded))


# Attention implementations that take a custom 4D mask (transformers hands a 4D mask to them as given): sdpa as a
# boolean, eager as additive floats. Others (flash attention's kernels take padding only) get padded rows.
_CUSTOM_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def shares_prompts_exactly(causal_lm, encoded: Sequence[EncodedAnswer]) -> bool:
    """Whether the shared-prompt layout scores `encoded` on this model as each answer alone.

    It needs an attention that takes a custom 4D mask (`_CUSTOM_MASK_IMPLEMENTATIONS`) and positions given by
    `position_ids` (`learner.model.takes_position_ids`: not ALiBi models). A 4D mask is used as given by every
    layer, so a sliding-window layer sees no window in it: exact only while no sequence is longer than the window
    (transformers' window keeps keys less than `sliding_window` positions back; Qwen2 sets `sliding_window` to None
    when its window is off)."""
    config = causal_lm.config
    window = getattr(config, "sliding_window", None)
    return (getattr(config, "_attn_implementation", None) in _CUSTOM_MASK_IMPLEMENTATIONS
            and takes_position_ids(causal_lm)
            and (window is None or max(len(e.input_ids) for e in encoded) <= window))


def layout(model, encoded: Sequence[EncodedAnswer], pad_token_id: int) -> Layout:
    """The layout `model` runs best, on its device: answers sharing their prompt where that scores each answer as
    alone (`shares_prompts_exactly`), else one padded row per answer (the model builds its own masks)."""
    device = next(model.parameters()).device
    causal_lm, _ = transformer_body(model)
    implementation = getattr(causal_lm.config, "_attn_implementation", None)
    if not shares_prompts_exactly(causal_lm, encoded):
        return padded_layout(encoded, pad_token_id, device)
    shared = shared_prompt_layout(encoded, pad_token_id, device)
    if implementation == "sdpa":
        return shared
    additive = torch.zeros(shared.attention_mask.shape, dtype=torch.float32, device=device)
    return replace(shared, attention_mask=additive.masked_fill_(~shared.attention_mask, torch.finfo(torch.float32).min))


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
    Answers to the same prompt share one copy of it (`layout`), and logits are only materialised at the positions
    that predict an answer token (`answer_logits`): the output layer and the softmax over the vocabulary are the
    largest part of a step after the transformer's layers, and the prompts' and the padding's part of them is never
    used.
    """
    batch = layout(model, encoded, pad_token_id)
    logits = answer_logits(model, batch).float()  # (N, vocab), N answer tokens in all
    token_logps = logits.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    counts = batch.counts
    entropy = None
    if with_entropy:
        with torch.no_grad():
            logp = torch.log_softmax(logits.detach(), dim=-1)
            entropy = batch.per_answer(-(logp.exp() * logp).sum(-1)) / counts.clamp(min=1)
    return SequenceLogprobs(batch.per_answer(token_logps), counts, entropy)


def transformer_body(model):
    """The causal LM inside `model` (a PeftModel, LoRA layers injected, or the plain model) and its transformer body
    (the decoder stack, whose output is the final-norm hidden state); the body is the causal LM itself where it has
    no separate one."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm, getattr(causal_lm, "base_model", causal_lm)


# Config fields by which a causal LM's forward changes its logits after the output layer (Gemma 2's soft-capping,
# Cohere's and Granite's scales): such models are scored through their own forward.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def answer_logits(model, batch: Layout) -> Tensor:
    """(N, vocab) logits at the N positions of `batch` that predict an answer token (its `rows`, `cols`): the
    transformer's last hidden states there only go through the output layer. A PeftModel (LoRA layers injected) or a
    plain causal LM; a model whose forward transforms its logits (`_LOGIT_TRANSFORMS`), or that has no separate
    transformer body, is run whole and its logits picked."""
    causal_lm, body = transformer_body(model)
    head, config = causal_lm.get_output_embeddings(), causal_lm.config
    transforms = any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)
    if body is causal_lm or head is None or transforms:
        return model(**batch.forward_kwargs()).logits[batch.rows, batch.cols]
    hidden = body(**batch.forward_kwargs()).last_hidden_state
    return head(hidden[batch.rows, batch.cols])


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
