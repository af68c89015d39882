"""Prompts: the texts answers are sampled for. Stored stripped and once each.

An admin may remove a prompt (the shipped starter prompts too): removal is soft, a `removed` flag, so the items,
labels and exports of answers already sampled keep their prompt; a removed prompt is never sampled again and its
waiting items are not handed out (storage/items.py). Adding the text of a removed prompt again counts it as a
duplicate and leaves it removed: a removal is not undone by re-importing a file that still holds the prompt.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa

from storage._common import utc
from storage.db import Database
from storage.errors import Conflict, InvalidValue, NotFound

MAX_PROMPT_CHARS = 20_000  # far above any real prompt for a 135M model; stops a pasted book from entering the queue
MAX_PAGE = 500  # prompts per listing page: a screenful many times over, and a bounded answer for the REST API
MAX_SEARCH_CHARS = 200  # a search is a phrase to find in prompts, not a prompt


@dataclass(frozen=True)
class Prompt:
    prompt_id: int
    text: str
    source: str


@dataclass(frozen=True)
class PoolPrompt:
    """A prompt as the Admin's pool listing shows it."""

    prompt_id: int
    text: str
    source: str  # "starter", "import:FILE", "api:NAME", "suggestion"...
    created_at: datetime
    items: int  # items sampled for it so far
    removed: bool


@dataclass(frozen=True)
class PromptPage:
    total: int  # prompts matching the search, over all pages
    prompts: list[PoolPrompt]


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

    def count(self, include_removed: bool = False, source: str | None = None) -> int:
        """Prompts in the pool (removed ones too with `include_removed`; only those from `source` if given)."""
        return self.db.cursor().execute(
            "SELECT count(*) FROM prompts WHERE (? OR NOT removed) AND (? IS NULL OR source = ?)",
            [include_removed, source, source]).fetchone()[0]

    def page(self, search: str = "", limit: int = 50, offset: int = 0, include_removed: bool = False) -> PromptPage:
        """Prompts whose text contains `search` (ignoring case; "" = all), newest first, `limit` from `offset`."""
        if not isinstance(search, str) or len(search) > MAX_SEARCH_CHARS:
            raise InvalidValue(f"search must be text of at most {MAX_SEARCH_CHARS} characters")
        for name, value, low, high in (("limit", limit, 1, MAX_PAGE), ("offset", offset, 0, None)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low or (high and value > high):
                raise InvalidValue(f"{name} must be an integer in [{low}, {high or 'any'}], got {value!r}")
        where = "contains(lower(p.text), lower($search))" + ("" if include_removed else " AND NOT p.removed")
        cur = self.db.cursor()
        total = cur.execute(f"SELECT count(*) FROM prompts p WHERE {where}", {"search": search.strip()}).fetchone()[0]
        rows = cur.execute(
            f"""SELECT p.prompt_id, p.text, p.source, p.created_at, coalesce(c.n, 0), p.removed FROM prompts p
                LEFT JOIN (SELECT prompt_id, count(*) AS n FROM items GROUP BY prompt_id) c USING (prompt_id)
                WHERE {where} ORDER BY p.prompt_id DESC LIMIT $limit OFFSET $offset""",
            {"search": search.strip(), "limit": limit, "offset": offset},
        ).fetchall()
        return PromptPage(total, [PoolPrompt(r[0], r[1], r[2], utc(r[3]), int(r[4]), bool(r[5])) for r in rows])

    def remove(self, prompt_id: int) -> Prompt:
        """Take a prompt out of the pool (soft: see the module docstring). NotFound for an unknown id, InvalidValue
        for one removed already."""
        if not isinstance(prompt_id, int) or isinstance(prompt_id, bool):
            raise InvalidValue(f"prompt id must be an integer, got {prompt_id!r}")
        with self.db.write() as cur:
            row = cur.execute("SELECT removed FROM prompts WHERE prompt_id = ?", [prompt_id]).fetchone()
            if row is None:
                raise NotFound(f"no prompt with id {prompt_id}")
            if row[0]:
                raise Conflict(f"prompt {prompt_id} was removed already")
            cur.execute("UPDATE prompts SET removed = true, removed_at = current_timestamp WHERE prompt_id = ?",
                        [prompt_id])
        return self.get(prompt_id)

    def least_sampled(self, n: int, keep: Callable[[str], bool] | None = None,
                      exclude: Collection[int] = ()) -> list[Prompt]:
        """The `n` prompts in the pool with the fewest items so far, ties broken at random (so the sampler spreads
        over prompts); removed prompts are never sampled. `keep(text)` narrows them (the canary's untrained prompts);
        `exclude` holds prompt ids already taken."""
        if n <= 0:
            return []
        query = """SELECT p.prompt_id, p.text, p.source FROM prompts p
                   LEFT JOIN (SELECT prompt_id, count(*) AS n FROM items GROUP BY prompt_id) c USING (prompt_id)
                   WHERE NOT p.removed
                   ORDER BY coalesce(c.n, 0), random()"""
        cur = self.db.cursor()
        if keep is None and not exclude:
            return [Prompt(*row) for row in cur.execute(query + " LIMIT ?", [n]).fetchall()]
        cur.execute(query)
        picked: list[Prompt] = []
        while len(picked) < n and (rows := cur.fetchmany(1024)):
            picked += [Prompt(*row) for row in rows if row[0] not in exclude and (keep is None or keep(row[1]))]
        return picked[:n]
