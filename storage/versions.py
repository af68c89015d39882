"""Policy versions: the registry of trained adapters, which one is deployed, and why others are not."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from storage._common import is_int, to_json, utc
from storage.db import Cursor, Database
from storage.errors import Conflict, InvalidValue, NotFound, StorageError

STATUSES = ("candidate", "deployed", "rejected", "rolled_back")


@dataclass(frozen=True)
class PolicyVersion:
    version: int  # 0 = the base model
    parent: int | None
    algorithm: str  # "base" | "dpo" | "kto" ...
    status: str  # one of STATUSES
    path: str | None  # the version directory; None for the base model
    config: dict
    metrics: dict
    labels_used: int
    reason: str | None
    created_at: datetime
    deployed_at: datetime | None


_COLUMNS = "version, parent, algorithm, status, path, config, metrics, labels_used, reason, created_at, deployed_at"


def _version(row: tuple) -> PolicyVersion:
    return PolicyVersion(
        version=row[0],
        parent=row[1],
        algorithm=row[2],
        status=row[3],
        path=row[4],
        config=json.loads(row[5]),
        metrics=json.loads(row[6]),
        labels_used=row[7],
        reason=row[8],
        created_at=utc(row[9]),
        deployed_at=utc(row[10]),
    )


def _get(cur: Cursor, version: int) -> PolicyVersion:
    row = cur.execute(f"SELECT {_COLUMNS} FROM versions WHERE version = ?", [version]).fetchone()
    if row is None:
        raise NotFound(f"no policy version {version}")
    return _version(row)


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise InvalidValue(f"version status must be one of {', '.join(STATUSES)}, got {status!r}")


class Versions:
    def __init__(self, db: Database) -> None:
        self.db = db

    def deployed(self) -> PolicyVersion:
        """The one deployed version."""
        rows = self.db.cursor().execute(f"SELECT {_COLUMNS} FROM versions WHERE status = 'deployed'").fetchall()
        if len(rows) != 1:
            # deploy() keeps exactly one; anything else means someone edited the file by hand.
            raise StorageError(f"{len(rows)} versions are marked deployed in {self.db.path}, expected exactly 1")
        return _version(rows[0])

    def get(self, version: int) -> PolicyVersion:
        return _get(self.db.cursor(), version)

    def list(self) -> list[PolicyVersion]:
        rows = self.db.cursor().execute(f"SELECT {_COLUMNS} FROM versions ORDER BY version").fetchall()
        return [_version(row) for row in rows]

    def next_number(self) -> int:
        return self.db.cursor().execute("SELECT max(version) + 1 FROM versions").fetchone()[0]

    def add(
        self,
        version: int,
        parent: int | None,
        algorithm: str,
        status: str,
        path: str | None,
        config: dict,
        metrics: dict,
        labels_used: int,
        reason: str | None = None,
    ) -> PolicyVersion:
        """Register a trained version (not deployed: use `deploy`). Conflict if the number is taken."""
        if not is_int(version) or version <= 0:
            raise InvalidValue(f"version must be an int > 0 (0 is the base model), got {version!r}")
        _check_status(status)
        if status == "deployed":
            raise InvalidValue("add a version as 'candidate' and then deploy() it, so exactly one stays deployed")
        if not isinstance(algorithm, str) or not algorithm:
            raise InvalidValue(f"algorithm must be a non-empty string, got {algorithm!r}")
        if not is_int(labels_used) or labels_used < 0:
            raise InvalidValue(f"labels_used must be an int >= 0, got {labels_used!r}")
        config_json, metrics_json = to_json(config, "config"), to_json(metrics, "metrics")
        with self.db.write() as cur:
            if cur.execute("SELECT 1 FROM versions WHERE version = ?", [version]).fetchone():
                raise Conflict(f"policy version {version} already exists")
            if parent is not None and not cur.execute("SELECT 1 FROM versions WHERE version = ?", [parent]).fetchone():
                raise NotFound(f"parent version {parent} of version {version} does not exist")
            cur.execute(
                "INSERT INTO versions (version, parent, algorithm, status, path, config, metrics, labels_used, reason)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [version, parent, algorithm, status, None if path is None else str(path), config_json, metrics_json,
                 labels_used, reason],
            )
            return _get(cur, version)

    def set_status(self, version: int, status: str, reason: str | None = None) -> PolicyVersion:
        """Mark a version candidate / rejected / rolled_back (with why). Deploying goes through `deploy`."""
        _check_status(status)
        if status == "deployed":
            raise InvalidValue("use deploy() to deploy a version")
        with self.db.write() as cur:
            if _get(cur, version).status == "deployed":
                raise InvalidValue(f"version {version} is deployed: deploy another version first")
            cur.execute("UPDATE versions SET status = ?, reason = ? WHERE version = ?", [status, reason, version])
            return _get(cur, version)

    def deploy(self, version: int, force: bool = False) -> PolicyVersion:
        """Make `version` the deployed one, in one transaction; the previously deployed version becomes a candidate.
        A rejected version is refused unless `force` (the gate said no; an admin may overrule it)."""
        with self.db.write() as cur:
            target = _get(cur, version)
            if target.status == "deployed":
                return target
            if target.status == "rejected" and not force:
                raise InvalidValue(f"version {version} was rejected ({target.reason or 'no reason given'}); "
                                   "pass force=True to deploy it anyway")
            cur.execute("UPDATE versions SET status = 'candidate' WHERE status = 'deployed'")
            cur.execute(
                "UPDATE versions SET status = 'deployed', deployed_at = current_timestamp WHERE version = ?", [version]
            )
            return _get(cur, version)
