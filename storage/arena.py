"""Arena votes: the Demo's blind comparisons of two versions (A / B / tie / both bad), append-only.

A vote keeps everything needed to read it later without the app: who voted, the prompt, both answers and the version
behind each side. Tallies are per unordered version pair, the lower version first, whichever side each one was on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from storage._common import is_int
from storage.db import Database
from storage.errors import InvalidValue, NotFound
from storage.prompts import MAX_PROMPT_CHARS

VOTES = ("a", "b", "tie", "both_bad")
MAX_ANSWER_CHARS = 100_000  # a demo answer is at most a few hundred tokens; this only stops abuse of the column


@dataclass(frozen=True)
class ArenaVote:
    vote_id: int
    user_id: int
    user: str
    prompt: str
    version_a: int
    version_b: int
    answer_a: str
    answer_b: str
    seed: int | None
    vote: str
    created_at: datetime


@dataclass(frozen=True)
class PairTally:
    """Votes on one pair of versions, `low` < `high` (a version against itself has low == high)."""

    low: int
    high: int
    high_wins: int
    low_wins: int
    ties: int
    both_bad: int

    @property
    def votes(self) -> int:
        return self.high_wins + self.low_wins + self.ties + self.both_bad


def _check(user_id: object, prompt: object, versions: tuple[object, object], answers: tuple[object, object],
           vote: object) -> None:
    if vote not in VOTES:
        raise InvalidValue(f"vote must be one of {', '.join(VOTES)}, got {vote!r}")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidValue(f"the prompt must be 1..{MAX_PROMPT_CHARS} characters")
    if not all(is_int(v) and v >= 0 for v in versions):
        raise InvalidValue(f"versions must be ints >= 0, got {versions!r}")
    if not all(isinstance(a, str) and len(a) <= MAX_ANSWER_CHARS for a in answers):
        raise InvalidValue(f"answers must be strings of at most {MAX_ANSWER_CHARS} characters")
    if not is_int(user_id):
        raise InvalidValue(f"user_id must be an int, got {user_id!r}")


class ArenaVotes:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, user_id: int, prompt: str, versions: tuple[int, int], answers: tuple[str, str], vote: str,
            seed: int | None = None) -> int:
        """Store one vote; `versions` and `answers` are (side A, side B). Returns the vote id."""
        _check(user_id, prompt, versions, answers, vote)
        with self.db.write() as cur:
            if not cur.execute("SELECT 1 FROM users WHERE user_id = ?", [user_id]).fetchone():
                raise NotFound(f"no user with id {user_id}")
            (vote_id,) = cur.execute(
                "INSERT INTO arena_votes (user_id, prompt, version_a, version_b, answer_a, answer_b, seed, vote) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING vote_id",
                [user_id, prompt, *versions, *answers, seed, vote]).fetchone()
        return vote_id

    def recent(self, limit: int = 50) -> list[ArenaVote]:
        """The newest votes first."""
        rows = self.db.cursor().execute(
            """SELECT v.vote_id, v.user_id, u.name, v.prompt, v.version_a, v.version_b, v.answer_a, v.answer_b,
                      v.seed, v.vote, v.created_at
               FROM arena_votes v JOIN users u USING (user_id) ORDER BY v.vote_id DESC LIMIT ?""", [limit]).fetchall()
        return [ArenaVote(*row) for row in rows]

    def tallies(self) -> list[PairTally]:
        """Per unordered version pair: wins of each, ties and both-bad votes, the pair with most votes first."""
        rows = self.db.cursor().execute("""
            WITH v AS (
                SELECT least(version_a, version_b) AS low, greatest(version_a, version_b) AS high,
                       CASE WHEN vote = 'a' THEN version_a WHEN vote = 'b' THEN version_b END AS winner,
                       vote, version_a = version_b AS same
                FROM arena_votes)
            SELECT low, high,
                   count(*) FILTER (WHERE winner IS NOT NULL AND (winner = high AND NOT same)),
                   count(*) FILTER (WHERE winner IS NOT NULL AND (winner = low OR same)),
                   count(*) FILTER (WHERE vote = 'tie'), count(*) FILTER (WHERE vote = 'both_bad')
            FROM v GROUP BY low, high ORDER BY count(*) DESC, high DESC, low""").fetchall()
        return [PairTally(*row) for row in rows]
