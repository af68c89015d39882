"""Read-only figures about the labels for the Admin tab: counts by kind, per-annotator throughput, agreement between
annotators who ranked the same item, and flagged items to review. Nothing here writes.

Agreement compares every two rankings of the same item by different annotators, over the answer pairs both ranked:
a pair is judged alike when both put the same answer first or both marked the two as tied; concordant when both
ordered it the same way (not tied), discordant when they ordered it opposite ways. Per comparison of two rankings,

    pairwise agreement = judged alike / pairs                 (1 = identical, 0 = reversed)
    Kendall's tau      = (concordant - discordant) / pairs    (tau-a: a pair one of them tied counts as neither)

and the figures shown are means over comparisons. Without ties tau = 2 * agreement - 1 per comparison; both are
shown because people read one or the other (tau is what the inter-annotator literature reports).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from storage.labels import LabelCounts

if TYPE_CHECKING:
    import pandas as pd

    from storage.store import Store

# One row per (item, annotator a, annotator b) both ranked: the answer pairs compared, how many they judged alike (the
# same answer better, or both a tie), and how many they ordered strictly alike and strictly opposite (Kendall's
# tau-a counts a pair tied by one of them as neither).
_COMPARISONS = """
    WITH shared AS (SELECT item_id FROM rankings GROUP BY item_id HAVING count(*) > 1),
    ranked AS (
        SELECT r.item_id, r.user_id, x.answer_id, x.tier
        FROM rankings r JOIN ranking_answers x USING (ranking_id) JOIN shared USING (item_id)
    )
    SELECT a1.item_id, a1.user_id AS user_a, b1.user_id AS user_b, count(*) AS pairs,
           count(*) FILTER (WHERE sign(a1.tier - a2.tier) = sign(b1.tier - b2.tier)) AS alike,
           count(*) FILTER (WHERE sign(a1.tier - a2.tier) * sign(b1.tier - b2.tier) > 0) AS concordant,
           count(*) FILTER (WHERE sign(a1.tier - a2.tier) * sign(b1.tier - b2.tier) < 0) AS discordant
    FROM ranked a1
    JOIN ranked a2 ON a2.item_id = a1.item_id AND a2.user_id = a1.user_id AND a2.answer_id > a1.answer_id
    JOIN ranked b1 ON b1.item_id = a1.item_id AND b1.answer_id = a1.answer_id AND b1.user_id > a1.user_id
    JOIN ranked b2 ON b2.item_id = a1.item_id AND b2.user_id = b1.user_id AND b2.answer_id = a2.answer_id
    GROUP BY a1.item_id, a1.user_id, b1.user_id
