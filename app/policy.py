"""The policy service: the base model and the LoRA adapters loaded onto it, shared by item sampling, the Demo tab
and /api/generate.

One base model stays in memory; each policy version is a LoRA adapter loaded onto it by name (`v3`), and version 0
is the base model itself (adapters disabled). Every call names the version it wants (which version serves is
app/deployments.py's to say, nobody else's) and gets back the version that generated. Every use of the model holds
`_lock`, so a hot swap (Deployments switching the version it names) never changes the adapter under a generation in
flight: that one finishes on the old version, no request fails and none sees half a swap.
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
    """Holds the base model and the loaded adapters; callers name the version for each generation."""

    def __init__(self, model, tokenizer, device: Device, base_model_dir: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.base_model_dir = base_model_dir
        self._lock = threading.Lock()
        self._adapters: dict[int, Path] = {}  # version -> adapter dir, for versions known to the service
        self._pinned: frozenset[int] = frozenset()  # never evicted: the serving version and the canary

    @classmethod
    def load(cls, model: str, cache_dir: Path, device: str | None = None) -> PolicyService:
        """Resolve `--model` (converting the shipped GGUF once), then load it on the best device."""
        path = resolve_model(model, cache_dir)
        chosen = pick_device(device)
        return cls(load_base_model(path, chosen), load_tokenizer(path), chosen, path)

    @property
    def loaded_versions(self) -> list[int]:
        return [0, *sorted(self._adapters)]

    def load_adapter(self, version: int, adapter_dir: Path | None) -> None:
        """Load `version`'s adapter now (waiting for the generation in flight), so the first request for it does not
        pay for the load. Version 0 is the base model and needs none."""
        if version == 0:
            return
        if adapter_dir is not None:
            self.register(version, adapter_dir)
        with self._lock:
            self._ensure_loaded(version, None)

    def pin(self, versions: set[int]) -> None:
        """Versions whose adapters stay loaded (the serving one and the canary): a swap to them is instant."""
        self._pinned = frozenset(versions)

    def sample(self, prompt: str, k: int, params: SamplingParams, version: int,
               seed: int | None = None) -> tuple[int, list[SampledAnswer]]:
        """K answers from `version` in one batched call; returns the version that generated them."""
        with self._use(version) as (model, used):
            return used, sample_answers(model, self.tokenizer, prompt, k, params, seed=seed)

    def generate(self, prompt: str | list[dict], params: SamplingParams, version: int) -> tuple[int, str]:
        """One answer (the last streamed text) from `version`; returns the version that generated it."""
        text = ""
        for piece in self.stream(prompt, params, version):
            text = piece
        return version, text

    def stream(self, prompt: str | list[dict], params: SamplingParams, version: int) -> Iterator[str]:
        """The growing text of one answer from `version`. Holds the model for the whole answer."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        with self._use(version) as (model, _):
            yield from stream_answer(model, self.tokenizer, messages, params)

    def register(self, version: int, adapter_dir: Path) -> None:
        """Remember where a version's adapter lives, so it can be asked for by number later."""
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ModelError(f"version {version}: {adapter_dir} holds no LoRA adapter (adapter_config.json missing)")
        self._adapters.setdefault(version, adapter_dir)

    @contextmanager
    def _use(self, version: int):
        """The model set to `version`, held for the duration."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ModelError(f"a policy version is an int >= 0, got {version!r}")
        with self._lock:
            if version == 0:
                if hasattr(self.model, "disable_adapter"):
                    with self.model.disable_adapter():
                        yield self.model, 0
                else:
                    yield self.model, 0
                return
            self._ensure_loaded(version, None)
            self.model.set_adapter(f"v{version}")
            yield self.model, version

    def _ensure_loaded(self, version: int, adapter_dir: Path | None) -> None:
        """Load `version`'s adapter onto the model under its name (caller holds the lock), then evict old ones."""
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
        self._evict(keep=version)

    def _evict(self, keep: int) -> None:
        """Unload the oldest adapters beyond MAX_LOADED_ADAPTERS, never `keep` or a pinned one (caller holds the
        lock); an evicted version is loaded again from its directory when asked for."""
        loaded = sorted(int(n[1:]) for n in self.model.peft_config)
        spare = [v for v in loaded if v != keep and v not in self._pinned]
        for version in spare[: max(0, len(loaded) - MAX_LOADED_ADAPTERS)]:
            self.model.delete_adapter(f"v{version}")


def with_max_new_tokens(params: SamplingParams, max_new_tokens: int | None) -> SamplingParams:
    return params if max_new_tokens is None else replace(params, max_new_tokens=max_new_tokens)
