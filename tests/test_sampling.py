import pytest

from learner.errors import ConfigError
from learner.sampling import SamplingParams, encode_prompt, sample_answers, stream_answer


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


def test_logprob_sum_matches_a_forward_pass(tiny_model, tiny_tokenizer):
    import torch

    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0)
    prompt_ids = encode_prompt(tiny_tokenizer, "hello")
    torch.manual_seed(1)
    out = tiny_model.generate(input_ids=torch.tensor([prompt_ids]), do_sample=True, top_k=0, temperature=1.0,
                              max_new_tokens=8, pad_token_id=tiny_tokenizer.pad_token_id)
    answer = sample_answers(tiny_model, tiny_tokenizer, "hello", k=1, params=params, seed=1)[0]
    full = out.sequences[0] if hasattr(out, "sequences") else out[0]
    with torch.no_grad():
        logits = tiny_model(full.unsqueeze(0)).logits[0, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, full[1:].unsqueeze(-1)).squeeze(-1)
    scored = answer.token_count + (1 if answer.finish_reason == "eos" else 0)
    expected = float(logp[len(prompt_ids) - 1: len(prompt_ids) - 1 + scored].sum())
    assert answer.logprob_sum == pytest.approx(expected, abs=1e-3)


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
