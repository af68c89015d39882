"""Policy versions: the registry of trained adapters, which one is deployed (serves everyone), which one is a canary
(tested on a share of new items), and why others are not.

Every change of what serves is one transaction here, so a crash at any moment leaves either the state before it or
the state after it: exactly one deployed version, at most one canary, and a canary always compared with the deployed
version (deploying anything else ends it). Who may deploy what (a rejected version needs force) is decided by the
app's Deployments service, not here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from storage._common import is_int, to_json, utc
from storage.db import Cursor, Database
from storage.errors import Conflict, InvalidValue, NotFound, StorageError

STATUSES = ("candidate", "canary", "deployed", "rejected", "rolled_back")
DECISIONS = ("pending", "promoted", "rolled_back", "undecided")


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


@dataclass(frozen=True)
class Canary:
    """A candidate's test on annotators (the `canaries` table)."""

    version: int
    serving: int  # the version it is compared with (deployed when it started)
    after_item: int  # items with a larger id were sampled while it ran
    decision: str  # one of DECISIONS
    reason: str | None
    comparisons: int | None  # the evidence at the decision; None until decided
    win_rate: float | None
    ci95: tuple[float, float] | None
    started_at: datetime
    decided_at: datetime | None

    @property
    def mixing(self) -> bool:
        """Whether new items should still carry its answers: only while no decision was reached."""
        return self.decision == "pending"


_COLUMNS = "version, parent, algorithm, status, path, config, metrics, labels_used, reason, created_at, deployed_at"
_CANARY_COLUMNS = ("version, serving, after_item, decision, reason, comparisons, win_rate, ci_low, ci_high, "
                   "started_at, decided_at")
# Candidate-vs-serving comparisons per ranking of a canary's items: every pair of answers, one the candidate's and one
# the serving version's; the candidate wins the pair when its answer is ranked above, and half of it when the two are
# tied (the annotator marked them equally good: the Chatbot Arena convention, so a candidate no better than the
# serving version scores 0.5 whether its annotators order such answers at random or say they tie).
_COMPARISONS = """
    SELECT r.ranking_id, r.item_id,
           count(*) FILTER (WHERE ca.policy_version = $candidate AND c.tier < j.tier)
             + 0.5 * count(*) FILTER (WHERE c.tier = j.tier) AS wins,
           count(*) AS comparisons
    FROM rankings r
    JOIN ranking_answers c ON c.ranking_id = r.ranking_id
    JOIN ranking_answers j ON j.ranking_id = r.ranking_id AND c.rank < j.rank
    JOIN answers ca ON ca.answer_id = c.answer_id
    JOIN answers ja ON ja.answer_id = j.answer_id
    WHERE r.item_id > $after_item
      AND ((ca.policy_version = $candidate AND ja.policy_version = $serving)
        OR (ca.policy_version = $serving AND ja.policy_version = $candidate))
    GROUP BY r.ranking_id, r.item_id
    ORDER BY r.ranking_id"""


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


def _canary(row: tuple) -> Canary:
    ci95 = None if row[7] is None else (row[7], row[8])
    return Canary(row[0], row[1], row[2], row[3], row[4], row[5], row[6], ci95, utc(row[9]), utc(row[10]))


def _get(cur: Cursor, version: int) -> PolicyVersion:
    row = cur.execute(f"SELECT {_COLUMNS} FROM versions WHERE version = ?", [version]).fetchone()
    if row is None:
        raise NotFound(f"no policy version {version}")
    return _version(row)


def _deployed(cur: Cursor, path) -> PolicyVersion:
    rows = cur.execute(f"SELECT {_COLUMNS} FROM versions WHERE status = 'deployed'").fetchall()
    if len(rows) != 1:
        # Every writer here keeps exactly one; anything else means someone edited the file by hand.
        raise StorageError(f"{len(rows)} versions are marked deployed in {path}, expected exactly 1")
    return _version(rows[0])


def _active_canary(cur: Cursor) -> Canary | None:
    row = cur.execute(f"SELECT {_CANARY_COLUMNS} FROM canaries "
                      "WHERE version IN (SELECT version FROM versions WHERE status = 'canary')").fetchone()
    return None if row is None else _canary(row)


