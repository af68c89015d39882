"""Reading prompts files (JSONL, CSV, Parquet) with every problem located by file and line, and importing them.

A file with any problem imports nothing unless `skip_invalid`; problems with the file as a whole (unknown suffix,
no "prompt" column, unreadable) import nothing even then.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.errors import InvalidValue, Problem, PromptFileError
from storage.prompts import validate_prompt

if TYPE_CHECKING:
    from storage.store import Store


@dataclass(frozen=True)
class ReadResult:
    prompts: list[str]  # validated and stripped, duplicates kept (Prompts.add counts them)
    problems: list[Problem]


@dataclass(frozen=True)
class ImportResult:
    added: int
    duplicates: int
    invalid: int
    problems: list[Problem]

    def report(self, name: str) -> list[str]:
        """What the CLI prints and the Admin tab shows: a summary line, then one line per skipped row."""
        return [describe_import(name, self.added, self.duplicates, self.problems),
                *(f"skipped: {p}" for p in self.problems)]


def describe_import(name: str, added: int, duplicates: int, problems: list[Problem]) -> str:
    return (f"imported {added} prompts from {name} ({duplicates} duplicates skipped, "
            f"{len(problems)} invalid rows skipped)")


class _FileProblem(Exception):
    """The whole file cannot be read (internal: becomes a PromptFileError)."""


def _decoded_lines(raw: bytes, name: str, problems: list[Problem]) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for each line that is valid UTF-8; the others become problems with their byte
    offset, so one bad byte costs one line rather than the file."""
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as Excel writes
        raw, offset = raw[3:], 3
    else:
        offset = 0
    for number, line in enumerate(raw.splitlines(keepends=True), start=1):
        try:
            yield number, line.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(name, number, f"not valid UTF-8 (byte offset {offset + e.start} of the file)"))
        offset += len(line)


def _check(text: Any, name: str, line: int, unit: str, problems: list[Problem], prompts: list[str]) -> None:
    try:
        prompts.append(validate_prompt(text))
    except InvalidValue as e:
        problems.append(Problem(name, line, str(e), unit))


def _read_jsonl(raw: bytes, name: str) -> tuple[list[str], list[Problem]]:
    prompts: list[str] = []
    problems: list[Problem] = []
    if name.endswith(".json") and raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return _read_json_array(raw, name)
    for number, line in _decoded_lines(raw, name, problems):
        if not line.strip():
            continue  # blank lines (a trailing newline, a separator) are not records
        try:
            record = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            problems.append(Problem(name, number, f"invalid JSON at column {e.colno}: {e.msg}"))
            continue
        if not isinstance(record, dict) or "prompt" not in record:
            problems.append(Problem(name, number, 'expected an object with a "prompt" key'))
            continue
        _check(record["prompt"], name, number, "line", problems, prompts)
    return prompts, problems


def _read_json_array(raw: bytes, name: str) -> tuple[list[str], list[Problem]]:
    """A .json file holding one array of {"prompt": ...} objects or of strings."""
    try:
        records = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise _FileProblem(f"not valid UTF-8 (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise _FileProblem(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    prompts: list[str] = []
    problems: list[Problem] = []
    for number, record in enumerate(records, start=1):
        if isinstance(record, dict):
            if "prompt" not in record:
                problems.append(Problem(name, number, 'expected an object with a "prompt" key', "item"))
                continue
            record = record["prompt"]
        _check(record, name, number, "item", problems, prompts)
    return prompts, problems


def _read_csv(raw: bytes, name: str) -> tuple[list[str], list[Problem]]:
    prompts: list[str] = []
    problems: list[Problem] = []
    # The csv module refuses fields over 128 KiB by default, which would fail a whole file over one long prompt
    # instead of reporting that row as over MAX_PROMPT_CHARS. Raising a process-wide limit harms no other reader.
    csv.field_size_limit(max(csv.field_size_limit(), 64 * 2**20))
    good = list(_decoded_lines(raw, name, problems))
    numbers = [number for number, _ in good]
    # csv.reader counts the lines it consumed (a quoted field may span several); map that back to the file's lines.
    reader = csv.reader((text for _, text in good))
    try:
        header = next(reader, None)
        if header is None:
            raise _FileProblem("empty file, expected a header row with a prompt column")
        columns = [column.strip() for column in header]
        if "prompt" not in columns:
            raise _FileProblem(f"no \"prompt\" column (columns: {', '.join(columns) or 'none'})")
        column = columns.index("prompt")
        start = reader.line_num
        for row in reader:
            number = numbers[start]  # the row's first line
            start = reader.line_num
            if not row:
                continue
            if column >= len(row):
                problems.append(Problem(name, number, f"the row has {len(row)} fields and no prompt"))
                continue
            _check(row[column], name, number, "line", problems, prompts)
    except csv.Error as e:
        raise _FileProblem(f"line {numbers[min(reader.line_num, len(numbers)) - 1]}: not valid CSV ({e})") from None
    return prompts, problems


def _read_parquet(path: Path, name: str) -> tuple[list[str], list[Problem]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if "prompt" not in schema.names:
            raise _FileProblem(f"no \"prompt\" column (columns: {', '.join(schema.names) or 'none'})")
        kind = schema.field("prompt").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise _FileProblem(f'the "prompt" column holds {kind}, expected strings')
        values = pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()
    except pa.ArrowException as e:
        raise _FileProblem(f"not a readable Parquet file ({e})") from None
    prompts: list[str] = []
    problems: list[Problem] = []
    for number, value in enumerate(values, start=1):
        if value is None:
            problems.append(Problem(name, number, "prompt is null", "row"))
            continue
        _check(value, name, number, "row", problems, prompts)
    return prompts, problems


_READERS: dict[str, Callable[[bytes, str], tuple[list[str], list[Problem]]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_jsonl,
    ".csv": _read_csv,
}
SUFFIXES = (*_READERS, ".parquet")


def read_prompt_file(path: Path, skip_invalid: bool = False) -> ReadResult:
    """The prompts in `path` (.jsonl/.json, .csv or .parquet; each record has a "prompt" field).
    Raises PromptFileError listing every problem, unless `skip_invalid`, which returns the valid rows and the
    invalid ones as problems (a problem with the file as a whole raises either way)."""
    path = Path(path)
    name = path.name
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            prompts, problems = _read_parquet(path, name)
        elif suffix in _READERS:
            prompts, problems = _READERS[suffix](path.read_bytes(), name)
        else:
            kind = path.suffix or "(no suffix)"
            raise _FileProblem(f"unknown file type {kind!r}, expected one of {', '.join(SUFFIXES)}")
    except _FileProblem as e:
        raise PromptFileError([Problem(name, None, str(e))]) from None
    except OSError as e:
        raise PromptFileError([Problem(name, None, f"cannot read the file ({e.strerror or e})")]) from None
    # Encoding problems are found in a first pass over the bytes; report everything in file order.
    problems.sort(key=lambda p: p.line or 0)
    if problems and not skip_invalid:
        raise PromptFileError(problems)
    return ReadResult(prompts, problems)


def import_prompt_file(store: Store, path: Path, skip_invalid: bool = False) -> ImportResult:
    """Read `path` and add its prompts in one transaction; nothing is written when the file has problems (unless
    `skip_invalid`, which writes the valid rows)."""
    result = read_prompt_file(path, skip_invalid=skip_invalid)
    added = store.prompts.add(result.prompts, source=f"file:{Path(path).name}")
    return ImportResult(added.added, added.duplicates, len(result.problems), result.problems)
