"""Sampling answers from the policy: K answers for each of several prompts in ONE batch, by a KV-cached loop.

Every answer records what the learner and the metrics need later: its text, token count, finish reason
(`eos` when the model ended it, `length` when max_new_tokens cut it) and the sum of its token log-probs under the
generating model at temperature 1 (the quantity DPO/KTO compare; the sampling temperature only shapes which tokens
were drawn).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from learner.errors import ConfigError
from learner.params import SamplingParams  # noqa: F401  (re-exported: its home is torch-free)


@dataclass(frozen=True)
class SampledAnswer:
    """One sampled answer."""

    text: str
    token_count: int
    finish_reason: str  # "eos" or "length"
    logprob_sum: float  # sum of log p(token) under the generating model at temperature 1
    token_logprobs: tuple[float, ...] = ()  # the terms of logprob_sum (answer tokens, then the eos if it ended)


def shown_text(text: str) -> str:
    """A model's text as people and the store take it. Byte-level tokenizers have a token for byte 0 (SmolLM2's
    token 190) that a random or broken model can draw; the store refuses NUL characters (they end C strings), so
    each becomes U+FFFD, the character decoders already show for bytes they cannot read."""
    return text.replace("\0", "\ufffd")


def chat_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt as chat messages: a plain string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of the prompt rendered with the tokenizer's chat template, ready for the assistant's turn."""
    ids = tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def eos_token_ids(tokenizer, model) -> set[int]:
    """Every token id that ends an answer (the tokenizer's eos and the generation config's)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return {i for i in ids if i is not None}


def sample_answers(model, tokenizer, prompt: str | list[dict], k: int, params: SamplingParams,
                   seed: int | None = None) -> list[SampledAnswer]:
    """K answers to one prompt from one batch (the prompt repeated K times, so no padding)."""
    return sample_many(model, tokenizer, [prompt], k, params, seed=seed)[0]


def all_finite(values: torch.Tensor) -> bool:
    """Whether every value is finite, by one sum: an inf or a NaN anywhere makes the sum inf or NaN. Finite values
    whose sum overflows read as not finite (then `nan_to_num` leaves them as they are: only time is lost). A tenth
    of `torch.isfinite(values).all()`'s time on a CPU batch of logits (28 x 49k: 0.1 vs 2.4 ms), paid every token."""
    return bool(torch.isfinite(values.sum()))


