"""Items and labels: rankings become pairs, every rejected label writes nothing, and the annotation queue."""

from datetime import UTC, datetime, timedelta

import pytest

from storage.errors import Conflict, InvalidValue, LabelError, NotFound
from storage.items import AnswerRecord
from storage.store import Store

LABEL_TABLES = ("rankings", "ranking_answers", "feedback", "skips", "flags")


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path) as store:
        yield store


def make_item(store, k=4, version=0, prompt="What is 17 + 25?"):
    prompt_id = store.prompts.add([prompt]).prompt_ids[0]
    answers = [AnswerRecord(f"answer {i}", 10 + i, "eos" if i % 2 else "length", -1.0 - i) for i in range(k)]
    return store.items.add(prompt_id, version, {"temperature": 0.8, "k": k}, answers)


def label_rows(store):
    cur = store.db.cursor()
    return {table: cur.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in LABEL_TABLES}


def test_items_round_trip(store):
    item = make_item(store)
    assert store.items.get(item.item_id) == item
    assert item.prompt == "What is 17 + 25?"
    assert item.sampling_params == {"temperature": 0.8, "k": 4}
    assert [a.position for a in item.answers] == [0, 1, 2, 3]
    assert item.answers[1].finish_reason == "eos" and item.answers[2].logprob_sum == -3.0
    assert item.created_at.tzinfo == UTC
    assert store.items.answer(item.answers[2].answer_id) == item.answers[2]
    with pytest.raises(NotFound, match="no item with id 999"):
        store.items.get(999)
    with pytest.raises(NotFound, match="no answer with id 999"):
        store.items.answer(999)
    with pytest.raises(NotFound, match="no prompt with id 999"):
        store.items.add(999, 0, {}, [AnswerRecord("a", 1, "eos", -1.0)])
    with pytest.raises(InvalidValue, match="answer 0: token_count must be an int >= 0"):
        store.items.add(item.prompt_id, 0, {}, [AnswerRecord("a", -1, "eos", -1.0)])
    assert store.items.count() == 1


def test_a_ranking_of_four_gives_six_ordered_pairs(store):
    user, _, _ = store.users.add("alice", "annotator")
    item = make_item(store, version=0)
    a = [answer.answer_id for answer in item.answers]
    ranking = [a[2], a[0], a[3], a[1]]  # best first
    ranking_id = store.labels.add_ranking(item.item_id, user.user_id, ranking, seconds=12.5)
    rows = store.db.cursor().execute(
        "SELECT ranking_id, annotator, annotator_id, policy_version, prompt, chosen_answer_id, chosen,"
        " rejected_answer_id, rejected, chosen_rank, rejected_rank FROM pairs ORDER BY chosen_rank, rejected_rank"
    ).fetchall()
    assert len(rows) == 6
    expected = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    assert [(r[9], r[10]) for r in rows] == expected
    for row, (i, j) in zip(rows, expected):
        assert row[:5] == (ranking_id, "alice", user.user_id, 0, "What is 17 + 25?")
        assert (row[5], row[7]) == (ranking[i], ranking[j])
        assert (row[6], row[8]) == (f"answer {a.index(ranking[i])}", f"answer {a.index(ranking[j])}")
    assert store.db.cursor().execute("SELECT seconds FROM rankings").fetchone()[0] == 12.5


def test_feedback_lands_with_the_ranking_in_one_transaction(store):
    user, _, _ = store.users.add("alice", "annotator")
    item = make_item(store)
    a = [answer.answer_id for answer in item.answers]
    ranking_id = store.labels.add_ranking(item.item_id, user.user_id, a, feedback={a[0]: "up", a[3]: "down"})
    rows = store.db.cursor().execute("SELECT answer_id, value, ranking_id FROM feedback ORDER BY answer_id").fetchall()
    assert rows == [(a[0], "up", ranking_id), (a[3], "down", ranking_id)]
    unary = store.db.cursor().execute("SELECT answer_id, annotator, completion, label FROM unary ORDER BY answer_id")
    assert unary.fetchall() == [(a[0], "alice", "answer 0", True), (a[3], "alice", "answer 3", False)]

    # Bad feedback rejects the ranking too.
    other = make_item(store, prompt="Another?")
    b = [answer.answer_id for answer in other.answers]
    before = label_rows(store)
    with pytest.raises(LabelError, match=f"feedback on answer {b[1]} must be 'up' or 'down', got 'meh'"):
        store.labels.add_ranking(other.item_id, user.user_id, b, feedback={b[0]: "up", b[1]: "meh"})
    with pytest.raises(LabelError, match=f"feedback names answer {a[0]}, which is not an answer of item"):
        store.labels.add_ranking(other.item_id, user.user_id, b, feedback={a[0]: "up"})
    assert label_rows(store) == before


