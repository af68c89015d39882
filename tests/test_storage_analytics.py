"""Admin figures from a real DuckDB file: counts by kind, per-annotator stats, agreement, flags."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import combinations

import pytest

from storage import analytics
from storage.items import AnswerRecord
from storage.store import Store


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path) as store:
        yield store


def make_item(store, prompt: str, k: int = 4):
    prompt_id = store.prompts.add([prompt]).prompt_ids[0]
    return store.items.add(prompt_id, 0, {"k": k}, [AnswerRecord(f"answer {i}", 5, "eos", -1.0) for i in range(k)])


def users(store, *names):
    return [store.users.add(name, "annotator", "pw-12345678")[0].user_id for name in names]


def kendall_tau(order_a: list[int], order_b: list[int]) -> float:
    """Textbook tau-a by enumerating pairs: (concordant - discordant) / pairs."""
    pos_a = {x: i for i, x in enumerate(order_a)}
    pos_b = {x: i for i, x in enumerate(order_b)}
    signs = [1 if (pos_a[x] < pos_a[y]) == (pos_b[x] < pos_b[y]) else -1 for x, y in combinations(order_a, 2)]
    return sum(signs) / len(signs)


def test_empty_store_has_no_agreement_and_zero_counts(store):
    assert analytics.agreement(store) == analytics.Agreement(0, 0, None, None)
    counts = analytics.counts_by_kind(store)
    assert counts.today.total() == counts.total.total() == 0
    assert analytics.agreement_by_annotator(store).empty
    assert analytics.flagged_items(store).empty


def test_agreement_matches_hand_computed_kendall_tau(store):
    ann, bob, cat = users(store, "ann", "bob", "cat")
    one, two, solo = make_item(store, "one"), make_item(store, "two"), make_item(store, "solo")
    a = [x.answer_id for x in one.answers]
    b = [x.answer_id for x in two.answers]
    orders = {
        (one.item_id, ann): a,  # identical to bob on item one: tau 1
        (one.item_id, bob): a,
        (one.item_id, cat): [a[1], a[0], a[2], a[3]],  # one swap: 5 of 6 pairs agree, tau 2/3
        (two.item_id, ann): b,
        (two.item_id, bob): b[::-1],  # reversed: tau -1
    }
    for (item_id, user_id), order in orders.items():
        store.labels.add_ranking(item_id, user_id, order, seconds=10.0 if user_id == ann else None)
    store.labels.add_ranking(solo.item_id, ann, [x.answer_id for x in solo.answers], seconds=30.0)  # no overlap

    taus = [kendall_tau(orders[(one.item_id, x)], orders[(one.item_id, y)]) for x, y in
            [(ann, bob), (ann, cat), (bob, cat)]] + [kendall_tau(b, b[::-1])]
    assert taus == [1.0, pytest.approx(2 / 3), pytest.approx(2 / 3), -1.0]
    result = analytics.agreement(store)
    assert (result.items, result.comparisons) == (2, 4)
    assert result.kendall_tau == pytest.approx(sum(taus) / 4)
    assert result.pairwise_agreement == pytest.approx((1 + 5 / 6 + 5 / 6 + 0) / 4)

    per = analytics.agreement_by_annotator(store).set_index("annotator")
    assert per.loc["cat", "shared_items"] == 2 and per.loc["cat", "kendall_tau"] == pytest.approx(2 / 3)
    assert per.loc["ann", "shared_items"] == 3
    assert per.loc["ann", "kendall_tau"] == pytest.approx((1 + 2 / 3 - 1) / 3)

    stats = analytics.annotator_stats(store).set_index("annotator")
    assert stats.loc["ann", "rankings"] == 3 and stats.loc["ann", "rankings_today"] == 3
    assert stats.loc["ann", "median_seconds"] == 10.0  # median of 10, 10, 30
    assert stats.loc["bob", "median_seconds"] != stats.loc["bob", "median_seconds"]  # NaN: never measured


def test_counts_by_kind_today_and_total_and_flags(store):
    ann, bob = users(store, "ann", "bob")
    item = make_item(store, "a prompt to flag")
    store.labels.add_ranking(item.item_id, ann, [x.answer_id for x in item.answers],
                             feedback={item.answers[0].answer_id: "up"})
    store.labels.add_flag(item.item_id, bob, "off-topic")
    store.labels.add_skip(item.item_id, bob, "flagged")
    counts = analytics.counts_by_kind(store)
    assert (counts.total.rankings, counts.total.feedback, counts.total.skips, counts.total.flags) == (1, 1, 1, 1)
    assert counts.today == counts.total
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    assert analytics.counts_by_kind(store, now=tomorrow).today.total() == 0

    flags = analytics.flagged_items(store)
    assert flags.loc[0, ["item_id", "annotator", "reason", "prompt"]].tolist() == [
        item.item_id, "bob", "off-topic", "a prompt to flag"]
    stats = analytics.annotator_stats(store).set_index("annotator")
    assert stats.loc["bob", ["rankings", "skips", "flags"]].tolist() == [0, 1, 1]
    assert stats.loc["ann", "thumbs"] == 1
