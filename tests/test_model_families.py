"""A researcher's `--model` is rarely a Llama: the sampler and the scorer agree on other families too.

Random 2-layer models of each family with SmolLM2's tokenizer: a left-padded batch of two prompts of different lengths
is sampled (`decode_steps`: static KV cache, explicit position ids), and every answer's sampled log-prob must equal
what `sequence_logprobs` scores for it (shared-prompt layout, or padded rows where that layout would not be exact)
and what the model gives it alone, in one unpadded row through its own forward. Families differ where the two paths
can go wrong: Qwen2's biases, Mistral's sliding window (8 tokens: shorter than the answers), Gemma 3's interleaved
sliding and full layers (a window shorter and one longer than the sequences), Phi-3's fused projections, GPT-2's
learned absolute positions.
"""

import math

import pytest
import torch

from learner.logprobs import EncodedAnswer, layout, sequence_logprobs
from learner.model import Device, load_base_model
from learner.sampling import SamplingParams, decode_steps, encode_prompt, eos_token_ids, left_padded

PROMPTS = ["Hi", "What is seventeen plus twenty five, and why? Explain it in a few careful words please."]
DECODER = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2)
FAMILIES = {  # name: (config class, its fields, whether answers share their prompt's tokens in one row)
    "qwen2": ("Qwen2Config", DECODER, True),
    "mistral-window-8": ("MistralConfig", dict(DECODER, sliding_window=8), False),
    "gemma3-window-16": ("Gemma3TextConfig", dict(DECODER, head_dim=8, sliding_window=16), False),
    "gemma3-window-128": ("Gemma3TextConfig", dict(DECODER, head_dim=8, sliding_window=128), True),
    "phi3": ("Phi3Config", DECODER, True),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4), True),
}
OTHERS = {
    # ALiBi, no position ids: refused at load, padded when scored.
    "bloom": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4), False),
    # Eager attention only, logits soft-capped after the output layer, sliding and full layers interleaved.
    "gemma2": ("Gemma2Config", dict(DECODER, head_dim=8, sliding_window=16), False),
}


def random_model(family: str, tokenizer):
    import transformers

    config_name, fields, _ = {**FAMILIES, **OTHERS}[family]
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, **fields)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def alone(model, answer: EncodedAnswer) -> float:
    ids = torch.tensor([answer.input_ids])
    logp = model(ids).logits[0].float().log_softmax(-1)[answer.prompt_length - 1:-1]
    return float(logp.gather(-1, ids[0, answer.prompt_length:].unsqueeze(-1)).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_log_probs_equal_scored_and_alone_in_each_family(tiny_tokenizer, family):
    model = random_model(family, tiny_tokenizer)
    rows = [encode_prompt(tiny_tokenizer, p) for p in PROMPTS for _ in range(2)]
    input_ids, attention_mask = left_padded(tiny_tokenizer, rows, "cpu")
    eos = eos_token_ids(tiny_tokenizer, model)
    torch.manual_seed(1)
    params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=1.0)
    steps = list(decode_steps(model, input_ids, attention_mask, params, eos, tiny_tokenizer.pad_token_id))
    tokens, logprobs = torch.stack([t for t, _ in steps], 1), torch.stack([lp for _, lp in steps], 1)
    answers, sampled = [], []
    for i, prompt in enumerate(rows):
        drawn = tokens[i].tolist()
        ended = next((j for j, t in enumerate(drawn) if t in eos), None)
        n = len(drawn) if ended is None else ended + 1  # the eos is scored
        answers.append(EncodedAnswer(tuple(prompt + drawn[:n]), len(prompt), False, ended is not None))
        sampled.append(float(logprobs[i, :n].sum()))
    assert max(len(a.input_ids) for a in answers) > 16 and len(rows[0]) != len(rows[2])  # windows bite; padding
    assert (layout(model, answers, tiny_tokenizer.pad_token_id).position_ids is not None) == FAMILIES[family][2]
    with torch.no_grad():
        scored = sequence_logprobs(model, answers, tiny_tokenizer.pad_token_id).logps.tolist()
        each_alone = [alone(model, a) for a in answers]
    assert sampled == pytest.approx(each_alone, abs=1e-3)
    assert scored == pytest.approx(each_alone, abs=1e-3)