"""


@dataclass(frozen=True)
class CountsByKind:
    today: LabelCounts  # since midnight UTC
    total: LabelCounts


@dataclass(frozen=True)
class Agreement:
    items: int  # items ranked by more than one annotator
    comparisons: int  # pairs of rankings of the same item by two annotators
    pairwise_agreement: float | None  # mean fraction of answer pairs ordered alike; None without comparisons
    kendall_tau: float | None  # mean Kendall's tau-a


def midnight_utc(now: datetime | None = None) -> datetime:
    now = datetime.now(UTC) if now is None else now.astimezone(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def counts_by_kind(store: Store, now: datetime | None = None) -> CountsByKind:
    """Rankings, thumbs, skips and flags stored today (UTC) and ever."""
    return CountsByKind(store.labels.counts(since=midnight_utc(now)), store.labels.counts())


def annotator_stats(store: Store, now: datetime | None = None) -> pd.DataFrame:
    """One row per user: annotator, role, disabled, rankings, rankings_today, thumbs, skips, flags,
    median_seconds (per ranking, over rankings whose time was measured; NaN if none), no_preference (rankings with
    every answer tied: honest for answers that are alike, but one annotator with far more than the others may be
    pressing "All equally good" to get through items)."""
    import pandas as pd

    rows = store.db.cursor().execute(
        """WITH r AS (SELECT user_id, count(*) AS n, count(*) FILTER (WHERE created_at >= $today) AS today,
                             median(seconds) AS median_seconds,
                             count(*) FILTER (WHERE ranking_id IN (SELECT ranking_id FROM ranking_answers
                                                                   GROUP BY ranking_id HAVING max(tier) = 0))
                               AS alike
                      FROM rankings GROUP BY user_id),
                f AS (SELECT user_id, count(*) AS n FROM feedback GROUP BY user_id),
                s AS (SELECT user_id, count(*) AS n FROM skips GROUP BY user_id),
                g AS (SELECT user_id, count(*) AS n FROM flags GROUP BY user_id)
           SELECT u.name, u.role, u.disabled, coalesce(r.n, 0), coalesce(r.today, 0), coalesce(f.n, 0),
                  coalesce(s.n, 0), coalesce(g.n, 0), r.median_seconds, coalesce(r.alike, 0)
           FROM users u LEFT JOIN r USING (user_id) LEFT JOIN f USING (user_id) LEFT JOIN s USING (user_id)
                LEFT JOIN g USING (user_id)
           ORDER BY coalesce(r.n, 0) DESC, u.name""",
        {"today": midnight_utc(now)},
    ).fetchall()
    columns = ["annotator", "role", "disabled", "rankings", "rankings_today", "thumbs", "skips", "flags",
               "median_seconds", "no_preference"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({"rankings": "int64", "rankings_today": "int64", "thumbs": "int64", "skips": "int64",
                         "flags": "int64", "median_seconds": "float64", "no_preference": "int64"})


def _comparisons(store: Store) -> list[tuple[int, int, int, float, float]]:
    """(item_id, user_a, user_b, agreement, kendall_tau) for every two rankings of one item: agreement is the share
    of answer pairs they judged alike, tau-a is (concordant - discordant) / pairs."""
    rows = store.db.cursor().execute(_COMPARISONS).fetchall()
    return [(item, a, b, alike / pairs, (concordant - discordant) / pairs)
            for item, a, b, pairs, alike, concordant, discordant in rows]


def agreement(store: Store) -> Agreement:
    """Agreement over every item ranked by more than one annotator (see the module docstring)."""
    rows = _comparisons(store)
    if not rows:
        return Agreement(0, 0, None, None)
    agree = [alike for _, _, _, alike, _ in rows]
    tau = [tau for _, _, _, _, tau in rows]
    return Agreement(len({row[0] for row in rows}), len(rows), sum(agree) / len(agree), sum(tau) / len(tau))


def agreement_by_annotator(store: Store) -> pd.DataFrame:
    """Per annotator: shared_items (their rankings compared with someone else's), agreement and kendall_tau
    (means over those comparisons). An annotator far below the others is worth a look (or the guidelines are)."""
    import pandas as pd

    names = {user.user_id: user.name for user in store.users.list()}
    per_user: dict[int, list[tuple[float, float]]] = {}
    for _, user_a, user_b, alike, tau in _comparisons(store):
        scores = (alike, tau)
        per_user.setdefault(user_a, []).append(scores)
        per_user.setdefault(user_b, []).append(scores)
    rows = [(names.get(user_id, f"user {user_id}"), len(scores), sum(s[0] for s in scores) / len(scores),
             sum(s[1] for s in scores) / len(scores)) for user_id, scores in per_user.items()]
    frame = pd.DataFrame(sorted(rows), columns=["annotator", "shared_items", "agreement", "kendall_tau"])
    return frame.astype({"shared_items": "int64", "agreement": "float64", "kendall_tau": "float64"})


def flagged_items(store: Store, limit: int = 200) -> pd.DataFrame:
    """The newest flags first: flag_id, item_id, annotator, reason, prompt, policy_version, flagged_at."""
    import pandas as pd

    rows = store.db.cursor().execute(
        """SELECT f.flag_id, f.item_id, u.name, f.reason, p.text, i.policy_version, f.created_at
           FROM flags f JOIN users u USING (user_id) JOIN items i USING (item_id) JOIN prompts p USING (prompt_id)
           ORDER BY f.flag_id DESC LIMIT ?""",
        [limit],
    ).fetchall()
    columns = ["flag_id", "item_id", "annotator", "reason", "prompt", "policy_version", "flagged_at"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({"flag_id": "int64", "item_id": "int64", "policy_version": "int64",
                         "flagged_at": "datetime64[us, UTC]"})
