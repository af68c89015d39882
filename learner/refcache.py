"""Reference log-probs computed once per answer, not once per step (TRL's `precompute_ref_log_probs` idea).

Within a round the reference is fixed: the base model (the policy's adapter disabled) or the frozen parent adapter
(`ref_sync`). So a human pair's reference log-probs are computed the first time it is seen and remembered for the
round; on-policy answers the first time a regeneration's examples are used. When the reference is the base model
they are also kept on disk across rounds (`--ref-cache DIR`): the base never changes, so a label's reference
log-prob is computed once in its life. The disk cache is keyed by the base model's identity (config and weight
files), the precision, and the exact token ids (prompt template, answer, eos or not, max_length cut all included).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from learner.logprobs import EncodedAnswer, distinct_sequence_logprobs


def base_model_key(base_model_dir: Path, precision: str) -> str:
    """A short id of a base model's weights and the precision they run in (`Device.precision`: bf16, fp32 and bf16
    autocast log-probs differ)."""
    base_model_dir = Path(base_model_dir)
    digest = hashlib.sha256(precision.encode())
    config = base_model_dir / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for weights in sorted(base_model_dir.glob("*.safetensors")) + sorted(base_model_dir.glob("*.bin")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:20]


def sequence_key(encoded: EncodedAnswer) -> str:
    """The identity of one scored sequence: its token ids and where the answer starts."""
    ids = ",".join(map(str, encoded.input_ids))
    return hashlib.sha256(f"{encoded.prompt_length}|{ids}".encode()).hexdigest()[:32]


def write_atomically(path: Path, text: str) -> None:
    """Write a file so that a reader sees the old one or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class ReferenceLogps:
    """Summed reference log-probs of encoded answers, each sequence computed once (memoised; on disk when given)."""

    def __init__(self, model, pad_token_id: int, adapter: str | None, batch_size: int,
                 cache_file: Path | None = None) -> None:
        self.model, self.pad_token_id, self.adapter = model, pad_token_id, adapter
        self.batch_size = max(1, batch_size)
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self.memo: dict[str, float] = {}
        self.loaded = self.computed = 0
        self.seconds = 0.0  # spent computing (what the memo saves is the rest of the steps' reference passes)
        if self.cache_file is not None and self.cache_file.is_file():
            for line in self.cache_file.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.memo[row["key"]] = float(row["logp"])
            self.loaded = len(self.memo)

    def __call__(self, encoded: Sequence[EncodedAnswer]) -> Tensor:
        """(B,) reference log-probs, computing only the sequences not seen before (no gradient)."""
        keys = [sequence_key(e) for e in encoded]
        missing = {}
        for key, e in zip(keys, encoded, strict=True):
            if key not in self.memo:
                missing[key] = e
        if missing:
            self._compute(list(missing.items()))
        device = next(self.model.parameters()).device
        return torch.tensor([self.memo[k] for k in keys], dtype=torch.float32, device=device)

    @torch.no_grad()
    def _compute(self, items: list[tuple[str, EncodedAnswer]]) -> None:
        from learner.train import eval_mode, use_adapter

        started = time.monotonic()
        try:
            with eval_mode(self.model), use_adapter(self.model, self.adapter):
                logps = distinct_sequence_logprobs(self.model, [e for _, e in items], self.pad_token_id,
                                                   self.batch_size).logps
            self.memo.update(zip([k for k, _ in items], logps.tolist(), strict=True))
            self.computed += len(items)
        finally:
            self.seconds += time.monotonic() - started

    def save(self) -> None:
        """Write every known entry to the cache file (atomically); nothing without a file or anything new."""
        if self.cache_file is None or not self.computed:
            return
        write_atomically(self.cache_file, "".join(json.dumps({"key": key, "logp": logp}) + "\n"
                                                  for key, logp in self.memo.items()))

    def stats(self) -> dict:
        return {"loaded_from_disk": self.loaded, "computed": self.computed, "on_disk": self.cache_file is not None,
                "seconds": round(self.seconds, 2)}
