"""One training loop with a pluggable loss, the DPO and KTO objectives it runs, and adapter switching.

The reward model and the policy train through the same `train_loop`; what differs is the `step_loss(step)`
function handed to it. The policy objectives are picked by name from `OBJECTIVES`, not by if/elif.

All adapters (policy, parent, reward) live on ONE PeftModel over one copy of the base weights; `use_adapter`
runs a block with another adapter active (or none: the base model) and restores the trained one afterwards.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from learner.config import RoundConfig
from learner.logprobs import EncodedAnswer, encode_answer, sequence_logprobs
from learner.losses import dpo_loss, kto_loss

StepLoss = Callable[[int], tuple[Tensor, dict]]


def hash_fraction(key: str) -> float:
    """A key's fixed place in [0, 1), the same in every round and process (unlike the salted hash())."""
    return int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "big") / 2**64


def in_heldout(key: str, fraction: float) -> bool:
    """A fixed split by hash: the same key lands on the same side of it in every round."""
    return hash_fraction(key) < fraction


# --- adapters -------------------------------------------------------------------------------------------------

def _is_trainable(model, adapter: str) -> bool:
    return any(p.requires_grad for n, p in model.named_parameters() if f".{adapter}." in n)


@contextmanager
def use_adapter(model, adapter: str | None) -> Iterator[None]:
    """Run a block with `adapter` active and frozen (None: all adapters off, i.e. the base model).

    peft's set_adapter also sets requires_grad, so the previously active adapter is restored with the
    trainability it had: a reference or reward forward in the middle of a policy step leaves the policy trainable.
    """
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    if adapter == previous:
        yield
        return
    previous_trainable = _is_trainable(model, previous)
    model.set_adapter(adapter, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous, inference_mode=not previous_trainable)


@contextmanager
def training_adapter(model, adapter: str) -> Iterator[None]:
    """Run a block with `adapter` active, trainable and in train mode (every other adapter frozen); restore after."""
    previous = model.active_adapter
    previous_trainable = _is_trainable(model, previous)
    was_training = model.training
    model.set_adapter(adapter, inference_mode=False)
    model.train()
    try:
        yield
    finally:
        model.set_adapter(previous, inference_mode=not previous_trainable)
        model.train(was_training)


# --- the loop -------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    history: list[dict]  # one record per step: {"step", "loss", "grad_norm", ...the loss's metrics}
    failure: str | None  # why training stopped early (a non-finite loss or gradient), else None


