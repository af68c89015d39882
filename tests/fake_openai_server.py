"""A small OpenAI-compatible inference server, as vLLM serves one with `--enable-lora` and runtime adapter loading.

It implements the part of the interface prefloop uses, with vLLM's request and response shapes: `/v1/models`,
`/v1/chat/completions` (n, temperature, top_p, max_tokens, seed, logprobs, stream as server-sent events),
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (`{"lora_name", "lora_path"}`). The answers come from a real
(tiny) transformer with the real adapters, so what prefloop stores is what a model said. `requests` records every
body for the tests to inspect.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from app.generation.backend import ItemRequest
from app.generation.transformers_backend import TransformersBackend
from learner.model import Device
from learner.sampling import SamplingParams

EOS_TOKEN = "<|im_end|>"  # SmolLM2's end of turn, listed last in the log-probs of an answer that stopped


def fake_openai_app(model_dir: Path, served_name: str = "prefloop-base") -> FastAPI:
    backend = TransformersBackend(model_dir, Device(torch.device("cpu"), torch.float32))
    loras: dict[str, int] = {}  # lora_name -> the backend's version slot
    app = FastAPI()
    app.state.requests = []

    def not_found(message: str, code: int = 404) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "NotFoundError", "code": code}}, status_code=code)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model"} for name in [served_name, *loras]]}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        body = await request.json()
        app.state.requests.append(("load", body))
        name, path = body["lora_name"], body["lora_path"]
        if name in loras:
            return JSONResponse({"error": {"message": f"The lora adapter '{name}' has already been loaded.",
                                           "type": "InvalidUserInput", "code": 400}}, status_code=400)
        slot = len(loras) + 1
        try:
            backend.load_version(slot, Path(path))
        except Exception as exc:
            return JSONResponse({"error": {"message": str(exc), "type": "BadRequestError", "code": 400}},
                                status_code=400)
        loras[name] = slot
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request):
        body = await request.json()
        app.state.requests.append(("unload", body))
        slot = loras.pop(body["lora_name"], None)
        if slot is None:
            return not_found(f"The lora adapter '{body['lora_name']}' cannot be found.")
        backend.drop_version(slot)
        return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.requests.append(("chat", body))
        name = body["model"]
        if name != served_name and name not in loras:
            return not_found(f"The model `{name}` does not exist.")
        version = 0 if name == served_name else loras[name]
        params = SamplingParams(max_new_tokens=body.get("max_tokens", 16), temperature=body.get("temperature", 1.0),
                                top_p=body.get("top_p", 1.0))
        prompt = body["messages"][-1]["content"]
        if body.get("stream"):
            return StreamingResponse(_stream(backend, body["messages"], params, version, body.get("seed"), name),
                                     media_type="text/event-stream")
        answers = backend.sample_items([ItemRequest(prompt, body.get("n", 1), version, body.get("seed") or 0)],
                                       params)[0]
        choices = [{"index": i, "message": {"role": "assistant", "content": a.text},
                    "logprobs": {"content": _entries(a)} if body.get("logprobs") else None,
                    "finish_reason": "stop" if a.finish_reason == "eos" else "length"} for i, a in enumerate(answers)]
        tokens = sum(a.token_count for a in answers)
        return {"id": f"chatcmpl-{time.monotonic_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": name, "choices": choices,
                "usage": {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}}

    return app


def _entries(answer) -> list[dict]:
    """vLLM's `logprobs.content`: one entry per generated token (the eos entry last when the answer stopped)."""
    tokens = [f"t{i}" for i in range(answer.token_count)]
    if answer.finish_reason == "eos":
        tokens.append(EOS_TOKEN)
    return [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
            for t, lp in zip(tokens, answer.token_logprobs)]


def _stream(backend, messages, params, version, seed, name):
    sent = ""
    for text in backend.stream(messages, params, version, seed):
        delta, sent = text[len(sent):], text
        chunk = {"object": "chat.completion.chunk", "model": name,
                 "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]}
        yield f"data: {json.dumps(chunk)}\n\n"
    final = {"object": "chat.completion.chunk", "model": name,
             "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    yield f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n"
