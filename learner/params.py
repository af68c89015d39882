"""How answers are drawn, in a module without torch: the CLI and the server's config read it without paying for
importing torch (seconds on a small machine)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from learner.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How answers are drawn."""

    max_new_tokens: int = 96  # long enough for a short answer; a CPU samples 4 x 96 tokens in ~6 s
    temperature: float = 0.8  # diverse enough that K answers differ, sober enough to stay on topic
    top_p: float = 0.95  # cuts the long tail of junk tokens a 135M model puts mass on

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    def to_dict(self) -> dict:
        return asdict(self)

# How the policy computes (ServeConfig.precision, PREFLOOP_PRECISION, learner.model.pick_device): "auto" is bf16
# autocast on a CPU with native bf16 and bf16 on a GPU, else fp32; "fp32" computes in fp32 everywhere (exact: what
# the losses are checked against); "bf16" uses bf16 even where the CPU only emulates it (slower than fp32 there).
PRECISIONS = ("auto", "fp32", "bf16")
