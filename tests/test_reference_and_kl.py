"""Reference log-probs computed once (and cached across rounds) give the same loss; the exact per-token KL."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from learner.config import RoundConfig
from learner.evaluate import exact_kl
from learner.logprobs import encode_answer, sequence_logprobs
from learner.refcache import ReferenceLogps
from learner.rollouts import human_examples
from learner.train import PairExample, PolicyContext, dpo_objective, use_adapter

PAIRS = [PairExample("What is 2 + 2?", "4.", "It is five, I think", "human", group="a"),
         PairExample("What is 2 + 2?", "4.", "Four, because 2 + 2", "human", rejected_ended=False, group="a"),
         PairExample("Name a colour.", "Blue", "A colour is a", "human", rejected_ended=False, group="b")]


def policy_model(tiny_model):
    """The tiny model with a policy LoRA moved off zero, so policy and reference differ."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"), adapter_name="policy")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    return model


def test_cached_reference_logprobs_give_the_same_loss_as_recomputing(tiny_model, tiny_tokenizer, tmp_path):
    model = policy_model(tiny_model)
    config = RoundConfig(max_length=64)
    pad = tiny_tokenizer.pad_token_id
    cache_file = tmp_path / "ref" / "base.jsonl"

    def recompute(encoded):  # the old way: a reference forward pass every time
        with torch.no_grad(), use_adapter(model, None):
            return sequence_logprobs(model, encoded, pad).logps

    first = ReferenceLogps(model, pad, None, batch_size=2, cache_file=cache_file)
    loss_recomputed, _ = dpo_objective(PolicyContext(model, tiny_tokenizer, config, recompute), PAIRS)
    loss_first, _ = dpo_objective(PolicyContext(model, tiny_tokenizer, config, first), PAIRS)
    assert first.computed == 5  # 6 sequences, "4." shared by the first two pairs: computed once
    dpo_objective(PolicyContext(model, tiny_tokenizer, config, first), PAIRS)
    assert first.computed == 5  # the second step computes nothing
    first.save()
    again = ReferenceLogps(model, pad, None, batch_size=2, cache_file=cache_file)  # a later round
    loss_cached, _ = dpo_objective(PolicyContext(model, tiny_tokenizer, config, again), PAIRS)
    assert again.loaded == 5 and again.computed == 0
    assert loss_first.item() == pytest.approx(loss_recomputed.item(), abs=1e-6)
    assert loss_cached.item() == pytest.approx(loss_recomputed.item(), abs=1e-6)


def test_an_answer_cut_at_max_new_tokens_is_trained_without_eos(tiny_tokenizer):
    import pandas as pd

    frame = pd.DataFrame([{"item_id": 1, "prompt": "Say hi.", "chosen": "Hi there", "rejected": "Hello hello hello",
                           "chosen_finish_reason": "eos", "rejected_finish_reason": "length"}])
    (example,), dropped = human_examples(frame, "dpo", tiny_tokenizer, 64)
    assert not dropped and example.chosen_ended and not example.rejected_ended
    eos = tiny_tokenizer.eos_token_id
    chosen = encode_answer(tiny_tokenizer, "Say hi.", "Hi there", 64, example.chosen_ended)
    rejected = encode_answer(tiny_tokenizer, "Say hi.", "Hello hello hello", 64, example.rejected_ended)
    assert chosen.input_ids[-1] == eos
    assert eos not in rejected.input_ids[rejected.prompt_length:]
    assert tiny_tokenizer.decode(rejected.input_ids[rejected.prompt_length:]) == "Hello hello hello"


def test_exact_kl_matches_a_hand_computation_and_is_never_negative(tiny_model, tiny_tokenizer):
    model = policy_model(tiny_model)
    model.eval()
    encoded = [encode_answer(tiny_tokenizer, "What is 2 + 2?", "Four, I would say.", 64),
               encode_answer(tiny_tokenizer, "Name a colour.", "Blue", 64, ended=False)]
    temperature = 0.8
    kl, _, counts = exact_kl(model, encoded, tiny_tokenizer.pad_token_id, None, temperature)
    for row, e in enumerate(encoded):
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            policy = model(input_ids=ids).logits[0].double()
            with model.disable_adapter():
                ref = model(input_ids=ids).logits[0].double()
        by_hand = 0.0
        for t in range(e.prompt_length, len(e.input_ids)):
            p = torch.softmax(policy[t - 1] / temperature, -1)
            q = torch.softmax(ref[t - 1] / temperature, -1)
            by_hand += float((p * (p.log() - q.log())).sum())
        assert kl[row].item() == pytest.approx(by_hand, rel=1e-3, abs=1e-5)
        assert counts[row].item() == e.answer_length
    assert (kl > 0).all()
    same, _, _ = exact_kl(model, encoded, tiny_tokenizer.pad_token_id, "policy", temperature)
    assert (same == 0).all()  # against itself: exactly 0, never a negative estimate


