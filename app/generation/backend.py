"""`PolicyBackend`: what the app needs from whatever generates answers.

Versions are numbers: 0 is the base model, N is the LoRA adapter of policy version N. A backend serves several
versions side by side (the serving one, a canary, the Demo's picks); the app decides which version answers what.

Implementations:
- `TransformersBackend` (transformers_backend.py): the model in this process, one serving copy per version with the
  adapter merged into the weights; what the worker process runs.
- `WorkerBackend` (worker.py): the same, in its own process, so the web process never runs the model.
- `OpenAIBackend` (openai_backend.py): an OpenAI-compatible server such as vLLM started with LoRA enabled; each
  version's adapter is loaded through the server's adapter-loading endpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from learner.sampling import SampledAnswer, SamplingParams


@dataclass(frozen=True)
class ItemRequest:
    """K answers to one prompt from one version (an item, or the canary's half of one)."""

    prompt: str
    k: int
    version: int
    seed: int


class PolicyBackend(Protocol):
    def load_version(self, version: int, adapter_dir: Path | None) -> None:
        """Make `version` servable (idempotent). ModelError when its adapter cannot be loaded."""

    def drop_version(self, version: int) -> None:
        """Free what serving `version` holds (no-op for version 0 and unknown versions)."""

    def loaded_versions(self) -> list[int]:
        """The versions servable right now, 0 included."""

    def sample_items(self, requests: Sequence[ItemRequest], params: SamplingParams) -> list[list[SampledAnswer]]:
        """Answers for every request, in order; requests for the same version and k share one call."""

    def stream(self, messages: list[dict], params: SamplingParams, version: int,
               seed: int | None = None) -> Iterator[str]:
        """The growing text of one answer (Demo chat, /api/generate): never waits for an item batch to finish."""

    def close(self) -> None:
        """Release the model / process / connection."""


def group_requests(requests: Sequence[ItemRequest]) -> dict[tuple[int, int], list[int]]:
    """Request indices per (version, k), in order: one sampling batch each (a canary item's halves have k/2)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault((request.version, request.k), []).append(index)
    return groups
