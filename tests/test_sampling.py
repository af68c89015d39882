import pytest

from learner.errors import ConfigError
from learner.sampling import SamplingParams, encode_prompt, sample_answers, sample_many, stream_answer


def test_k_answers_from_one_call_with_token_counts_and_logprobs(tiny_model, tiny_tokenizer):
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    answers = sample_answers(tiny_model, tiny_tokenizer, "What is 17 + 25?", k=4, params=params, seed=0)
    assert len(answers) == 4
    for a in answers:
        assert 0 <= a.token_count <= 12
        assert a.finish_reason in ("eos", "length")
        assert (a.finish_reason == "length") == (a.token_count == 12)
        assert a.logprob_sum < 0  # a random model is unsure of every token
    # A random model over a 49k vocabulary does not repeat itself four times.
    assert len({a.text for a in answers}) > 1


def test_each_tokens_logprob_is_the_models_on_the_whole_sequence_under_left_padding(tiny_model, tiny_tokenizer):
    """The KV-cached loop against plain forward passes: every drawn token's recorded log-prob (temperature 1) is the
    one the model gives it reading the whole unpadded sequence, for prompts of different lengths in one batch."""
    import torch

    from learner.sampling import decode_steps, eos_token_ids, left_padded

    prompts = [encode_prompt(tiny_tokenizer, p) for p in ("hello", "Explain how a hash table resolves collisions.")]
    input_ids, attention_mask = left_padded(tiny_tokenizer, prompts, "cpu")
    torch.manual_seed(3)
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9)
    steps = list(decode_steps(tiny_model, input_ids, attention_mask, params, set(), tiny_tokenizer.pad_token_id))
    tokens = torch.stack([t for t, _ in steps], 1)
    logprobs = torch.stack([lp for _, lp in steps], 1)
    assert tokens.shape == (2, 8)  # no eos asked for: every row runs to max_new_tokens
    for row, prompt in enumerate(prompts):
        full = torch.tensor([prompt + tokens[row].tolist()])
        with torch.no_grad():
            logits = tiny_model(full).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits, -1).gather(-1, tokens[row].unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(logprobs[row], expected, atol=1e-4), (row, logprobs[row], expected)
    assert eos_token_ids(tiny_tokenizer, tiny_model)  # (what sample_many stops rows at)


def test_near_greedy_sampling_continues_as_transformers_generate_does(tiny_model, tiny_tokenizer):
    """The loop replaces `generate`: at a temperature near 0 it must pick generate's greedy tokens."""
    import torch

    from learner.sampling import sample_many

    prompt = "Explain in detail how a hash table resolves collisions."
    ids = torch.tensor([encode_prompt(tiny_tokenizer, prompt)])
    greedy = tiny_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=10, pad_token_id=tiny_tokenizer.pad_token_id)
    expected = tiny_tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True).strip()
    (answer,) = sample_many(tiny_model, tiny_tokenizer, ["hi", prompt], k=1,
                            params=SamplingParams(max_new_tokens=10, temperature=1e-4, top_p=1.0), seed=0)[1]
    assert answer.text == expected


def test_the_nucleus_is_transformers_top_p_at_every_size(tiny_model):
    """Against transformers' TopPLogitsWarper on peaked and flat rows: the same tokens kept, with the warped
    distribution's probabilities, including when a row's nucleus outgrows the first candidates."""
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from learner.sampling import nucleus

    torch.manual_seed(0)
    vocab = 5000
    logits = torch.randn(6, vocab) * torch.tensor([[0.1], [1.0], [3.0], [8.0], [0.5], [20.0]])
    for temperature, top_p in [(1.0, 0.95), (0.8, 0.5), (0.7, 0.999), (1.3, 1.0)]:
        warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
        reference = torch.softmax(warped, -1)
        for candidates in (2, 64, vocab):
            weights, index = nucleus(logits, temperature, top_p, candidates=candidates)
            for row in range(logits.shape[0]):
                kept = index[row][weights[row] > 0]
                assert set(kept.tolist()) == set(torch.nonzero(reference[row]).flatten().tolist())
                mine = weights[row][weights[row] > 0]
                assert torch.allclose(mine / mine.sum(), reference[row][kept], atol=1e-5)
    flat = nucleus(torch.zeros(1, vocab), 1.0, 0.95, candidates=2)[0]
    assert int((flat > 0).sum()) == 4750  # a flat row needs 95% of the vocabulary: the candidates grew to it


