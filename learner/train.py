"""One training loop with a pluggable loss, the DPO and KTO objectives it runs, and adapter switching.

The reward model and the policy train through the same `train_loop`; what differs is the `step_loss(step)`
function handed to it. The policy objectives are picked by name from `OBJECTIVES`, not by if/elif.

All adapters (policy, parent, reward) live on ONE PeftModel over one copy of the base weights; `use_adapter`
runs a block with another adapter active (or none: the base model) and restores the trained one afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from learner.config import RoundConfig
from learner.logprobs import (
    EncodedAnswer,
    SequenceLogprobs,
    distinct_sequence_logprobs,
    encode_answer,
    sequence_logprobs,
)
from learner.losses import dpo_loss, kto_loss
from learner.model import uncast_weight

StepLoss = Callable[[int], Iterable[tuple[Tensor, float, dict]]]


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
def eval_mode(model) -> Iterator[None]:
    """Run a block in eval mode (LoRA dropout off), restoring the mode the model had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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


def mergeable(model, adapter: str) -> bool:
    """Whether `merged_adapter` can merge `adapter`: plain LoRA on linear layers (no DoRA, no embedding adapters)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return bool(layers) and all(
        adapter not in getattr(m, "lora_embedding_A", {}) and not m.use_dora.get(adapter, False)
        and adapter not in getattr(m, "lora_variant", {}) for m in layers)


@contextmanager
def merged_adapter(model, adapter: str) -> Iterator[None]:
    """Run a block (inference only: sampling) with `adapter` merged into new copies of the weights it changes and
    every adapter off, so the model runs at the base model's speed: unmerged, a LoRA adds two small matmuls and a sum
    to each of SmolLM2's 210 linear layers at every sampled token (a round's regeneration: 0.84x the time merged;
    `python -m bench.learner rollouts` prints both).

    The original weight tensors are put back afterwards, untouched: swapped, not merged and unmerged in place, which
    would leave float rounding in the base weights that the reference and every later step share. Costs one copy of
    the adapted layers' weights for the block. Under bf16 autocast the merged weight is rounded to bf16 at each
    matmul, as the serving copies' are (app/generation); measured on SmolLM2 with a one-round adapter, that adds
    nothing to autocast's own rounding (per-token KL to the exact fp32 distributions 6.91e-4 merged, 6.90e-4 unmerged;
    docs/benchmarks.md). Inside a round's `learner.model.autocast_weights` the merge starts from the fp32 weight
    (`uncast_weight`), not from its bf16 copy, and the copy is what comes back."""
    from peft.tuners.lora import LoraLayer

    swapped = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoraLayer) and adapter in module.lora_A:
                    layer = module.get_base_layer()
                    exact = uncast_weight(layer)  # fp32 even while a round keeps a bf16 copy (autocast_weights)
                    with torch.autocast(exact.device.type, enabled=False):  # B @ A in the weights' dtype
                        merged = exact + module.get_delta_weight(adapter).to(exact.dtype)
                    swapped.append((layer, layer.weight))
                    layer.weight = torch.nn.Parameter(merged, requires_grad=False)
        with model.disable_adapter():
            yield
    finally:
        for layer, original in swapped:
            layer.weight = original


# --- the loop -------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    history: list[dict]  # one record per step: {"step", "loss", "grad_norm", ...the loss's metrics}
    failure: str | None  # why training stopped early (a non-finite loss or gradient), else None


def _weighted_metrics(parts: list[tuple[float, dict]]) -> dict:
    """The micro-batches' metrics averaged with their weights (a key missing from a part is averaged over the rest)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for weight, metrics in parts:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                sums[key] = sums.get(key, 0.0) + weight * value
                weights[key] = weights.get(key, 0.0) + weight
    return {key: sums[key] / weights[key] for key in sums if weights[key]}


