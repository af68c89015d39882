"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer (read from the shipped GGUF file, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (with its chat template), extracted once per test session from the GGUF file."""
    from transformers import AutoTokenizer

    from learner.model import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A HF model directory: a 2-layer random Llama (hidden 32) plus the real tokenizer. Usable as `--model DIR`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh copy of the tiny model on the CPU in fp32, frozen, in eval mode."""
    from learner.model import Device, load_base_model

    return load_base_model(tiny_model_dir, Device(torch.device("cpu"), torch.float32))


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    from learner.model import load_tokenizer

    return load_tokenizer(tiny_model_dir)
