"""Exports for other tools (DPO / KTO JSONL as TRL reads them, raw rankings) and the Parquet snapshots a training
round reads. Everything is written to a temporary name and renamed into place, so a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from storage._common import utc
from storage.errors import Conflict, InvalidValue

if TYPE_CHECKING:
    from storage.store import Store

FETCH_ROWS = 1000  # rows per fetchmany: exports stream, the whole table never sits in memory

_RANKINGS_SQL = """
    SELECT r.ranking_id, r.item_id, u.name, i.policy_version, p.text,
           list(a.text ORDER BY ra.rank), list(a.answer_id ORDER BY ra.rank), r.seconds, r.created_at
    FROM rankings r
    JOIN ranking_answers ra ON ra.ranking_id = r.ranking_id
    JOIN answers a ON a.answer_id = ra.answer_id
    JOIN items i ON i.item_id = r.item_id
    JOIN prompts p ON p.prompt_id = i.prompt_id
    JOIN users u ON u.user_id = r.user_id
    GROUP BY ALL
    ORDER BY r.ranking_id"""


def _ranking(row: tuple) -> dict:
    return {
        "ranking_id": row[0],
        "item_id": row[1],
        "annotator": row[2],
        "policy_version": row[3],
        "prompt": row[4],
        "answers": row[5],  # best first
        "answer_ids": row[6],
        "seconds": row[7],
        "created_at": utc(row[8]).isoformat(),
    }


# Format -> (query, row -> record). "dpo" and "kto" are the column names TRL's DPOTrainer / KTOTrainer expect.
FORMATS: dict[str, tuple[str, Callable[[tuple], dict]]] = {
    "dpo": (
        "SELECT prompt, chosen, rejected FROM pairs ORDER BY ranking_id, chosen_rank, rejected_rank",
        lambda row: {"prompt": row[0], "chosen": row[1], "rejected": row[2]},
    ),
    "kto": (
        "SELECT prompt, completion, label FROM unary ORDER BY feedback_id",
        lambda row: {"prompt": row[0], "completion": row[1], "label": row[2]},
    ),
    "rankings": (_RANKINGS_SQL, _ranking),
}


def iter_export(store: Store, fmt: str) -> Iterator[dict]:
    """The records of export format `fmt` ("dpo", "kto" or "rankings"), streamed from one consistent read."""
    if fmt not in FORMATS:
        raise InvalidValue(f"unknown export format {fmt!r}, expected one of {', '.join(FORMATS)}")
    sql, record = FORMATS[fmt]
    return _stream(store, sql, record)


def _stream(store: Store, sql: str, record: Callable[[tuple], dict]) -> Iterator[dict]:
    with store.db.reader() as cur:
        cur.execute(sql)
        while rows := cur.fetchmany(FETCH_ROWS):
            for row in rows:
                yield record(row)


def export_jsonl(store: Store, fmt: str, out: Path) -> int:
    """Write export format `fmt` to `out` as JSON lines; returns the number of rows."""
    out = Path(out)
    records = iter_export(store, fmt)  # raises on an unknown format before any file exists
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        count = 0
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in records:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return count


def write_snapshot(
    store: Store, out_dir: Path, parent_version: int, base_model: str, max_staleness: int | None = None
) -> dict:
    """Write the inputs of a training round into `out_dir`: pairs.parquet and unary.parquet (the `pairs` and `unary`
    views, only labels on answers from versions >= parent_version - max_staleness when max_staleness is set),
    prompts.parquet (prompt_id, prompt) and meta.json; returns the meta dict. All three tables come from one read
    transaction, and the directory appears complete or not at all."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise Conflict(f"snapshot directory {out_dir} already exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    min_version = None if max_staleness is None else max(0, parent_version - max_staleness)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        queries = {
            "pairs": "SELECT * FROM pairs WHERE $min IS NULL OR policy_version >= $min"
                     " ORDER BY ranking_id, chosen_rank, rejected_rank",
            "unary": "SELECT * FROM unary WHERE $min IS NULL OR policy_version >= $min ORDER BY feedback_id",
            "prompts": "SELECT prompt_id, text AS prompt FROM prompts ORDER BY prompt_id",
        }
        counts = {}
        with store.db.reader() as cur:
            cur.execute("BEGIN TRANSACTION")  # one snapshot of the database for all three files
            for name, query in queries.items():
                params = {"min": min_version, "path": str(tmp / f"{name}.parquet")}
                if "$min" not in query:
                    del params["min"]
                (counts[name],) = cur.execute(f"COPY ({query}) TO $path (FORMAT parquet)", params).fetchone()
            cur.execute("COMMIT")
        meta = {
            "created_at": datetime.now(UTC).isoformat(),
            "parent_version": parent_version,
            "base_model": base_model,
            "max_staleness": max_staleness,
            "min_policy_version": min_version,
            "counts": counts,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory on every platform
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
