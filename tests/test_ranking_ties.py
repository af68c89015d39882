"""Ties in rankings (migration m016): answers marked equally good yield no pair, a ranking of all-alike answers says
"no preference", and every reader of rankings (pairs, exports, Undo, agreement, the canary) counts a tie as one.
Real DuckDB files; the canary through the real server is in test_deployments.py."""

from __future__ import annotations

import json

import duckdb
import pytest

from storage import analytics
from storage.db import Database
from storage.errors import LabelError
from storage.exports import iter_export
from storage.items import AnswerRecord
from storage.migrations import MIGRATIONS
from storage.store import Store
from storage.versions import _COMPARISONS

LABEL_TABLES = ("ranking_events", "ranking_answers", "feedback_events")


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path) as store:
        yield store


def make_item(store, prompt="Name three rivers.", k=4, versions=None):
    prompt_id = store.prompts.add([prompt]).prompt_ids[0]
    answers = [AnswerRecord(f"answer {i}", 5, "eos", -1.0, None if versions is None else versions[i])
               for i in range(k)]
    item = store.items.add(prompt_id, 0, {"k": k}, answers)
    return item, [a.answer_id for a in item.answers]


def pairs(store, ranking_id=None):
    return store.db.cursor().execute(
        "SELECT chosen_answer_id, rejected_answer_id FROM pairs WHERE $r IS NULL OR ranking_id = $r "
        "ORDER BY chosen_rank, rejected_rank", {"r": ranking_id}).fetchall()


def label_rows(store):
    cur = store.db.cursor()
    return {table: cur.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in LABEL_TABLES}


def test_tied_answers_give_no_pair_between_them(store):
    user, _, _ = store.users.add("alice", "annotator")
    _, a = make_item(store)
    ranking_id = store.labels.add_ranking(_.item_id, user.user_id, [[a[2], a[0]], a[3], a[1]])
    # 6 pairs without the tie, 5 with it: both tied answers beat the two below, and a3 beats a1.
    assert pairs(store, ranking_id) == [(a[2], a[3]), (a[2], a[1]), (a[0], a[3]), (a[0], a[1]), (a[3], a[1])]
    assert store.labels.given(ranking_id) == ([[a[2], a[0]], [a[3]], [a[1]]], {})
    tiers = store.db.cursor().execute(
        "SELECT answer_id, rank, tier FROM ranking_answers WHERE ranking_id = ? ORDER BY rank", [ranking_id]).fetchall()
    assert tiers == [(a[2], 0, 0), (a[0], 1, 0), (a[3], 2, 1), (a[1], 3, 2)]


def test_no_preference_is_a_ranking_with_no_pairs(store):
    user, _, _ = store.users.add("alice", "annotator")
    item, a = make_item(store)
    ranking_id = store.labels.add_ranking(item.item_id, user.user_id, [a])  # one tier: all equally good
    assert pairs(store) == []
    assert store.labels.counts().rankings == 1  # a label: the annotator is done with the item
    assert store.items.is_done_by(item.item_id, user.user_id)
    assert store.labels.given(ranking_id) == ([a], {})
    (record,) = iter_export(store, "rankings")
    assert record["answer_ids"] == a and record["tiers"] == [0, 0, 0, 0]
    assert list(iter_export(store, "dpo")) == []


def test_a_flat_ranking_is_unchanged_and_exports_its_tiers(store):
    user, _, _ = store.users.add("alice", "annotator")
    item, a = make_item(store)
    store.labels.add_ranking(item.item_id, user.user_id, [a[1], a[0], a[3], a[2]])
    assert len(pairs(store)) == 6
    (record,) = iter_export(store, "rankings")
    assert record["answer_ids"] == [a[1], a[0], a[3], a[2]] and record["tiers"] == [0, 1, 2, 3]
    assert len(list(iter_export(store, "dpo"))) == 6


def test_malformed_ties_are_refused_and_write_nothing(store):
    user, _, _ = store.users.add("alice", "annotator")
    item, a = make_item(store)
    i = item.item_id
    before = label_rows(store)
    cases = [
        ([[a[0], a[1]], [], a[2], a[3]], "ranking entry 1 must be an answer id (int) or a non-empty list"),
        ([[a[0], [a[1]]], a[2], a[3]], "ranking entry 0 must be an answer id"),
        ([[a[0], "x"], a[1], a[2], a[3]], "ranking entry 0 must be an answer id"),
        ([[a[0], a[1]], [a[1], a[2]]], f"answer {a[1]} appears twice in the ranking"),
        ([[a[0], a[1]], a[2]], f"ranking has 3 answer ids, item {i} has 4"),
        ([[a[0], a[1], a[2], 999]], f"answer 999 is not an answer of item {i}"),
    ]
    for ranking, message in cases:
        with pytest.raises(LabelError, match=message.replace("(", r"\(").replace(")", r"\)")):
            store.labels.add_ranking(i, user.user_id, ranking)
        assert label_rows(store) == before, message


