"""Exports for other tools (DPO / KTO JSONL as TRL reads them, raw rankings) and the Parquet snapshots a training
round reads. Everything is written to a temporary name and renamed into place, so a crash never leaves half a file.

DPO and KTO rows are in TRL's *conversational* format by default: `prompt` is the list of messages prefloop sampled
from ([{"role": "user", "content": ...}]) and `chosen` / `rejected` / `completion` are one assistant message each, so
TRL renders them with the model's own chat template, exactly as prefloop did when it sampled the answers. The
`plain` style writes strings instead (TRL then trains on the untemplated prompt and appends EOS itself).

Every row also carries, beside TRL's columns (which TRL's chat-template step ignores):
- the finish reason of each answer ("eos", or "length" when `max_new_tokens` cut it off). TRL closes every assistant
  turn with the template's end-of-turn token (and appends EOS in the plain style), so a cut-off answer is trained as if
  the model had chosen to stop there. Drop such rows (`drop_truncated`) or filter on these columns before training.
- `policy_version`: the version that generated the answers (0 = the base model).
- `annotator_id`: the store's integer user id, never the name. Datasets travel (a hub upload, a paper's artefact); an
  id is enough to group labels by person and for agreement, and it names nobody. The names stay in the DuckDB file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from storage._common import new_directory, utc
from storage.errors import InvalidValue

if TYPE_CHECKING:
    from storage.store import Store

FETCH_ROWS = 1000  # rows per fetchmany: exports stream, the whole table never sits in memory

# "conversational" is the default: TRL applies the chat template prefloop sampled with (issue 11).
STYLES = ("conversational", "plain")

# $drop: when true, leave out every row with an answer cut off by max_new_tokens (finish_reason "length").
_DPO_SQL = """
    SELECT p.prompt, p.chosen, p.rejected, ca.finish_reason, ja.finish_reason, p.policy_version, p.annotator_id,
           p.ranking_id, p.item_id
    FROM pairs p
    JOIN answers ca ON ca.answer_id = p.chosen_answer_id
    JOIN answers ja ON ja.answer_id = p.rejected_answer_id
    WHERE NOT $drop OR (ca.finish_reason <> 'length' AND ja.finish_reason <> 'length')
    ORDER BY p.ranking_id, p.chosen_rank, p.rejected_rank"""

_KTO_SQL = """
    SELECT u.prompt, u.completion, u.label, a.finish_reason, u.policy_version, f.user_id, u.feedback_id, u.item_id
    FROM unary u
    JOIN answers a ON a.answer_id = u.answer_id
    JOIN feedback f ON f.feedback_id = u.feedback_id
    WHERE NOT $drop OR a.finish_reason <> 'length'
    ORDER BY u.feedback_id"""

_RANKINGS_SQL = """
    SELECT r.ranking_id, r.item_id, r.user_id, i.policy_version, p.text,
           list(a.text ORDER BY ra.rank), list(a.answer_id ORDER BY ra.rank),
           list(a.finish_reason ORDER BY ra.rank), r.seconds, r.created_at, list(ra.tier ORDER BY ra.rank)
    FROM rankings r
    JOIN ranking_answers ra ON ra.ranking_id = r.ranking_id
    JOIN answers a ON a.answer_id = ra.answer_id
    JOIN items i ON i.item_id = r.item_id
    JOIN prompts p ON p.prompt_id = i.prompt_id
    GROUP BY ALL
    HAVING NOT $drop OR bool_and(a.finish_reason <> 'length')
    ORDER BY r.ranking_id"""


def _user(text: str, conversational: bool) -> str | list[dict]:
    """The prompt as prefloop sampled it: one user turn (learner.sampling.chat_messages), or the bare string."""
    return [{"role": "user", "content": text}] if conversational else text


def _assistant(text: str, conversational: bool) -> str | list[dict]:
    return [{"role": "assistant", "content": text}] if conversational else text


def _dpo(row: tuple, conversational: bool) -> dict:
    return {
        "prompt": _user(row[0], conversational),
        "chosen": _assistant(row[1], conversational),
        "rejected": _assistant(row[2], conversational),
        "chosen_finish_reason": row[3],
        "rejected_finish_reason": row[4],
        "policy_version": row[5],
        "annotator_id": row[6],
        "ranking_id": row[7],
        "item_id": row[8],
    }


def _kto(row: tuple, conversational: bool) -> dict:
    return {
        "prompt": _user(row[0], conversational),
        "completion": _assistant(row[1], conversational),
        "label": row[2],
        "finish_reason": row[3],
        "policy_version": row[4],
        "annotator_id": row[5],
        "feedback_id": row[6],
        "item_id": row[7],
    }


def _ranking(row: tuple, conversational: bool) -> dict:
    """A whole ranking, best first; raw strings in either style (no trainer reads this format as is)."""
    return {
        "ranking_id": row[0],
        "item_id": row[1],
        "annotator_id": row[2],
        "policy_version": row[3],
        "prompt": row[4],
        "answers": row[5],  # best first
        "answer_ids": row[6],
        "finish_reasons": row[7],
        "tiers": row[10],  # per answer: 0 = best; answers with equal tiers were marked equally good
        "seconds": row[8],
        "created_at": utc(row[9]).isoformat(),
    }


# Format -> (query, (row, conversational) -> record). "dpo" and "kto" hold the columns TRL's DPOTrainer / KTOTrainer
# read (prompt, chosen, rejected / prompt, completion, label); "rankings" holds each ranking whole.
FORMATS: dict[str, tuple[str, Callable[[tuple, bool], dict]]] = {
    "dpo": (_DPO_SQL, _dpo),
    "kto": (_KTO_SQL, _kto),
    "rankings": (_RANKINGS_SQL, _ranking),
}


def iter_export(store: Store, fmt: str, style: str = "conversational", drop_truncated: bool = False) -> Iterator[dict]:
    """The records of export format `fmt` ("dpo", "kto" or "rankings"), streamed from one consistent read.

    style: "conversational" (TRL's messages) or "plain" (strings); drop_truncated: leave out every row that holds an
    answer cut off by max_new_tokens. Bad arguments raise InvalidValue before anything is read."""
    if fmt not in FORMATS:
        raise InvalidValue(f"unknown export format {fmt!r}, expected one of {', '.join(FORMATS)}")
    if style not in STYLES:
        raise InvalidValue(f"unknown export style {style!r}, expected one of {', '.join(STYLES)}")
    sql, record = FORMATS[fmt]
    return _stream(store, sql, {"drop": bool(drop_truncated)}, lambda row: record(row, style == "conversational"))


def _stream(store: Store, sql: str, params: dict, record: Callable[[tuple], dict]) -> Iterator[dict]:
    with store.db.reader() as cur:
        cur.execute(sql, params)
        while rows := cur.fetchmany(FETCH_ROWS):
            for row in rows:
                yield record(row)


def export_jsonl(store: Store, fmt: str, out: Path, style: str = "conversational", drop_truncated: bool = False) -> int:
    """Write export format `fmt` to `out` as JSON lines (see iter_export); returns the number of rows."""
    out = Path(out)
    records = iter_export(store, fmt, style, drop_truncated)  # raises on bad arguments before any file exists
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


def label_staleness(cur, serving_version: int) -> dict[int, int]:
    """Each registered version's staleness as seen from `serving_version`: how many versions were DEPLOYED along the
    serving lineage (the serving version's parent chain) since its answers were sampled.

    The serving version is 0; going back along its parent chain, each step over a version that was deployed adds 1.
    A version off the lineage (a rejected or rolled-back round, a canary) takes the staleness of its nearest ancestor
    on it: a rejected round does not age anyone's labels, and a canary's answers are as fresh as the serving
    version's. Versions missing from the registry get no entry (their labels count as too stale)."""
    rows = cur.execute("SELECT version, parent, deployed_at IS NOT NULL FROM versions").fetchall()
    parent_of = {v: p for v, p, _ in rows}
    deployed = {v for v, _, was_deployed in rows if was_deployed}
    staleness = {serving_version: 0}
    version = serving_version
    while parent_of.get(version) is not None and parent_of[version] not in staleness:
        staleness[parent_of[version]] = staleness[version] + (1 if version in deployed else 0)
        version = parent_of[version]
    lineage = dict(staleness)
    for version in parent_of:
        chain, ancestor = [], version
        while ancestor is not None and ancestor not in lineage and ancestor not in chain:
            chain.append(ancestor)
            ancestor = parent_of.get(ancestor)
        if ancestor in lineage:
            staleness.update({v: lineage[ancestor] for v in chain})
    return staleness


# The snapshot's label tables: the views, plus each answer's finish_reason (an answer cut at max_new_tokens gets no
# eos in training) and each label's staleness ($versions/$staleness: label_staleness as two parallel lists).
_SNAPSHOT_QUERIES = {
    "pairs": """
        SELECT p.*, ca.finish_reason AS chosen_finish_reason, ja.finish_reason AS rejected_finish_reason, s.staleness
        FROM pairs p
        JOIN answers ca ON ca.answer_id = p.chosen_answer_id
        JOIN answers ja ON ja.answer_id = p.rejected_answer_id
        LEFT JOIN (SELECT unnest($versions) AS version, unnest($staleness) AS staleness) s
               ON s.version = p.policy_version
        WHERE $max IS NULL OR s.staleness <= $max
        ORDER BY p.ranking_id, p.chosen_rank, p.rejected_rank""",
    "unary": """
        SELECT u.*, a.finish_reason, s.staleness
        FROM unary u
        JOIN answers a ON a.answer_id = u.answer_id
        LEFT JOIN (SELECT unnest($versions) AS version, unnest($staleness) AS staleness) s
               ON s.version = u.policy_version
        WHERE $max IS NULL OR s.staleness <= $max
        ORDER BY u.feedback_id""",
    "prompts": "SELECT prompt_id, text AS prompt FROM prompts WHERE NOT removed ORDER BY prompt_id",  # rollouts
}


def write_snapshot(
    store: Store, out_dir: Path, parent_version: int, base_model: str, max_label_staleness: int | None = None
) -> dict:
    """Write the inputs of a training round into `out_dir`: pairs.parquet and unary.parquet (the `pairs` and `unary`
    views with finish reasons and each label's `staleness` counted in deployed versions along the serving lineage,
    see label_staleness; only labels within `max_label_staleness` when set), prompts.parquet (prompt_id, prompt) and
    meta.json (with the lineage); returns the meta dict. All three tables come from one read transaction, and the
    directory appears complete or not at all."""
    with new_directory(out_dir, "snapshot directory") as tmp:
        counts = {}
        with store.db.reader() as cur:
            cur.execute("BEGIN TRANSACTION")  # one snapshot of the database for all three files
            staleness = label_staleness(cur, parent_version)
            versions = sorted(staleness)
            for name, query in _SNAPSHOT_QUERIES.items():
                params = {"path": str(tmp / f"{name}.parquet")}
                if "$max" in query:
                    params.update(max=max_label_staleness, versions=versions,
                                  staleness=[staleness[v] for v in versions])
                (counts[name],) = cur.execute(f"COPY ({query}) TO $path (FORMAT parquet)", params).fetchone()
            cur.execute("COMMIT")
        meta = {
            "created_at": datetime.now(UTC).isoformat(),
            "parent_version": parent_version,
            "base_model": base_model,
            "max_label_staleness": max_label_staleness,
            "staleness_by_version": {str(v): staleness[v] for v in versions},
            "counts": counts,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
