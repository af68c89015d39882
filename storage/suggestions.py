"""Suggestions: prompts annotators propose for the annotation pool (the Demo's "Send to annotation").

A suggestion waits as `pending` until an admin approves it (its prompt enters the pool in the same transaction) or
rejects it, so nobody but an admin adds to what annotators are shown (issue 8 item 4). Each user's sends are limited
(`SuggestionLimits`), counted inside the write transaction so parallel sends cannot slip past a limit together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from storage._common import is_int, utc
from storage.db import Cursor, Database
from storage.errors import Conflict, InvalidValue, NotFound, RateLimited
from storage.prompts import validate_prompt

STATUSES = ("pending", "approved", "rejected")
RATE_WINDOW = timedelta(hours=1)  # SuggestionLimits.per_hour counts the sends of the last hour


@dataclass(frozen=True)
class SuggestionLimits:
    """How much one user may suggest; every default with its reason."""

    per_hour: int = 20  # someone trying prompts in the Demo sends a few an hour; a script sending hundreds is stopped
    pending: int = 50  # per user: an admin reads each one, and a longer backlog from one person is noise, not a queue
    max_chars: int = 4000  # a prompt worth ranking answers to fits in a few paragraphs, and the admin reads it whole

    def __post_init__(self) -> None:
        for name in ("per_hour", "pending", "max_chars"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise InvalidValue(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class Suggestion:
    suggestion_id: int
    user: str  # the name of who suggested it
    text: str
    status: str  # pending | approved | rejected
    created_at: datetime
    decided_by: str | None  # the admin's name, once decided
    decided_at: datetime | None
    prompt_id: int | None  # the pool prompt an approval added or found


_SELECT = """SELECT s.suggestion_id, u.name, s.text, s.status, s.created_at, d.name, s.decided_at, s.prompt_id
             FROM suggestions s JOIN users u ON u.user_id = s.user_id LEFT JOIN users d ON d.user_id = s.decided_by"""


def _suggestion(row: tuple) -> Suggestion:
    return Suggestion(row[0], row[1], row[2], row[3], utc(row[4]), row[5], utc(row[6]), row[7])


def _read(cur: Cursor, suggestion_id: int) -> Suggestion:
    row = cur.execute(f"{_SELECT} WHERE s.suggestion_id = ?", [suggestion_id]).fetchone()
    if row is None:
        raise NotFound(f"no suggestion with id {suggestion_id}")
    return _suggestion(row)


def _check_limits(cur: Cursor, user_id: int, limits: SuggestionLimits, now: datetime) -> None:
    """RateLimited when the user has sent `per_hour` in the last hour or has `pending` waiting for review."""
    since = now - RATE_WINDOW
    recent, oldest = cur.execute(
        "SELECT count(*), min(created_at) FROM suggestions WHERE user_id = ? AND created_at > ?", [user_id, since]
    ).fetchone()
    if recent >= limits.per_hour:
        minutes = max(1, round((utc(oldest) + RATE_WINDOW - now).total_seconds() / 60))
        raise RateLimited(f"you sent {recent} suggestions in the last hour, the limit is {limits.per_hour}; "
                          f"try again in {minutes} minute(s)")
    (pending,) = cur.execute(
        "SELECT count(*) FROM suggestions WHERE user_id = ? AND status = 'pending'", [user_id]).fetchone()
    if pending >= limits.pending:
        raise RateLimited(f"{pending} of your suggestions wait for an admin's review, the limit is {limits.pending}; "
                          "send more once some are reviewed")


def _check_new(cur: Cursor, text: str) -> None:
    """Conflict when the prompt is in the pool already, or waits for review already."""
    in_pool = cur.execute("SELECT prompt_id FROM prompts WHERE text = ?", [text]).fetchone()
    if in_pool:
        raise Conflict(f"this prompt is already in the annotation pool (prompt {in_pool[0]})")
    waiting = cur.execute("SELECT suggestion_id FROM suggestions WHERE text = ? AND status = 'pending'", [text])
    row = waiting.fetchone()
    if row:
        raise Conflict(f"this prompt already waits for an admin's review (suggestion {row[0]})")


class Suggestions:
    def __init__(self, db: Database, limits: SuggestionLimits | None = None) -> None:
        self.db = db
        self.limits = SuggestionLimits() if limits is None else limits

    def add(self, user_id: int, text: str) -> Suggestion:
        """Queue `text` for an admin's review. InvalidValue for a text that cannot be a prompt or is over
        `max_chars`; Conflict when it is in the pool or waiting already; RateLimited over a limit."""
        text = validate_prompt(text)
        if len(text) > self.limits.max_chars:
            raise InvalidValue(f"a suggested prompt is at most {self.limits.max_chars} characters, got {len(text)}")
        with self.db.write() as cur:
            if not cur.execute("SELECT 1 FROM users WHERE user_id = ?", [user_id]).fetchone():
                raise NotFound(f"no user with id {user_id}")
            _check_new(cur, text)
            now = datetime.now(UTC)
            _check_limits(cur, user_id, self.limits, now)
            (suggestion_id,) = cur.execute(
                "INSERT INTO suggestions (user_id, text, created_at) VALUES (?, ?, ?) RETURNING suggestion_id",
                [user_id, text, now],
            ).fetchone()
            return _read(cur, suggestion_id)

    def get(self, suggestion_id: int) -> Suggestion:
        return _read(self.db.cursor(), suggestion_id)

    def list(self, status: str | None = "pending", limit: int = 200) -> list[Suggestion]:
        """Suggestions with `status` (None = any), newest first."""
        if status is not None and status not in STATUSES:
            raise InvalidValue(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        rows = self.db.cursor().execute(
            f"{_SELECT} WHERE ($status IS NULL OR s.status = $status) ORDER BY s.suggestion_id DESC LIMIT $limit",
            {"status": status, "limit": limit},
        ).fetchall()
        return [_suggestion(row) for row in rows]

    def count_pending(self) -> int:
        return self.db.cursor().execute("SELECT count(*) FROM suggestions WHERE status = 'pending'").fetchone()[0]

    def approve(self, suggestion_id: int, admin_id: int) -> Suggestion:
        """Add the suggested prompt to the pool (or find it there) and mark the suggestion approved, in one
        transaction. Conflict unless it is pending."""
        with self.db.write() as cur:
            suggestion = self._pending(cur, suggestion_id)
            row = cur.execute("SELECT prompt_id FROM prompts WHERE text = ?", [suggestion.text]).fetchone()
            if row is None:
                row = cur.execute("INSERT INTO prompts (text, source) VALUES (?, ?) RETURNING prompt_id",
                                  [suggestion.text, f"suggestion:{suggestion.user}"]).fetchone()
            return self._decide(cur, suggestion_id, "approved", admin_id, row[0])

    def reject(self, suggestion_id: int, admin_id: int) -> Suggestion:
        """Mark the suggestion rejected; nothing enters the pool. Conflict unless it is pending."""
        with self.db.write() as cur:
            self._pending(cur, suggestion_id)
            return self._decide(cur, suggestion_id, "rejected", admin_id, None)

    @staticmethod
    def _pending(cur: Cursor, suggestion_id: int) -> Suggestion:
        suggestion = _read(cur, suggestion_id)
        if suggestion.status != "pending":
            raise Conflict(f"suggestion {suggestion_id} is already {suggestion.status}")
        return suggestion

    @staticmethod
    def _decide(cur: Cursor, suggestion_id: int, status: str, admin_id: int, prompt_id: int | None) -> Suggestion:
        # admin_id is not checked against users: the local CLI's stand-in (id 0) decides too, shown without a name.
        cur.execute(
            "UPDATE suggestions SET status = ?, decided_by = ?, decided_at = ?, prompt_id = ? WHERE suggestion_id = ?",
            [status, admin_id, datetime.now(UTC), prompt_id, suggestion_id],
        )
        return _read(cur, suggestion_id)
