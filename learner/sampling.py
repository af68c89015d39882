"""Sampling answers from the policy: K answers for a prompt in ONE batched `generate` call.

Every answer records what the learner and the metrics need later: its text, token count, finish reason
(`eos` when the model ended it, `length` when max_new_tokens cut it) and the sum of its token log-probs under the
generating model at temperature 1 (the quantity DPO/KTO compare; the sampling temperature only shapes which tokens
were drawn).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from threading import Thread

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


@torch.no_grad()
def sample_answers(model, tokenizer, prompt: str | list[dict], k: int, params: SamplingParams,
                   seed: int | None = None) -> list[SampledAnswer]:
    """K answers to one prompt from one batched `generate` call (the prompt repeated K times, so no padding)."""
    return sample_many(model, tokenizer, [prompt], k, params, seed=seed)[0]


class _ChosenLogprobs:
    """A logits processor that records log p(chosen token) at temperature 1 without keeping every step's logits.

    `generate` calls processors with the raw logits of step t before the temperature/top-p warpers (which it appends
    after custom processors); at step t+1 the token drawn at t is the last column of `input_ids`, so the log-softmax
    kept from step t is gathered then and dropped. Memory is one (rows, vocab) tensor instead of (rows, T, vocab):
    8 items x K=4 x 64 tokens of SmolLM2's 49k vocabulary would otherwise hold 400 MB of logits.
    """

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None  # (rows, vocab) log-softmax of the last step's raw logits
        self.chosen: list[torch.Tensor] = []  # per step: (rows,) log p of the token drawn

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._collect(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _collect(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.chosen.append(self.previous.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))

    def finish(self, sequences: torch.Tensor, steps: int) -> torch.Tensor:
        """(rows, steps) log-probs of the generated tokens, once `generate` returned `sequences`."""
        if steps:
            self._collect(sequences[:, -1])
        self.previous = None
        if not self.chosen:
            return torch.zeros(sequences.shape[0], 0)
        return torch.stack(self.chosen, dim=1)[:, :steps]


@torch.no_grad()
def sample_many(model, tokenizer, prompts: Sequence[str | list[dict]], k: int, params: SamplingParams,
                seed: int | None = None) -> list[list[SampledAnswer]]:
    """K answers to each of several prompts from ONE `generate` call: each prompt repeated K times, left-padded.

    Left padding keeps every row's last prompt token at the same position, where generation continues. Batching
    items is what makes a CPU keep up with annotators: the weights are read once per token for every row.
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if not prompts:
        return []
    device = next(model.parameters()).device
    rows = [ids for ids in (encode_prompt(tokenizer, p) for p in prompts) for _ in range(k)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention_mask[i, width - len(ids):] = 1
    if seed is not None:
        torch.manual_seed(seed)
    eos_ids = eos_token_ids(tokenizer, model)
    recorder = _ChosenLogprobs()
    sequences = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=True,
        temperature=params.temperature, top_p=params.top_p, top_k=0, max_new_tokens=params.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos_ids),
        logits_processor=[recorder],  # log-probs at temperature 1, before top-p
        # Weights mid-training can overflow the logits (a learning rate far too high): a round's rollouts must not
        # crash outside the gate (the next loss is then non-finite and the round is rejected for it).
        remove_invalid_values=True,
    )
    new_tokens = sequences[:, width:]  # (rows, T)
    token_logprobs = recorder.finish(sequences, new_tokens.shape[1]).cpu()
    answers = [_answer(tokenizer, new_tokens[i].cpu(), token_logprobs[i], eos_ids) for i in range(len(rows))]
    return [answers[p * k:(p + 1) * k] for p in range(len(prompts))]


def _answer(tokenizer, tokens: torch.Tensor, logprobs: torch.Tensor, eos_ids: set[int]) -> SampledAnswer:
    """Cut one generated row at its first eos (generate pads finished rows) and describe it."""
    ended = [j for j, t in enumerate(tokens.tolist()) if t in eos_ids]
    length = ended[0] if ended else len(tokens)
    text = tokenizer.decode(tokens[:length], skip_special_tokens=True).strip()
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
    """Yield the growing text of one answer token by token (for the Demo chat). `compute()` is the context the
    generating thread runs in (`Device.compute`: autocast is per thread, so the caller's would not reach it)."""
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, messages)], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=params.temperature,
                  top_p=params.top_p, top_k=0, max_new_tokens=params.max_new_tokens,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos_token_ids(tokenizer, model)),
                  streamer=streamer)
    def generate() -> None:
        with torch.no_grad(), compute():
            model.generate(**kwargs)

    worker = Thread(target=generate, daemon=True)
    worker.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    worker.join()