def test_every_rejected_label_writes_nothing(store):
    alice, _, _ = store.users.add("alice", "annotator")
    item = make_item(store)
    a = [answer.answer_id for answer in item.answers]
    i = item.item_id
    store.labels.add_ranking(i, alice.user_id, a)
    store.labels.add_feedback(a[0], alice.user_id, "up")
    before = label_rows(store)
    bob, _, _ = store.users.add("bob", "annotator")
    cases = [
        (LabelError, f"ranking has 3 answer ids, item {i} has 4",
         lambda: store.labels.add_ranking(i, bob.user_id, a[:3])),
        (LabelError, f"answer {a[1]} appears twice in the ranking",
         lambda: store.labels.add_ranking(i, bob.user_id, [a[0], a[1], a[1], a[2]])),
        (LabelError, f"answer 99 is not an answer of item {i}",
         lambda: store.labels.add_ranking(i, bob.user_id, [a[0], a[1], a[2], 99])),
        (LabelError, "ranking must be a list of answer ids", lambda: store.labels.add_ranking(i, bob.user_id, "1,2")),
        (LabelError, "seconds must be a number >= 0", lambda: store.labels.add_ranking(i, bob.user_id, a, seconds=-1)),
        (NotFound, "no item with id 999", lambda: store.labels.add_ranking(999, bob.user_id, a)),
        (NotFound, "no user with id 999", lambda: store.labels.add_ranking(i, 999, a)),
        (Conflict, f"item {i} is already ranked by you", lambda: store.labels.add_ranking(i, alice.user_id, a[::-1])),
        (LabelError, "must be 'up' or 'down', got 'sideways'",
         lambda: store.labels.add_feedback(a[1], bob.user_id, "sideways")),
        (NotFound, "no answer with id 999", lambda: store.labels.add_feedback(999, bob.user_id, "up")),
        (Conflict, f"answer {a[0]} already has your feedback",
         lambda: store.labels.add_feedback(a[0], alice.user_id, "down")),
        (NotFound, "no item with id 999", lambda: store.labels.add_skip(999, bob.user_id)),
        (Conflict, f"item {i} is already ranked by you", lambda: store.labels.add_skip(i, alice.user_id)),
        (LabelError, "a flag needs a reason", lambda: store.labels.add_flag(i, bob.user_id, "  ")),
        (NotFound, "no item with id 999", lambda: store.labels.add_flag(999, bob.user_id, "harmful")),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
        assert label_rows(store) == before, message

    store.labels.add_skip(i, bob.user_id, reason="too long")
    with pytest.raises(Conflict, match=f"item {i} is already skipped by you"):
        store.labels.add_skip(i, bob.user_id)


def test_counts_since_and_by_user(store):
    alice, _, _ = store.users.add("alice", "annotator")
    bob, _, _ = store.users.add("bob", "annotator")
    item = make_item(store)
    a = [answer.answer_id for answer in item.answers]
    store.labels.add_ranking(item.item_id, alice.user_id, a, feedback={a[0]: "up"})
    store.labels.add_feedback(a[1], bob.user_id, "down")
    store.labels.add_skip(item.item_id, bob.user_id)
    store.labels.add_flag(item.item_id, bob.user_id, "the answers are all the same")
    counts = store.labels.counts()
    assert (counts.rankings, counts.feedback, counts.skips, counts.flags) == (1, 2, 1, 1)
    assert store.labels.total() == counts.total() == 3
    by_bob = store.labels.counts(user_id=bob.user_id)
    assert (by_bob.rankings, by_bob.feedback, by_bob.skips, by_bob.flags) == (0, 1, 1, 1)
    future = datetime.now(UTC) + timedelta(minutes=1)
    assert store.labels.total(since=future) == 0
    assert store.labels.total(since=datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=1)) == 3


def test_waiting_respects_overlap_exclude_and_own_labels(store):
    alice, _, _ = store.users.add("alice", "annotator")
    bob, _, _ = store.users.add("bob", "annotator")
    carol, _, _ = store.users.add("carol", "annotator")
    old = make_item(store, version=0, prompt="old?")
    items = [make_item(store, version=1, prompt=f"p{n}?") for n in range(3)]
    ids = [item.item_id for item in items]

    assert store.items.waiting(alice.user_id, versions=[1], overlap=2) == ids  # oldest first, served versions only
    assert store.items.waiting(alice.user_id, versions=[0, 1], overlap=2, limit=2) == [old.item_id, ids[0]]
    assert store.items.waiting(alice.user_id, versions=[1], overlap=2, exclude={ids[1]}) == [ids[0], ids[2]]
    assert store.items.count_waiting(versions=[1], overlap=2) == 3

    store.labels.add_ranking(ids[0], alice.user_id, [a.answer_id for a in items[0].answers])
    store.labels.add_skip(ids[1], alice.user_id)
    store.labels.add_feedback(items[2].answers[0].answer_id, alice.user_id, "up")  # thumbs alone leave it queued
    assert store.items.waiting(alice.user_id, [1], overlap=2) == [ids[2]]
    assert store.items.waiting(bob.user_id, [1], overlap=2) == ids
    assert store.items.count_waiting([1], overlap=2) == 3

    store.labels.add_ranking(ids[0], bob.user_id, [a.answer_id for a in items[0].answers][::-1])
    assert store.items.waiting(carol.user_id, [1], overlap=2) == ids[1:]  # ids[0] has its 2 annotators
    assert store.items.waiting(carol.user_id, [1], overlap=3) == ids
    assert store.items.count_waiting([1], overlap=2) == 2
    # A flag alone does not take the item out of anyone's queue.
    store.labels.add_flag(ids[2], carol.user_id, "harmful")
    assert ids[2] in store.items.waiting(carol.user_id, [1], overlap=2)


