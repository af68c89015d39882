import math

import pytest
import torch

from learner.errors import LearnerError
from learner.losses import bradley_terry_loss, dpo_loss, kto_loss, kto_weight_warning


def softplus(x: float) -> float:
    """-log σ(x) is softplus(-x); used to write hand values."""
    return math.log1p(math.exp(x))


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


# --- Bradley-Terry --------------------------------------------------------------------------------------------

def test_bradley_terry_averages_a_k3_ranking_over_its_pairs_then_over_rankings():
    # Item 0 ranks a > b > c with rewards 2, 1, 0 -> pairs (a,b), (a,c), (b,c); item 1 has one pair, 0.5 vs 0.
    chosen, rejected, groups = t(2, 2, 1, 0.5), t(1, 0, 0, 0), torch.tensor([0, 0, 0, 1])
    loss, metrics = bradley_terry_loss(chosen, rejected, groups)
    item0 = (softplus(-1) + softplus(-2) + softplus(-1)) / 3  # 0.251151
    item1 = softplus(-0.5)  # 0.474077
    assert loss.item() == pytest.approx((item0 + item1) / 2, abs=1e-9)  # 0.362614, not the mean over 4 pairs
    assert loss.item() == pytest.approx(0.362614, abs=1e-6)
    assert metrics["accuracy"] == 1.0
    assert metrics["margin"] == pytest.approx((1 + 2 + 1 + 0.5) / 4)


def test_bradley_terry_margin_and_centring_term():
    chosen, rejected, groups = t(2, 2, 1, 0.5), t(1, 0, 0, 0), torch.tensor([7, 7, 7, 3])  # any group ids
    loss, _ = bradley_terry_loss(chosen, rejected, groups, centering=0.1)
    base, _ = bradley_terry_loss(chosen, rejected, groups)
    assert (loss - base).item() == pytest.approx(0.1 * (9 + 4 + 1 + 0.25) / 4)
    with_margin, _ = bradley_terry_loss(t(1.0), t(0.0), torch.tensor([0]), margin=1.0)
    assert with_margin.item() == pytest.approx(math.log(2))


# --- DPO ------------------------------------------------------------------------------------------------------

def test_dpo_sigmoid_hand_value():
    # Δ = (-1 - -2) - (-3 - -2) = 2, β = 0.5 -> -log σ(1)
    loss, metrics = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert loss.item() == pytest.approx(softplus(-1.0))  # 0.313262
    assert metrics["reward_chosen"] == pytest.approx(0.5)
    assert metrics["reward_rejected"] == pytest.approx(-0.5)
    assert metrics["reward_margin"] == pytest.approx(1.0)
    assert metrics["reward_accuracy"] == 1.0
    assert metrics["logp_chosen"] == -1.0 and metrics["logp_rejected"] == -3.0
    assert metrics["kl"] == pytest.approx(0.0)  # (+1 and -1) / 2


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("robust", 0.2)])
def test_dpo_is_log_2_when_policy_equals_reference(loss_type, smoothing):
    torch.manual_seed(0)
    chosen, rejected = torch.randn(5) * 10, torch.randn(5) * 10
    loss, metrics = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.1, loss_type=loss_type,
                             label_smoothing=smoothing)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["reward_margin"] == 0.0


def test_ipo_hand_value_uses_per_token_log_ratios():
    # chosen log-ratio 1 over 2 tokens, rejected -1 over 4: Δ_norm = 0.5 + 0.25 = 0.75; β = 0.5 -> (0.75 - 1)^2
    loss, _ = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, loss_type="ipo",
                       chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([4]))
    assert loss.item() == pytest.approx(0.0625)