def train_loop(params: Sequence[torch.nn.Parameter], step_loss: StepLoss, steps: int, learning_rate: float,
               adam_eps: float, max_grad_norm: float, accelerator=None,
               on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """AdamW on `params` for `steps` steps of `step_loss(step) -> (loss, metrics)`, clipping the gradient norm.

    Stops at the first non-finite loss or gradient norm without applying that update: one NaN step would
    poison every weight it touches, and the gate rejects the round anyway.
    With `accelerate launch` on several processes each one draws its own batches and the (small) LoRA
    gradients are averaged across processes before the step, so no DDP wrapper has to follow adapter switches.
    """
    params = list(params)
    # weight_decay 0: decaying LoRA weights towards 0 pulls the policy back to the base, which is the KL term's job.
    optimizer = torch.optim.AdamW(params, lr=learning_rate, eps=adam_eps, weight_decay=0.0)
    history: list[dict] = []
    for step in range(steps):
        loss, metrics = step_loss(step)
        record = {"step": step, **metrics, "loss": loss.item()}
        finite = math.isfinite(record["loss"])
        if accelerator is not None and accelerator.num_processes > 1:
            # Every process must stop together, or the others would wait forever in the gradient reduce.
            flag = torch.tensor([float(finite)], device=loss.device)
            finite = int(accelerator.reduce(flag, reduction="sum").item()) == accelerator.num_processes
        if not finite:
            history.append(record)
            here = not math.isfinite(record["loss"])
            reason = f"loss is {record['loss']}" if here else "another process's loss is not finite"
            return TrainResult(history, f"{reason} at step {step}")
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        if accelerator is not None and accelerator.num_processes > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        record["grad_norm"] = grad_norm
        history.append(record)
        if not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            return TrainResult(history, f"gradient norm is {grad_norm} at step {step}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(record)
        # A finite loss and gradient can still take a step to inf (a learning rate far too large): the next
        # forward pass, or sampling from the weights, would then fail outside the gate. Check the few LoRA weights.
        if not all(bool(torch.isfinite(p).all()) for p in params):
            return TrainResult(history, f"weights are not finite after step {step}")
    return TrainResult(history, None)


# --- policy objectives ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairExample:
    """A chosen/rejected pair for DPO, from a human ranking or an on-policy rollout."""

    prompt: str
    chosen: str
    rejected: str
    source: str  # "human" or "onpolicy"

    def texts(self) -> tuple[tuple[str, str], ...]:
        return (self.prompt, self.chosen), (self.prompt, self.rejected)


@dataclass(frozen=True)
class UnaryExample:
    """An answer with a thumbs up (desirable) or down, for KTO."""

    prompt: str
    answer: str
    desirable: bool
    source: str  # "human" or "onpolicy"

    def texts(self) -> tuple[tuple[str, str], ...]:
        return ((self.prompt, self.answer),)


@dataclass(frozen=True)
class PolicyContext:
    """What a policy objective needs besides the batch."""

    model: object  # the PeftModel with the trainable "policy" adapter active
    tokenizer: object
    config: RoundConfig
    reference: str | None  # adapter that is the reference (the parent with ref_sync), None = the base model


def _encode(ctx: PolicyContext, prompt: str, answer: str) -> EncodedAnswer:
    return encode_answer(ctx.tokenizer, prompt, answer, ctx.config.max_length)


def _reference_logprobs(ctx: PolicyContext, encoded: list[EncodedAnswer]):
    with torch.no_grad(), use_adapter(ctx.model, ctx.reference):
        return sequence_logprobs(ctx.model, encoded, ctx.tokenizer.pad_token_id)


def dpo_objective(ctx: PolicyContext, batch: Sequence[PairExample]) -> tuple[Tensor, dict]:
    """DPO on a batch of pairs: chosen and rejected through the policy in ONE forward pass, then the reference."""
    encoded = [_encode(ctx, e.prompt, e.chosen) for e in batch] + [_encode(ctx, e.prompt, e.rejected) for e in batch]
    policy_chosen, policy_rejected = sequence_logprobs(ctx.model, encoded, ctx.tokenizer.pad_token_id).split(len(batch))
    ref_chosen, ref_rejected = _reference_logprobs(ctx, encoded).split(len(batch))
    c = ctx.config
    return dpo_loss(policy_chosen.logps, policy_rejected.logps, ref_chosen.logps, ref_rejected.logps, beta=c.beta,
                    loss_type=c.loss_type, label_smoothing=c.label_smoothing,
                    chosen_tokens=policy_chosen.token_counts, rejected_tokens=policy_rejected.token_counts)


def kto_objective(ctx: PolicyContext, batch: Sequence[UnaryExample]) -> tuple[Tensor, dict]:
    """KTO on a shuffled batch (size >= 2): answer i is also paired with prompt i+1 for the z_ref estimate.

    Mismatched pairs are TRL's construction (each completion shifted by one within the batch); they only feed
    z_ref, which is detached, so the policy scores them without building a graph.
    """
    n = len(batch)
    matched = [_encode(ctx, e.prompt, e.answer) for e in batch]
    mismatched = [_encode(ctx, batch[(i + 1) % n].prompt, e.answer) for i, e in enumerate(batch)]
    policy = sequence_logprobs(ctx.model, matched, ctx.tokenizer.pad_token_id)
    with torch.no_grad():
        policy_kl = sequence_logprobs(ctx.model, mismatched, ctx.tokenizer.pad_token_id)
    ref, ref_kl = _reference_logprobs(ctx, matched + mismatched).split(n)
    desirable = torch.tensor([e.desirable for e in batch], device=policy.logps.device)
    c = ctx.config
    return kto_loss(policy.logps, ref.logps, desirable, policy_kl.logps, ref_kl.logps, beta=c.beta,
                    desirable_weight=c.desirable_weight, undesirable_weight=c.undesirable_weight)


Objective = Callable[[PolicyContext, Sequence], tuple[Tensor, dict]]
OBJECTIVES: dict[str, Objective] = {"dpo": dpo_objective, "kto": kto_objective}
