"""The OpenAI-compatible backend against a fake vLLM server on a free port (real HTTP, the tiny model behind it)."""

from __future__ import annotations

import pytest
from fake_openai_server import fake_openai_app
from test_generation_worker import CPU, PARAMS, adapter_dir  # noqa: F401  (the adapter fixture)

from app.generation.backend import ItemRequest
from app.generation.openai_backend import OpenAIBackend
from app.server import RunningServer
from learner.errors import ModelError


@pytest.fixture
def fake_server(tiny_model_dir):
    app = fake_openai_app(tiny_model_dir)
    server = RunningServer(app, "127.0.0.1", 0).start()
    yield app, server.url
    server.stop()


def test_items_are_one_request_with_n_k_and_logprobs(fake_server, adapter_dir):  # noqa: F811
    app, url = fake_server
    backend = OpenAIBackend(url, "prefloop-base")
    backend.load_version(3, adapter_dir)
    backend.load_version(3, adapter_dir)  # idempotent: no second load request
    assert backend.loaded_versions() == [0, 3]
    loads = [body for kind, body in app.state.requests if kind == "load"]
    assert loads == [{"lora_name": "prefloop-v3", "lora_path": str(adapter_dir.resolve())}]

    items = backend.sample_items([ItemRequest("What is 2 + 2?", 4, 3, seed=1), ItemRequest("hi", 4, 0, seed=2)],
                                 PARAMS)
    chats = [body for kind, body in app.state.requests if kind == "chat"]
    assert sorted((c["model"], c["n"], c["logprobs"]) for c in chats) == [("prefloop-base", 4, True),
                                                                          ("prefloop-v3", 4, True)]
    for answers in items:
        assert len(answers) == 4
        for a in answers:
            assert a.finish_reason in ("eos", "length")
            assert (a.finish_reason == "length") == (a.token_count == PARAMS.max_new_tokens)
            assert a.logprob_sum == pytest.approx(sum(a.token_logprobs)) and a.logprob_sum < 0
            # Answers that stopped carry the eos entry in their log-probs, but it is not counted as a token.
            assert len(a.token_logprobs) == a.token_count + (a.finish_reason == "eos")

    pieces = list(backend.stream([{"role": "user", "content": "hi"}], PARAMS, version=3, seed=0))
    assert pieces and all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))

    backend.drop_version(3)
    assert [body for kind, body in app.state.requests if kind == "unload"] == [{"lora_name": "prefloop-v3"}]
    with pytest.raises(ModelError, match="version 3 is not loaded"):
        backend.sample_items([ItemRequest("hi", 2, 3, 0)], PARAMS)


def test_refusals_and_an_unreachable_server_are_model_errors(fake_server, tmp_path):
    _, url = fake_server
    backend = OpenAIBackend(url, "prefloop-base")
    with pytest.raises(ModelError, match="refused to load version 5"):
        backend.load_version(5, tmp_path)  # no adapter there
    backend._loaded.add(9)  # a version the server never loaded: its 404 names the model
    with pytest.raises(ModelError, match="prefloop-v9"):
        backend.sample_items([ItemRequest("hi", 2, 9, 0)], PARAMS)
    gone = OpenAIBackend("http://127.0.0.1:9", "prefloop-base")
    with pytest.raises(ModelError, match="cannot be reached"):
        gone.sample_items([ItemRequest("hi", 2, 0, 0)], PARAMS)


def test_adapter_paths_are_mapped_to_the_servers_view(tmp_path):
    backend = OpenAIBackend("http://127.0.0.1:9", "base", adapter_root=(tmp_path, "/mnt/prefloop/versions"))
    assert backend._server_path(tmp_path / "v4" / "adapter") == "/mnt/prefloop/versions/v4/adapter"


def test_byte_zero_from_an_inference_server_reaches_the_store_as_a_replacement_character():
    """vLLM sends what the model wrote: "\\u0000" in JSON when it drew the byte-0 token (the store refuses NUL)."""
    from app.generation.openai_backend import _answer

    choice = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "a\u0000b"},
              "logprobs": {"content": [{"token": "a", "logprob": -1.0}, {"token": "\u0000", "logprob": -2.0},
                                       {"token": "b", "logprob": -1.5}]}}
    answer = _answer(choice)
    assert (answer.text, answer.token_count, answer.logprob_sum) == ("a\ufffdb", 3, -4.5)