def test_agreement_counts_ties_by_hand(store):
    ann = store.users.add("ann", "annotator", "pw-12345678")[0].user_id
    bob = store.users.add("bob", "annotator", "pw-12345678")[0].user_id
    item, a = make_item(store)
    store.labels.add_ranking(item.item_id, ann, [[a[0], a[1]], a[2], a[3]])
    store.labels.add_ranking(item.item_id, bob, [a[0], a[1], [a[2], a[3]]])
    # Pairs (a0,a1): ann tie, bob a0 > a1 -> not alike, neither concordant nor discordant.
    # (a0,a2) (a0,a3) (a1,a2) (a1,a3): both order them alike -> concordant. (a2,a3): ann a2 > a3, bob tie -> neither.
    result = analytics.agreement(store)
    assert (result.items, result.comparisons) == (1, 1)
    assert result.pairwise_agreement == pytest.approx(4 / 6)
    assert result.kendall_tau == pytest.approx((4 - 0) / 6)
    cat = store.users.add("cat", "annotator", "pw-12345678")[0].user_id
    store.labels.add_ranking(item.item_id, cat, [[a[0], a[1]], a[3], a[2]])  # ties like ann, a2/a3 reversed
    other, b = make_item(store, prompt="Another.")
    store.labels.add_ranking(other.item_id, cat, [b])  # no preference
    stats = analytics.annotator_stats(store).set_index("annotator")
    assert stats["no_preference"].to_dict() == {"ann": 0, "bob": 0, "cat": 1}
    assert stats.loc["cat", "rankings"] == 2
    per = analytics.agreement_by_annotator(store).set_index("annotator")
    # ann vs cat: (a0,a1) both tie -> alike; 4 concordant; (a2,a3) reversed -> discordant. 5/6 alike, tau 3/6.
    # bob vs cat: (a0,a1) not alike; 4 concordant; (a2,a3) bob tie -> neither. 4/6 alike, tau 4/6.
    assert per.loc["cat", "agreement"] == pytest.approx((5 / 6 + 4 / 6) / 2)
    assert per.loc["cat", "kendall_tau"] == pytest.approx((3 / 6 + 4 / 6) / 2)


def test_a_tie_between_candidate_and_serving_is_half_a_win(store):
    user, _, _ = store.users.add("alice", "annotator")
    item, a = make_item(store, versions=[1, 1, 0, 0])  # a0, a1 from candidate 1; a2, a3 from serving 0
    params = {"candidate": 1, "serving": 0, "after_item": 0}
    cases = [  # ranking -> candidate's wins of its 4 comparisons
        ([a[0], a[1], a[2], a[3]], 4.0),
        ([[a[0], a[2]], a[1], a[3]], 0.5 + 1 + 0 + 1),  # (a0,a2) tie; (a0,a3) win; (a2,a1) loss; (a1,a3) win
        ([a], 2.0),  # no preference: four ties
    ]
    for ranking, wins in cases:
        with store.db.write() as cur:
            cur.execute("DELETE FROM ranking_answers; DELETE FROM ranking_events")
        store.labels.add_ranking(item.item_id, user.user_id, ranking)
        (row,) = store.db.cursor().execute(_COMPARISONS, params).fetchall()
        assert (float(row[2]), row[3]) == (wins, 4), ranking


def test_rankings_stored_before_ties_keep_their_pairs(tmp_path):
    """A data directory of the version before m016: its rankings get tier = rank and the same pairs as before."""
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE _migrations (name VARCHAR PRIMARY KEY, applied_order INTEGER NOT NULL, "
                "applied_at TIMESTAMPTZ NOT NULL)")
    old = [fn for fn in MIGRATIONS if fn.__name__ < "m016"]
    for order, fn in enumerate(old):
        fn(con)
        con.execute("INSERT INTO _migrations VALUES (?, ?, current_timestamp)", [fn.__name__, order])
    con.execute("INSERT INTO users (name, role, password_hash, token_hash) VALUES ('alice', 'annotator', 'x', 'y')")
    con.execute("INSERT INTO prompts (text, source) VALUES ('Name three rivers.', 'test')")
    con.execute("INSERT INTO items (prompt_id, policy_version, sampling_params) VALUES (1, 0, '{}')")
    for position in range(3):
        con.execute("INSERT INTO answers (item_id, position, text, token_count, finish_reason, logprob_sum) "
                    "VALUES (1, ?, ?, 5, 'eos', -1.0)", [position, f"answer {position}"])
    con.execute("INSERT INTO ranking_events (item_id, user_id) VALUES (1, 1)")
    con.execute("INSERT INTO ranking_answers VALUES (1, 0, 2), (1, 1, 1), (1, 2, 3)")  # (ranking, rank, answer)
    before = con.execute("SELECT chosen_answer_id, rejected_answer_id FROM pairs ORDER BY 1, 2").fetchall()
    con.close()
    assert len(before) == 3

    db = Database(path)  # opening migrates
    cur = db.cursor()
    assert cur.execute("SELECT chosen_answer_id, rejected_answer_id FROM pairs ORDER BY 1, 2").fetchall() == before
    assert cur.execute("SELECT rank, tier FROM ranking_answers ORDER BY rank").fetchall() == [(0, 0), (1, 1), (2, 2)]
    db.close()


def test_the_export_of_tiers_is_json(store):
    user, _, _ = store.users.add("alice", "annotator")
    item, a = make_item(store)
    store.labels.add_ranking(item.item_id, user.user_id, [[a[3], a[1]], [a[0], a[2]]])
    (record,) = iter_export(store, "rankings")
    assert json.loads(json.dumps(record))["tiers"] == [0, 0, 1, 1]
    assert record["answer_ids"] == [a[3], a[1], a[0], a[2]]
