"""The policy service: every generation the app asks for (items, the Demo tab, /api/generate), by version number.

Version 0 is the base model; version N is the LoRA adapter of policy version N. Every call names the version it
wants (which version serves is app/deployments.py's to say, nobody else's) and gets back the version that generated.
The model itself lives behind a `PolicyBackend` (app/generation/): by default in a worker process with one merged
serving copy per version, so the web process never runs the model, a hot swap is Deployments naming another version
(the generation in flight finishes on the old one; no request fails, none sees half a swap), and the serving version
and a canary are served side by side. A few versions stay loaded (the serving one and the canary pinned); others are
loaded again from their directories when asked for.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from app.config import ServeConfig
from app.generation.backend import ItemRequest, PolicyBackend
from learner.errors import ModelError
from learner.model import pick_device, resolve_model
from learner.sampling import SampledAnswer, SamplingParams

MAX_LOADED_ADAPTERS = 4  # serving + canary + two Demo picks; a merged SmolLM2 copy is ~0.5 GB in fp32
GENERATION_SLOTS = 2  # on-demand generations (Demo, /api/generate) at once: one answering, one next in line
MAX_GENERATE_TOKENS = 256  # ~10 s of SmolLM2 on a 2-core CPU: the longest an on-demand answer holds the model


class PolicyBusy(Exception):
    """Every generation slot is taken; the caller should retry in a few seconds."""


class GenerationSlots:
    """At most `size` on-demand generations (Demo tab, /api/generate) at once; one more is refused at once, not
    queued. Item sampling runs in its own thread and labels never touch the model, so neither waits on these."""

    def __init__(self, size: int = GENERATION_SLOTS):
        self.size = size
        self._semaphore = threading.BoundedSemaphore(size)

    def acquire(self) -> None:
        if not self._semaphore.acquire(blocking=False):
            raise PolicyBusy(f"the model is busy ({self.size} answers are being generated); try again in a few seconds")

    def release(self) -> None:
        self._semaphore.release()

    @contextmanager
    def held(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()


class PolicyService:
    """Versions by number over a `PolicyBackend`; callers name the version for each generation."""

    def __init__(self, backend: PolicyBackend, base_model_dir: Path, device: str):
        self.backend = backend
        self.base_model_dir = base_model_dir
        self.device = device  # "cpu", "cuda" or the inference server's URL: for messages
        self._lock = threading.Lock()  # guards the bookkeeping below, never a generation
        self._adapters: dict[int, Path] = {}  # version -> adapter dir, for versions known to the service
        self._last_used: dict[int, float] = {}
        self._loaded: set[int] = set()  # versions this service had the backend load (a restarted worker reloads them)
        self._pinned: frozenset[int] = frozenset()  # never evicted: the serving version and the canary
        self._generating = 0  # generations in flight (item batches and on-demand answers)
        self._busy_watcher: Callable[[], None] | None = None  # called when generation starts or stops

    @classmethod
    def load(cls, model: str, cache_dir: Path, device: str | None = None, backend: str = "inprocess",
             merge: bool = True, precision: str | None = None) -> PolicyService:
        """Resolve `--model` (converting the shipped GGUF once), then start the backend on the best device."""
        path = resolve_model(model, cache_dir)
        if backend == "worker":
            from app.generation.worker import WorkerBackend

            worker = WorkerBackend(path, device, merge=merge, precision=precision)
            return cls(worker, path, worker.device)
        from app.generation.transformers_backend import TransformersBackend

        chosen = pick_device(device, precision)
        return cls(TransformersBackend(path, chosen, merge=merge), path, str(chosen.torch_device))

    @classmethod
    def from_config(cls, config: ServeConfig) -> PolicyService:
        """The backend `prefloop serve` was asked for (ServeConfig.backend)."""
        if config.backend != "openai":
            return cls.load(config.model, config.models_dir, config.device, config.backend, config.merge_adapters,
                            config.precision)
        from app.generation.openai_backend import OpenAIBackend

        root = (config.versions_dir, config.backend_adapter_root) if config.backend_adapter_root else None
        backend = OpenAIBackend(config.backend_url, config.backend_model,
                                api_key=os.environ.get("PREFLOOP_BACKEND_API_KEY"), adapter_root=root)
        # The learner still trains on this machine from the local copy of the base model.
        return cls(backend, resolve_model(config.model, config.models_dir), config.backend_url)

    @property
    def loaded_versions(self) -> list[int]:
        return [0, *sorted(self._adapters)]

    def register(self, version: int, adapter_dir: Path) -> None:
        """Remember where a version's adapter lives, so it can be asked for by number later."""
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ModelError(f"version {version}: {adapter_dir} holds no LoRA adapter (adapter_config.json missing)")
        with self._lock:
            self._adapters.setdefault(version, adapter_dir)

    def load_adapter(self, version: int, adapter_dir: Path | None) -> None:
        """Load `version` now, so the first request for it does not pay for the load (a merge: ~1 s for SmolLM2).
        Version 0 is the base model and needs none."""
        if version == 0:
            return
        if adapter_dir is not None:
            self.register(version, adapter_dir)
        self._ensure_loaded(version)

    def pin(self, versions: set[int]) -> None:
        """Versions that stay loaded (the serving one and the canary): a swap to them is instant."""
        self._pinned = frozenset(versions)

    def sample_items(self, requests: Sequence[ItemRequest], params: SamplingParams) -> list[list[SampledAnswer]]:
        """Answers for several items in as few sampling batches as there are versions among them."""
        for version in {r.version for r in requests}:
            self._ensure_loaded(version)
        with self._generation():
            return self.backend.sample_items(list(requests), params)

    def sample(self, prompt: str, k: int, params: SamplingParams, version: int,
               seed: int | None = None) -> tuple[int, list[SampledAnswer]]:
        """K answers from `version` in one batched call; returns the version that generated them."""
        return version, self.sample_prompts([prompt], k, params, version, seed)[0]

    def sample_prompts(self, prompts: Sequence[str], k: int, params: SamplingParams, version: int,
                       seed: int | None = None) -> list[list[SampledAnswer]]:
        """K answers to each prompt from `version`, all in one sampling batch (one seed; random when None)."""
        seed = random.randrange(2**31) if seed is None else seed
        return self.sample_items([ItemRequest(p, k, version, seed) for p in prompts], params)

    def generate(self, prompt: str | list[dict], params: SamplingParams, version: int) -> tuple[int, str]:
        """One answer (the last streamed text) from `version`; returns the version that generated it."""
        text = ""
        for piece in self.stream(prompt, params, version):
            text = piece
        return version, text

    def stream(self, prompt: str | list[dict], params: SamplingParams, version: int,
               seed: int | None = None) -> Iterator[str]:
        """The growing text of one answer from `version`; never waits for an item batch in flight."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        self._ensure_loaded(version)
        with self._generation():
            yield from self.backend.stream(messages, params, version, seed)

    @property
    def generating(self) -> bool:
        """Whether any generation is in flight now."""
        return self._generating > 0

    def watch_busy(self, watcher: Callable[[], None] | None) -> None:
        """`watcher()` after generation starts (none ran) or stops (the last one ended); it reads `generating`, as
        two calls from two threads may arrive in either order (app/cores.py's CoreShare lends a round the
        generator's cores while it idles). None stops watching."""
        self._busy_watcher = watcher

    @contextmanager
    def _generation(self):
        with self._lock:
            self._generating += 1
            started = self._generating == 1
        if started:
            self._tell_busy()
        try:
            yield
        finally:
            with self._lock:
                self._generating -= 1
                ended = self._generating == 0
            if ended:
                self._tell_busy()

    def _tell_busy(self) -> None:
        watcher = self._busy_watcher
        if watcher is not None:
            watcher()

    def set_threads(self, threads: int) -> None:
        """CPU threads generation may use (a round takes the others while it runs); only the worker has its own."""
        if hasattr(self.backend, "set_threads"):
            self.backend.set_threads(threads)

    def close(self) -> None:
        self.backend.close()

    def _ensure_loaded(self, version: int) -> None:
        """`version` loaded in the backend (from its registered directory), then the least recently used unpinned
        versions beyond MAX_LOADED_ADAPTERS dropped."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ModelError(f"a policy version is an int >= 0, got {version!r}")
        if version == 0:
            return
        with self._lock:
            adapter_dir = self._adapters.get(version)
            self._last_used[version] = time.monotonic()
        if adapter_dir is None:
            raise ModelError(f"version {version} is not known to the policy service")
        if version in self._loaded:  # the hot path: no call to the backend (for the worker, a round trip)
            return
        self.backend.load_version(version, adapter_dir)  # idempotent in every backend
        with self._lock:
            self._loaded.add(version)
        self._evict(keep=version)

    def _evict(self, keep: int) -> None:
        with self._lock:
            spare = sorted((v for v in self._loaded if v != keep and v not in self._pinned),
                           key=lambda v: self._last_used.get(v, 0.0))
            dropped = spare[: max(0, len(self._loaded) - MAX_LOADED_ADAPTERS)]
            self._loaded.difference_update(dropped)
        for version in dropped:
            self.backend.drop_version(version)


def with_max_new_tokens(params: SamplingParams, max_new_tokens: int | None) -> SamplingParams:
    return params if max_new_tokens is None else replace(params, max_new_tokens=max_new_tokens)