def test_robust_hand_value():
    # βΔ = 1, ε = 0.1: [-(0.9) log σ(1) + 0.1 log σ(-1)] / 0.8
    loss, _ = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, loss_type="robust", label_smoothing=0.1)
    expected = (0.9 * softplus(-1) - 0.1 * softplus(1)) / 0.8
    assert loss.item() == pytest.approx(expected)
    assert loss.item() == pytest.approx(0.188262, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust"])
def test_dpo_gradient_pushes_chosen_up_and_rejected_down(loss_type):
    policy_chosen, policy_rejected = t(-5.0, -4.0, grad=True), t(-5.0, -6.0, grad=True)
    tokens = torch.tensor([3, 3])
    loss, _ = dpo_loss(policy_chosen, policy_rejected, t(-5.0, -4.0), t(-5.0, -6.0), beta=0.1, loss_type=loss_type,
                       label_smoothing=0.1 if loss_type == "robust" else 0.0, chosen_tokens=tokens,
                       rejected_tokens=tokens)
    loss.backward()
    assert (policy_chosen.grad < 0).all()  # gradient descent raises log π(y_w)
    assert (policy_rejected.grad > 0).all()  # and lowers log π(y_l)


def test_rpo_adds_the_chosen_answers_per_token_nll_per_pair():
    # Pair 1: Δ = 2 (as above), chosen -6 over 3 tokens; pair 2: Δ = 0, chosen -2 over 4 tokens. α = 0.5.
    tokens = {"chosen_tokens": torch.tensor([3, 4]), "rejected_tokens": torch.tensor([2, 2])}
    loss, metrics = dpo_loss(t(-6.0, -2.0), t(-8.0, -3.0), t(-7.0, -2.5), t(-7.0, -3.5), beta=0.5, rpo_alpha=0.5,
                             **tokens)
    dpo = (softplus(-1.0) + math.log(2)) / 2
    nll = (6 / 3 + 2 / 4) / 2  # per pair, then the mean: 1.25
    assert loss.item() == pytest.approx(dpo + 0.5 * nll)
    assert loss.item() == pytest.approx(1.128204, abs=1e-6)
    assert metrics["nll_chosen"] == pytest.approx(1.25)
    without, metrics = dpo_loss(t(-6.0, -2.0), t(-8.0, -3.0), t(-7.0, -2.5), t(-7.0, -3.5), beta=0.5, **tokens)
    assert without.item() == pytest.approx(dpo) and metrics["nll_chosen"] == pytest.approx(1.25)  # reported anyway


def test_rpo_term_is_trls_sft_loss_on_equal_length_answers():
    # TRL 1.16 (DPOTrainer, loss_type "sft"): -chosen_per_token_logps[chosen_mask.bool()].mean(), a mean over the
    # batch's chosen tokens; per pair and then over pairs here, which is the same when every chosen has n tokens.
    torch.manual_seed(0)
    per_token = -torch.rand(3, 5, dtype=torch.float64) * 4  # 3 chosen answers x 5 tokens
    mask = torch.ones(3, 5, dtype=torch.bool)
    trl_sft = -per_token[mask].mean()
    rejected = t(-9.0, -9.0, -9.0)
    plain, _ = dpo_loss(per_token.sum(1), rejected, per_token.sum(1), rejected, beta=0.1,
                        chosen_tokens=torch.tensor([5, 5, 5]), rejected_tokens=torch.tensor([5, 5, 5]))
    rpo, _ = dpo_loss(per_token.sum(1), rejected, per_token.sum(1), rejected, beta=0.1, rpo_alpha=2.0,
                      chosen_tokens=torch.tensor([5, 5, 5]), rejected_tokens=torch.tensor([5, 5, 5]))
    assert (rpo - plain).item() == pytest.approx(2.0 * trl_sft.item(), abs=1e-12)


def test_rpo_pulls_the_chosen_answer_up_harder_and_leaves_the_rejected_gradient():
    grads = {}
    for alpha in (0.0, 1.0):
        chosen, rejected = t(-5.0, grad=True), t(-6.0, grad=True)
        loss, _ = dpo_loss(chosen, rejected, t(-5.0), t(-6.0), beta=0.1, rpo_alpha=alpha,
                           chosen_tokens=torch.tensor([4]), rejected_tokens=torch.tensor([4]))
        loss.backward()
        grads[alpha] = (chosen.grad.item(), rejected.grad.item())
    assert grads[1.0][0] == pytest.approx(grads[0.0][0] - 1 / 4)  # d(α · -π/n)/dπ = -α/n
    assert grads[1.0][1] == pytest.approx(grads[0.0][1])
    with pytest.raises(LearnerError, match="rpo_alpha needs chosen_tokens"):
        dpo_loss(t(-5.0), t(-6.0), t(-5.0), t(-6.0), beta=0.1, rpo_alpha=1.0)


# --- KTO ------------------------------------------------------------------------------------------------------

def test_kto_hand_value():
    # r = [0.5, -1]; z_ref = max(0, mean(0.2, 0.4)) = 0.3; β = 1, λ_D = 1, λ_U = 2
    loss, metrics = kto_loss(t(-1.0, -2.0), t(-1.5, -1.0), torch.tensor([True, False]), t(-3.0, -3.0),
                             t(-3.2, -3.4), beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)
    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    expected = ((1 - sigmoid(0.5 - 0.3)) + 2 * (1 - sigmoid(0.3 + 1))) / 2
    assert loss.item() == pytest.approx(expected)
    assert loss.item() == pytest.approx(0.439248, abs=1e-6)
    assert metrics["kl"] == pytest.approx(0.3)
    assert metrics["reward_chosen"] == pytest.approx(0.5) and metrics["reward_rejected"] == pytest.approx(-1.0)


def test_kto_z_ref_is_clamped_at_zero_and_carries_no_gradient():
    policy, policy_kl = t(-1.0, -2.0, grad=True), t(-3.0, -3.0, grad=True)
    loss, metrics = kto_loss(policy, t(-1.5, -1.0), torch.tensor([True, False]), policy_kl, t(-2.0, -2.5), beta=1.0)
    assert metrics["kl"] == 0.0  # the mismatched log-ratio is negative
    grad_policy, grad_kl = torch.autograd.grad(loss, [policy, policy_kl], allow_unused=True)
    assert grad_kl is None  # detached: z_ref is a baseline, not something to optimise (TRL #1474)
    assert grad_policy[0] < 0 < grad_policy[1]  # desirable up, undesirable down


def test_kto_metrics_leave_out_an_absent_half():
    _, metrics = kto_loss(t(-1.0, -2.0), t(-1.0, -2.0), torch.tensor([True, True]), t(-1.0), t(-1.0), beta=0.1)
    assert "reward_rejected" not in metrics and all(math.isfinite(v) for v in metrics.values())


def test_kto_weight_warning_outside_one_to_four_thirds():
    assert kto_weight_warning(10, 10, 1.0, 1.0) is None
    assert kto_weight_warning(12, 10, 1.0, 1.0) is None  # 1.2
    assert "outside [1, 4/3]" in kto_weight_warning(30, 10, 1.0, 1.0)  # 3.0: too many thumbs up
    assert "outside [1, 4/3]" in kto_weight_warning(5, 10, 1.0, 1.0)  # 0.5
    assert kto_weight_warning(5, 10, 2.0, 1.0) is None  # re-weighted back to 1.0
    assert "one side missing" in kto_weight_warning(0, 10, 1.0, 1.0)
