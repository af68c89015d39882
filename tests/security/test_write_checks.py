"""Issue 8 item 4: annotators act only on what was given to them.

Against commit 4ca63a6 an annotator ranked an item reserved for someone else and one already at its overlap (201),
thumbed an answer never shown to them (201), flagged one item 20 times, and added 200 prompts of 19 kB through the
Demo's "Send to annotation". Each test below repeats one of those through the real REST server (or the Annotate and
Demo handlers) and asserts the refusal, and that nothing was written.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from app.ui import annotate, demo
from storage.errors import Conflict, NotHanded, RateLimited

TABLES = ("rankings", "ranking_answers", "feedback", "skips", "flags", "prompts", "suggestions")
NOT_HANDED = "item {} was not handed to you; fetch your next item with GET /api/items/next"


def rows(ctx) -> dict[str, int]:
    cur = ctx.store.db.cursor()
    return {table: cur.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES}


def answer_ids(item: dict) -> list[int]:
    return [a["answer_id"] for a in item["answers"]]


def refusal(r, status: int) -> str:
    assert r.status_code == status, f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:300]}"
    return r.json()["error"]


def set_overlap(boss, overlap: int) -> None:
    assert boss.patch("/api/settings", json={"overlap": overlap}).status_code == 200


# -- labels only on items handed to you --------------------------------------------------------------------------
def test_ranking_an_item_reserved_for_someone_else_is_refused(ctx, ann, api, sample_items):
    sample_items(2)
    bob = api("bob")
    theirs = bob.get("/api/items/next").json()
    item_id = theirs["item_id"]
    before = rows(ctx)
    assert refusal(ann.post(f"/api/items/{item_id}/ranking", json={"ranking": answer_ids(theirs)}), 403).startswith(
        NOT_HANDED.format(item_id))
    assert refusal(ann.post(f"/api/items/{item_id}/skip"), 403).startswith(NOT_HANDED.format(item_id))
    assert refusal(ann.post(f"/api/items/{item_id}/flag", json={"reason": "spam"}), 403).startswith(
        NOT_HANDED.format(item_id))
    assert rows(ctx) == before
    mine = ann.get("/api/items/next").json()
    assert mine["item_id"] != item_id  # reserved for bob, so not handed to ann either
    assert ann.post(f"/api/items/{mine['item_id']}/ranking", json={"ranking": answer_ids(mine)}).status_code == 201
    assert bob.post(f"/api/items/{item_id}/ranking", json={"ranking": answer_ids(theirs)}).status_code == 201


def test_an_item_never_fetched_is_refused_and_an_unknown_one_is_404(ctx, ann, sample_items):
    (item_id,) = sample_items(1)
    ids = [a.answer_id for a in ctx.store.items.get(item_id).answers]
    refusal(ann.post(f"/api/items/{item_id}/ranking", json={"ranking": ids}), 403)
    refusal(ann.post(f"/api/answers/{ids[0]}/feedback", json={"value": "up"}), 403)
    refusal(ann.post("/api/items/999999/ranking", json={"ranking": ids}), 404)
    assert ctx.store.labels.total() == 0


def test_ranking_an_item_at_its_overlap_is_refused(ctx, ann, boss, api, sample_items):
    sample_items(1)
    set_overlap(boss, 2)
    bob = api("bob")
    item = ann.get("/api/items/next").json()
    assert bob.get("/api/items/next").json()["item_id"] == item["item_id"]  # overlap 2: handed to both
    set_overlap(boss, 1)  # the admin lowers the overlap while both hold the item
    assert bob.post(f"/api/items/{item['item_id']}/ranking", json={"ranking": answer_ids(item)}).status_code == 201
    before = rows(ctx)
    full = f"item {item['item_id']} already has its 1 annotator(s) (overlap 1)"
    assert refusal(ann.post(f"/api/items/{item['item_id']}/ranking", json={"ranking": answer_ids(item)}),
                   409).startswith(full)
    assert refusal(ann.post(f"/api/items/{item['item_id']}/skip"), 409).startswith(full)
    assert refusal(ann.post(f"/api/answers/{answer_ids(item)[0]}/feedback", json={"value": "up"}), 409).startswith(full)
    assert rows(ctx) == before


def test_two_annotators_racing_for_the_last_slot_cannot_both_pass(ctx, ann, boss, api, sample_items):
    sample_items(1)
    set_overlap(boss, 2)
    bob = api("bob")
    item = ann.get("/api/items/next").json()
    assert bob.get("/api/items/next").json()["item_id"] == item["item_id"]
    set_overlap(boss, 1)
    start = threading.Barrier(2)
    statuses: list[int] = []

    def submit(client) -> None:
        start.wait()
        statuses.append(client.post(f"/api/items/{item['item_id']}/ranking",
                                    json={"ranking": answer_ids(item)}).status_code)

    racers = [threading.Thread(target=submit, args=(c,)) for c in (ann, bob)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(60)
    assert sorted(statuses) == [201, 409]
    assert ctx.store.labels.counts().rankings == 1


def test_an_expired_reservation_counts_until_someone_else_takes_the_slot(ctx, ann, api, sample_items):
    (first, second) = sample_items(2)
    bob = api("bob")
    live = ctx.buffer.config
    ctx.buffer.config = replace(live, reserve_seconds=1e-9)  # every reservation has expired by the next request
    assert ann.get("/api/items/next").json()["item_id"] == first
    ctx.buffer.config = live
    # Nobody took the slot: ann may still submit what she was handed (a long pause is not a reason to lose work).
    ids = [a.answer_id for a in ctx.store.items.get(first).answers]
    assert ann.post(f"/api/items/{first}/ranking", json={"ranking": ids}).status_code == 201

    ctx.buffer.config = replace(live, reserve_seconds=1e-9)
    assert ann.get("/api/items/next").json()["item_id"] == second
    ctx.buffer.config = live
    taken = bob.get("/api/items/next").json()  # ann's reservation expired: the item may go to bob, who holds it now
    assert taken["item_id"] == second
    before = rows(ctx)
    message = refusal(ann.post(f"/api/items/{second}/ranking", json={"ranking": answer_ids(taken)}), 403)
    assert message.startswith(f"your reservation of item {second} expired and another annotator took its slot")
    assert rows(ctx) == before
    assert bob.post(f"/api/items/{second}/ranking", json={"ranking": answer_ids(taken)}).status_code == 201


def test_thumbs_only_on_answers_of_an_item_handed_to_you(ctx, ann, sample_items):
    sample_items(2)
    shown = ann.get("/api/items/next").json()
    (other,) = [i for i in ctx.store.db.cursor().execute("SELECT item_id FROM items").fetchall()
                if i[0] != shown["item_id"]]
    never_shown = ctx.store.items.get(other[0]).answers[0].answer_id
    before = rows(ctx)
    assert refusal(ann.post(f"/api/answers/{never_shown}/feedback", json={"value": "up"}), 403).startswith(
        NOT_HANDED.format(other[0]))
    assert rows(ctx) == before
    ids = answer_ids(shown)
    assert ann.post(f"/api/answers/{ids[0]}/feedback", json={"value": "up"}).status_code == 201
    assert ann.post(f"/api/items/{shown['item_id']}/ranking", json={"ranking": ids}).status_code == 201
    # An item you ranked stays yours to thumb (the simulator ranks first, then sends thumbs).
    assert ann.post(f"/api/answers/{ids[1]}/feedback", json={"value": "down"}).status_code == 201


def test_one_flag_per_item_and_annotator(ctx, ann, sample_items):
    sample_items(1)
    item = ann.get("/api/items/next").json()
    url = f"/api/items/{item['item_id']}/flag"
    assert ann.post(url, json={"reason": "harmful"}).status_code == 201
    for _ in range(19):
        assert refusal(ann.post(url, json={"reason": "harmful"}), 409) == f"you already flagged item {item['item_id']}"
    assert ctx.store.labels.counts().flags == 1


def test_the_annotate_tab_refuses_an_item_it_did_not_hand_out(ctx, accounts, sample_items):
    sample_items(2)
    forged = annotate.next_view(ctx, "bob").session  # bob's item, put into ann's browser session
    before = rows(ctx)
    with pytest.raises(NotHanded, match="was not handed to you"):
        annotate.submit(ctx, "ann", forged, ["1", "2", "3", "4"], ["up", None, None, None])
    with pytest.raises(NotHanded, match="was not handed to you"):
        annotate.skip(ctx, "ann", forged)
    with pytest.raises(NotHanded, match="was not handed to you"):
        annotate.flag(ctx, "ann", forged, "spam")
    assert rows(ctx) == before
    own = annotate.next_view(ctx, "ann").session
    assert own.item_id != forged.item_id
    annotate.flag(ctx, "ann", own, "broken")  # flag + skip, one transaction
    with pytest.raises(Conflict, match=f"you already flagged item {own.item_id}"):
        annotate.flag(ctx, "ann", own, "broken")
    counts = ctx.store.labels.counts()
    assert (counts.flags, counts.skips) == (1, 1)


# -- "Send to annotation" is a suggestion an admin approves ---------------------------------------------------------
def test_200_sends_from_an_annotator_are_capped_and_add_nothing_to_the_pool(ctx, ann):
    pool = ctx.store.prompts.count()
    answers = [ann.post("/api/suggestions", json={"prompt": f"Prompt {n}: " + "x" * 3_900}) for n in range(200)]
    statuses = [r.status_code for r in answers]
    assert statuses[:20] == [201] * 20 and set(statuses[20:]) == {429}
    assert {r.json()["status"] for r in answers[:20]} == {"pending"}
    assert "you sent 20 suggestions in the last hour, the limit is 20" in answers[20].json()["error"]
    assert ctx.store.prompts.count() == pool
    assert ctx.store.suggestions.count_pending() == 20
    too_big = ann.post("/api/suggestions", json={"prompt": "y" * 19_000})
    assert "at most 4000 characters" in refusal(too_big, 422)


def test_the_demo_button_queues_a_suggestion_and_is_rate_limited(ctx, accounts):
    pool = ctx.store.prompts.count()
    sent = [demo.send_to_annotation(ctx, "bob", f"Demo prompt {n}?") for n in range(20)]
    assert all(line.startswith("Sent as suggestion") for line in sent)
    with pytest.raises(RateLimited, match="the limit is 20"):
        demo.send_to_annotation(ctx, "bob", "One too many?")
    assert ctx.store.prompts.count() == pool
    assert demo.send_to_annotation(ctx, "boss", "An admin's own prompt?").startswith("Added")
    assert ctx.store.prompts.count() == pool + 1


def test_admin_approval_adds_the_prompt_to_the_pool(ctx, ann, boss):
    pool = ctx.store.prompts.count()
    first = ann.post("/api/suggestions", json={"prompt": "What do herons eat in winter?"}).json()
    second = ann.post("/api/suggestions", json={"prompt": "Buy cheap watches at example.com"}).json()
    assert first["status"] == "pending" and ctx.store.prompts.count() == pool
    assert "admin" in refusal(ann.get("/api/suggestions"), 403)
    assert "admin" in refusal(ann.post(f"/api/suggestions/{first['suggestion_id']}/approve"), 403)
    listed = boss.get("/api/suggestions").json()
    assert [(s["user"], s["prompt"], s["status"]) for s in listed] == [
        ("ann", "Buy cheap watches at example.com", "pending"), ("ann", "What do herons eat in winter?", "pending")]

    approved = boss.post(f"/api/suggestions/{first['suggestion_id']}/approve").json()
    assert (approved["status"], approved["decided_by"]) == ("approved", "boss")
    assert ctx.store.prompts.get(approved["prompt_id"]).text == "What do herons eat in winter?"
    assert "already approved" in refusal(boss.post(f"/api/suggestions/{first['suggestion_id']}/approve"), 409)
    assert boss.post(f"/api/suggestions/{second['suggestion_id']}/reject").json()["status"] == "rejected"
    assert ctx.store.prompts.count() == pool + 1
    assert boss.get("/api/suggestions").json() == []
    assert len(boss.get("/api/suggestions", params={"status": "all"}).json()) == 2
    refusal(boss.post("/api/suggestions/999999/approve"), 404)

    own = boss.post("/api/suggestions", json={"prompt": "Name a prime between 10 and 20."}).json()
    assert own["status"] == "added" and ctx.store.prompts.get(own["prompt_id"]).source == "demo:boss"
    assert "already in the annotation pool" in refusal(
        ann.post("/api/suggestions", json={"prompt": "What do herons eat in winter?"}), 409)
