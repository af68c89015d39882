import math

import pytest
import torch

from learner.errors import TokenizationError
from learner.logprobs import answer_logprobs, collate, encode_answer, sequence_logprobs
from learner.sampling import encode_prompt

PROMPT = "What is 17 + 25?"


def test_mask_covers_the_answer_and_its_eos_only(tiny_tokenizer):
    encoded = encode_answer(tiny_tokenizer, PROMPT, "It is 42.", max_length=128)
    prompt_ids = encode_prompt(tiny_tokenizer, PROMPT)
    assert list(encoded.input_ids[:encoded.prompt_length]) == prompt_ids
    input_ids, attention_mask, answer_mask = collate([encoded, encode_answer(tiny_tokenizer, PROMPT, "42", 128)],
                                                     tiny_tokenizer.pad_token_id)
    row = answer_mask[0]
    assert not row[:len(prompt_ids)].any()
    answer_tokens = input_ids[0][row].tolist()
    assert answer_tokens[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(answer_tokens[:-1]) == "It is 42."
    # The shorter second row is right-padded; padding is neither attended to nor scored.
    pad_start = len(encode_answer(tiny_tokenizer, PROMPT, "42", 128).input_ids)
    assert attention_mask[1, pad_start:].sum() == 0 and not answer_mask[1, pad_start:].any()


def test_one_forward_for_chosen_and_rejected_equals_separate_forwards(tiny_model, tiny_tokenizer):
    prompts = [PROMPT, "Name a colour."]
    chosen = [encode_answer(tiny_tokenizer, p, a, 128) for p, a in zip(prompts, ["42, since 17 + 25 = 42.", "Red"])]
    rejected = [encode_answer(tiny_tokenizer, p, a, 128) for p, a in zip(prompts, ["41", "A colour is a thing."])]
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        together = sequence_logprobs(tiny_model, chosen + rejected, pad)
        one_by_one = torch.cat([sequence_logprobs(tiny_model, [e], pad).logps for e in chosen + rejected])
    torch.testing.assert_close(together.logps, one_by_one, atol=1e-4, rtol=1e-5)
    c, r = together.split(2)
    assert c.token_counts.tolist() == [e.answer_length for e in chosen]
    assert r.token_counts.tolist() == [e.answer_length for e in rejected]


def test_summed_logprob_matches_the_naive_sum(tiny_model, tiny_tokenizer):
    encoded = encode_answer(tiny_tokenizer, PROMPT, "Forty-two", 128)
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        logits = tiny_model(ids).logits[0]
        result = sequence_logprobs(tiny_model, [encoded], tiny_tokenizer.pad_token_id, with_entropy=True)
    logp = torch.log_softmax(logits, -1)
    naive = sum(logp[t - 1, ids[0, t]] for t in range(encoded.prompt_length, ids.shape[1]))
    assert result.logps.item() == pytest.approx(float(naive), abs=1e-4)
    answer_logp = logp[encoded.prompt_length - 1:-1]
    naive_entropy = float(-(answer_logp.exp() * answer_logp).sum(-1).mean())
    assert result.entropy.item() == pytest.approx(naive_entropy, abs=1e-4)
    assert 0 < result.entropy.item() <= math.log(len(tiny_tokenizer))


def test_both_ways_to_the_answer_logits_give_each_rows_naive_sum(tiny_model, tiny_tokenizer):
    """Logits at answer positions only (the transformer's hidden states there through the output layer), and the
    model's own forward for models that transform their logits after it (picked by config, here forced): a
    right-padded batch whose rows' answers start at different positions, each row equal to its naive sum."""
    pad = tiny_tokenizer.pad_token_id
    encoded = [encode_answer(tiny_tokenizer, p, a, 128) for p, a in
               [(PROMPT, "Forty-two, because 17 + 25 = 42."), ("Hi", "Hello"), ("Name a colour, any colour.", "Red")]]
    assert len({e.prompt_length for e in encoded}) == 3
    naive = []
    with torch.no_grad():
        for e in encoded:
            ids = torch.tensor([e.input_ids])
            logp = torch.log_softmax(tiny_model(ids).logits[0], -1)
            naive.append(float(sum(logp[t - 1, ids[0, t]] for t in range(e.prompt_length, ids.shape[1]))))
        hidden_path = sequence_logprobs(tiny_model, encoded, pad).logps
        tiny_model.config.final_logit_softcapping = 30.0  # as Gemma 2's config says: its forward caps the logits
        try:
            forward_path = sequence_logprobs(tiny_model, encoded, pad).logps
        finally:
            del tiny_model.config.final_logit_softcapping
    assert hidden_path.tolist() == pytest.approx(naive, abs=1e-4)
    assert forward_path.tolist() == pytest.approx(naive, abs=1e-4)


def test_gradients_flow_through_the_policy(tiny_model, tiny_tokenizer):
    tiny_model.lm_head.weight.requires_grad_(True)  # tied to the embeddings in the tiny model
    result = answer_logprobs(tiny_model, tiny_tokenizer, [PROMPT], ["42"], max_length=128)
    result.logps.sum().backward()
    assert tiny_model.lm_head.weight.grad.abs().sum() > 0


class PirateTemplate:
    """A tokenizer whose chat template renders differently as text than as ids (a real kind of mismatch:
    templates that add a BOS or a system prompt on one path only)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, messages, tokenize=True, **kwargs):
        rendered = self._tokenizer.apply_chat_template(messages, tokenize=tokenize, **kwargs)
        return rendered.replace("a helpful AI assistant", "a pirate") if not tokenize else rendered


def test_prefix_check_raises_on_a_template_mismatch(tiny_tokenizer):
    with pytest.raises(TokenizationError, match="not a prefix"):
        encode_answer(PirateTemplate(tiny_tokenizer), PROMPT, "Arr, 42.", max_length=128)


def test_prefix_check_raises_on_a_merge_across_the_boundary(tiny_tokenizer):
    # The template ends the prompt with "\n"; an answer starting with "\n\n" merges into one "\n\n\n"-ish token.
    with pytest.raises(TokenizationError, match="not a prefix"):
        encode_answer(tiny_tokenizer, PROMPT, "\n\n42", max_length=128)


def test_truncation_cuts_the_answer_from_the_end_and_keeps_the_prompt(tiny_tokenizer):
    prompt_ids = encode_prompt(tiny_tokenizer, PROMPT)
    encoded = encode_answer(tiny_tokenizer, PROMPT, "word " * 50, max_length=len(prompt_ids) + 5)
    assert len(encoded.input_ids) == len(prompt_ids) + 5
    assert list(encoded.input_ids[:len(prompt_ids)]) == prompt_ids
    assert encoded.truncated and encoded.answer_length == 5
    assert tiny_tokenizer.eos_token_id not in encoded.input_ids[len(prompt_ids):]


def test_a_prompt_too_long_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(TokenizationError, match=r"the prompt has \d+ tokens .* max_length is 16"):
        encode_answer(tiny_tokenizer, PROMPT, "42", max_length=16)


def _naive_logprob(model, encoded) -> float:
    ids = torch.tensor([encoded.input_ids])
    logp = torch.log_softmax(model(ids).logits[0], -1)
    return float(sum(logp[t - 1, ids[0, t]] for t in range(encoded.prompt_length, ids.shape[1])))


SHARED = [(PROMPT, "Forty-two, because 17 + 25 = 42.", True), ("Hi", "Hello", True), (PROMPT, "41?", True),
          ("Hi", "Hey there, how are you today? I am fine.", False), ("Name a colour, any colour.", "Red", True),
          (PROMPT, "It is forty-two, plainly.", False),
          (PROMPT, "Seventeen plus twenty-five makes forty-two; check it by counting up from seventeen.", True),
          ("Hi", "", False)]  # cut before its first token: nothing to score


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_answers_sharing_a_prompt_are_scored_as_each_would_be_alone(tiny_model, tiny_tokenizer, attention):
    """The shared-prompt layout (each prompt's tokens once, its answers after it, each answer seeing the prompt and
    itself only, positions continuing from the prompt's end; short groups packed into one row) gives each answer
    the log-prob, entropy and gradient it has alone: two answers seeing each other, or restarting their positions,
    change them."""
    from learner.logprobs import answer_logits, layout, padded_layout

    tiny_model.set_attn_implementation(attention)
    pad = tiny_tokenizer.pad_token_id
    encoded = [encode_answer(tiny_tokenizer, p, a, 128, ended) for p, a, ended in SHARED]
    shared = layout(tiny_model, encoded, pad)
    assert shared.position_ids is not None and shared.attention_mask.dim() == 4
    assert shared.input_ids.shape[0] == 2  # PROMPT's group alone; "Hi"'s and the colour's share the second row
    assert shared.counts.tolist() == [e.answer_length for e in encoded]
    with torch.no_grad():
        naive = [_naive_logprob(tiny_model, e) for e in encoded]
        result = sequence_logprobs(tiny_model, encoded, pad, with_entropy=True)
        alone = [float(sequence_logprobs(tiny_model, [e], pad, with_entropy=True).entropy) for e in encoded]
    assert result.logps.tolist() == pytest.approx(naive, abs=1e-4)
    assert result.entropy.tolist() == pytest.approx(alone, abs=1e-4)
    assert result.logps[-1] == 0 and result.token_counts[-1] == 0

    weight = tiny_model.model.layers[0].self_attn.q_proj.weight
    weight.requires_grad_(True)
    sequence_logprobs(tiny_model, encoded, pad).logps.sum().backward()
    together, weight.grad = weight.grad.clone(), None
    for e in encoded:  # each alone, in a row of its own
        alone = padded_layout([e], pad)
        logits = answer_logits(tiny_model, alone).float()
        (logits.gather(-1, alone.targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)).sum().backward()
    torch.testing.assert_close(together, weight.grad, atol=1e-5, rtol=1e-4)


def test_a_prompts_many_answers_split_into_groups_that_each_repeat_it(tiny_model, tiny_tokenizer):
    """A group's attention is a full square, so a prompt's answers beyond `max_group_tokens` start a new group with
    the prompt again (an answer longer than the bound alone gets a group of its own); every answer still scores as
    it does alone."""
    from learner.logprobs import answer_logits, shared_prompt_layout

    pad = tiny_tokenizer.pad_token_id
    encoded = [encode_answer(tiny_tokenizer, p, a, 128, ended) for p, a, ended in SHARED]
    batch = shared_prompt_layout(encoded, pad, max_group_tokens=60)
    prompt = list(encoded[0].input_ids[:encoded[0].prompt_length])
    rows = batch.input_ids.tolist()
    copies = sum(row[i:i + len(prompt)] == prompt for row in rows for i in range(len(row)))
    assert copies == 3  # PROMPT (40 tokens) with answers of 19 | 4 + 8 | 21 tokens: no two more fit in 60
    with torch.no_grad():
        logits = answer_logits(tiny_model, batch).float()
        token_logps = logits.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        naive = [_naive_logprob(tiny_model, e) for e in encoded]
    assert batch.per_answer(token_logps).tolist() == pytest.approx(naive, abs=1e-4)
