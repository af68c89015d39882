"""Preference losses as pure functions over tensors: Bradley-Terry (reward model), DPO (+ IPO, robust) and KTO.

Every loss returns `(loss, metrics)`: a scalar tensor to backpropagate and a dict of plain floats to log.
Log-probs are per-sequence sums over answer tokens (see `learner.logprobs`); "π" is the policy, "ref" the reference.
A DPO variant is picked by name from `DPO_LOSS_TYPES`; `learner.train.OBJECTIVES` picks DPO or KTO.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from learner.errors import LearnerError

Metrics = dict[str, float]


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, groups: Tensor,
                       margin: Tensor | float = 0.0, centering: float = 0.0) -> tuple[Tensor, Metrics]:
    """Bradley-Terry reward-model loss, one batch element per ranking (InstructGPT, arXiv 2203.02155, Eq. 1).

    Per pair p:   ℓ_p = -log σ(r_w - r_l - margin)
    A ranking of K answers gives C(K,2) pairs sharing a group id; its pairs are averaged so every ranking weighs
    the same however many answers it had, then rankings are averaged:
        loss = mean_g mean_{p in g} ℓ_p  +  centering · mean_p (r_w + r_l)^2
    The centring term (arXiv 2312.09244) pins the scores' free offset near 0.

    Shapes: chosen_rewards, rejected_rewards, groups: (P,) for P pairs; margin: scalar or (P,).
    Naive equivalent:
        sum(mean(-logsigmoid(rw - rl - m) for rw, rl in pairs_of(g)) for g in groups) / n_groups
    """
    diff = chosen_rewards - rejected_rewards
    per_pair = -F.logsigmoid(diff - margin)
    _, group_index = torch.unique(groups, return_inverse=True)
    n_groups = int(group_index.max()) + 1
    per_group = torch.zeros(n_groups, dtype=per_pair.dtype, device=per_pair.device).index_add(0, group_index, per_pair)
    pairs_per_group = torch.bincount(group_index, minlength=n_groups).to(per_pair.dtype)
    loss = (per_group / pairs_per_group).mean()
    if centering:
        loss = loss + centering * ((chosen_rewards + rejected_rewards) ** 2).mean()
    metrics = {
        "loss": loss.item(),
        "accuracy": (diff > 0).float().mean().item(),
        "margin": diff.mean().item(),
        "reward_chosen": chosen_rewards.mean().item(),
        "reward_rejected": rejected_rewards.mean().item(),
    }
    return loss, metrics


def _dpo_sigmoid(delta: Tensor, delta_per_token: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """DPO (arXiv 2305.18290, Eq. 7): -log σ(βΔ)."""
    return -F.logsigmoid(beta * delta)


def _dpo_ipo(delta: Tensor, delta_per_token: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """IPO (arXiv 2310.12036, Eq. 17) on per-token-normalised log-ratios: (Δ_norm - 1/(2β))^2."""
    return (delta_per_token - 1 / (2 * beta)) ** 2


def _dpo_robust(delta: Tensor, delta_per_token: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (arXiv 2403.00409, Eq. 9), ε = label_smoothing:
    [-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1-2ε), unbiased under a fraction ε of flipped labels."""
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)