def test_the_finite_check_sees_every_inf_and_nan_and_only_overflow_besides():
    """`all_finite` sums instead of testing each value: an inf or NaN anywhere, even one cancelling another, must
    read as not finite; finite values pass unless their sum overflows (then nan_to_num leaves them as they are)."""
    import torch

    from learner.sampling import all_finite

    row = torch.randn(3, 1000)
    assert all_finite(row)
    for bad in (float("inf"), -float("inf"), float("nan")):
        broken = row.clone()
        broken[1, 500] = bad
        assert not all_finite(broken)
    opposite = row.clone()
    opposite[0, 0], opposite[2, 9] = float("inf"), -float("inf")  # inf - inf: the sum is NaN, still caught
    assert not all_finite(opposite)
    huge = torch.full((2, 4), 3e38)
    assert not all_finite(huge)  # the sum overflows: read as not finite, and nan_to_num changes nothing
    assert torch.equal(torch.nan_to_num(huge), huge)


def test_bad_sampling_params_name_the_field():
    with pytest.raises(ConfigError, match="temperature must be > 0, got 0"):
        SamplingParams(temperature=0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_stream_yields_growing_text(tiny_model, tiny_tokenizer):
    updates = list(stream_answer(tiny_model, tiny_tokenizer, [{"role": "user", "content": "hi"}],
                                 SamplingParams(max_new_tokens=10, temperature=1.0)))
    assert len(updates) > 1
    assert all(later.startswith(earlier) for earlier, later in zip(updates, updates[1:]))
    # The stream draws as sample_many does: with the same seed, the same answer.
    import torch

    from learner.sampling import sample_many

    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    torch.manual_seed(5)
    streamed = list(stream_answer(tiny_model, tiny_tokenizer, [{"role": "user", "content": "hi"}], params))[-1]
    (sampled,) = sample_many(tiny_model, tiny_tokenizer, ["hi"], k=1, params=params, seed=5)[0]
    assert streamed.strip() == sampled.text


def test_several_prompts_in_one_call_match_one_prompt_at_a_time(tiny_model, tiny_tokenizer):
    """Left padding must not change an answer: near-greedy sampling of prompts of different lengths in one batch
    gives each prompt the same text and log-prob as sampling it alone."""
    from learner.sampling import sample_many

    params = SamplingParams(max_new_tokens=10, temperature=1e-4, top_p=1.0)
    prompts = ["hi", "Explain in detail how a hash table resolves collisions, with an example."]
    batched = sample_many(tiny_model, tiny_tokenizer, prompts, k=2, params=params, seed=0)
    assert [len(answers) for answers in batched] == [2, 2]
    for prompt, answers in zip(prompts, batched):
        (alone,) = sample_answers(tiny_model, tiny_tokenizer, prompt, k=1, params=params, seed=0)
        # Log-probs are of the raw distribution (temperature 1), not of the near-greedy one the tokens came from,
        # where every token would score ~0: a random model gives each token a log-prob of about -10.
        assert alone.logprob_sum < -alone.token_count
        for answer in answers:
            assert answer.text == alone.text
            assert answer.token_count == alone.token_count
            assert answer.logprob_sum == pytest.approx(alone.logprob_sum, abs=1e-3)


def test_logits_a_broken_model_makes_still_give_tokens():
    """Weights a far too large learning rate broke give inf and NaN logits: sampling must go on (the round's loss
    and gate reject the version), not crash in the middle of a round's rollouts."""
    import torch

    from learner.sampling import nucleus_sample

    logits = torch.tensor([[float("inf"), 0.0, 1.0, float("nan")], [3e38, 3e38, -float("inf"), 0.0],
                           [float("nan")] * 4])
    for temperature in (0.8, 1.0):
        tokens = nucleus_sample(torch.nan_to_num(logits), temperature, 0.95)
        assert tokens.shape == (3,) and bool(((tokens >= 0) & (tokens < 4)).all())


def test_a_model_whose_weights_broke_still_answers(tiny_model, tiny_tokenizer):
    """The same through the sampling loop (`decode_steps` makes non-finite logits finite before drawing): a model
    whose output layer holds inf and NaN answers every row with tokens from its vocabulary."""
    import copy
    import math

    import torch

    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        weight = broken.get_output_embeddings().weight
        broken.get_output_embeddings().weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        broken.get_output_embeddings().weight[0] = float("inf")
        broken.get_output_embeddings().weight[1] = float("nan")
    answers = sample_many(broken, tiny_tokenizer, ["hello", "a longer prompt here"], 2,
                          SamplingParams(max_new_tokens=5), seed=0)
    assert [len(a) for a in answers] == [2, 2]
    assert all(1 <= a.token_count + (a.finish_reason == "eos") <= 5 for item in answers for a in item)
    assert all(math.isfinite(a.logprob_sum) for item in answers for a in item)  # log-probs of finite logits


def test_a_model_that_writes_byte_zero_gives_text_the_store_takes(tiny_model, tiny_tokenizer, tmp_path):
    """Byte-level tokenizers have a token for byte 0. A random model drew it in CI and the buffer's fill crashed on
    the store's refusal of NUL characters; a head biased to that token writes it at every step."""
    import copy

    import torch

    from learner.sampling import sample_many
    from storage.items import AnswerRecord
    from storage.store import Store

    nul = next(i for i in range(len(tiny_tokenizer)) if "\0" in tiny_tokenizer.decode([i]))
    model = copy.deepcopy(tiny_model)
    bias = torch.full((model.lm_head.out_features,), -50.0)
    bias[nul] = 50.0
    model.lm_head.bias = torch.nn.Parameter(bias)
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    answers = sample_many(model, tiny_tokenizer, ["hi"], k=2, params=params, seed=0)[0]
    assert [(a.text, a.token_count) for a in answers] == [("\ufffd" * 4, 4)] * 2
    streamed = list(stream_answer(model, tiny_tokenizer, [{"role": "user", "content": "hi"}], params))
    assert streamed[-1] == "\ufffd" * 4

    with Store.open(tmp_path / "data") as store:
        store.prompts.add(["hi"], source="test")
        (prompt,) = store.prompts.page(limit=1).prompts
        records = [AnswerRecord(a.text, a.token_count, a.finish_reason, a.logprob_sum, 0) for a in answers]
        item = store.items.add(prompt.prompt_id, 0, {}, records)
        assert [a.text for a in store.items.get(item.item_id).answers] == ["\ufffd" * 4] * 2


def test_a_mixed_adapter_batch_answers_each_row_from_its_own_model(tiny_model, tiny_tokenizer):
    """Rows of several models in one batch (peft's mixed-adapter batches, as a round's evaluation samples the policy,
    its parent and the base together): near-greedy, each row's tokens and log-probs are those its model gives alone."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)  # B != 0: they differ
    model = get_peft_model(tiny_model, lora, adapter_name="first")
    model.add_adapter("second", lora)
    model.eval()
    params = SamplingParams(max_new_tokens=8, temperature=1e-4, top_p=1.0)
    prompts = ["What is 17 + 25?", "Name a colour."]
    adapters = ["first", "__base__", "second"]
    mixed = sample_many(model, tiny_tokenizer, prompts * 3, 1, params, seed=0,
                        adapters=[a for a in adapters for _ in prompts])
    alone = []
    for name in adapters:
        if name == "__base__":
            with model.disable_adapter():
                alone += sample_many(model, tiny_tokenizer, prompts, 1, params, seed=0)
        else:
            model.set_adapter(name)
            alone += sample_many(model, tiny_tokenizer, prompts, 1, params, seed=0)
    assert len({g[0].text for g in alone[:2]} | {g[0].text for g in alone[4:]}) > 2  # the models answer differently
    for got, expected in zip(mixed, alone, strict=True):
        assert got[0].text == expected[0].text
        assert got[0].token_logprobs == pytest.approx(expected[0].token_logprobs, abs=1e-4)
    with pytest.raises(ConfigError, match="one adapter per prompt"):
        sample_many(model, tiny_tokenizer, prompts, 1, params, adapters=["first"])
