"""The GPU path on a real GPU: bf16 weights under bf16 autocast (`learner.model.cuda_device`), checked against the
CPU's exact fp32 on the same tiny Llama. Where torch sees no CUDA GPU (CI, the 2-core machines) these are skipped;
on a GPU machine `pytest tests/test_cuda.py` runs them (every other test there runs its rounds on the GPU too:
`pick_device` takes CUDA where torch sees it). docs/benchmarks.md, "On a GPU", records where they last ran.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_generation_worker import GREEDY, PARAMS, save_adapter
from test_round import TINY, write_snapshot

from app.generation.backend import ItemRequest
from app.generation.transformers_backend import TransformersBackend
from app.generation.worker import WorkerBackend
from learner.config import RoundConfig
from learner.logprobs import answer_logprobs
from learner.model import Device, keep_lora_sums_fp32, load_base_model, load_tokenizer, pick_device
from learner.round import run_round

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")

CPU = Device(torch.device("cpu"), torch.float32)
PROMPTS = ["What is 2 + 2?", "What is 2 + 2?", "Name a colour.", "Name a colour.", "Say hi."]
ANSWERS = ["4.", "It is four, as two and two make four.", "Blue.", "Red, like a ripe tomato in August.", "Hi!"]


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with its (tied) embeddings scaled up: next-token distributions far from uniform (logits of
    std ~5 instead of ~0.1), so an answer's log-prob depends on its context and a masking or padding error on the
    GPU would move it by nats, not by the thousandths a near-uniform random model allows."""
    model = load_base_model(tiny_model_dir, CPU)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(50.0)
    out = tmp_path_factory.mktemp("sharp-llama")
    model.save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


def per_token(model, device: Device, tokenizer, prompts=PROMPTS, answers=ANSWERS) -> torch.Tensor:
    with torch.no_grad(), device.compute():
        scored = answer_logprobs(model, tokenizer, prompts, answers, 96)
    return (scored.logps / scored.token_counts).float().cpu()


def test_the_gpu_scores_answers_as_the_cpu_does_in_fp32_batched_or_alone(sharp_model_dir):
    gpu = pick_device()
    assert gpu.is_cuda and gpu.precision == "bfloat16 weights, bfloat16 autocast"
    tokenizer = load_tokenizer(sharp_model_dir)
    on_gpu = load_base_model(sharp_model_dir, gpu)
    assert {p.dtype for p in on_gpu.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in on_gpu.parameters()} == {"cuda"}
    exact = per_token(load_base_model(sharp_model_dir, CPU), CPU, tokenizer)
    batched = per_token(on_gpu, gpu, tokenizer)
    alone = torch.cat([per_token(on_gpu, gpu, tokenizer, [p], [a]) for p, a in zip(PROMPTS, ANSWERS)])
    spread = float(exact.max() - exact.min())
    assert spread > 1.0, f"the check cannot tell answers apart: per-token log-probs {exact.tolist()}"
    # bf16 keeps ~3 significant digits: a few hundredths of a nat per token, against a spread of nats.
    assert torch.allclose(batched, exact, atol=0.1), f"GPU {batched.tolist()} vs CPU fp32 {exact.tolist()}"
    assert torch.allclose(batched, alone, atol=0.05), f"GPU batched {batched.tolist()} vs alone {alone.tolist()}"


def test_a_round_on_the_gpu_trains_in_bf16_and_its_version_serves_alike_on_the_cpu(tmp_path, tiny_model_dir):
    config = RoundConfig.from_dict(TINY)
    metrics = run_round(write_snapshot(tmp_path / "snapshot"), tiny_model_dir, None, tmp_path / "v1", config)
    alpha = config.rpo_alpha  # RPO's weight on the chosen answers' NLL, added to DPO's loss
    assert metrics["device"] == "cuda" and metrics["precision"] == "bfloat16 weights, bfloat16 autocast"
    history = metrics["history"]
    # Step 0: a fresh LoRA is the reference (loss ln 2 up to bf16 rounding); later steps run the moved adapter.
    assert history[0]["loss"] - alpha * history[0]["nll_chosen"] == pytest.approx(math.log(2), abs=0.01)  # less RPO's
    assert all(step["kl"] != 0 and step["reward_chosen"] != 0 for step in history[1:]), history
    assert metrics["data"]["onpolicy"]["regenerations"] == 2  # rollouts sampled on the GPU

    from peft import PeftModel

    tokenizer = load_tokenizer(tiny_model_dir)
    gpu = pick_device()
    shifts = {}
    for name, device in (("cpu", CPU), ("gpu", gpu)):
        model = PeftModel.from_pretrained(load_base_model(tiny_model_dir, device), str(tmp_path / "v1" / "adapter"))
        keep_lora_sums_fp32(model, device)
        with model.disable_adapter():
            before = per_token(model, device, tokenizer)
        shifts[name] = per_token(model, device, tokenizer) - before  # what the trained adapter changes, per token
    moved = float(shifts["cpu"].abs().max())
    assert moved > 1e-3, f"the adapter trained on the GPU changes nothing on the CPU: {shifts['cpu'].tolist()}"
    assert torch.allclose(shifts["gpu"], shifts["cpu"], atol=0.2 * moved + 1e-3), shifts


def test_the_generation_worker_samples_and_streams_on_the_gpu_as_the_server_runs_it(tmp_path, tiny_model_dir):
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter", 0.5)
    in_process = TransformersBackend(tiny_model_dir, pick_device())
    assert not in_process.merge  # bf16 weights: the adapter is served unmerged (a merge would round it away)
    worker = WorkerBackend(tiny_model_dir, device="cuda")  # a spawned process, as `prefloop serve` starts it
    try:
        assert worker.device == "cuda"
        requests = [ItemRequest("What is 2 + 2?", 2, 1, seed=0), ItemRequest("What is 2 + 2?", 2, 0, seed=0)]
        for backend in (in_process, worker):
            backend.load_version(1, adapter)
            assert backend.loaded_versions() == [0, 1]
        v1, v0 = worker.sample_items(requests, GREEDY)
        assert v1[0].logprob_sum != pytest.approx(v0[0].logprob_sum, abs=1e-3)  # the adapter acts on the GPU
        assert [[a.text for a in item] for item in in_process.sample_items(requests, GREEDY)] == \
            [[a.text for a in v1], [a.text for a in v0]]  # the worker samples what the same model does in-process
        for answer in v1 + v0:
            assert answer.finish_reason in ("eos", "length") and 0 < answer.token_count <= GREEDY.max_new_tokens
            assert answer.logprob_sum == pytest.approx(sum(answer.token_logprobs), abs=1e-3)
        pieces = list(worker.stream([{"role": "user", "content": "hi"}], PARAMS, 1, seed=0))
        assert pieces and "".join(pieces)
    finally:
        worker.close()
