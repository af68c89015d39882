"""The policy service: the deployed model, shared by item sampling, the Demo tab and /api/generate.

One base model stays in memory; each policy version is a LoRA adapter loaded onto it by name (`v3`), and version 0
is the base model itself (adapters disabled). Every use of the model holds `_lock`, so a hot swap waits for the
generation in flight to finish on the old version, then switches: no request fails and none sees half a swap.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from learner.errors import ModelError
from learner.model import Device, load_base_model, load_tokenizer, pick_device, resolve_model
from learner.sampling import SampledAnswer, SamplingParams, sample_answers, stream_answer

MAX_LOADED_ADAPTERS = 4  # deployed + a few for the Demo's version picker; each SmolLM2 r=16 adapter is ~20 MB
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
    """Holds the base model and the loaded adapters; `version` is the deployed policy version."""

    def __init__(self, model, tokenizer, device: Device, base_model_dir: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.base_model_dir = base_model_dir
        self._lock = threading.Lock()
        self._version = 0
        self._adapters: dict[int, Path] = {}  # version -> adapter dir, for versions loaded onto the model

    @classmethod
    def load(cls, model: str, cache_dir: Path, device: str | None = None) -> PolicyService:
        """Resolve `--model` (converting the shipped GGUF once), then load it on the best device."""
        path = resolve_model(model, cache_dir)
        chosen = pick_device(device)
        return cls(load_base_model(path, chosen), load_tokenizer(path), chosen, path)

    @property
    def version(self) -> int:
        return self._version

    @property
    def loaded_versions(self) -> list[int]:
        return [0, *sorted(self._adapters)]

    def deploy(self, version: int, adapter_dir: Path | None) -> None:
        """Make `version` the one served. Waits for the generation in flight (the lock), then switches."""
        with self._lock:
            if version != 0:
                self._ensure_loaded(version, adapter_dir)
            self._version = version
            self._evict()

    def sample(self, prompt: str, k: int, params: SamplingParams, version: int | None = None,
               seed: int | None = None) -> tuple[int, list[SampledAnswer]]:
        """K answers in one batched call; returns the version that actually generated them."""
        with self._use(version) as (model, used):
            return used, sample_answers(model, self.tokenizer, prompt, k, params, seed=seed)

    def generate(self, prompt: str | list[dict], params: SamplingParams, version: int | None = None) -> tuple[int, str]:
        """One answer (the last streamed text) from `version` (default: deployed)."""
        text = ""
        used = self.version if version is None else version
        for piece in self.stream(prompt, params, version):
            text = piece
        return used, text

    def stream(self, prompt: str | list[dict], params: SamplingParams, version: int | None = None) -> Iterator[str]:
        """The growing text of one answer. Holds the model for the whole answer."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        with self._use(version) as (model, _):
            yield from stream_answer(model, self.tokenizer, messages, params)

    def register(self, version: int, adapter_dir: Path) -> None:
        """Remember where a version's adapter lives, so the Demo can ask for it by number later."""
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ModelError(f"version {version}: {adapter_dir} holds no LoRA adapter (adapter_config.json missing)")
        self._adapters.setdefault(version, adapter_dir)

    @contextmanager
    def _use(self, version: int | None):
        """The model set to `version` (None = deployed), held for the duration; restores the deployed adapter."""
        with self._lock:
            wanted = self._version if version is None else version
            if wanted == 0:
                if hasattr(self.model, "disable_adapter"):
                    with self.model.disable_adapter():
                        yield self.model, 0
                else:
                    yield self.model, 0
                return
            self._ensure_loaded(wanted, None)
            self.model.set_adapter(f"v{wanted}")
            try:
                yield self.model, wanted
            finally:
                if self._version != 0:
                    self.model.set_adapter(f"v{self._version}")

    def _ensure_loaded(self, version: int, adapter_dir: Path | None) -> None:
        """Load `version`'s adapter onto the model under its name (caller holds the lock)."""
        from peft import PeftModel

        name = f"v{version}"
        adapter_dir = adapter_dir or self._adapters.get(version)
        if adapter_dir is None:
            raise ModelError(f"version {version} is not known to the policy service")
        if not hasattr(self.model, "peft_config"):
            self.model = PeftModel.from_pretrained(self.model, adapter_dir, adapter_name=name, is_trainable=False)
        elif name not in self.model.peft_config:
            self.model.load_adapter(adapter_dir, adapter_name=name, is_trainable=False)
        self._adapters[version] = adapter_dir
        self.model.set_adapter(name)
        self.model.eval()

    def _evict(self) -> None:
        """Unload the oldest adapters beyond MAX_LOADED_ADAPTERS (never the deployed one)."""
        if not hasattr(self.model, "peft_config"):
            return
        loaded = sorted(int(n[1:]) for n in self.model.peft_config)
        for version in loaded[: max(0, len(loaded) - MAX_LOADED_ADAPTERS)]:
            if version != self._version:
                self.model.delete_adapter(f"v{version}")


def with_max_new_tokens(params: SamplingParams, max_new_tokens: int | None) -> SamplingParams:
    return params if max_new_tokens is None else replace(params, max_new_tokens=max_new_tokens)
