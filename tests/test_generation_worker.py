"""The policy backends on the tiny model: in-process transformers (merged and unmerged) and the worker process."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from app.generation.backend import ItemRequest
from app.generation.transformers_backend import TransformersBackend
from app.generation.worker import WorkerBackend, WorkerError
from learner.errors import ModelError
from learner.model import Device
from learner.sampling import SamplingParams

CPU = Device(torch.device("cpu"), torch.float32)
PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0)
GREEDY = SamplingParams(max_new_tokens=8, temperature=1e-4, top_p=1.0)


def save_adapter(tiny_model_dir, out, b_std: float, target_modules="all-linear", seed: int | None = 3):
    """A LoRA adapter on the tiny model with random B weights of standard deviation `b_std`, saved in `out`."""
    from peft import LoraConfig, get_peft_model

    from learner.model import load_base_model

    model = get_peft_model(load_base_model(tiny_model_dir, CPU),
                           LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False))
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, b_std)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter on the tiny model with large random B weights, so it really changes the answers."""
    return save_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), 0.5)


def test_merged_and_unmerged_serving_give_the_same_answers(tiny_model_dir, adapter_dir):
    merged = TransformersBackend(tiny_model_dir, CPU, merge=True)
    unmerged = TransformersBackend(tiny_model_dir, CPU, merge=False)
    for backend in (merged, unmerged):
        backend.load_version(1, adapter_dir)
    requests = [ItemRequest("What is 2 + 2?", 2, 1, seed=0), ItemRequest("hi", 2, 0, seed=0)]
    a, b = merged.sample_items(requests, GREEDY), unmerged.sample_items(requests, GREEDY)
    for item_a, item_b in zip(a, b):
        assert [x.text for x in item_a] == [x.text for x in item_b]
        for x, y in zip(item_a, item_b):
            assert x.logprob_sum == pytest.approx(y.logprob_sum, abs=1e-3)
    # The adapter changes the model: version 1 and the base answer differently to the same prompt.
    (v1,), (v0,) = merged.sample_items([ItemRequest("hi", 1, 1, 0), ItemRequest("hi", 1, 0, 0)], GREEDY)
    assert v1.logprob_sum != pytest.approx(v0.logprob_sum, abs=1e-3)


def test_merging_an_adapter_on_a_tied_output_layer_leaves_the_inputs_alone(tiny_model_dir, tmp_path):
    """The tiny model ties lm_head to the input embeddings; an adapter on lm_head merged into that shared weight would
    also change every input embedding. Merged and unmerged serving must agree."""
    save_adapter(tiny_model_dir, tmp_path, 0.5, target_modules=["q_proj", "lm_head"], seed=None)
    merged, unmerged = TransformersBackend(tiny_model_dir, CPU), TransformersBackend(tiny_model_dir, CPU, merge=False)
    request = [ItemRequest("What is 2 + 2?", 2, 1, seed=0)]
    answers = []
    for backend in (merged, unmerged):
        backend.load_version(1, tmp_path)
        answers.append(backend.sample_items(request, GREEDY)[0])
    assert [a.text for a in answers[0]] == [a.text for a in answers[1]]
    assert answers[0][0].token_logprobs == pytest.approx(answers[1][0].token_logprobs, abs=1e-3)
    base = merged.base.get_input_embeddings().weight
    assert torch.equal(base, TransformersBackend(tiny_model_dir, CPU).base.get_input_embeddings().weight)


BF16_AUTOCAST = Device(torch.device("cpu"), torch.float32, torch.bfloat16)  # a CPU with native bf16 (emulated here)


