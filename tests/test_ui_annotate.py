"""The Annotate tab: handlers called directly, and through gradio_client with a real login."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from app.ui import annotate
from app.ui.annotate import Session, UiError
from storage.errors import Conflict, NotFound
from storage.exports import iter_export, write_snapshot
from storage.items import AnswerRecord


def pair_count(ctx) -> int:
    return ctx.store.db.cursor().execute("SELECT count(*) FROM pairs").fetchone()[0]


def test_next_view_then_submit_stores_ranking_and_thumbs(ctx, accounts, sample_items):
    sample_items(2)
    view = annotate.next_view(ctx, "ann")
    assert view.session.item_id is not None and len(view.session.answer_ids) == 4 and view.state == "item"
    assert "policy" not in view.prompt.lower() and "version" not in view.counter.lower()
    after = annotate.submit(ctx, "ann", view.session, ["2", "1", "4", "3"], ["up", None, None, "down"])
    ids = view.session.answer_ids
    stored = ctx.store.db.cursor().execute(
        "SELECT chosen_answer_id, rejected_answer_id FROM pairs ORDER BY chosen_rank, rejected_rank").fetchall()
    best_first = [ids[1], ids[0], ids[3], ids[2]]
    assert stored[0] == (best_first[0], best_first[1])
    assert len(stored) == 6
    assert ctx.store.labels.counts().feedback == 2
    assert after.session.item_id not in (None, view.session.item_id)
    assert after.message.startswith("Saved. Here is the next one.")
    assert after.session.last_ranking is not None  # what Undo takes back
    assert "<b>1</b> ranked today" in after.counter


@pytest.mark.parametrize("ranks, message", [
    (["1", "1", None, "3"], "Answer 3 has none"),  # with a tie the rank left is not one: nothing is filled in
    (["1", None, None, "3"], "Answer 2, Answer 3 have none"),
    (["1", "2", "3", "9"], "rank must be 1..4"),
])
def test_invalid_rankings_name_the_problem_and_write_nothing(ctx, accounts, sample_items, ranks, message):
    sample_items(1)
    view = annotate.next_view(ctx, "ann")
    with pytest.raises(UiError, match=message):
        annotate.submit(ctx, "ann", view.session, ranks, [None] * 4)
    assert ctx.store.labels.total() == 0


def test_the_last_rank_is_filled_in_when_all_others_are_given(ctx, accounts, sample_items):
    sample_items(1)
    view = annotate.next_view(ctx, "ann")
    ids = view.session.answer_ids
    assert annotate.ranking_from(view.session, ["3", None, "1", "2"]) == [ids[2], ids[3], ids[0], ids[1]]
    annotate.submit(ctx, "ann", view.session, [None, "2", "1", "3"], [None] * 4)
    order = ctx.store.db.cursor().execute(
        "SELECT answer_id FROM ranking_answers ORDER BY rank").fetchall()
    assert [a for (a,) in order] == [ids[2], ids[1], ids[3], ids[0]]


def test_equal_ranks_tie_answers_and_undo_shows_the_tie_again(ctx, accounts, sample_items):
    sample_items(2)
    view = annotate.next_view(ctx, "ann")
    ids = view.session.answer_ids
    assert annotate.ranking_from(view.session, ["2", "1", "2", "3"]) == [ids[1], [ids[0], ids[2]], ids[3]]
    after = annotate.submit(ctx, "ann", view.session, ["2", "1", "2", "3"], [None] * 4)
    pairs = ctx.store.db.cursor().execute("SELECT chosen_answer_id, rejected_answer_id FROM pairs").fetchall()
    assert sorted(pairs) == sorted([(ids[1], ids[0]), (ids[1], ids[2]), (ids[1], ids[3]), (ids[0], ids[3]),
                                    (ids[2], ids[3])])  # 5: no pair between the two answers ranked 2
    undone = annotate.undo(ctx, "ann", after.session)
    assert undone.session.answer_ids == ids and undone.ranks == ("2", "1", "2", "3")


def test_all_equally_good_is_a_ranking_without_pairs(ctx, accounts, sample_items):
    sample_items(2)
    view = annotate.next_view(ctx, "ann")
    assert annotate.ranking_from(view.session, ["1"] * 4) == [list(view.session.answer_ids)]
    after = annotate.submit(ctx, "ann", view.session, ["1"] * 4, ["up", None, None, None])
    assert after.message.startswith("Saved.") and after.session.item_id != view.session.item_id
    assert ctx.store.labels.counts().rankings == 1 and ctx.store.labels.counts().feedback == 1
    assert ctx.store.db.cursor().execute("SELECT count(*) FROM pairs").fetchone()[0] == 0


def test_skip_and_flag(ctx, accounts, sample_items):
    sample_items(3)
    first = annotate.next_view(ctx, "ann")
    second = annotate.skip(ctx, "ann", first.session)
    assert second.session.item_id != first.session.item_id
    with pytest.raises(UiError, match="say why"):
        annotate.flag(ctx, "ann", second.session, "  ")
    third = annotate.flag(ctx, "ann", second.session, "off-topic")
    assert third.session.item_id not in (first.session.item_id, second.session.item_id)
    counts = ctx.store.labels.counts()
    assert (counts.skips, counts.flags) == (2, 1)


def test_nothing_waiting_polls_and_never_promises_a_next_item(ctx, accounts, sample_items):
    empty = annotate.next_view(ctx, "ann")
    assert empty.session == Session() and empty.state == "waiting" and "shows the next item by itself" in empty.prompt
    assert annotate.poll(ctx, "ann", empty.session) is None  # nothing yet: the page stays as it is
    sample_items(1)
    shown = annotate.poll(ctx, "ann", empty.session)
    assert shown is not None and shown.state == "item"
    assert annotate.poll(ctx, "ann", shown.session) is None  # a tab showing an item is left alone
    after = annotate.submit(ctx, "ann", shown.session, ["1", "2", "3", "4"], [None] * 4)
    assert after.state == "waiting" and "Here is the next one" not in after.message
    assert "Nothing else waits" in after.message


def test_progress_is_the_annotators_own_towards_the_daily_goal(ctx, accounts, sample_items):
    sample_items(3)
    bob = annotate.next_view(ctx, "bob")
    annotate.submit(ctx, "bob", bob.session, ["1", "2", "3", "4"], [None] * 4)
    view = annotate.next_view(ctx, "ann")
    assert "<b>0</b> ranked today" in view.counter  # bob's ranking is not ann's progress
    assert f"daily goal {ctx.config.daily_goal}" in view.counter and "waiting" not in view.counter


def test_an_admin_who_opens_the_page_reserves_nothing(ctx, accounts, sample_items):
    sample_items(1)
    idle = annotate.load_view(ctx, "boss")
    assert idle.state == "idle" and idle.session.item_id is None and "Start annotating" in idle.prompt
    assert ctx.buffer.reserved_count() == 0
    assert annotate.load_view(ctx, "ann").state == "item"  # an annotator gets their item at once
    assert annotate.next_view(ctx, "boss").state == "waiting"  # overlap 1: ann holds the only item


def test_answers_cut_at_max_new_tokens_are_marked(ctx, accounts):
    prompt = ctx.store.prompts.least_sampled(1)[0]
    ctx.store.items.add(prompt.prompt_id, 0, {}, [AnswerRecord(f"answer {i}", 3, reason, -1.0)
                                                  for i, reason in enumerate(["eos", "length", "eos", "eos"])])
    view = annotate.next_view(ctx, "ann")
    cut = [i for i, text in enumerate(view.answers) if "cut off" in text]
    assert len(cut) == 1 and "answer 1" in view.answers[cut[0]]


def test_answers_render_html_as_text(ctx, accounts):
    prompt = ctx.store.prompts.least_sampled(1)[0]
    evil = ["<script>alert(1)</script>", '<img src=x onerror="alert(2)">', "fine", "also fine"]
    ctx.store.items.add(prompt.prompt_id, 0, {}, [AnswerRecord(t, 3, "eos", -1.0) for t in evil])
    view = annotate.next_view(ctx, "ann")
    joined = "".join(view.answers)
    assert "<script>" not in joined and "<img" not in joined
    assert "&lt;script&gt;" in joined
    assert "&lt;b&gt;" in annotate.refusal_html("<b>")  # refusals are escaped too


def test_unknown_user_is_refused(ctx):
    with pytest.raises(UiError, match="not logged in"):
        annotate.next_view(ctx, "nobody")


# -- Undo ---------------------------------------------------------------------------------------------------------
def test_undo_retracts_the_ranking_everywhere_and_brings_the_item_back(ctx, accounts, sample_items, tmp_path):
    sample_items(2)
    view = annotate.next_view(ctx, "ann")
    after = annotate.submit(ctx, "ann", view.session, ["2", "1", "4", "3"], ["up", None, None, None])
    assert pair_count(ctx) == 6 and len(list(iter_export(ctx.store, "dpo"))) == 6
    back = annotate.undo(ctx, "ann", after.session)
    assert back.session.item_id == view.session.item_id and back.session.last_ranking is None
    assert back.ranks == ("2", "1", "4", "3") and back.thumbs == ("up", None, None, None)  # as given, to change
    assert "withdrawn" in back.message
    # Append-only: the ranking row is still there, a retraction row says it no longer counts.
    raw = ctx.store.db.cursor().execute("SELECT count(*) FROM ranking_events").fetchone()[0]
    retractions = ctx.store.db.cursor().execute("SELECT ranking_id FROM retractions").fetchall()
    assert raw == 1 and retractions == [(after.session.last_ranking,)]
    # No view, export or training snapshot sees it, nor the thumbs given with it.
    assert pair_count(ctx) == 0 and ctx.store.labels.counts().rankings == 0
    assert ctx.store.labels.counts().feedback == 0
    assert [list(iter_export(ctx.store, fmt)) for fmt in ("dpo", "kto", "rankings")] == [[], [], []]
    meta = write_snapshot(ctx.store, tmp_path / "snap", 0, "tiny")
    assert meta["counts"]["pairs"] == 0 and pq.read_table(tmp_path / "snap" / "pairs.parquet").num_rows == 0
    # The item is the annotator's again: ranked anew, only the new ranking counts.
    again = annotate.submit(ctx, "ann", back.session, ["1", "2", "3", "4"], [None] * 4)
    assert pair_count(ctx) == 6 and ctx.store.labels.counts().rankings == 1
    assert [r["answer_ids"] for r in iter_export(ctx.store, "rankings")] == [list(view.session.answer_ids)]
    assert again.session.item_id not in (None, view.session.item_id)


def test_undo_is_refused_once_too_late_or_twice_or_for_someone_else(ctx, accounts, sample_items):
    sample_items(2)
    with pytest.raises(UiError, match="no ranking of yours to undo"):
        annotate.undo(ctx, "ann", Session())
    view = annotate.next_view(ctx, "ann")
    after = annotate.submit(ctx, "ann", view.session, ["1", "2", "3", "4"], [None] * 4)
    ranking_id = after.session.last_ranking
    bob = ctx.store.users.get("bob").user_id
    with pytest.raises(NotFound, match=f"you have no ranking with id {ranking_id}"):
        ctx.store.labels.retract_ranking(ranking_id, bob, 60)
    ctx.store.db.cursor().execute(  # as if it was submitted two minutes ago
        "UPDATE ranking_events SET created_at = created_at - INTERVAL 2 MINUTE WHERE ranking_id = ?", [ranking_id])
    with pytest.raises(Conflict, match="can be retracted only within 60 s"):
        annotate.undo(ctx, "ann", after.session)
    assert pair_count(ctx) == 6
    ctx.store.db.cursor().execute(
        "UPDATE ranking_events SET created_at = current_timestamp WHERE ranking_id = ?", [ranking_id])
    annotate.undo(ctx, "ann", after.session)
    with pytest.raises(Conflict, match="already retracted"):
        annotate.undo(ctx, "ann", after.session)


def test_undo_over_rest_hands_the_item_back(ctx, server, accounts, ann, api, sample_items):
    sample_items(1)
    item = ann.get("/api/items/next").json()
    ranking = [a["answer_id"] for a in item["answers"]]
    ranking_id = ann.post(f"/api/items/{item['item_id']}/ranking", json={"ranking": ranking}).json()["ranking_id"]
    assert api("bob").post(f"/api/rankings/{ranking_id}/retract").status_code == 404
    r = ann.post(f"/api/rankings/{ranking_id}/retract")
    assert r.status_code == 201, r.text
    assert r.json() == {"retraction_id": 1, "ranking_id": ranking_id, "item_id": item["item_id"],
                        "handed_back": True}
    again = ann.post(f"/api/rankings/{ranking_id}/retract")
    assert (again.status_code, again.json()["error"]) == (409, f"ranking {ranking_id} is already retracted")
    assert ann.post(f"/api/items/{item['item_id']}/ranking", json={"ranking": ranking[::-1]}).status_code == 201
    assert pair_count(ctx) == 6


# -- Through Gradio -------------------------------------------------------------------------------------------------
def test_gradio_client_ranks_and_sees_refusals_as_one_message(ctx, server, accounts, sample_items, capfd):
    from gradio_client import Client

    sample_items(2)
    ui = Client(f"{server.url}/ui/", auth=("ann", "ann-password"), verbose=False)
    shown = ui.predict(api_name="/next_item")
    assert any("Answer 1" in str(x) for x in shown)
    capfd.readouterr()
    refused = ui.predict("1", "1", "2", None, None, None, None, None, api_name="/submit_ranking")
    messages = [x for x in refused if "pl-refusal" in str(x)]
    assert len(messages) == 1 and "give every answer a rank: Answer 4 has none" in messages[0]
    assert "Traceback" not in capfd.readouterr().err  # an ordinary refusal logs no traceback
    assert ctx.store.labels.counts().rankings == 0
    saved = ui.predict("1", "2", "3", None, None, None, None, None, api_name="/submit_ranking")  # last rank filled
    assert any("Saved. Here is the next one." in str(x) for x in saved)
    assert ctx.store.labels.counts().rankings == 1
    undone = ui.predict(api_name="/undo")
    assert any("withdrawn" in str(x) for x in undone) and ctx.store.labels.counts().rankings == 0
    assert json.dumps(ui.view_api(print_info=False, return_format="dict")).count("/undo") == 1