def train_loop(params: Sequence[torch.nn.Parameter], step_loss: StepLoss, steps: int, learning_rate: float,
               adam_eps: float, max_grad_norm: float, accelerator=None,
               on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """AdamW on `params` for `steps` steps, clipping the gradient norm. `step_loss(step)` yields the step's
    micro-batches as (loss, weight, metrics); the step's loss is sum(weight * loss) (weights summing to 1), and each
    micro-batch is backpropagated as soon as it is computed, so a step's memory is one micro-batch's.

    Stops at the first non-finite loss or gradient norm without applying that update: one NaN step would
    poison every weight it touches, and the gate rejects the round anyway.
    With `accelerate launch` on several processes each one draws its own batches and the (small) LoRA
    gradients are averaged across processes before the step, so no DDP wrapper has to follow adapter switches.
    """
    params = list(params)
    # weight_decay 0: decaying LoRA weights towards 0 pulls the policy back to the base, which is the KL term's job.
    optimizer = torch.optim.AdamW(params, lr=learning_rate, eps=adam_eps, weight_decay=0.0)
    history: list[dict] = []
    distributed = accelerator is not None and accelerator.num_processes > 1
    for step in range(steps):
        parts, total = [], 0.0
        for loss, weight, metrics in step_loss(step):
            total += weight * loss.item()
            parts.append((weight, metrics))
            if accelerator is not None:
                accelerator.backward(loss * weight)
            else:
                (loss * weight).backward()
        finite = math.isfinite(total)
        if distributed:
            # Every process must stop together, or the others would wait forever in the gradient reduce.
            flags = torch.tensor([float(bool(parts)), float(finite)], device=params[0].device)
            have, finite = (int(v) == accelerator.num_processes for v in accelerator.reduce(flags, reduction="sum"))
            if not have:
                optimizer.zero_grad(set_to_none=True)
                break  # a process has no examples left for this step: none of them steps
        if not parts:
            break  # no examples left for this step (a round with fewer labels than steps and no rollouts)
        record = {"step": step, **_weighted_metrics(parts), "loss": total}
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            history.append(record)
            here = not math.isfinite(total)
            reason = f"loss is {total}" if here else "another process's loss is not finite"
            return TrainResult(history, f"{reason} at step {step}")
        if distributed:
            for p in params:  # every process reduces every parameter, in the same order
                p.grad = accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")
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
    chosen_ended: bool = True  # finish_reason "eos": the answer is scored with its eos; False: cut at max_new_tokens
    rejected_ended: bool = True
    group: str = ""  # the ranking (item) it came from: pairs of one ranking share answers and are batched together

    def texts(self) -> tuple[tuple[str, str, bool], ...]:
        return (self.prompt, self.chosen, self.chosen_ended), (self.prompt, self.rejected, self.rejected_ended)


@dataclass(frozen=True)
class UnaryExample:
    """An answer with a thumbs up (desirable) or down, for KTO."""

    prompt: str
    answer: str
    desirable: bool
    source: str  # "human" or "onpolicy"
    ended: bool = True  # finish_reason "eos"; False: cut at max_new_tokens, scored without an eos
    group: str = ""

    def texts(self) -> tuple[tuple[str, str, bool], ...]:
        return ((self.prompt, self.answer, self.ended),)


@dataclass(frozen=True)
class PolicyContext:
    """What a policy objective needs besides the batch."""

    model: object  # the PeftModel with the trainable "policy" adapter active
    tokenizer: object
    config: RoundConfig
    reference: Callable[[Sequence[EncodedAnswer]], Tensor]  # encoded answers -> (B,) reference log-probs, no grad
    #   (learner.refcache.ReferenceLogps: each sequence computed once per round, or once ever for the base model)


def _encode(ctx: PolicyContext, prompt: str, answer: str, ended: bool) -> EncodedAnswer:
    return encode_answer(ctx.tokenizer, prompt, answer, ctx.config.max_length, ended)


def _policy_logprobs(ctx: PolicyContext, encoded: list[EncodedAnswer]) -> SequenceLogprobs:
    """Policy log-probs of `encoded` in one forward pass, each distinct sequence once."""
    return distinct_sequence_logprobs(ctx.model, encoded, ctx.tokenizer.pad_token_id)


def dpo_objective(ctx: PolicyContext, batch: Sequence[PairExample]) -> tuple[Tensor, dict]:
    """DPO on a batch of pairs: every distinct answer through the policy in ONE forward pass; the reference's
    log-probs from ctx.reference (computed once per answer)."""
    encoded = ([_encode(ctx, e.prompt, e.chosen, e.chosen_ended) for e in batch]
               + [_encode(ctx, e.prompt, e.rejected, e.rejected_ended) for e in batch])
    policy_chosen, policy_rejected = _policy_logprobs(ctx, encoded).split(len(batch))
    ref_chosen, ref_rejected = ctx.reference(encoded).split(len(batch))
    c = ctx.config
    return dpo_loss(policy_chosen.logps, policy_rejected.logps, ref_chosen, ref_rejected, beta=c.beta,
                    loss_type=c.loss_type, label_smoothing=c.label_smoothing,
                    chosen_tokens=policy_chosen.token_counts, rejected_tokens=policy_rejected.token_counts,
                    rpo_alpha=c.rpo_alpha)


def kto_objective(ctx: PolicyContext, batch: Sequence[UnaryExample]) -> tuple[Tensor, dict]:
    """KTO on a shuffled batch (size >= 2): answer i is also paired with prompt i+1 for the z_ref estimate.

    Mismatched pairs are TRL's construction (each completion shifted by one within the batch); they only feed
    z_ref, which is detached, so the policy scores them without building a graph.
    """
    n = len(batch)
    matched = [_encode(ctx, e.prompt, e.answer, e.ended) for e in batch]
    mismatched = [_encode(ctx, batch[(i + 1) % n].prompt, e.answer, e.ended) for i, e in enumerate(batch)]
    policy = _policy_logprobs(ctx, matched)
    with torch.no_grad():
        policy_kl = sequence_logprobs(ctx.model, mismatched, ctx.tokenizer.pad_token_id)
    ref, ref_kl = ctx.reference(matched + mismatched).split(n)
    desirable = torch.tensor([e.desirable for e in batch], device=policy.logps.device)
    c = ctx.config
    return kto_loss(policy.logps, ref, desirable, policy_kl.logps, ref_kl, beta=c.beta,
                    desirable_weight=c.desirable_weight, undesirable_weight=c.undesirable_weight)


Objective = Callable[[PolicyContext, Sequence], tuple[Tensor, dict]]
OBJECTIVES: dict[str, Objective] = {"dpo": dpo_objective, "kto": kto_objective}
MIN_BATCH = {"dpo": 1, "kto": 2}  # KTO's z_ref pairs each answer with another example's prompt


def micro_batches(examples: Sequence, size: int, minimum: int) -> list[list]:
    """`examples` cut into micro-batches of at most `size` (a last one smaller than `minimum` joins the one before)."""
    size = max(size, minimum)
    chunks = [list(examples[i:i + size]) for i in range(0, len(examples), size)]
    if len(chunks) > 1 and len(chunks[-1]) < minimum:
        chunks[-2].extend(chunks.pop())
    return chunks


def shared_answer_batches(examples: Sequence[PairExample], max_sequences: int) -> list[list[PairExample]]:
    """Pairs cut, in order, into micro-batches of at most `max_sequences` DISTINCT answers (each pair alone fits).

    The pairs of one ranking share its answers (K answers, up to K(K-1)/2 pairs) and come in a step together
    (learner.data.human_plan): cut by pairs, a K=4 ranking's 6 pairs straddled two micro-batches and sent up to 12
    sequences through the policy; cut by distinct answers they are 4, in one forward pass of the same memory bound.
    """
    chunks: list[list[PairExample]] = []
    current: list[PairExample] = []
    seen: set = set()
    for example in examples:
        texts = set(example.texts())
        if current and len(seen | texts) > max_sequences:
            chunks.append(current)
            current, seen = [], set()
        current.append(example)
        seen |= texts
    if current:
        chunks.append(current)
    return chunks


MICRO_BATCHES: dict[str, Callable[[Sequence, int], list[list]]] = {
    # algorithm: (examples, batch_size) -> micro-batches; batch_size pairs = 2 x batch_size sequences of memory
    "dpo": lambda examples, size: shared_answer_batches(examples, 2 * size),
    "kto": lambda examples, size: micro_batches(examples, size, MIN_BATCH["kto"]),
}


def step_micro_losses(ctx: PolicyContext, algorithm: str, examples: Sequence):
    """One step's (loss, weight, metrics) per micro-batch (`MICRO_BATCHES`), weights by size, so the step's loss is
    the mean over its examples (learner.train.train_loop backpropagates each as it comes)."""
    total = len(examples)
    for chunk in MICRO_BATCHES[algorithm](examples, ctx.config.batch_size):
        loss, metrics = OBJECTIVES[algorithm](ctx, chunk)
        yield loss, len(chunk) / total, metrics