def nucleus(logits: torch.Tensor, temperature: float, top_p: float,
            candidates: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p nucleus of softmax(logits / temperature) per row of `logits` (rows, vocab): (probabilities, token
    ids), each (rows, c), most likely first (top_p >= 1: the whole vocabulary in its order), probabilities zeroed
    past each row's nucleus.

    The nucleus is transformers' `TopPLogitsWarper`'s: a token is kept when the probability of the tokens more likely
    than it is below `top_p` (the most likely token always). Sorting the whole vocabulary at every step, as that warper
    does, and drawing from all of it cost more than the model's matmuls when a CPU samples a batch (SmolLM2: 49k
    tokens, 24 rows); here only the `candidates` most likely tokens are sorted, and more (x4 up to the vocabulary)
    only for the rows whose nucleus does not fit in them, so the nucleus is exact either way. (A small model at
    T = 0.8 leaves a few rows of a batch with flat distributions at most steps: growing every row for them took a
    step's `topk` from ~2.3 ms to ~10 ms on 28 rows of SmolLM2 on a 2-core CPU.)
    """
    # Made finite after the temperature too: a logit of +inf or 3e38 (weights a far too large learning rate broke)
    # must give a distribution, not NaNs that multinomial refuses.
    scaled = logits.float() / temperature
    probs = torch.softmax(scaled if all_finite(scaled) else torch.nan_to_num(scaled), dim=-1)
    vocab = probs.shape[-1]
    if top_p >= 1.0:  # no nucleus (as generate skips its warper): the whole distribution, unsorted
        return probs, torch.arange(vocab, device=probs.device).expand_as(probs)
    k = min(candidates, vocab)
    top, index = probs.topk(k, dim=-1)  # descending
    keep = _kept(top, top_p)
    while k < vocab:
        grow = keep[:, -1].nonzero().flatten()  # rows whose nucleus may go on past the candidates
        if not len(grow):
            break
        wider = min(4 * k, vocab)
        widen = (0, wider - k)
        top, index, keep = (torch.nn.functional.pad(top, widen), torch.nn.functional.pad(index, widen),
                            torch.nn.functional.pad(keep, widen, value=False))
        top[grow], index[grow] = probs[grow].topk(wider, dim=-1)
        keep[grow] = _kept(top[grow], top_p)
        k = wider
    return torch.where(keep, top, torch.zeros_like(top)), index


def _kept(top: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of the descending candidate probabilities `top` are in the nucleus: the mass strictly before each token
    is below top_p (the most likely token always)."""
    keep = (top.cumsum(-1) - top) < top_p
    keep[:, 0] = True
    return keep


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token id per row, drawn from its `nucleus` in proportion to the probabilities (the global torch seed)."""
    weights, index = nucleus(logits, temperature, top_p)
    return index.gather(-1, torch.multinomial(weights, 1)).squeeze(-1)


def cache_argument(model) -> str:
    """The name the model's forward takes its KV cache by: `cache` in transformers >= 5.2x, `past_key_values`
    before (the old name is deprecated, so the new one is used where it exists)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def decode_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
                 eos_ids: set[int], pad_token_id: int,
                 compute: Callable[[], AbstractContextManager] = nullcontext,
                 adapter_names: Sequence[str] | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Sample continuations of a left-padded batch, one step at a time: yields (tokens, log-probs), each (rows,),
    where a log-prob is the drawn token's under the model at temperature 1 (what DPO and KTO compare). A row that
    drew an eos gets `pad_token_id` from then on; it ends when every row has or after `max_new_tokens` steps.

    A plain KV-cached loop instead of `generate`, its cache allocated once for the prompt and every new token (a
    StaticCache: a growing one concatenates every layer's keys and values at every step, quadratic in the answer's
    length; at 64 tokens the two take the same wall time, docs/benchmarks.md). At SmolLM2's size `generate`'s per-step
    work around the model
    (sorting the vocabulary for top-p, drawing from all of it, its logits processors) took a third of a CPU batch's
    time (bench/sampling.py prints the two side by side). Positions count only real tokens, so left padding
    changes no row's answer (tests/test_sampling.py). Logits that are not finite (weights a far too large learning
    rate broke) are made finite first, as `generate(remove_invalid_values=True)` did: the round's loss then shows it.
    `compute()` wraps every forward pass (autocast is per thread, and a generator may be resumed in another one).
    `adapter_names` (a PeftModel's LoRA adapters, unmerged): one per row, peft's "__base__" for the base model: rows
    of several models in one batch, sharing the frozen weights' matmuls (peft's mixed-adapter batches).
    Only temperature and top-p shape the draw: a model's generation_config (a repetition penalty, top-k) is not
    applied, so every model is sampled alike.
    """
    device = input_ids.device
    rows = input_ids.shape[0]
    cache_name = cache_argument(model)
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + params.max_new_tokens)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    eos = torch.tensor(sorted(eos_ids), device=device)
    ended = torch.zeros(rows, dtype=torch.bool, device=device)
    next_position = positions[:, -1:] + 1
    per_row = {} if adapter_names is None else {"adapter_names": list(adapter_names)}
    for _ in range(params.max_new_tokens):
        with torch.no_grad(), compute():
            logits = model(**inputs, **{cache_name: cache}, **per_row, use_cache=True, logits_to_keep=1).logits[:, -1]
        logits = logits.float()
        if not all_finite(logits):  # checked first: nan_to_num rewrites every logit, ~5% of a step
            logits = torch.nan_to_num(logits)
        tokens = nucleus_sample(logits, params.temperature, params.top_p)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        tokens = torch.where(ended, torch.full_like(tokens, pad_token_id), tokens)
        yield tokens, logprobs
        ended |= torch.isin(tokens, eos)
        if bool(ended.all()):
            return
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, 1)], dim=-1)
        inputs = dict(input_ids=tokens.unsqueeze(-1), attention_mask=attention_mask, position_ids=next_position)
        next_position = next_position + 1


def left_padded(tokenizer, rows: Sequence[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token rows padded on the left, so every row's next token is in the last
    column."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention_mask[i, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


def sample_many(model, tokenizer, prompts: Sequence[str | list[dict]], k: int, params: SamplingParams,
                seed: int | None = None, adapters: Sequence[str] | None = None) -> list[list[SampledAnswer]]:
    """K answers to each of several prompts from ONE batch: each prompt repeated K times, left-padded.

    Batching items is what makes a CPU keep up with annotators: the weights are read once per token for every row.
    `adapters`: the LoRA adapter that answers each prompt ("__base__": the base model), so several models' answers
    come from one batch (`decode_steps`' `adapter_names`; the adapters must not be merged).
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if not prompts:
        return []
    if adapters is not None and len(adapters) != len(prompts):
        raise ConfigError(f"adapters names one adapter per prompt: {len(adapters)} for {len(prompts)} prompts")
    device = next(model.parameters()).device
    rows = [ids for ids in (encode_prompt(tokenizer, p) for p in prompts) for _ in range(k)]
    input_ids, attention_mask = left_padded(tokenizer, rows, device)
    if seed is not None:
        torch.manual_seed(seed)
    eos_ids = eos_token_ids(tokenizer, model)
    adapter_names = None if adapters is None else [a for a in adapters for _ in range(k)]
    steps = list(decode_steps(model, input_ids, attention_mask, params, eos_ids, tokenizer.pad_token_id,
                              adapter_names=adapter_names))
    new_tokens = torch.stack([t for t, _ in steps], dim=1).cpu()  # (rows, T)
    token_logprobs = torch.stack([lp for _, lp in steps], dim=1).cpu()
    answers = [_answer(tokenizer, new_tokens[i], token_logprobs[i], eos_ids) for i in range(len(rows))]
    return [answers[p * k:(p + 1) * k] for p in range(len(prompts))]


def _answer(tokenizer, tokens: torch.Tensor, logprobs: torch.Tensor, eos_ids: set[int]) -> SampledAnswer:
    """Cut one sampled row at its first eos (`decode_steps` pads finished rows) and describe it."""
    ended = [j for j, t in enumerate(tokens.tolist()) if t in eos_ids]
    length = ended[0] if ended else len(tokens)
    text = shown_text(tokenizer.decode(tokens[:length], skip_special_tokens=True).strip())
    # The eos token is part of the answer's probability (the model chose to stop), so it counts in the log-prob.
    scored = length + 1 if ended else length
    return SampledAnswer(
        text=text,
        token_count=length,
        finish_reason="eos" if ended else "length",
        logprob_sum=float(logprobs[:scored].sum()),
        token_logprobs=tuple(float(x) for x in logprobs[:scored]),
    )


def stream_answer(model, tokenizer, messages: list[dict], params: SamplingParams,
                  compute: Callable[[], AbstractContextManager] = nullcontext) -> Iterator[str]:
    """Yield the growing text of one answer as its words complete (for the Demo chat), drawn as `sample_many`
    draws. `compute()` wraps every forward pass (`Device.compute`)."""
    from transformers import TextStreamer

    class Pieces(TextStreamer):  # transformers' word-boundary buffering, kept in a list instead of printed
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_special_tokens=True)
            self.pieces: list[str] = []

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                self.pieces.append(shown_text(text))

    device = next(model.parameters()).device
    input_ids, attention_mask = left_padded(tokenizer, [encode_prompt(tokenizer, messages)], device)
    eos_ids = eos_token_ids(tokenizer, model)
    streamer, text = Pieces(), ""
    for tokens, _ in decode_steps(model, input_ids, attention_mask, params, eos_ids, tokenizer.pad_token_id,
                                  compute):
        streamer.put(tokens.cpu())
        if streamer.pieces:
            text += "".join(streamer.pieces)
            streamer.pieces.clear()
            yield text
    streamer.end()
    if streamer.pieces:
        yield text + "".join(streamer.pieces)
