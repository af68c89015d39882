"""An OpenAI-compatible inference server as the policy backend: how prefloop's generation grows past one machine.

Start vLLM with LoRA and runtime adapter loading, for example

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve ./prefloop-data/models/smollm2 \\
        --served-model-name prefloop-base --enable-lora --max-lora-rank 16 --max-loras 4

and point `prefloop serve --backend openai --backend-url http://gpu-host:8000 --backend-model prefloop-base` at it.
Then:
- an item is ONE chat completion with `n=K` and `logprobs=true` (the server batches concurrent requests itself;
  tensor parallelism and replicas are the server's business);
- version N is the adapter `prefloop-vN`, loaded at deploy through `POST /v1/load_lora_adapter` with the version
  directory's path as the server sees it (a shared filesystem, or `--backend-adapter-root` to map prefloop's versions
  dir onto the server's), and freed through `POST /v1/unload_lora_adapter`; version 0 is the base model;
- Demo answers stream with `stream=true` (server-sent events).
Log-probs: vLLM returns the raw model's log-probs (before temperature and top-p), the quantity prefloop stores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from app.generation.backend import ItemRequest
from learner.errors import ModelError
from learner.sampling import SampledAnswer, SamplingParams, shown_text

REQUEST_TIMEOUT_S = 300.0  # a K=4 x 96-token item is well under a second on a GPU; a cold server can take minutes
PARALLEL_REQUESTS = 16  # items of one batch sent at once: the server's continuous batching is what makes it fast


class OpenAIBackend:
    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 adapter_root: tuple[Path, str] | None = None, transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.model = model  # the served name of the base model (version 0)
        self.adapter_root = adapter_root  # (local versions dir, the same dir as the server sees it)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=REQUEST_TIMEOUT_S,
                                   transport=transport)
        self._loaded: set[int] = {0}
        self._pool = ThreadPoolExecutor(PARALLEL_REQUESTS, "openai-backend")

    # -- PolicyBackend ----------------------------------------------------------------------------------------------
    def load_version(self, version: int, adapter_dir: Path | None) -> None:
        if version == 0 or version in self._loaded:
            return
        if adapter_dir is None:
            raise ModelError(f"version {version} has no adapter directory to load")
        response = self._post("/v1/load_lora_adapter", {"lora_name": self.served_name(version),
                                                        "lora_path": self._server_path(Path(adapter_dir))})
        if response.status_code >= 400 and "already" not in response.text:
            raise ModelError(f"the inference server at {self.base_url} refused to load version {version}'s adapter "
                             f"(HTTP {response.status_code}): {response.text[:300]}")
        self._loaded.add(version)

    def drop_version(self, version: int) -> None:
        if version == 0 or version not in self._loaded:
            return
        self._post("/v1/unload_lora_adapter", {"lora_name": self.served_name(version)})
        self._loaded.discard(version)

    def loaded_versions(self) -> list[int]:
        return sorted(self._loaded)

    def sample_items(self, requests: Sequence[ItemRequest], params: SamplingParams) -> list[list[SampledAnswer]]:
        for request in requests:
            if request.version not in self._loaded:
                raise ModelError(f"version {request.version} is not loaded in the policy backend")
        return list(self._pool.map(lambda r: self._item(r, params), requests))

    def stream(self, messages: list[dict], params: SamplingParams, version: int,
               seed: int | None = None) -> Iterator[str]:
        body = {**self._body(messages, params, version, seed), "stream": True}
        text = ""
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise ModelError(self._refusal(response))
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                delta = json.loads(data)["choices"][0].get("delta", {}).get("content") or ""
                if delta:
                    text += shown_text(delta)
                    yield text

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    # -- helpers ----------------------------------------------------------------------------------------------------
    def served_name(self, version: int) -> str:
        return self.model if version == 0 else f"prefloop-v{version}"

    def _server_path(self, adapter_dir: Path) -> str:
        if self.adapter_root is None:
            return str(adapter_dir.resolve())
        local, remote = self.adapter_root
        return f"{remote.rstrip('/')}/{adapter_dir.resolve().relative_to(local.resolve()).as_posix()}"

    def _body(self, messages: list[dict], params: SamplingParams, version: int, seed: int | None) -> dict:
        body = {"model": self.served_name(version), "messages": messages, "temperature": params.temperature,
                "top_p": params.top_p, "max_tokens": params.max_new_tokens}
        return body if seed is None else {**body, "seed": seed}

    def _item(self, request: ItemRequest, params: SamplingParams) -> list[SampledAnswer]:
        body = {**self._body([{"role": "user", "content": request.prompt}], params, request.version, request.seed),
                "n": request.k, "logprobs": True}
        response = self._post("/v1/chat/completions", body)
        if response.status_code >= 400:
            raise ModelError(self._refusal(response))
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        if len(choices) != request.k:
            raise ModelError(f"the inference server returned {len(choices)} answers, asked for n={request.k}")
        return [_answer(choice) for choice in choices]

    def _post(self, path: str, body: dict) -> httpx.Response:
        try:
            return self.client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise ModelError(f"the inference server at {self.base_url} cannot be reached: {exc}") from exc

    def _refusal(self, response: httpx.Response) -> str:
        return f"the inference server at {self.base_url} answered HTTP {response.status_code}: {response.text[:300]}"


def _answer(choice: dict) -> SampledAnswer:
    """One choice as a SampledAnswer: finish "stop" is prefloop's "eos", "length" stays "length"."""
    entries = ((choice.get("logprobs") or {}).get("content")) or []
    logprobs = tuple(float(e["logprob"]) for e in entries)
    ended = choice.get("finish_reason") != "length"
    # The eos entry (when the server lists one) scores the decision to stop but is not a token of the text.
    eos_listed = ended and bool(entries) and _is_special(entries[-1].get("token", ""))
    return SampledAnswer(
        text=shown_text((choice.get("message") or {}).get("content") or ""),
        token_count=len(entries) - (1 if eos_listed else 0),
        finish_reason="eos" if ended else "length",
        logprob_sum=float(sum(logprobs)),
        token_logprobs=logprobs,
    )


def _is_special(token: str) -> bool:
    return token == "" or (token.startswith("<|") and token.endswith("|>")) or token in ("</s>", "<eos>")
