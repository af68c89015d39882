"""Prompts: the texts answers are sampled for. Stored stripped and once each."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from storage.db import Database
from storage.errors import InvalidValue, NotFound

MAX_PROMPT_CHARS = 20_000  # far above any real prompt for a 135M model; stops a pasted book from entering the queue


@dataclass(frozen=True)
class Prompt:
    prompt_id: int
    text: str
    source: str


@dataclass(frozen=True)
class AddResult:
    added: int
    duplicates: int
    prompt_ids: list[int]  # one per text given, in order: the new prompt's id, or the id of the stored duplicate


def validate_prompt(text: Any) -> str:
    """`text` stripped, or InvalidValue saying why it cannot be a prompt."""
    if not isinstance(text, str):
        raise InvalidValue(f"prompt is not a string (got {type(text).__name__})")
    text = text.strip()
    if not text:
        raise InvalidValue("empty prompt")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidValue(f"prompt is {len(text)} characters, the limit is {MAX_PROMPT_CHARS}")
    if "\0" in text:
        raise InvalidValue("prompt contains a NUL character")
    try:
        text.encode("utf-8")  # a lone surrogate ("\ud800" in JSON) decodes to a str that UTF-8 cannot store
    except UnicodeEncodeError as e:
        raise InvalidValue(f"prompt is not valid Unicode: {e.reason} at character {e.start}") from None
    return text


class Prompts:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, texts: list[str], source: str = "api") -> AddResult:
        """Store the texts not stored yet, in one transaction; every text is validated before anything is written."""
        if isinstance(texts, str):
            raise InvalidValue("texts must be a list of prompts, got a single string")
        if not isinstance(source, str) or not source:
            raise InvalidValue(f"source must be a non-empty string, got {source!r}")
        cleaned = []
        for index, text in enumerate(texts):
            try:
                cleaned.append(validate_prompt(text))
            except InvalidValue as e:
                raise InvalidValue(f"prompt {index}: {e}") from None
        unique = list(dict.fromkeys(cleaned))
        if not unique:
            return AddResult(0, 0, [])
        # Bulk path: DuckDB scans an Arrow table in one statement (executemany runs one statement per row).
        incoming = pa.table(
            {"position": pa.array(range(len(unique)), pa.int64()), "text": pa.array(unique, pa.string())}
        )
        view = f"incoming_prompts_{uuid.uuid4().hex}"
        with self.db.write() as cur:
            cur.register(view, incoming)
            try:
                existing = cur.execute(f"SELECT p.text, p.prompt_id FROM {view} i JOIN prompts p ON p.text = i.text")
                ids = dict(existing.fetchall())
                inserted = cur.execute(
                    f"INSERT INTO prompts (text, source) SELECT text, ? FROM {view} i"
                    " WHERE NOT EXISTS (SELECT 1 FROM prompts p WHERE p.text = i.text)"
                    " ORDER BY position RETURNING text, prompt_id",
                    [source],
                ).fetchall()
            finally:
                cur.unregister(view)
        ids.update(inserted)
        return AddResult(len(inserted), len(cleaned) - len(inserted), [int(ids[text]) for text in cleaned])

    def get(self, prompt_id: int) -> Prompt:
        row = self.db.cursor().execute(
            "SELECT prompt_id, text, source FROM prompts WHERE prompt_id = ?", [prompt_id]
        ).fetchone()
        if row is None:
            raise NotFound(f"no prompt with id {prompt_id}")
        return Prompt(*row)

    def count(self) -> int:
        return self.db.cursor().execute("SELECT count(*) FROM prompts").fetchone()[0]

    def least_sampled(self, n: int) -> list[Prompt]:
        """The `n` prompts with the fewest items so far, ties broken at random (so the sampler spreads over prompts)."""
        rows = self.db.cursor().execute(
            """SELECT p.prompt_id, p.text, p.source FROM prompts p
               LEFT JOIN (SELECT prompt_id, count(*) AS n FROM items GROUP BY prompt_id) c USING (prompt_id)
               ORDER BY coalesce(c.n, 0), random() LIMIT ?""",
            [n],
        ).fetchall()
        return [Prompt(*row) for row in rows]
