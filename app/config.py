"""The server's configuration: one frozen dataclass, defaults that work on a 2-core CPU, overridable by flags and env.

Every field can be set by an environment variable (`PREFLOOP_MAX_ITEM_STALENESS=3`), the main ones by a CLI flag
(`--overlap 2`); flags win over env, env over the defaults here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from learner.errors import ConfigError
from learner.params import PRECISIONS, SamplingParams

BACKENDS = ("worker", "inprocess", "openai")
DEFAULT_DATA_DIR = Path("prefloop-data")  # relative to the working directory, like a Jupyter notebook's folder


@dataclass(frozen=True)
class ServeConfig:
    """How `prefloop serve` runs."""

    data_dir: Path = DEFAULT_DATA_DIR  # the DuckDB file, the cached model and the policy versions live here
    host: str = "127.0.0.1"  # loopback by default: exposing annotators' UI is a deliberate choice (--host 0.0.0.0)
    port: int = 7860  # Gradio's usual port; 0 picks a free one
    model: str = "smollm2"  # "smollm2" (shipped GGUF), a local HF directory, or a hub id already cached
    k: int = 4  # answers per item: C(4,2) = 6 pairs per ranking, and still quick to read and rank
    overlap: int = 1  # distinct annotators who rank each item; >1 measures agreement at the cost of throughput
    # The buffer sizes itself: enough ready items to cover the recent label rate while the next batch is sampled,
    # never fewer than buffer_size (the floor: a new annotator's first items) nor more than buffer_max (the ceiling:
    # items sampled ahead go stale when a new version is deployed, and each costs ~2 s of a 2-core CPU).
    buffer_size: int = 4
    buffer_max: int = 32  # 8 annotators x 4 items each: a round's worth of labels on a CPU, sampled ahead
    # Items per sampling batch: one call of 4 items x K=4 gives 2.4x the items/s of one item per call on a 2-core CPU
    # with the adapter merged (bench/serving.py); 8 gives a little more but holds the worker ~13 s per batch.
    batch_items: int = 4
    # Where the model runs: "worker" (its own process, the default: the web process never runs the model),
    # "inprocess" (the same backend in this process: tests, debugging) or "openai" (an OpenAI-compatible inference
    # server such as vLLM with LoRA enabled: backend_url and backend_model; see README, "Scaling generation").
    backend: str = "worker"
    backend_url: str = ""  # for "openai": e.g. http://gpu-host:8000
    backend_model: str = ""  # for "openai": the base model's served name (vllm serve --served-model-name)
    backend_adapter_root: str = ""  # for "openai": the versions dir as the inference server sees it ("" = same path)
    merge_adapters: bool = True  # serve each version with its LoRA merged into a copy of the weights (faster)
    reserve_seconds: float = 600.0  # an item handed to an annotator is kept from others this long
    daily_goal: int = 100  # rankings a day the Annotate tab counts each annotator towards: ~1 hour at ~30 s each
    # Items sampled by a version more than this many deployed versions back along the serving lineage are not
    # served: 2 keeps the buffer's items through two quick deploys, then annotators judge the current policy again.
    max_item_staleness: int = 2
    sampling: SamplingParams = field(default_factory=SamplingParams)
    device: str | None = None  # "cpu" or "cuda"; None picks CUDA when present
    # "auto": on a CPU with native bf16 (AVX512-BF16, AMX) the matmuls of sampling and rounds run in bf16 over
    # fp32 weights: a default round in 0.76x the fp32 time (docs/benchmarks.md); "fp32" exact; "bf16" forced
    precision: str = "auto"
    prefetch: bool = True  # sample items in the background; tests turn it off to drive sampling by hand
    # Processes per training round (torchrun --nproc_per_node; each takes its share of every step and the LoRA
    # gradients are averaged): one per GPU on a machine with several. 1 on a CPU, where one process uses every core.
    round_processes: int = 1

    def __post_init__(self) -> None:
        checks = {
            "k": (self.k >= 2, "k must be >= 2 (a ranking needs two answers)"),
            "overlap": (self.overlap >= 1, "overlap must be >= 1"),
            "buffer_size": (self.buffer_size >= 0, "buffer_size must be >= 0"),
            "buffer_max": (self.buffer_max >= 1, "buffer_max must be >= 1 (a buffer_size above it raises it)"),
            "batch_items": (self.batch_items >= 1, "batch_items must be >= 1"),
            "backend": (self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}"),
            "backend_url": (self.backend != "openai" or bool(self.backend_url and self.backend_model),
                            "backend 'openai' needs backend_url and backend_model"),
            "reserve_seconds": (self.reserve_seconds > 0, "reserve_seconds must be > 0"),
            "daily_goal": (self.daily_goal >= 1, "daily_goal must be >= 1"),
            "max_item_staleness": (self.max_item_staleness >= 0, "max_item_staleness must be >= 0"),
            "port": (0 <= self.port <= 65535, "port must be in 0..65535"),
            "precision": (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            "round_processes": (self.round_processes >= 1, "round_processes must be >= 1"),
        }
        for name, (ok, message) in checks.items():
            if not ok:
                raise ConfigError(f"{message}, got {getattr(self, name)!r}")

    @property
    def buffer_ceiling(self) -> int:
        """buffer_max, or buffer_size when that is set higher (a floor above the ceiling is the user's intent)."""
        return max(self.buffer_max, self.buffer_size)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "prefloop.duckdb"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def versions_dir(self) -> Path:
        return self.data_dir / "versions"

    @property
    def server_file(self) -> Path:
        """Written while a server holds the data dir: its URL and a local admin token for the CLI (mode 0600)."""
        return self.data_dir / "server.json"


SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
SERVE_FIELDS = {f.name for f in fields(ServeConfig)} - {"sampling"}


def build_config(overrides: dict, env: dict[str, str] | None = None) -> ServeConfig:
    """Defaults, then PREFLOOP_* env vars, then `overrides` (CLI flags; None values are ignored). Unknown keys fail."""
    env = os.environ if env is None else env
    if env.get("PREFLOOP_MAX_STALENESS") not in (None, ""):
        raise ConfigError("PREFLOOP_MAX_STALENESS was renamed PREFLOOP_MAX_ITEM_STALENESS (the round's own knob is "
                          "max_label_staleness); set that instead")
    values: dict = {}
    for name in SERVE_FIELDS | SAMPLING_FIELDS:
        raw = env.get(f"PREFLOOP_{name.upper()}")
        if raw not in (None, ""):
            values[name] = raw
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in SERVE_FIELDS | SAMPLING_FIELDS:
            raise ConfigError(f"unknown config key {key!r}; known: {', '.join(sorted(SERVE_FIELDS | SAMPLING_FIELDS))}")
        values[key] = value
    return _coerce(values)


def _coerce(values: dict) -> ServeConfig:
    base = ServeConfig()
    sampling_values = {k: _typed(k, v, getattr(base.sampling, k)) for k, v in values.items() if k in SAMPLING_FIELDS}
    serve_values = {k: _typed(k, v, getattr(base, k)) for k, v in values.items() if k in SERVE_FIELDS}
    return replace(base, sampling=replace(base.sampling, **sampling_values), **serve_values)


def _typed(name: str, value, default):
    """Cast a flag/env string to the type of the field's default, naming the field when it does not parse."""
    if default is None or not isinstance(value, str):
        return Path(value) if name == "data_dir" else value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        return type(default)(value)
    except ValueError:
        raise ConfigError(f"{name} must be a {type(default).__name__}, got {value!r}") from None
