"""Sampling answers from the policy: K answers for a prompt in ONE batched `generate` call.

Every answer records what the learner and the metrics need later: its text, token count, finish reason
(`eos` when the model ended it, `length` when max_new_tokens cut it) and the sum of its token log-probs under the
generating model at temperature 1 (the quantity DPO/KTO compare; the sampling temperature only shapes which tokens
were drawn).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from threading import Thread

import torch

from learner.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How answers are drawn."""

    max_new_tokens: int = 96  # long enough for a short answer; a CPU samples 4 x 96 tokens in ~6 s
    temperature: float = 0.8  # diverse enough that K answers differ, sober enough to stay on topic
    top_p: float = 0.95  # cuts the long tail of junk tokens a 135M model puts mass on

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SampledAnswer:
    """One sampled answer."""

    text: str
    token_count: int
    finish_reason: str  # "eos" or "length"
    logprob_sum: float  # sum of log p(token) under the generating model at temperature 1


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
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    device = next(model.parameters()).device
    prompt_ids = torch.tensor([encode_prompt(tokenizer, prompt)] * k, device=device)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        do_sample=True,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=0,
        max_new_tokens=params.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(eos_token_ids(tokenizer, model)),
        output_logits=True,  # raw logits: log-probs at temperature 1, before top-p
        return_dict_in_generate=True,
    )
    new_tokens = out.sequences[:, prompt_ids.shape[1]:]  # (k, T)
    logits = torch.stack(out.logits, dim=1).float()  # (k, T, vocab)
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
    return [_answer(tokenizer, new_tokens[i], token_logprobs[i], eos_token_ids(tokenizer, model))
            for i in range(k)]


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
    )


def stream_answer(model, tokenizer, messages: list[dict], params: SamplingParams) -> Iterator[str]:
    """Yield the growing text of one answer token by token (for the Demo chat)."""
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, messages)], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=params.temperature,
                  top_p=params.top_p, top_k=0, max_new_tokens=params.max_new_tokens,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos_token_ids(tokenizer, model)),
                  streamer=streamer)
    worker = Thread(target=torch.no_grad()(model.generate), kwargs=kwargs, daemon=True)
    worker.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    worker.join()
