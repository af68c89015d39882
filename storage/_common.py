"""Small helpers the record modules share."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from storage.errors import Conflict, InvalidValue


def utc(value: datetime | None) -> datetime | None:
    """A TIMESTAMPTZ from DuckDB (a pytz-aware datetime) as a stdlib UTC datetime; None stays None."""
    return None if value is None else value.astimezone(UTC)


def as_aware(value: datetime) -> datetime:
    """A caller's datetime as an aware one: naive values are read as UTC, which is what every column stores."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _finite(value: Any) -> Any:
    """`value` with every NaN / infinity replaced by None, in nested dicts and lists too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(value: Any, field: str) -> str:
    """`value` (a dict) as JSON text, or InvalidValue naming `field` if it is not a JSON-serialisable dict.
    NaN and infinities become null: they are not JSON (DuckDB's JSON type refuses them), and a diverged round's
    metrics full of NaN must still be recorded, not lost to an error."""
    if not isinstance(value, dict):
        raise InvalidValue(f"{field} must be a dict, got {type(value).__name__}")
    try:
        return json.dumps(_finite(value), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise InvalidValue(f"{field} is not JSON-serialisable: {e}") from e


def is_int(value: Any) -> bool:
    """True for ints that are not bools (True is an int in Python, never an id)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for finite ints and floats (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def directory_taken(path: Path) -> bool:
    """Whether `path` cannot be written as a new directory: it exists and is a file or a directory with entries."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


@contextmanager
def new_directory(out_dir: Path, what: str) -> Iterator[Path]:
    """A directory that appears complete or not at all: yields a temporary directory beside `out_dir` to fill, and
    renames it to `out_dir` when the block ends without an error (removes it when not). `out_dir` must be new or an
    empty directory (Conflict, naming it as `what`); missing parents are made."""
    out_dir = Path(out_dir)
    if directory_taken(out_dir):
        raise Conflict(f"{what} {out_dir} already exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory on every platform
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