def test_within_its_window_a_sliding_window_model_shares_prompts_again(tiny_tokenizer):
    """The window only bars the shared layout where a sequence is longer than it (a 4D mask reaches every layer as
    given, so the shared layout cannot apply a window): at the longest sequence's length, answers share again."""
    model = random_model("mistral-window-8", tiny_tokenizer)
    short = [EncodedAnswer(tuple(encode_prompt(tiny_tokenizer, "Hi") + [t, tiny_tokenizer.eos_token_id]),
                           len(encode_prompt(tiny_tokenizer, "Hi")), False) for t in (100, 200)]
    longest = max(len(a.input_ids) for a in short)
    model.config.sliding_window = longest - 1
    assert layout(model, short, tiny_tokenizer.pad_token_id).position_ids is None
    model.config.sliding_window = longest
    assert layout(model, short, tiny_tokenizer.pad_token_id).position_ids is not None


def test_an_alibi_model_is_scored_in_padded_rows_and_refused_when_loaded(tiny_tokenizer, tmp_path):
    """Bloom takes no position ids (ALiBi's bias comes from the 2D mask): scored, each answer gets a padded row and
    its own log-prob; loaded as a base model, it is refused with the reason and what to choose instead, rather than
    failing inside the first sampling batch."""
    from learner.errors import ModelError
    from learner.model import Device, load_base_model

    model = random_model("bloom", tiny_tokenizer)
    prompt = encode_prompt(tiny_tokenizer, PROMPTS[1])
    answers = [EncodedAnswer(tuple(prompt + list(range(300, 300 + n))), len(prompt), False, False) for n in (3, 9)]
    assert layout(model, answers, tiny_tokenizer.pad_token_id).position_ids is None
    with torch.no_grad():
        scored = sequence_logprobs(model, answers, tiny_tokenizer.pad_token_id).logps.tolist()
        assert scored == pytest.approx([alone(model, a) for a in answers], abs=1e-3)
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"\(bloom\) takes its positions from ALiBi.*rotary or learned positions"):
        load_base_model(tmp_path, Device(torch.device("cpu"), torch.float32))


def test_a_whole_round_trains_a_gemma2_policy(tiny_tokenizer, tmp_path):
    """A round (reward model, rollouts, DPO steps, evaluation, gate) on the family most unlike the tiny Llama: the
    LoRA moves, the first loss is log 2 (policy == reference), and every figure is finite."""
    from test_round import TINY, assert_complete, lora_weights, write_snapshot

    from learner.config import RoundConfig
    from learner.round import run_round

    random_model("gemma2", tiny_tokenizer).save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    metrics = run_round(write_snapshot(tmp_path / "snapshot"), tmp_path / "model", None, tmp_path / "v1",
                        RoundConfig.from_dict(TINY))
    assert assert_complete(tmp_path / "v1") == metrics and metrics["gate"]["passed"]
    first, alpha = metrics["history"][0], RoundConfig.from_dict(TINY).rpo_alpha  # DPO's part: less RPO's NLL
    assert first["loss"] - alpha * first["nll_chosen"] == pytest.approx(math.log(2), abs=1e-3)
    assert metrics["data"]["onpolicy"]["answers"] > 0 and metrics["kl_to_reference"] >= 0
    assert any(w.abs().sum() > 0 for name, w in lora_weights(tmp_path / "v1").items() if "lora_B" in name)


def test_a_loaded_model_runs_transformers_own_layers_and_fetches_no_hub_kernels(tiny_model_dir):
    # transformers >= 5.25 loads with use_kernels=True by default; on a GPU a round's `model.train()` then fetched
    # layer kernels from the Hugging Face Hub and failed offline (seen on an H200). Here, on any machine: off.
    model = load_base_model(tiny_model_dir, Device(torch.device("cpu"), torch.float32))
    assert model.use_kernels is False
    model.train()  # what a round does to the policy
    assert model.use_kernels is False
