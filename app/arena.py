"""The arena's standings: how the Demo's blind votes (storage/arena.py) came out for each pair of versions.

Shared by GET /api/arena and the Admin UI's Arena section (neither imports the other). Per pair, the newer version's
win-rate counts a tie or a both-bad vote as half a win for each side (as Chatbot Arena scores ties), with n = all
votes on the pair and a Wilson 95% interval that treats the votes as independent (a voter who votes often weighs
more than one who votes once).
"""

from __future__ import annotations

from learner.stats import wilson_interval
from storage.store import Store


def standings(store: Store) -> list[dict]:
    """One row per pair of versions that met in the arena, the pair with most votes first."""
    rows = []
    for t in store.arena.tallies():
        score = t.high_wins + 0.5 * (t.ties + t.both_bad)
        low, high = wilson_interval(score, t.votes)
        rows.append({
            "older": t.low, "newer": t.high, "votes": t.votes, "newer_wins": t.high_wins, "older_wins": t.low_wins,
            "ties": t.ties, "both_bad": t.both_bad,
            "newer_win_rate": score / t.votes if t.votes else None, "ci95": [low, high], "n": t.votes,
        })
    return rows
