"""Training runs: their lifecycle (queued -> running -> succeeded | rejected | failed | cancelled), progress, and the
per-step losses the Admin tab plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from storage._common import is_int, is_number, to_json, utc
from storage.db import Cursor, Database
from storage.errors import InvalidValue, NotFound

if TYPE_CHECKING:
    import pandas as pd

STATUSES = ("queued", "running", "succeeded", "rejected", "failed", "cancelled")
RUN_LOG_LINES = 200  # per run: a traceback and a round's warnings fit many times; the Admin shows the newest
RUN_LOG_LINE_CHARS = 1000  # a line longer than this is cut: one runaway line must not fill the table
LOG_KINDS = ("log", "warning")
ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "rejected", "failed", "cancelled")


@dataclass(frozen=True)
class Run:
    run_id: int
    status: str
    algorithm: str
    config: dict
    progress: float  # 0..1
    step: int | None
    loss: float | None
    metrics: dict
    version: int | None  # the policy version the run produced
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    phase: str | None = None  # the phase the round reported last: reward | rollouts | policy | eval
    phase_step: int | None = None  # step x ...
    phase_total: int | None = None  # ... of y, within that phase


_COLUMNS = (
    "run_id, status, algorithm, config, progress, step, loss, metrics, version, error, created_at, started_at, "
    "finished_at, phase, phase_step, phase_total"
)


def _run(row: tuple) -> Run:
    return Run(
        run_id=row[0],
        status=row[1],
        algorithm=row[2],
        config=json.loads(row[3]),
        progress=row[4],
        step=row[5],
        loss=row[6],
        metrics=json.loads(row[7]),
        version=row[8],
        error=row[9],
        created_at=utc(row[10]),
        started_at=utc(row[11]),
        finished_at=utc(row[12]),
        phase=row[13],
        phase_step=row[14],
        phase_total=row[15],
    )


def _get(cur: Cursor, run_id: int) -> Run:
    row = cur.execute(f"SELECT {_COLUMNS} FROM runs WHERE run_id = ?", [run_id]).fetchone()
    if row is None:
        raise NotFound(f"no training run with id {run_id}")
    return _run(row)


def _column_value(field: str, value: Any) -> Any:
    """`value` as stored in column `field`, or InvalidValue saying what that field takes."""
    if field == "status":
        if value not in STATUSES:
            raise InvalidValue(f"run status must be one of {', '.join(STATUSES)}, got {value!r}")
        return value
    if field in ("config", "metrics"):
        return to_json(value, field)
    if field == "progress":
        if not (is_number(value) and 0 <= value <= 1):
            raise InvalidValue(f"progress must be a number in [0, 1], got {value!r}")
        return float(value)
    if field in ("step", "version", "phase_step", "phase_total"):
        if value is not None and not is_int(value):
            raise InvalidValue(f"{field} must be an int or None, got {value!r}")
        return value
    if field == "loss":
        # A NaN loss is worth recording: it is why the run failed.
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise InvalidValue(f"loss must be a number or None, got {value!r}")
        return None if value is None else float(value)
    if field in ("error", "algorithm", "phase"):
        if value is not None and not isinstance(value, str):
            raise InvalidValue(f"{field} must be a string, got {type(value).__name__}")
        return value
    if field in ("started_at", "finished_at"):
        if value is not None and not isinstance(value, datetime):
            raise InvalidValue(f"{field} must be a datetime, got {value!r}")
        return value
    raise InvalidValue(
        f"unknown run field {field!r}; expected one of status, config, metrics, progress, step, version, loss, "
        "error, algorithm, started_at, finished_at, phase, phase_step, phase_total"
    )


class Runs:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, algorithm: str, config: dict) -> int:
        """A queued run; returns its id."""
        if not isinstance(algorithm, str) or not algorithm:
            raise InvalidValue(f"algorithm must be a non-empty string, got {algorithm!r}")
        config_json = to_json(config, "config")
        with self.db.write() as cur:
            (run_id,) = cur.execute(
                "INSERT INTO runs (status, algorithm, config) VALUES ('queued', ?, ?) RETURNING run_id",
                [algorithm, config_json],
            ).fetchone()
        return run_id

    def update(self, run_id: int, **fields: Any) -> Run:
        """Set some of a run's fields. Moving to 'running' stamps started_at, and to a finished status stamps
        finished_at, unless given."""
        values = {field: _column_value(field, value) for field, value in fields.items()}
        now = datetime.now(UTC)
        if values.get("status") == "running":
            values.setdefault("started_at", now)
        if values.get("status") in FINISHED:
            values.setdefault("finished_at", now)
        with self.db.write() as cur:
            _get(cur, run_id)
            if values:
                # Column names come from _column_value's whitelist, never from the caller's strings as such.
                assignments = ", ".join(f"{field} = ?" for field in values)
                cur.execute(f"UPDATE runs SET {assignments} WHERE run_id = ?", [*values.values(), run_id])
            return _get(cur, run_id)

    def add_step(self, run_id: int, step: int, loss: float | None, metrics: dict | None = None) -> None:
        """One point of the run's loss curve."""
        if not is_int(step):
            raise InvalidValue(f"step must be an int, got {step!r}")
        loss = _column_value("loss", loss)
        metrics_json = to_json({} if metrics is None else metrics, "metrics")
        with self.db.write() as cur:
            _get(cur, run_id)
            cur.execute(
                "INSERT INTO run_steps (run_id, step, loss, metrics) VALUES (?, ?, ?, ?)",
                [run_id, step, loss, metrics_json],
            )

    def steps(self, run_id: int) -> pd.DataFrame:
        """The run's loss curve: columns step, loss, metrics (a dict per row), at; ordered by step."""
        import pandas as pd  # only the Admin tab's plots need pandas; keep it off the import path of the rest

        rows = self.db.cursor().execute(
            'SELECT step, loss, metrics, "at" FROM run_steps WHERE run_id = ? ORDER BY step, "at"', [run_id]
        ).fetchall()
        # Built from rows rather than DuckDB's .df(), which trips a pandas 3 deprecation warning inside duckdb 2.0.
        frame = pd.DataFrame(
            [(step, loss, json.loads(metrics), at) for step, loss, metrics, at in rows],
            columns=["step", "loss", "metrics", "at"],
        )
        return frame.astype({"step": "int64", "loss": "float64", "at": "datetime64[us, UTC]"})

    def add_log(self, run_id: int, line: str, kind: str = "log") -> None:
        """One line of the run's log (kind "warning" for what the round reports as one); only the newest
        RUN_LOG_LINES of a run are kept."""
        if kind not in LOG_KINDS:
            raise InvalidValue(f"log kind must be one of {', '.join(LOG_KINDS)}, got {kind!r}")
        if not isinstance(line, str):
            raise InvalidValue(f"a log line must be a string, got {type(line).__name__}")
        line = line.rstrip()[:RUN_LOG_LINE_CHARS]
        with self.db.write() as cur:
            _get(cur, run_id)
            cur.execute("INSERT INTO run_log (run_id, line, kind) VALUES (?, ?, ?)", [run_id, line, kind])
            # rowid grows with each insert: keep the newest RUN_LOG_LINES rows of this run.
            cur.execute(
                "DELETE FROM run_log WHERE run_id = $run AND rowid < (SELECT min(rowid) FROM (SELECT rowid FROM "
                "run_log WHERE run_id = $run ORDER BY rowid DESC LIMIT $keep))",
                {"run": run_id, "keep": RUN_LOG_LINES},
            )

    def log(self, run_id: int, limit: int = RUN_LOG_LINES, kind: str | None = None) -> list[tuple[str, str]]:
        """The newest `limit` lines of the run's log (of one `kind` if given), oldest first: (kind, line)."""
        rows = self.db.cursor().execute(
            "SELECT kind, line FROM (SELECT kind, line, rowid AS r FROM run_log WHERE run_id = ?"
            " AND (? IS NULL OR kind = ?) ORDER BY rowid DESC LIMIT ?) ORDER BY r",
            [run_id, kind, kind, limit],
        ).fetchall()
        return [(k, line) for k, line in rows]

    def get(self, run_id: int) -> Run:
        return _get(self.db.cursor(), run_id)

    def list(self, limit: int = 50) -> list[Run]:
        """The `limit` most recent runs, newest first."""
        rows = self.db.cursor().execute(
            f"SELECT {_COLUMNS} FROM runs ORDER BY run_id DESC LIMIT ?", [limit]
        ).fetchall()
        return [_run(row) for row in rows]

    def active(self) -> Run | None:
        """The queued or running run, if any (the newest, should there be several)."""
        row = self.db.cursor().execute(
            f"SELECT {_COLUMNS} FROM runs WHERE status IN ('queued', 'running') ORDER BY run_id DESC LIMIT 1"
        ).fetchone()
        return None if row is None else _run(row)

    def fail_unfinished(self, reason: str) -> int:
        """Mark every queued or running run failed with `reason` (the app calls this at start: a run cannot
        outlive the process that launched it); returns how many."""
        with self.db.write() as cur:
            rows = cur.execute(
                "UPDATE runs SET status = 'failed', error = ?, finished_at = current_timestamp"
                " WHERE status IN ('queued', 'running') RETURNING run_id",
                [reason],
            ).fetchall()
        return len(rows)
