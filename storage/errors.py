"""Every error storage raises. The app turns them into HTTP 4xx / gr.Error at its boundary; nothing here is written
when one is raised."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class StorageError(Exception):
    """Base of every storage error."""


class NotFound(StorageError):
    """An id that names no row."""


class Conflict(StorageError):
    """A label or name that already exists."""


class LabelError(StorageError):
    """A label that cannot be stored as given."""


class InvalidValue(StorageError):
    """A field value that is not allowed (role, name, prompt text ...)."""


class NotHanded(StorageError):
    """A label on an item that was not handed to the annotator (or whose slot someone else holds now)."""


class NothingToExport(StorageError):
    """An export that would hold no row where an empty one is of no use (a dataset directory)."""


class RateLimited(StorageError):
    """More requests of one kind from one user than its limit allows for now; the message says when to retry."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a prompts file: where (file name, 1-based line or row, None for the whole file) and what."""

    file: str
    line: int | None
    message: str
    unit: str = "line"  # "row" for Parquet files, "item" for a JSON array: what `line` counts

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file} {self.unit} {self.line}: {self.message}"


class PromptFileError(StorageError):
    """A prompts file that cannot be imported."""

    SHOWN = 5  # problems spelled out in the message; the rest are counted (all are in .problems)

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        lines = [str(p) for p in self.problems[: self.SHOWN]]
        if len(self.problems) > self.SHOWN:
            lines.append(f"... and {len(self.problems) - self.SHOWN} more problems")
        super().__init__("; ".join(lines) if lines else "the prompts file cannot be imported")


class StorageFull(StorageError):
    """The disk (or quota) holding the DuckDB file is full: the write was rolled back; free space and retry."""


class DataDirBusy(StorageError):
    """Another process holds the DuckDB file."""

    def __init__(self, path: Path, detail: str = "") -> None:
        self.path = Path(path)
        message = (
            f"{self.path} is held by another process (a running `prefloop serve` probably holds it); "
            "stop that process, or use its REST API or Admin tab instead"
        )
        if detail:
            message += f" [{detail}]"
        super().__init__(message)
