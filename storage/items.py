"""Items: a prompt and the K answers one policy version sampled for it, waiting for annotators."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from storage._common import is_int, is_number, to_json, utc
from storage.db import Cursor, Database
from storage.errors import InvalidValue, NotFound


@dataclass(frozen=True)
class AnswerRecord:
    """One sampled answer, as the policy service hands it in."""

    text: str
    token_count: int
    finish_reason: str  # "eos" | "length"
    logprob_sum: float  # sum of the answer's token log-probs under the generating policy
    policy_version: int | None = None  # the version that generated it (a canary item mixes two); None = the item's


@dataclass(frozen=True)
class Answer:
    answer_id: int
    item_id: int
    position: int  # order of generation (0-based); the UI shows answers shuffled
    text: str
    token_count: int
    finish_reason: str
    logprob_sum: float
    policy_version: int  # the version that generated this answer (canary items mix the candidate and the serving one)


@dataclass(frozen=True)
class Item:
    item_id: int
    prompt_id: int
    prompt: str
    policy_version: int
    sampling_params: dict
    created_at: datetime
    answers: tuple[Answer, ...]


_ANSWER_COLUMNS = "answer_id, item_id, position, text, token_count, finish_reason, logprob_sum, policy_version"

# (item, annotator) pairs where the annotator is done with the item: ranked it or skipped it. UNION removes the
# duplicate when one did both, so count(*) per item counts distinct annotators.
_DONE = "SELECT item_id, user_id FROM rankings UNION SELECT item_id, user_id FROM skips"
# `waiting`'s order key for items with an answer by one of the versions in $first (a canary's), put before the rest
_FIRST = ("EXISTS (SELECT 1 FROM answers a WHERE a.item_id = i.item_id "
          "AND list_contains($first::INTEGER[], a.policy_version)) DESC,")


def annotators_done(cur: Cursor, item_id: int) -> int:
    """How many distinct annotators are done with (ranked or skipped) item `item_id`: what `overlap` bounds. Read
    through `cur`, so a writer counts inside its own transaction."""
    return cur.execute(f"SELECT count(*) FROM ({_DONE}) WHERE item_id = ?", [item_id]).fetchone()[0]


def is_done_by(cur: Cursor, item_id: int, user_id: int) -> bool:
    """Whether `user_id` ranked or skipped item `item_id`."""
    return cur.execute(f"SELECT count(*) FROM ({_DONE}) WHERE item_id = ? AND user_id = ?",
                       [item_id, user_id]).fetchone()[0] > 0


def _check_answer(index: int, answer: AnswerRecord) -> None:
    if not isinstance(answer, AnswerRecord):
        raise InvalidValue(f"answer {index}: expected an AnswerRecord, got {type(answer).__name__}")
    if not isinstance(answer.text, str) or "\0" in answer.text:
        raise InvalidValue(f"answer {index}: text must be a string without NUL characters")
    if not is_int(answer.token_count) or answer.token_count < 0:
        raise InvalidValue(f"answer {index}: token_count must be an int >= 0, got {answer.token_count!r}")
    if not isinstance(answer.finish_reason, str) or not answer.finish_reason:
        raise InvalidValue(f"answer {index}: finish_reason must be a non-empty string, got {answer.finish_reason!r}")
    # -inf is a legitimate log-prob sum (a token of probability 0 under top-k/top-p); NaN never is.
    if not (is_number(answer.logprob_sum) or answer.logprob_sum == -math.inf):
        raise InvalidValue(f"answer {index}: logprob_sum must be a number, got {answer.logprob_sum!r}")
    if answer.policy_version is not None and not (is_int(answer.policy_version) and answer.policy_version >= 0):
        raise InvalidValue(f"answer {index}: policy_version must be an int >= 0, got {answer.policy_version!r}")


def read_item(cur: Cursor, item_id: int) -> Item:
    """Item `item_id` read through `cur` (so a writer sees its own uncommitted rows); NotFound if there is none."""
    row = cur.execute(
        """SELECT i.item_id, i.prompt_id, p.text, i.policy_version, i.sampling_params, i.created_at
           FROM items i JOIN prompts p USING (prompt_id) WHERE i.item_id = ?""",
        [item_id],
    ).fetchone()
    if row is None:
        raise NotFound(f"no item with id {item_id}")
    answers = cur.execute(
        f"SELECT {_ANSWER_COLUMNS} FROM answers WHERE item_id = ? ORDER BY position", [item_id]
    ).fetchall()
    return Item(
        item_id=row[0],
        prompt_id=row[1],
        prompt=row[2],
        policy_version=row[3],
        sampling_params=json.loads(row[4]),
        created_at=utc(row[5]),
        answers=tuple(Answer(*a) for a in answers),
    )


class Items:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, prompt_id: int, policy_version: int, sampling_params: dict, answers: list[AnswerRecord]) -> Item:
        """Store an item and its answers in one transaction."""
        if not is_int(policy_version) or policy_version < 0:
            raise InvalidValue(f"policy_version must be an int >= 0, got {policy_version!r}")
        params_json = to_json(sampling_params, "sampling_params")
        if not answers:
            raise InvalidValue("an item needs at least one answer")
        for index, answer in enumerate(answers):
            _check_answer(index, answer)
        with self.db.write() as cur:
            if not cur.execute("SELECT 1 FROM prompts WHERE prompt_id = ?", [prompt_id]).fetchone():
                raise NotFound(f"no prompt with id {prompt_id}")
            (item_id,) = cur.execute(
                "INSERT INTO items (prompt_id, policy_version, sampling_params) VALUES (?, ?, ?) RETURNING item_id",
                [prompt_id, policy_version, params_json],
            ).fetchone()
            # One multi-row INSERT: K is small, and executemany would run K statements.
            values = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(answers))
            columns = "item_id, position, text, token_count, finish_reason, logprob_sum, policy_version"
            params: list = []
            for position, a in enumerate(answers):
                version = policy_version if a.policy_version is None else a.policy_version
                params += [item_id, position, a.text, a.token_count, a.finish_reason, float(a.logprob_sum), version]
            cur.execute(
                f"INSERT INTO answers ({columns}) VALUES {values}",
                params,
            )
            return read_item(cur, item_id)

    def get(self, item_id: int) -> Item:
        return read_item(self.db.cursor(), item_id)

    def answer(self, answer_id: int) -> Answer:
        cur = self.db.cursor()
        row = cur.execute(f"SELECT {_ANSWER_COLUMNS} FROM answers WHERE answer_id = ?", [answer_id]).fetchone()
        if row is None:
            raise NotFound(f"no answer with id {answer_id}")
        return Answer(*row)

    def count(self) -> int:
        return self.db.cursor().execute("SELECT count(*) FROM items").fetchone()[0]

    def annotators_done(self, item_id: int) -> int:
        """Distinct annotators who ranked or skipped item `item_id` (see the module function)."""
        return annotators_done(self.db.cursor(), item_id)

    def is_done_by(self, item_id: int, user_id: int) -> bool:
        """Whether `user_id` ranked or skipped item `item_id`; NotFound if there is no such item."""
        cur = self.db.cursor()
        if not cur.execute("SELECT 1 FROM items WHERE item_id = ?", [item_id]).fetchone():
            raise NotFound(f"no item with id {item_id}")
        return is_done_by(cur, item_id, user_id)

    def waiting(
        self, user_id: int, versions: Iterable[int], overlap: int, exclude: Iterable[int] = frozenset(),
        limit: int = 20, only: Iterable[int] | None = None, first: Sequence[int] = (),
    ) -> list[int]:
        """Ids of items `user_id` may label next, oldest first (those with an answer by a version in `first` before
        all others: the canary's items while it is judged): sampled by one of `versions` (the ones still served),
        done (ranked or skipped) by fewer than `overlap` annotators, never by `user_id`, not in `exclude`, in
        `only` if given, and of a prompt still in the pool (an admin may remove prompts)."""
        rows = self.db.cursor().execute(
            f"""WITH done AS ({_DONE}),
                per_item AS (SELECT item_id, count(*) AS n, bool_or(user_id = $user_id) AS mine
                             FROM done GROUP BY item_id)
                SELECT i.item_id FROM items i LEFT JOIN per_item d USING (item_id) JOIN prompts p USING (prompt_id)
                WHERE list_contains($versions::INTEGER[], i.policy_version) AND NOT p.removed
                  AND coalesce(d.n, 0) < $overlap
                  AND NOT coalesce(d.mine, false)
                  AND NOT list_contains($exclude::BIGINT[], i.item_id)
                  AND ($only::BIGINT[] IS NULL OR list_contains($only::BIGINT[], i.item_id))
                ORDER BY {_FIRST if first else ""} i.created_at, i.item_id
                LIMIT $limit""",
            {
                "user_id": user_id,
                "versions": sorted(versions),
                "overlap": overlap,
                "exclude": sorted(exclude),
                "only": None if only is None else sorted(only),
                **({"first": sorted(first)} if first else {}),
                "limit": limit,
            },
        ).fetchall()
        return [item_id for (item_id,) in rows]

    def count_waiting(self, versions: Iterable[int], overlap: int) -> int:
        """How many items still need labels from anyone: sampled by one of `versions`, done by < `overlap` people."""
        return self.db.cursor().execute(
            f"""WITH done AS ({_DONE}), per_item AS (SELECT item_id, count(*) AS n FROM done GROUP BY item_id)
                SELECT count(*) FROM items i LEFT JOIN per_item d USING (item_id) JOIN prompts p USING (prompt_id)
                WHERE list_contains(?::INTEGER[], i.policy_version) AND coalesce(d.n, 0) < ? AND NOT p.removed""",
            [sorted(versions), overlap],
        ).fetchone()[0]

    def stale(self, min_version: int) -> list[int]:
        """Ids of items nobody has touched (no ranking, skip or feedback) sampled by a version older than
        `min_version`: the prefetch buffer regenerates them after a hot swap."""
        rows = self.db.cursor().execute(
            """SELECT i.item_id FROM items i
               WHERE i.policy_version < ?
                 AND NOT EXISTS (SELECT 1 FROM rankings r WHERE r.item_id = i.item_id)
                 AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.item_id = i.item_id)
                 AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.item_id = i.item_id)
               ORDER BY i.item_id""",
            [min_version],
        ).fetchall()
        return [item_id for (item_id,) in rows]