def _end_canary(cur: Cursor, reason: str) -> None:
    """The active canary (if any) stops being one without a decision: back to candidate, decision undecided."""
    active = _active_canary(cur)
    if active is None:
        return
    cur.execute("UPDATE canaries SET decision = 'undecided', reason = ?, decided_at = coalesce(decided_at, "
                "current_timestamp) WHERE version = ?", [reason, active.version])
    cur.execute("UPDATE versions SET status = 'candidate', reason = ? WHERE version = ?", [reason, active.version])


def _deploy(cur: Cursor, version: int) -> None:
    cur.execute("UPDATE versions SET status = 'candidate' WHERE status = 'deployed'")
    cur.execute("UPDATE versions SET status = 'deployed', deployed_at = current_timestamp WHERE version = ?",
                [version])


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise InvalidValue(f"version status must be one of {', '.join(STATUSES)}, got {status!r}")


class Versions:
    def __init__(self, db: Database) -> None:
        self.db = db

    def deployed(self) -> PolicyVersion:
        """The one deployed version."""
        return _deployed(self.db.cursor(), self.db.path)

    def get(self, version: int) -> PolicyVersion:
        return _get(self.db.cursor(), version)

    def list(self) -> list[PolicyVersion]:
        rows = self.db.cursor().execute(f"SELECT {_COLUMNS} FROM versions ORDER BY version").fetchall()
        return [_version(row) for row in rows]

    def next_number(self) -> int:
        return self.db.cursor().execute("SELECT max(version) + 1 FROM versions").fetchone()[0]

    def lineage(self, version: int) -> list[int]:
        """`version`, its parent, the parent's parent ... down to the base model: the versions that served before
        it along its line (staleness counts steps along this list, not version numbers)."""
        parents = dict(self.db.cursor().execute("SELECT version, parent FROM versions").fetchall())
        line: list[int] = []
        current: int | None = version
        while current is not None and current not in line:
            line.append(current)
            current = parents.get(current)
        return line

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
        if status in ("deployed", "canary"):
            raise InvalidValue(f"add a version as 'candidate', then deploy() or start_canary() it, not {status!r}")
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
        """Mark a version candidate / rejected / rolled_back (with why). Deploying and canaries have their own calls."""
        _check_status(status)
        if status in ("deployed", "canary"):
            raise InvalidValue(f"use deploy() or start_canary() to make a version {status}")
        with self.db.write() as cur:
            current = _get(cur, version).status
            if current in ("deployed", "canary"):
                raise InvalidValue(f"version {version} is {current}: deploy another version or decide the canary")
            cur.execute("UPDATE versions SET status = ?, reason = ? WHERE version = ?", [status, reason, version])
            return _get(cur, version)

    def deploy(self, version: int, taken_down: str | None = None, reason: str | None = None) -> PolicyVersion:
        """Make `version` the deployed one, in one transaction. The previously deployed version becomes a candidate
        (or `taken_down`, e.g. "rolled_back", with `reason`); a running canary ends undecided (it was compared with
        the version that no longer serves). Refuses the canary itself: promote it with decide_canary."""
        if taken_down not in (None, "rolled_back", "rejected"):
            raise InvalidValue(f"taken_down must be rolled_back or rejected, got {taken_down!r}")
        with self.db.write() as cur:
            target = _get(cur, version)
            if target.status == "deployed":
                return target
            if target.status == "canary":
                raise InvalidValue(f"version {version} is the canary: promote it (decide_canary) to deploy it")
            previous = _deployed(cur, self.db.path)
            _end_canary(cur, f"ended undecided: v{version} was deployed in place of v{previous.version}")
            _deploy(cur, version)
            if taken_down:
                cur.execute("UPDATE versions SET status = ?, reason = ? WHERE version = ?",
                            [taken_down, reason, previous.version])
            return _get(cur, version)

    # -- canaries -------------------------------------------------------------------------------------------------
    def start_canary(self, version: int) -> Canary:
        """Make candidate `version` the canary, compared with the deployed version from the next item on; a canary
        already running ends undecided (superseded). One transaction."""
        with self.db.write() as cur:
            target = _get(cur, version)
            if target.status != "candidate":
                raise InvalidValue(f"only a candidate can become the canary; version {version} is {target.status}")
            if cur.execute("SELECT 1 FROM canaries WHERE version = ?", [version]).fetchone():
                raise Conflict(f"version {version} was a canary already")
            _end_canary(cur, f"ended undecided: superseded by the canary v{version}")
            serving = _deployed(cur, self.db.path).version
            (after,) = cur.execute("SELECT coalesce(max(item_id), 0) FROM items").fetchone()
            cur.execute("INSERT INTO canaries (version, serving, after_item, decision) VALUES (?, ?, ?, 'pending')",
                        [version, serving, after])
            cur.execute("UPDATE versions SET status = 'canary', reason = NULL WHERE version = ?", [version])
            return _active_canary(cur)

    def decide_canary(self, version: int, decision: str, comparisons: int, win_rate: float | None,
                      ci95: tuple[float, float] | None, reason: str) -> Canary:
        """Record the active canary's decision with its evidence, in one transaction: promoted deploys it (the
        serving version becomes a candidate), rolled_back marks it so, undecided leaves it the canary without
        mixing (an admin decides)."""
        if decision not in DECISIONS or decision == "pending":
            raise InvalidValue(f"a canary decision is promoted, rolled_back or undecided, got {decision!r}")
        with self.db.write() as cur:
            active = _active_canary(cur)
            if active is None or active.version != version:
                raise Conflict(f"version {version} is not the canary"
                               + (f" (v{active.version} is)" if active else " (no canary is running)"))
            low, high = ci95 if ci95 is not None else (None, None)
            cur.execute("UPDATE canaries SET decision = ?, reason = ?, comparisons = ?, win_rate = ?, ci_low = ?, "
                        "ci_high = ?, decided_at = current_timestamp WHERE version = ?",
                        [decision, reason, comparisons, win_rate, low, high, version])
            if decision == "promoted":
                _deploy(cur, version)
            elif decision == "rolled_back":
                cur.execute("UPDATE versions SET status = 'rolled_back', reason = ? WHERE version = ?",
                            [reason, version])
            return self._canary(cur, version)

    def waiting(self, parent: int) -> list[PolicyVersion]:
        """Candidates of `parent` that never served and were never a canary, newest first: the rounds trained from a
        canary while it was judged (CanaryConfig.canary_chain), waiting for its decision."""
        rows = self.db.cursor().execute(
            f"""SELECT {_COLUMNS} FROM versions WHERE parent = ? AND status = 'candidate' AND deployed_at IS NULL
                AND version NOT IN (SELECT version FROM canaries) ORDER BY version DESC""", [parent]).fetchall()
        return [_version(row) for row in rows]

    def active_canary(self) -> Canary | None:
        """The version with status 'canary' and its record (pending, or undecided waiting for an admin)."""
        return _active_canary(self.db.cursor())

    def canaries(self) -> dict[int, Canary]:
        rows = self.db.cursor().execute(f"SELECT {_CANARY_COLUMNS} FROM canaries ORDER BY version").fetchall()
        return {row[0]: _canary(row) for row in rows}

    def canary_comparisons(self, canary: Canary) -> list[tuple[int, float, int]]:
        """(item_id, wins, comparisons) per ranking of the canary's items, in ranking order (a tie is half a win)."""
        rows = self.db.cursor().execute(
            _COMPARISONS, {"candidate": canary.version, "serving": canary.serving, "after_item": canary.after_item}
        ).fetchall()
        return [(item_id, float(wins), n) for _, item_id, wins, n in rows]

    def canary_items(self, canary: Canary) -> tuple[int, int]:
        """(canary items, all items) sampled since the canary started."""
        return self.db.cursor().execute(
            """SELECT count(DISTINCT i.item_id) FILTER (WHERE a.policy_version = ?), count(DISTINCT i.item_id)
               FROM items i JOIN answers a USING (item_id) WHERE i.item_id > ?""",
            [canary.version, canary.after_item],
        ).fetchone()

    def canary_prompts(self, canary: Canary) -> tuple[int, int]:
        """(canary items on a prompt no version in its line trained on, canary items): app/buffer.py records which."""
        return self.db.cursor().execute(
            """SELECT count(*) FILTER (WHERE (sampling_params->>'canary_prompt_untrained')::BOOLEAN), count(*)
               FROM items WHERE item_id > ? AND (sampling_params->>'canary')::INTEGER = ?""",
            [canary.after_item, canary.version],
        ).fetchone()

    def _canary(self, cur: Cursor, version: int) -> Canary:
        row = cur.execute(f"SELECT {_CANARY_COLUMNS} FROM canaries WHERE version = ?", [version]).fetchone()
        return _canary(row)
