"""Suggestions: queued for an admin, limited per user inside the write transaction, approved into the pool."""

from datetime import UTC, datetime, timedelta

import pytest

from storage.errors import Conflict, InvalidValue, NotFound, RateLimited
from storage.store import Store
from storage.suggestions import SuggestionLimits, Suggestions


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path) as store:
        yield store


def rows(store, table: str) -> int:
    return store.db.cursor().execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_a_suggestion_waits_until_an_admin_approves_it(store):
    ann, _, _ = store.users.add("ann", "annotator")
    boss, _, _ = store.users.add("boss", "admin")
    first = store.suggestions.add(ann.user_id, "  Why do cats purr?  ")
    second = store.suggestions.add(ann.user_id, "Name three rivers.")
    assert (first.user, first.text, first.status, first.prompt_id) == ("ann", "Why do cats purr?", "pending", None)
    assert rows(store, "prompts") == 0
    assert [s.suggestion_id for s in store.suggestions.list()] == [second.suggestion_id, first.suggestion_id]
    assert store.suggestions.count_pending() == 2

    approved = store.suggestions.approve(first.suggestion_id, boss.user_id)
    assert (approved.status, approved.decided_by) == ("approved", "boss")
    assert store.prompts.get(approved.prompt_id).text == "Why do cats purr?"
    assert store.prompts.get(approved.prompt_id).source == "suggestion:ann"
    rejected = store.suggestions.reject(second.suggestion_id, boss.user_id)
    assert rejected.status == "rejected" and rejected.prompt_id is None
    assert rows(store, "prompts") == 1
    assert store.suggestions.list() == [] and len(store.suggestions.list(None)) == 2
    for decide in (store.suggestions.approve, store.suggestions.reject):
        with pytest.raises(Conflict, match=f"suggestion {first.suggestion_id} is already approved"):
            decide(first.suggestion_id, boss.user_id)
    with pytest.raises(NotFound, match="no suggestion with id 999"):
        store.suggestions.approve(999, boss.user_id)
    assert rows(store, "prompts") == 1


def test_duplicates_and_bad_texts_write_nothing(store):
    ann, _, _ = store.users.add("ann", "annotator")
    store.prompts.add(["Already pooled?"])
    pending = store.suggestions.add(ann.user_id, "Waiting?")
    before = rows(store, "suggestions")
    cases = [
        (Conflict, "already in the annotation pool", "Already pooled?"),
        (Conflict, f"already waits for an admin's review \\(suggestion {pending.suggestion_id}\\)", " Waiting? "),
        (InvalidValue, "empty prompt", "   "),
        (InvalidValue, "at most 4000 characters, got 4001", "x" * 4001),
        (InvalidValue, "NUL", "a\0b"),
    ]
    for error, message, text in cases:
        with pytest.raises(error, match=message):
            store.suggestions.add(ann.user_id, text)
    with pytest.raises(NotFound, match="no user with id 999"):
        store.suggestions.add(999, "From nobody?")
    assert rows(store, "suggestions") == before


def test_limits_per_hour_and_pending(store):
    ann, _, _ = store.users.add("ann", "annotator")
    bob, _, _ = store.users.add("bob", "annotator")
    boss, _, _ = store.users.add("boss", "admin")
    limited = Suggestions(store.db, SuggestionLimits(per_hour=5, pending=3))
    sent = [limited.add(ann.user_id, f"Question {n}?") for n in range(3)]
    with pytest.raises(RateLimited, match="3 of your suggestions wait for an admin's review, the limit is 3"):
        limited.add(ann.user_id, "One more?")
    limited.add(bob.user_id, "Bob's own?")  # the limits are per user
    limited.reject(sent[0].suggestion_id, boss.user_id)
    limited.approve(sent[1].suggestion_id, boss.user_id)
    limited.add(ann.user_id, "Question 3?")
    limited.add(ann.user_id, "Question 4?")
    with pytest.raises(RateLimited, match="you sent 5 suggestions in the last hour, the limit is 5; try again in 60"):
        limited.add(ann.user_id, "Question 5?")
    # An hour later the window has moved on (the sends are dated back, as if an hour had passed).
    store.db.cursor().execute("UPDATE suggestions SET created_at = ?",
                              [datetime.now(UTC) - timedelta(hours=1, seconds=1)])
    limited.reject(limited.list()[0].suggestion_id, boss.user_id)
    assert limited.add(ann.user_id, "Question 5?").status == "pending"


def test_limits_are_validated():
    with pytest.raises(InvalidValue, match="per_hour must be an int >= 1, got 0"):
        SuggestionLimits(per_hour=0)