def test_stale_items_are_untouched_and_older_than_min_version(store):
    user, _, _ = store.users.add("alice", "annotator")
    labelled = make_item(store, version=0, prompt="a?")
    untouched = make_item(store, version=0, prompt="b?")
    thumbed = make_item(store, version=1, prompt="c?")
    fresh = make_item(store, version=2, prompt="d?")
    store.labels.add_skip(labelled.item_id, user.user_id)
    assert store.items.stale(min_version=2) == [untouched.item_id, thumbed.item_id]
    store.labels.add_feedback(thumbed.answers[0].answer_id, user.user_id, "down")
    assert store.items.stale(min_version=2) == [untouched.item_id]
    assert store.items.stale(min_version=0) == []
    assert store.items.stale(min_version=3) == [untouched.item_id, fresh.item_id]


def test_overlap_is_checked_inside_the_label_transaction(store):
    alice, _, _ = store.users.add("alice", "annotator")
    bob, _, _ = store.users.add("bob", "annotator")
    carol, _, _ = store.users.add("carol", "annotator")
    item = make_item(store)
    a = [answer.answer_id for answer in item.answers]
    store.labels.add_ranking(item.item_id, alice.user_id, a, overlap=2)
    store.labels.add_skip(item.item_id, bob.user_id, overlap=2)
    before = label_rows(store)
    full = f"item {item.item_id} already has its 2 annotator\\(s\\) \\(overlap 2\\)"
    for call in (lambda: store.labels.add_ranking(item.item_id, carol.user_id, a, overlap=2),
                 lambda: store.labels.add_skip(item.item_id, carol.user_id, overlap=2),
                 lambda: store.labels.add_feedback(a[0], carol.user_id, "up", overlap=2),
                 lambda: store.labels.add_flag(item.item_id, carol.user_id, "broken", skip=True, overlap=2)):
        with pytest.raises(Conflict, match=full):
            call()
        assert label_rows(store) == before
    # Those done with the item may still give thumbs on it; a flag alone needs no slot.
    store.labels.add_feedback(a[1], alice.user_id, "down", overlap=2)
    store.labels.add_feedback(a[1], bob.user_id, "up", overlap=2)
    store.labels.add_flag(item.item_id, carol.user_id, "broken", overlap=2)


def test_a_skipped_item_cannot_be_ranked_and_an_item_is_flagged_once(store):
    alice, _, _ = store.users.add("alice", "annotator")
    item = make_item(store)
    a = [answer.answer_id for answer in item.answers]
    store.labels.add_flag(item.item_id, alice.user_id, "looks broken", skip=True)
    before = label_rows(store)
    assert (before["flags"], before["skips"]) == (1, 1)
    with pytest.raises(Conflict, match=f"item {item.item_id} is already skipped by you"):
        store.labels.add_ranking(item.item_id, alice.user_id, a)
    with pytest.raises(Conflict, match=f"you already flagged item {item.item_id}"):
        store.labels.add_flag(item.item_id, alice.user_id, "still broken")
    assert label_rows(store) == before
    # flag + skip is one transaction: a refused skip leaves no flag behind.
    other = make_item(store, prompt="Another?")
    store.labels.add_skip(other.item_id, alice.user_id)
    with pytest.raises(Conflict, match="already skipped by you"):
        store.labels.add_flag(other.item_id, alice.user_id, "broken", skip=True)
    assert label_rows(store)["flags"] == 1


def test_done_counts_distinct_annotators(store):
    alice, _, _ = store.users.add("alice", "annotator")
    bob, _, _ = store.users.add("bob", "annotator")
    item = make_item(store)
    assert store.items.annotators_done(item.item_id) == 0
    assert not store.items.is_done_by(item.item_id, alice.user_id)
    store.labels.add_ranking(item.item_id, alice.user_id, [x.answer_id for x in item.answers])
    store.labels.add_feedback(item.answers[0].answer_id, bob.user_id, "up")  # thumbs alone: not done
    assert store.items.annotators_done(item.item_id) == 1
    assert store.items.is_done_by(item.item_id, alice.user_id) and not store.items.is_done_by(item.item_id, bob.user_id)
    with pytest.raises(NotFound, match="no item with id 999"):
        store.items.is_done_by(999, alice.user_id)