DPO_LOSS_TYPES: dict[str, Callable[[Tensor, Tensor, float, float], Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "ipo": _dpo_ipo,
    "robust": _dpo_robust,
}


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, chosen_tokens: Tensor | None = None,
             rejected_tokens: Tensor | None = None, rpo_alpha: float = 0.0) -> tuple[Tensor, Metrics]:
    """Direct preference optimisation on summed answer log-probs, averaged over B pairs.

        Δ = (π(y_w) - ref(y_w)) - (π(y_l) - ref(y_l))
        sigmoid: -log σ(βΔ)
        ipo:     (Δ_norm - 1/(2β))^2, Δ_norm = (π(y_w) - ref(y_w))/n_w - (π(y_l) - ref(y_l))/n_l (n = answer tokens)
        robust:  [-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1-2ε)
        + rpo_alpha · mean_b(-π(y_w) / n_w): RPO's negative log-likelihood of the chosen answer per token
          (arXiv 2404.19733, Eq. 1; TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, α], its former
          `rpo_alpha`), which keeps DPO from lowering the chosen answers' own likelihood. Per pair, so
          micro-batches weighted by size sum to the step's mean; TRL averages over the batch's tokens instead
          (the same when the chosen answers have equal lengths).

    Shapes: all log-prob tensors (B,); chosen_tokens, rejected_tokens (B,) token counts, needed by "ipo" and by
    rpo_alpha > 0.
    Metrics: implicit rewards β(π - ref) of chosen/rejected, their margin and accuracy, the log-probs,
    `kl` = mean(π - ref) over all 2B answers (a KL estimate only when the answers were sampled from π), and with
    token counts `nll_chosen`, the chosen answers' mean per-token negative log-likelihood.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise LearnerError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}")
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    delta = chosen_logratio - rejected_logratio
    chosen_n = chosen_tokens.clamp(min=1) if chosen_tokens is not None else None
    if chosen_n is not None and rejected_tokens is not None:
        delta_per_token = chosen_logratio / chosen_n - rejected_logratio / rejected_tokens.clamp(min=1)
    elif loss_type == "ipo" or rpo_alpha:
        needs = "rpo_alpha" if rpo_alpha else "loss_type 'ipo'"
        raise LearnerError(f"{needs} needs chosen_tokens and rejected_tokens (it normalises per token)")
    else:
        delta_per_token = delta
    loss = DPO_LOSS_TYPES[loss_type](delta, delta_per_token, beta, label_smoothing).mean()
    nll_chosen = -policy_chosen / chosen_n if chosen_n is not None else None
    if rpo_alpha:
        loss = loss + rpo_alpha * nll_chosen.mean()
    chosen_reward = beta * chosen_logratio.detach()
    rejected_reward = beta * rejected_logratio.detach()
    metrics = {
        "loss": loss.item(),
        "reward_chosen": chosen_reward.mean().item(),
        "reward_rejected": rejected_reward.mean().item(),
        "reward_margin": (chosen_reward - rejected_reward).mean().item(),
        "reward_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
        "logp_chosen": policy_chosen.detach().mean().item(),
        "logp_rejected": policy_rejected.detach().mean().item(),
        "kl": torch.cat([chosen_logratio, rejected_logratio]).detach().mean().item(),
    }
    if nll_chosen is not None:
        metrics["nll_chosen"] = nll_chosen.detach().mean().item()
    return loss, metrics


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, policy_kl_logps: Tensor,
             ref_kl_logps: Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[Tensor, Metrics]:
    """Kahneman-Tversky optimisation (arXiv 2402.01306, Eq. 8) on B answers with a thumbs up or down.

        r     = π(y|x) - ref(y|x)                                   (summed log-ratio)
        z_ref = max(0, mean_j [π(y_j|x_k) - ref(y_j|x_k)])  detached, over mismatched pairs j≠k of the batch
        desirable:   λ_D (1 - σ(β(r - z_ref)))
        undesirable: λ_U (1 - σ(β(z_ref - r)))
        loss = mean over the B answers

    z_ref carries no gradient (the paper's estimate of the KL term, TRL issue #1474), and it is only meaningful
    over a shuffled batch of size >= 2 (TRL issue #2554): the caller pairs each answer with another item's prompt.

    Shapes: policy_logps, ref_logps, desirable (bool): (B,); policy_kl_logps, ref_kl_logps: (M,), M >= 1.
    """
    z_ref = (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
    logratio = policy_logps - ref_logps
    desirable = desirable.bool()
    per_answer = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratio - z_ref))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z_ref - logratio))),
    )
    loss = per_answer.mean()
    rewards = beta * logratio.detach()
    metrics = {"loss": loss.item(), "kl": z_ref.item()}
    # Only the halves present in this batch: an empty half would be NaN, which the gate reads as a failed round.
    if desirable.any():
        metrics["reward_chosen"] = rewards[desirable].mean().item()
        metrics["logp_chosen"] = policy_logps.detach()[desirable].mean().item()
    if (~desirable).any():
        metrics["reward_rejected"] = rewards[~desirable].mean().item()
        metrics["logp_rejected"] = policy_logps.detach()[~desirable].mean().item()
    if desirable.any() and (~desirable).any():
        metrics["reward_margin"] = metrics["reward_chosen"] - metrics["reward_rejected"]
    return loss, metrics


def kto_weight_warning(n_desirable: int, n_undesirable: int, desirable_weight: float,
                       undesirable_weight: float) -> str | None:
    """The KTO paper's advice (Sec. 4.2, Eq. 9): λ_D·n_D / (λ_U·n_U) in [1, 4/3]; a message when outside, else None."""
    if n_undesirable == 0 or n_desirable == 0:
        return (f"KTO data has {n_desirable} desirable and {n_undesirable} undesirable answers; "
                "with one side missing the update only pushes one way")
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1 <= ratio <= 4 / 3:
        return None
    return (f"KTO weights are unbalanced: λ_D·n_D / (λ_U·n_U) = {desirable_weight}·{n_desirable} / "
            f"({undesirable_weight}·{n_undesirable}) = {ratio:.2f}, outside [1, 4/3] (arXiv 2402.01306, Eq. 9); "
            "adjust desirable_weight or undesirable_weight")