def test_under_bf16_autocast_serving_copies_hold_bf16_weights_and_answer_as_autocast_computes(tiny_model_dir,
                                                                                             adapter_dir):
    """Serving copies keep their linear weights in bf16, cast once, where autocast would cast the fp32 weights at
    every token: the same tokens and log-probs, bit for bit, as the fp32 model under autocast; the base the copies
    are made from stays fp32 (merging into bf16 would round a young adapter away)."""
    from peft import PeftModel

    from learner.model import load_base_model
    from learner.sampling import sample_many

    backend = TransformersBackend(tiny_model_dir, BF16_AUTOCAST)
    backend.load_version(1, adapter_dir)
    exact = {0: load_base_model(tiny_model_dir, CPU)}
    exact[1] = PeftModel.from_pretrained(load_base_model(tiny_model_dir, CPU), adapter_dir).merge_and_unload()
    for version in (0, 1):
        served = backend._model(version)
        assert served.lm_head.weight.dtype == torch.bfloat16
        assert served.get_input_embeddings().weight.dtype == torch.float32  # a lookup: autocast does not cast it
        with BF16_AUTOCAST.compute():
            want = sample_many(exact[version], backend.tokenizer, ["What is 2 + 2?", "hi"], 2, PARAMS, seed=5)
        got = backend.sample_items([ItemRequest("What is 2 + 2?", 2, version, seed=5),
                                    ItemRequest("hi", 2, version, seed=5)], PARAMS)
        assert [[a.text for a in item] for item in got] == [[a.text for a in item] for item in want]
        assert [[a.token_logprobs for a in item] for item in got] == [[a.token_logprobs for a in item] for item in want]
    assert {p.dtype for p in backend.base.parameters()} == {torch.float32}
    assert backend._model(0) is not backend.base


def test_a_broken_adapter_is_a_model_error_naming_the_directory(tiny_model_dir, tmp_path):
    backend = TransformersBackend(tiny_model_dir, CPU)
    with pytest.raises(ModelError, match="adapter_config.json missing"):
        backend.load_version(1, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelError, match=str(tmp_path)):
        backend.load_version(1, tmp_path)
    with pytest.raises(ModelError, match="version 1 is not loaded"):
        backend.sample_items([ItemRequest("hi", 2, 1, 0)], PARAMS)


@pytest.fixture
def worker(tiny_model_dir):
    backend = WorkerBackend(tiny_model_dir, device="cpu", threads=1)
    yield backend
    backend.close()


def test_the_worker_process_samples_streams_and_serves_two_versions(worker, adapter_dir):
    assert worker.pid != os.getpid()
    worker.load_version(1, adapter_dir)
    assert worker.loaded_versions() == [0, 1]
    items = worker.sample_items([ItemRequest("a", 4, 0, 1), ItemRequest("b", 4, 1, 2), ItemRequest("c", 4, 0, 3)],
                                PARAMS)
    assert [len(answers) for answers in items] == [4, 4, 4]
    assert all(a.finish_reason in ("eos", "length") and a.logprob_sum < 0 for answers in items for a in answers)
    pieces = list(worker.stream([{"role": "user", "content": "hi"}], PARAMS, version=1, seed=0))
    assert pieces and all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))
    with pytest.raises(ModelError, match="version 7 is not loaded"):
        worker.sample_items([ItemRequest("a", 2, 7, 0)], PARAMS)
    worker.drop_version(1)
    assert worker.loaded_versions() == [0]


def test_a_killed_worker_restarts_with_its_versions(worker, adapter_dir):
    worker.load_version(1, adapter_dir)
    first = worker.pid
    os.kill(first, signal.SIGKILL)
    worker._process.join(10)
    items = worker.sample_items([ItemRequest("a", 2, 1, 0)], PARAMS)  # restarts, reloads version 1
    assert worker.pid != first
    assert len(items[0]) == 2
    assert worker.loaded_versions() == [0, 1]


def test_the_worker_outlives_a_signal_to_its_process_group(worker):
    """Ctrl+C and SIGTERM to the group reach the worker with the server, which closes it after the sampler; so the
    worker ignores SIGINT and outlives SIGTERM by SIGTERM_GRACE_S, and keeps answering (it died first once: the
    sampler's batch failed with a traceback in a clean shutdown's log)."""
    pid = worker.pid
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    items = worker.sample_items([ItemRequest("a", 2, 0, 0)], PARAMS)
    assert worker.pid == pid and len(items[0]) == 2