def test_a_rankings_pairs_go_through_the_policy_once_per_distinct_answer(tiny_model, tiny_tokenizer):
    """DPO's micro-batches are cut by distinct answers (<= 2 x batch_size), not by pairs: a K=4 ranking's 6 pairs
    are 4 sequences in one forward pass instead of 12 across two, with the same step loss and gradient."""
    from itertools import combinations

    from learner.train import micro_batches, shared_answer_batches, step_micro_losses

    answers = ["Four.", "It is 4", "2 + 2 = 4, so four", "Five"]
    ranking = [PairExample("What is 2 + 2?", a, b, "human", group="r1") for a, b in combinations(answers, 2)]
    other = [PairExample("Name a colour.", "Blue", w, "human", group="r2") for w in ("A colour", "Sky", "Red?")]
    examples = ranking + other
    assert [len(c) for c in shared_answer_batches(examples, 8)] == [9]  # 4 + 4 distinct answers
    chunks = shared_answer_batches(examples, 5)
    assert [len(c) for c in chunks] == [6, 3] and sum(chunks, []) == examples
    assert [len({t for e in c for t in e.texts()}) for c in chunks] == [4, 4]
    assert [len(c) for c in shared_answer_batches(examples, 2)] == [1] * 9  # each pair alone fits, in order

    model = policy_model(tiny_model)
    config = RoundConfig(max_length=64, batch_size=4)
    pad = tiny_tokenizer.pad_token_id
    context = PolicyContext(model, tiny_tokenizer, config, ReferenceLogps(model, pad, None, batch_size=8))
    rows = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: rows.append(tuple(i[0].shape)))
    params = [p for n, p in model.named_parameters() if "lora_" in n]

    def step(chunked) -> tuple[float, list[torch.Tensor]]:
        rows.clear()
        total = 0.0
        for loss, weight, _ in chunked:
            (loss * weight).backward()
            total += weight * loss.item()
        grads = [p.grad.clone() for p in params]
        model.zero_grad()
        return total, grads

    # The reference's log-probs first (memoised), so the hook below counts the policy's rows only.
    context.reference([encode_answer(tiny_tokenizer, p, a, 64, e) for x in examples for p, a, e in x.texts()])
    by_answers, grads = step(step_micro_losses(context, "dpo", examples))
    policy_rows = list(rows)
    by_pairs, grads_by_pairs = step((dpo_objective(context, c)[0], len(c) / len(examples), {})
                                    for c in micro_batches(examples, 4, 1))
    hook.remove()
    # One pass, each prompt once and each distinct answer once (the ranking's 4, "Blue" and its 3 rejected): two
    # groups, one per row, as wide as the longer.
    def group(prompt, texts):
        encoded = [encode_answer(tiny_tokenizer, prompt, a, 64) for a in texts]
        return encoded[0].prompt_length + sum(e.answer_length for e in encoded)
    width = max(group("What is 2 + 2?", answers), group("Name a colour.", ["Blue", "A colour", "Sky", "Red?"]))
    assert policy_rows == [(2, width)]
    assert len(rows) == 3  # by 4 pairs: {F, I, 2, 5}, {I, 5, 2, B, A, S}, {B, R}
    assert by_answers == pytest.approx(by_pairs, abs=1e-5)
    for a, b in zip(grads, grads_by_pairs, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_the_policys_heldout_accuracy_is_the_hand_computed_share_of_pairs(tiny_model, tiny_tokenizer):
    """implicit_reward_accuracy scores each distinct answer once; its count is the naive per-pair one."""
    from types import SimpleNamespace

    from learner.phases import implicit_reward_accuracy

    model = policy_model(tiny_model)
    config = RoundConfig(max_length=64, batch_size=1)  # chunks of 2 sequences: several passes
    pad = tiny_tokenizer.pad_token_id
    pairs = PAIRS + [PairExample("Name a colour.", "A colour is a", "Blue", "human", chosen_ended=False, group="b"),
                     PairExample("What is 2 + 2?", "Four, because 2 + 2", "4.", "human", chosen_ended=False)]
    setup = SimpleNamespace(model=model, tokenizer=tiny_tokenizer)
    got = implicit_reward_accuracy(setup, config, ReferenceLogps(model, pad, None, batch_size=2), pairs)

    def logp(prompt, answer, ended, adapter_off):
        encoded = [encode_answer(tiny_tokenizer, prompt, answer, 64, ended)]
        with torch.no_grad():
            if adapter_off:
                with use_adapter(model, None):
                    return float(sequence_logprobs(model, encoded, pad).logps[0])
            return float(sequence_logprobs(model, encoded, pad).logps[0])

    def ratio(prompt, answer, ended):
        return logp(prompt, answer, ended, False) - logp(prompt, answer, ended, True)

    expected = sum(ratio(p.prompt, p.chosen, p.chosen_ended) > ratio(p.prompt, p.rejected, p.rejected_ended)
                   for p in pairs)
    assert got.n == 5 and got.value == pytest.approx(expected / 5)
    assert 0 < expected < 5  # the reversed pairs make both outcomes occur


def test_rpo_alpha_adds_the_chosen_answers_nll_to_the_dpo_objective(tiny_model, tiny_tokenizer):
    model = policy_model(tiny_model)
    pad = tiny_tokenizer.pad_token_id
    reference = ReferenceLogps(model, pad, None, batch_size=8)
    plain, metrics = dpo_objective(PolicyContext(model, tiny_tokenizer, RoundConfig(max_length=64, rpo_alpha=0.0),
                                                 reference), PAIRS)
    rpo, _ = dpo_objective(PolicyContext(model, tiny_tokenizer, RoundConfig(max_length=64, rpo_alpha=0.5),
                                         reference), PAIRS)
    chosen = [encode_answer(tiny_tokenizer, e.prompt, e.chosen, 64, e.chosen_ended) for e in PAIRS]
    with torch.no_grad():
        policy = sequence_logprobs(model, chosen, pad)  # the policy adapter, each pair's chosen scored on its own
    nll = (-policy.logps / policy.token_counts).mean().item()
    assert metrics["nll_chosen"] == pytest.approx(nll, abs=1e-5)
    assert (rpo - plain).item() == pytest.approx(0.5 * nll, abs=1e-5)
