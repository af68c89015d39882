"""Labels: rankings, thumbs, skips and flags. Append-only; each is committed before its method returns, and a label
that fails any check writes nothing."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime

from storage._common import as_aware, is_int, is_number
from storage.db import Cursor, Database
from storage.errors import Conflict, LabelError, NotFound
from storage.items import annotators_done, is_done_by

MAX_REASON_CHARS = 2000  # a skip or flag reason: a sentence or two for the admin who reviews it

FEEDBACK_VALUES = ("up", "down")


@dataclass(frozen=True)
class LabelCounts:
    rankings: int
    feedback: int
    skips: int
    flags: int

    def total(self) -> int:
        """Labels a learner can use: rankings and thumbs (skips and flags carry no preference)."""
        return self.rankings + self.feedback


@dataclass(frozen=True)
class Retraction:
    retraction_id: int
    ranking_id: int
    item_id: int  # the item the retracted ranking was on: its annotator may rank it again


def _item_answers(cur: Cursor, item_id: int) -> list[int]:
    """Answer ids of `item_id` in generation order; NotFound if there is no such item."""
    if not cur.execute("SELECT 1 FROM items WHERE item_id = ?", [item_id]).fetchone():
        raise NotFound(f"no item with id {item_id}")
    return [a for (a,) in cur.execute("SELECT answer_id FROM answers WHERE item_id = ? ORDER BY position", [item_id])
            .fetchall()]


def _check_user(cur: Cursor, user_id: int) -> None:
    if not cur.execute("SELECT 1 FROM users WHERE user_id = ?", [user_id]).fetchone():
        raise NotFound(f"no user with id {user_id}")


def _check_room(cur: Cursor, item_id: int, overlap: int | None) -> None:
    """Conflict when `overlap` annotators are already done with the item (None: no bound, for scripts and tests that
    write labels directly). Called inside the write transaction, so two racers for the last slot cannot both pass."""
    if overlap is None:
        return
    done = annotators_done(cur, item_id)
    if done >= overlap:
        raise Conflict(f"item {item_id} already has its {done} annotator(s) (overlap {overlap}); "
                       "fetch your next item with GET /api/items/next")


def _check_not_done(cur: Cursor, item_id: int, user_id: int) -> None:
    if cur.execute("SELECT 1 FROM rankings WHERE item_id = ? AND user_id = ?", [item_id, user_id]).fetchone():
        raise Conflict(f"item {item_id} is already ranked by you")
    if cur.execute("SELECT 1 FROM skips WHERE item_id = ? AND user_id = ?", [item_id, user_id]).fetchone():
        raise Conflict(f"item {item_id} is already skipped by you")


def _insert_skip(cur: Cursor, item_id: int, user_id: int, reason: str | None, overlap: int | None) -> int:
    _check_not_done(cur, item_id, user_id)
    _check_room(cur, item_id, overlap)
    (skip_id,) = cur.execute(
        "INSERT INTO skips (item_id, user_id, reason) VALUES (?, ?, ?) RETURNING skip_id", [item_id, user_id, reason]
    ).fetchone()
    return skip_id


def _check_feedback_value(answer_id: int, value: object) -> None:
    if value not in FEEDBACK_VALUES:
        raise LabelError(f"feedback on answer {answer_id} must be 'up' or 'down', got {value!r}")


def _check_ranking(item_id: int, answer_ids: list[int], ranking: object) -> list[list[int]]:
    """The ranking as tiers, best first: `ranking` lists answer ids best first, and a list of ids in place of one id
    marks those answers as equally good ([[12, 13], 11, 14]: 12 and 13 tie for best). Every answer exactly once."""
    if not isinstance(ranking, (list, tuple)):
        raise LabelError("ranking must be a list of answer ids (ints), best first; a list of ids in it marks a tie")
    tiers = []
    for place, entry in enumerate(ranking):
        tier = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if not tier or not all(is_int(a) for a in tier):
            raise LabelError(f"ranking entry {place} must be an answer id (int) or a non-empty list of answer ids "
                             f"(a tie), got {entry!r}")
        tiers.append(tier)
    flat = [answer_id for tier in tiers for answer_id in tier]
    if len(flat) != len(answer_ids):
        raise LabelError(f"ranking has {len(flat)} answer ids, item {item_id} has {len(answer_ids)}")
    seen = set()
    for answer_id in flat:
        if answer_id in seen:
            raise LabelError(f"answer {answer_id} appears twice in the ranking")
        seen.add(answer_id)
    for answer_id in flat:
        if answer_id not in answer_ids:
            raise LabelError(f"answer {answer_id} is not an answer of item {item_id}")
    return tiers


class Labels:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add_ranking(
        self,
        item_id: int,
        user_id: int,
        ranking: list[int | list[int]],
        seconds: float | None = None,
        feedback: dict[int, str] | None = None,
        overlap: int | None = None,
    ) -> int:
        """Store `user_id`'s ranking of item `item_id` (answer ids, best first; a list of ids marks a tie, see
        _check_ranking) and optional thumbs
        {answer_id: "up"|"down"} in one transaction; returns the ranking id. Conflict if the user already ranked or
        skipped the item, or if `overlap` annotators are done with it."""
        if seconds is not None and not (is_number(seconds) and seconds >= 0):
            raise LabelError(f"seconds must be a number >= 0, got {seconds!r}")
        feedback = {} if feedback is None else feedback
        if not isinstance(feedback, dict):
            raise LabelError(f"feedback must be a dict {{answer_id: 'up' | 'down'}}, got {type(feedback).__name__}")
        with self.db.write() as cur:
            answer_ids = _item_answers(cur, item_id)
            _check_user(cur, user_id)
            tiers = _check_ranking(item_id, answer_ids, ranking)
            for answer_id, value in feedback.items():
                if not is_int(answer_id) or answer_id not in answer_ids:
                    raise LabelError(f"feedback names answer {answer_id!r}, which is not an answer of item {item_id}")
                _check_feedback_value(answer_id, value)
            _check_not_done(cur, item_id, user_id)
            _check_room(cur, item_id, overlap)
            for answer_id in feedback:
                if cur.execute(
                    "SELECT 1 FROM feedback WHERE answer_id = ? AND user_id = ?", [answer_id, user_id]
                ).fetchone():
                    raise Conflict(f"answer {answer_id} already has your feedback")
            (ranking_id,) = cur.execute(
                "INSERT INTO ranking_events (item_id, user_id, seconds) VALUES (?, ?, ?) RETURNING ranking_id",
                [item_id, user_id, seconds],
            ).fetchone()
            # Multi-row VALUES rather than executemany, which runs one statement per row.
            placed = [(tier, answer_id) for tier, ids in enumerate(tiers) for answer_id in ids]
            cur.execute(
                "INSERT INTO ranking_answers (ranking_id, rank, answer_id, tier) VALUES "
                + ", ".join(["(?, ?, ?, ?)"] * len(placed)),
                [x for rank, (tier, answer_id) in enumerate(placed) for x in (ranking_id, rank, answer_id, tier)],
            )
            if feedback:
                cur.execute(
                    "INSERT INTO feedback_events (answer_id, item_id, user_id, value, ranking_id) VALUES "
                    + ", ".join(["(?, ?, ?, ?, ?)"] * len(feedback)),
                    [x for a, v in feedback.items() for x in (a, item_id, user_id, v, ranking_id)],
                )
        return ranking_id

    def add_feedback(self, answer_id: int, user_id: int, value: str, overlap: int | None = None) -> int:
        """Store a thumbs up/down on one answer; returns the feedback id. With `overlap`, Conflict when that many
        annotators are done with the answer's item and the user is not one of them."""
        _check_feedback_value(answer_id, value)
        with self.db.write() as cur:
            row = cur.execute("SELECT item_id FROM answers WHERE answer_id = ?", [answer_id]).fetchone()
            if row is None:
                raise NotFound(f"no answer with id {answer_id}")
            _check_user(cur, user_id)
            given = cur.execute("SELECT 1 FROM feedback WHERE answer_id = ? AND user_id = ?", [answer_id, user_id])
            if given.fetchone():
                raise Conflict(f"answer {answer_id} already has your feedback")
            if not is_done_by(cur, row[0], user_id):
                _check_room(cur, row[0], overlap)
            (feedback_id,) = cur.execute(
                "INSERT INTO feedback_events (answer_id, item_id, user_id, value) VALUES (?, ?, ?, ?) "
                "RETURNING feedback_id",
                [answer_id, row[0], user_id, value],
            ).fetchone()
        return feedback_id

    def add_skip(self, item_id: int, user_id: int, reason: str | None = None, overlap: int | None = None) -> int:
        """Record that `user_id` is done with an item without ranking it; returns the skip id. Conflict if the user
        already ranked or skipped it, or if `overlap` annotators are done with it."""
        if reason is not None and not isinstance(reason, str):
            raise LabelError(f"skip reason must be a string, got {type(reason).__name__}")
        _check_reason_length("skip", reason)
        with self.db.write() as cur:
            _item_answers(cur, item_id)
            _check_user(cur, user_id)
            return _insert_skip(cur, item_id, user_id, reason, overlap)

    def add_flag(self, item_id: int, user_id: int, reason: str, skip: bool = False, overlap: int | None = None) -> int:
        """Flag an item for an admin (harmful, broken ...), once per item and user; returns the flag id. A flag alone
        does not take the item out of the user's queue: `skip=True` also skips it, in the same transaction (the
        Annotate tab's Flag button), under add_skip's checks and `overlap`."""
        if not isinstance(reason, str) or not reason.strip():
            raise LabelError("a flag needs a reason")
        _check_reason_length("flag", reason)
        with self.db.write() as cur:
            _item_answers(cur, item_id)
            _check_user(cur, user_id)
            if cur.execute("SELECT 1 FROM flags WHERE item_id = ? AND user_id = ?", [item_id, user_id]).fetchone():
                raise Conflict(f"you already flagged item {item_id}")
            if skip:
                _insert_skip(cur, item_id, user_id, "flagged", overlap)
            (flag_id,) = cur.execute(
                "INSERT INTO flags (item_id, user_id, reason) VALUES (?, ?, ?) RETURNING flag_id",
                [item_id, user_id, reason.strip()],
            ).fetchone()
        return flag_id

    def retract_ranking(self, ranking_id: int, user_id: int, within_seconds: float) -> Retraction:
        """Take back `user_id`'s own ranking `ranking_id` (and the thumbs given with it), at most `within_seconds`
        after it was stored: a new retraction row, nothing deleted (see migration m012). From then on the ranking is
        in no view, export or snapshot, and the annotator may rank the item again. NotFound for a ranking that is
        not theirs (as for one that does not exist: ids of others' labels are not revealed), Conflict when it is
        already retracted or the window has passed."""
        with self.db.write() as cur:
            row = cur.execute(
                "SELECT item_id, epoch(current_timestamp) - epoch(created_at) FROM ranking_events "
                "WHERE ranking_id = ? AND user_id = ?", [ranking_id, user_id]).fetchone()
            if row is None:
                raise NotFound(f"you have no ranking with id {ranking_id}")
            item_id, age = row
            if cur.execute("SELECT 1 FROM retractions WHERE ranking_id = ?", [ranking_id]).fetchone():
                raise Conflict(f"ranking {ranking_id} is already retracted")
            if age > within_seconds:
                raise Conflict(f"ranking {ranking_id} was stored {age:.0f} s ago; it can be retracted only within "
                               f"{within_seconds:.0f} s")
            (retraction_id,) = cur.execute(
                "INSERT INTO retractions (ranking_id, user_id) VALUES (?, ?) RETURNING retraction_id",
                [ranking_id, user_id]).fetchone()
        return Retraction(retraction_id, ranking_id, item_id)

    def given(self, ranking_id: int) -> tuple[list[list[int]], dict[int, str]]:
        """What ranking `ranking_id` said, retracted or not: its tiers of answer ids best first (tied answers share
        a tier), and the thumbs given with it (Undo shows them again so the annotator changes only what they meant
        to)."""
        cur = self.db.cursor()
        rows = cur.execute("SELECT tier, answer_id FROM ranking_answers WHERE ranking_id = ? ORDER BY rank",
                           [ranking_id]).fetchall()
        tiers = [[answer_id for _, answer_id in tie] for _, tie in itertools.groupby(rows, key=lambda row: row[0])]
        thumbs = dict(cur.execute("SELECT answer_id, value FROM feedback_events WHERE ranking_id = ?",
                                  [ranking_id]).fetchall())
        return tiers, thumbs

    def counts(self, since: datetime | None = None, user_id: int | None = None) -> LabelCounts:
        """Labels stored since `since` (naive = UTC; None = ever), by `user_id` (None = anyone)."""
        where = "WHERE ($since IS NULL OR created_at >= $since) AND ($user_id IS NULL OR user_id = $user_id)"
        row = self.db.cursor().execute(
            f"""SELECT (SELECT count(*) FROM rankings {where}), (SELECT count(*) FROM feedback {where}),
                       (SELECT count(*) FROM skips {where}), (SELECT count(*) FROM flags {where})""",
            {"since": None if since is None else as_aware(since), "user_id": user_id},
        ).fetchone()
        return LabelCounts(*row)

    def total(self, since: datetime | None = None, user_id: int | None = None) -> int:
        """Rankings + feedback (see `counts`)."""
        return self.counts(since, user_id).total()


def _check_reason_length(kind: str, reason: str | None) -> None:
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        raise LabelError(f"the {kind} reason is {len(reason)} characters, the limit is {MAX_REASON_CHARS}")