def test_a_server_that_never_closes_its_worker_still_exits(tiny_model_dir):
    """multiprocessing's exit steps send daemonic children SIGTERM and wait for them: the worker must end by itself
    then (SIGTERM_GRACE_S later), or such a server would never exit."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys; from pathlib import Path; from app.generation.worker import WorkerBackend; "
              "w = WorkerBackend(Path(sys.argv[1]), device='cpu', threads=1); print('started', flush=True)")
    done = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "started" in done.stdout, done.stderr[-2000:]


def test_a_worker_reaped_elsewhere_is_still_restarted(worker, adapter_dir):
    """CI once saw a killed worker that `is_alive()` still called alive: the pipe reader read `exitcode` while the
    caller polled too, and the poll that lost the race to waitpid got ECHILD, which multiprocessing reads as
    "running". The reader no longer polls, and a broken pipe itself triggers the restart; here the exit status is
    collected behind multiprocessing's back, which leaves it in exactly that state."""
    worker.load_version(1, adapter_dir)
    first = worker.pid
    os.kill(first, signal.SIGKILL)
    os.waitpid(first, 0)  # reap it ourselves, as a stray SIGCHLD handler or waitpid(-1) would
    assert worker._process.is_alive()  # the state CI hit: multiprocessing cannot tell it is gone
    items = worker.sample_items([ItemRequest("a", 2, 1, 0)], PARAMS)
    assert worker.pid != first
    assert len(items[0]) == 2
    assert worker.loaded_versions() == [0, 1]


def test_closing_the_worker_abandons_the_answer_in_flight_and_restarts_nothing(worker):
    """Shutdown must not wait for a batch (~20 s of a CPU): close() ends the worker mid-answer, the caller gets a
    WorkerError, and no later call brings a worker back."""
    long = SamplingParams(max_new_tokens=480, temperature=1.0)  # far longer than close() takes (the tiny model's
    # context is 512 tokens)
    pieces = worker.stream([{"role": "user", "content": "hi"}], long, version=0, seed=0)
    next(pieces)  # the answer is being generated now
    pid = worker.pid
    worker.close()
    with pytest.raises(WorkerError, match="died"):
        list(pieces)
    assert worker.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone, and reaped
    with pytest.raises(WorkerError, match="closed"):
        worker.sample_items([ItemRequest("a", 2, 0, 0)], PARAMS)
    worker.set_threads(2)  # a round ending after the shutdown began (CoreShare.after_round): nothing to tell
    assert worker.pid is None


def test_a_closed_worker_leaves_no_leaked_semaphore_warning(tiny_model_dir):
    """The worker leaves with os._exit (never waiting for a batch); multiprocessing's exit steps still run, or the
    server's console ends with the resource tracker's "leaked semaphore objects" warning."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys; from pathlib import Path; from app.generation.worker import WorkerBackend; "
              "from learner.sampling import SamplingParams; "
              "w = WorkerBackend(Path(sys.argv[1]), device='cpu', threads=1); "
              "list(w.stream([{'role': 'user', 'content': 'hi'}], SamplingParams(max_new_tokens=4), 0, 0)); "
              "w.close(); print('closed')")
    done = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "closed" in done.stdout, done.stderr[-2000:]
    assert "leaked" not in done.stderr, done.stderr[-2000:]


def test_with_bf16_weights_a_young_adapter_still_reaches_the_answers(tiny_model_dir, tmp_path):
    """A GPU keeps the weights in bf16 (`learner.model.cuda_device`, emulated here on the CPU). Merged into bf16
    weights, or added to a bf16 frozen output, a young adapter's small changes round away and a new version would
    answer exactly as its parent: the serving copy keeps it unmerged, its sums in fp32 under bf16 autocast."""
    save_adapter(tiny_model_dir, tmp_path, 2e-4)  # young: its changes to each weight are below bf16's resolution
    bf16 = Device(torch.device("cpu"), torch.bfloat16, torch.bfloat16)
    request = [ItemRequest("What is 2 + 2?", 2, 1, seed=0), ItemRequest("What is 2 + 2?", 2, 0, seed=0)]
    exact = TransformersBackend(tiny_model_dir, CPU)
    gpu = TransformersBackend(tiny_model_dir, bf16)
    assert not gpu.merge
    for backend in (exact, gpu):
        backend.load_version(1, tmp_path)
    (exact_v1, exact_v0), (gpu_v1, gpu_v0) = exact.sample_items(request, GREEDY), gpu.sample_items(request, GREEDY)
    assert exact_v1[0].logprob_sum != exact_v0[0].logprob_sum  # the adapter changes the model a little
    assert gpu_v1[0].logprob_sum != gpu_v0[0].logprob_sum  # and the bf16 serving copy shows it
