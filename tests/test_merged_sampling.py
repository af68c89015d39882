"""A round samples its rollouts and evaluation answers with the adapter merged into a copy of the weights: the same
model, faster. The base weights come back untouched (the reference and later steps share them)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from learner.params import SamplingParams
from learner.rollouts import sample_batch
from learner.train import mergeable, merged_adapter, use_adapter

PROMPTS = ["What is 2 + 2?", "Name a colour.", "Say hi"]


def lora_model(tiny_model, **extra):
    """The tiny model with two LoRA adapters ("policy", "parent") moved off zero, so each changes the model."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", **extra)
    model = get_peft_model(tiny_model, config, adapter_name="policy")
    model.add_adapter("parent", config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    model.set_adapter("policy")
    model.eval()
    return model


def logits(model, tokenizer):
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def base_weights(model):
    from peft.tuners.lora import LoraLayer

    return {name: m.get_base_layer().weight for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_merged_gives_the_adapters_model_and_puts_the_same_weights_back(tiny_model, tiny_tokenizer):
    model = lora_model(tiny_model)
    before = {name: (w, w.detach().clone()) for name, w in base_weights(model).items()}
    unmerged = logits(model, tiny_tokenizer)
    with use_adapter(model, None):
        base = logits(model, tiny_tokenizer)
    assert (unmerged - base).abs().max() > 1e-2  # the adapter changes the model
    with merged_adapter(model, "policy"):
        merged = logits(model, tiny_tokenizer)
        assert any(not torch.equal(w, before[n][1]) for n, w in base_weights(model).items())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    after = base_weights(model)
    for name, (tensor, values) in before.items():
        assert after[name] is tensor and torch.equal(tensor, values), name  # the very tensors, bit for bit
    assert torch.equal(logits(model, tiny_tokenizer), unmerged)  # the adapter is on again
    with use_adapter(model, "parent"), merged_adapter(model, "parent"):
        merged_parent = logits(model, tiny_tokenizer)
    with use_adapter(model, "parent"):
        torch.testing.assert_close(merged_parent, logits(model, tiny_tokenizer), atol=1e-5, rtol=1e-5)


def test_an_error_inside_still_puts_the_weights_back(tiny_model, tiny_tokenizer):
    model = lora_model(tiny_model)
    before = {name: w.detach().clone() for name, w in base_weights(model).items()}
    unmerged = logits(model, tiny_tokenizer)
    with pytest.raises(RuntimeError, match="boom"), merged_adapter(model, "policy"):
        raise RuntimeError("boom")
    assert all(torch.equal(w, before[n]) for n, w in base_weights(model).items())
    assert torch.equal(logits(model, tiny_tokenizer), unmerged)


@pytest.mark.parametrize("extra", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_merged_sampling_draws_what_unmerged_sampling_draws(tiny_model, tiny_tokenizer, extra):
    model = lora_model(tiny_model, **extra)
    assert mergeable(model, "policy") == (not extra)  # DoRA's magnitude is not a delta: it is sampled unmerged
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0)
    for adapter in ("policy", "parent"):
        with use_adapter(model, adapter):
            plain = sample_batch(model, tiny_tokenizer, PROMPTS, 2, params, seed=3)
            merged = sample_batch(model, tiny_tokenizer, PROMPTS, 2, params, seed=3, merge=True)
        assert [[a.text for a in g] for g in merged] == [[a.text for a in g] for g in plain]
    with use_adapter(model, None):
        base = sample_batch(model, tiny_tokenizer, PROMPTS, 2, params, seed=3)
    assert [[a.text for a in g] for g in base] != [[a.text for a in g] for g in plain]  # the adapter shows


def test_the_policys_implicit_reward_ranks_rollouts_by_its_log_ratio_to_the_reference(tiny_model, tiny_tokenizer):
    """`rollout_judge` "auto" can rank a prompt's rollouts by log pi - log ref (pi: the active adapter as it is now,
    ref: the round's memoised reference) instead of the reward model: the scores equal the difference of the two
    log-probs `answer_logprobs` gives each answer, the best and worst of them make the pair, and the reference keeps
    them for the training step."""
    from learner.logprobs import answer_logprobs
    from learner.refcache import ReferenceLogps
    from learner.rollouts import Rollout, best_vs_worst, implicit_reward_scorer

    model = lora_model(tiny_model)
    pad = tiny_tokenizer.pad_token_id
    reference = ReferenceLogps(model, pad, None, batch_size=4)  # the base model, as in a default round
    prompt = PROMPTS[0]
    rollouts = [Rollout(prompt, text, 3, reason) for text, reason in
                [("Four.", "eos"), ("It is 4", "length"), ("2 + 2 = 4, always.", "eos"), ("Five?", "eos")]]
    scores = implicit_reward_scorer(model, tiny_tokenizer, reference, 96, batch_size=2)(prompt, rollouts)
    texts, ended = [r.text for r in rollouts], [r.finish_reason == "eos" for r in rollouts]
    with torch.no_grad():
        policy = answer_logprobs(model, tiny_tokenizer, [prompt] * 4, texts, 96, ended=ended)
        with use_adapter(model, None):
            base = answer_logprobs(model, tiny_tokenizer, [prompt] * 4, texts, 96, ended=ended)
    expected = (policy.logps - base.logps).tolist()
    assert scores == pytest.approx(expected, abs=1e-4)
    assert len(set(round(s, 3) for s in scores)) == 4  # the adapter moved every answer's log-ratio differently
    best, worst = max(range(4), key=expected.__getitem__), min(range(4), key=expected.__getitem__)
    [pair] = best_vs_worst(prompt, rollouts, scores)
    assert (pair.chosen, pair.rejected) == (texts[best], texts[worst])
    assert reference.stats()["computed"] == 4  # memoised: the pair's training step computes no reference again


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_under_autocast_the_frozen_weights_are_cast_once_and_the_draws_stay_the_same(tiny_model, tiny_tokenizer,
                                                                                       merge):
    """Inside bf16 autocast (a CPU with native bf16; emulated here) a round's sampling casts every frozen linear
    weight once for the call instead of at every token: the very same tokens and log-probs as autocast casting them
    at each matmul, and afterwards the same fp32 tensors, untouched."""
    from learner.model import autocast_weights
    from learner.sampling import sample_many

    model = lora_model(tiny_model)
    before = {id(p): (p, p.detach().clone()) for p in model.parameters()}
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with merged_adapter(model, "policy") if merge else use_adapter(model, "policy"):
            per_matmul = sample_many(model, tiny_tokenizer, PROMPTS, 2, params, seed=3)
            with autocast_weights(model) as cast:
                assert cast == 7 * 2 + 1  # the tiny Llama's 2 layers x 7 linear layers, and the output layer
                assert model.get_output_embeddings().weight.dtype == torch.bfloat16
                assert model.get_input_embeddings().weight.dtype == torch.float32  # a lookup: never cast
                assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
                once = sample_many(model, tiny_tokenizer, PROMPTS, 2, params, seed=3)
        through_rollouts = sample_batch(model, tiny_tokenizer, PROMPTS, 2, params, seed=3, merge=merge)
    assert [[a.token_logprobs for a in g] for g in once] == [[a.token_logprobs for a in g] for g in per_matmul]
    assert [[a.text for a in g] for g in once] == [[a.text for a in g] for g in per_matmul]
    assert [[a.text for a in g] for g in through_rollouts] == [[a.text for a in g] for g in per_matmul]
    after = {id(p): p for p in model.parameters()}
    assert after.keys() == before.keys()
    assert all(torch.equal(p, values) and p.dtype == torch.float32 for p, values in before.values())
    with autocast_weights(model) as cast:  # outside autocast: nothing to cast
        assert cast == 0


def lora_grads(model, tokenizer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A training forward and backward of the policy adapter on a fixed text: the loss and every LoRA gradient."""
    ids = tokenizer(" ".join(PROMPTS), return_tensors="pt").input_ids
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_round_long_cast_trains_and_scores_as_autocast_casting_at_every_matmul(tiny_model, tiny_tokenizer):
    """A round runs every phase inside `autocast_weights` (`learner.round.run_round`): under bf16 autocast a forward
    and backward pass give the very loss and LoRA gradients autocast gives casting each frozen weight at its matmul,
    and the frozen weights get no gradient."""
    from learner.model import autocast_weights

    model = lora_model(tiny_model)
    model.train()
    model.set_requires_grad("policy", True)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        per_matmul = lora_grads(model, tiny_tokenizer)
        with autocast_weights(model) as cast:
            assert cast == 7 * 2 + 1
            once = lora_grads(model, tiny_tokenizer)
    assert per_matmul[1] and set(once[1]) == set(per_matmul[1])
    assert all("lora_" in name and ".policy." in name for name in once[1])
    assert torch.equal(once[0], per_matmul[0])
    assert all(torch.equal(once[1][n], g) for n, g in per_matmul[1].items())


def test_inside_a_round_long_cast_a_merge_starts_from_the_fp32_weights(tiny_model, tiny_tokenizer):
    """Sampling merges the adapter into a copy of the weights (`merged_adapter`). Inside the round's cast the layers
    hold bf16 copies: the merge adds the adapter to the fp32 weight (`uncast_weight`), not to its rounding, so a
    round draws what it drew before the cast lasted the round; the bf16 copies come back after the merge and the fp32
    tensors after the round, untouched."""
    from peft.tuners.lora import LoraLayer

    from learner.model import autocast_weights, uncast_weight

    model = lora_model(tiny_model)
    before = {name: (w, w.detach().clone()) for name, w in base_weights(model).items()}
    name, lora = next((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))
    layer = lora.get_base_layer()
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        per_call = merged_draws(model, tiny_tokenizer, params)
        with autocast_weights(model):
            copy = layer.weight
            assert copy.dtype == torch.bfloat16 and uncast_weight(layer) is before[name][0]
            with merged_adapter(model, "policy"):
                with torch.autocast("cpu", enabled=False):  # the merge's B @ A, in fp32
                    expected = before[name][1] + lora.get_delta_weight("policy")
                assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, expected)
            assert layer.weight is copy  # the round's bf16 copy again
            in_round = merged_draws(model, tiny_tokenizer, params)
    assert in_round == per_call
    after = base_weights(model)
    for key, (tensor, values) in before.items():
        assert after[key] is tensor and torch.equal(tensor, values), key
    assert uncast_weight(layer) is layer.weight


def merged_draws(model, tokenizer, params) -> tuple[list, list]:
    """What sampling with the policy merged draws: `sample_batch`'s texts (it merges, then casts the merged copies
    for the call) and `sample_many`'s tokens' log-probs inside a merge."""
    from learner.sampling import sample_many

    texts = sample_batch(model, tokenizer, PROMPTS, 2, params, seed=3, merge=True)
    with merged_adapter(model, "policy"):
        answers = sample_many(model, tokenizer, PROMPTS, 2, params, seed=3)
    return [[a.text for a in g] for g in texts], [[a.token_logprobs for a in g] for g in answers]
