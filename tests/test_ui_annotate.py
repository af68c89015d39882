"""The Annotate tab: handlers called directly, and once through gradio_client with a real login."""

from __future__ import annotations

import pytest

from app.ui import annotate
from app.ui.annotate import Session, UiError


def test_next_view_then_submit_stores_ranking_and_thumbs(ctx, accounts, sample_items):
    sample_items(2)
    view = annotate.next_view(ctx, "ann")
    assert view.session.item_id is not None and len(view.session.answer_ids) == 4
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
    assert after.message.startswith("Saved")
    assert "**1** rankings today" in after.counter


@pytest.mark.parametrize("ranks, message", [
    (["1", "1", "2", "3"], "rank 1 is used by Answer 1 and Answer 2"),
    (["1", None, "2", "3"], "Answer 2 has none"),
    (["1", "2", "3", "9"], "rank must be 1..4"),
])
def test_invalid_rankings_name_the_problem_and_write_nothing(ctx, accounts, sample_items, ranks, message):
    sample_items(1)
    view = annotate.next_view(ctx, "ann")
    with pytest.raises(UiError, match=message):
        annotate.submit(ctx, "ann", view.session, ranks, [None] * 4)
    assert ctx.store.labels.total() == 0


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


def test_nothing_waiting_says_so(ctx, accounts):
    view = annotate.next_view(ctx, "ann")
    assert view.session == Session() and "Nothing to rank" in view.prompt


def test_answers_render_html_as_text(ctx, accounts):
    from storage.items import AnswerRecord

    prompt = ctx.store.prompts.least_sampled(1)[0]
    evil = ["<script>alert(1)</script>", '<img src=x onerror="alert(2)">', "fine", "also fine"]
    ctx.store.items.add(prompt.prompt_id, 0, {}, [AnswerRecord(t, 3, "eos", -1.0) for t in evil])
    view = annotate.next_view(ctx, "ann")
    joined = "".join(view.answers)
    assert "<script>" not in joined and "<img" not in joined
    assert "&lt;script&gt;" in joined


def test_unknown_user_is_refused(ctx):
    with pytest.raises(UiError, match="not logged in"):
        annotate.next_view(ctx, "nobody")


def test_gradio_client_ranks_through_the_real_ui(ctx, server, accounts, sample_items):
    from gradio_client import Client

    sample_items(2)
    ui = Client(f"{server.url}/ui/", auth=("ann", "ann-password"), verbose=False)
    shown = ui.predict(api_name="/next_item")
    assert any("Answer" in str(x) or x for x in shown)
    ui.predict("1", "2", "3", "4", None, None, None, None, api_name="/submit_ranking")
    assert ctx.store.labels.counts().rankings == 1
    with pytest.raises(Exception, match="used by"):
        ui.predict("1", "1", "2", "3", None, None, None, None, api_name="/submit_ranking")
    assert ctx.store.labels.counts().rankings == 1
