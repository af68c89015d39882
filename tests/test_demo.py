"""The Demo tab: streamed chat, the arena (two real versions, blind, voted), the bound on demo generation, and labels
accepted while a demo answer streams."""

from __future__ import annotations

import random
from itertools import pairwise

import httpx
import pytest

from app.policy import GenerationSlots, PolicyBusy
from app.ui import demo
from app.ui.annotate import UiError
from storage.errors import Conflict, InvalidValue, NotFound


def test_chat_streams_more_than_one_update_and_keeps_the_conversation(ctx, accounts):
    slots = ctx.generation_slots
    views = list(demo.chat(ctx, slots, "ann", (), "Tell me about <script>alert(1)</script> rivers", demo.DEPLOYED,
                           max_new_tokens=24))
    answers = [view.history[-1]["content"] for view in views]
    assert len(set(answers)) > 1, "the answer arrived in one piece, not streamed"
    assert all(later.startswith(earlier) for earlier, later in pairwise(answers))
    last = views[-1]
    assert [m["role"] for m in last.history] == ["user", "assistant"] and last.status == "base model (v0) answered."
    assert "<script>" in last.history[0]["content"]  # the model sees what was typed...
    assert "<script>" not in last.shown[0]["content"]  # ...the page shows it as text
    second = list(demo.chat(ctx, slots, "ann", last.history, "And lakes?", "0", max_new_tokens=4))[-1]
    assert [m["role"] for m in second.history] == ["user", "assistant", "user", "assistant"]
    assert second.history[:2] == last.history


def run_arena(ctx, first: str, second: str, seed: int, rng_seed: int = 0) -> list:
    return list(demo.arena(ctx, ctx.generation_slots, "ann", "Name a colour.", first, second, seed=seed,
                           max_new_tokens=8, rng=random.Random(rng_seed)))


def test_arena_streams_both_sides_blind_then_stores_the_vote_and_reveals(ctx, accounts, add_version):
    add_version(scale=1.0)
    views = run_arena(ctx, "1", "0", seed=7)
    final = views[-1]
    a_texts = [v.match.answers[0] for v in views]
    b_texts = [v.match.answers[1] for v in views if v.match.answers[1]]
    assert len(set(a_texts)) > 1 and len(set(b_texts)) > 1, "a side arrived in one piece, not streamed"
    assert all(later.startswith(earlier) for earlier, later in pairwise(b_texts))
    assert final.match.finished and not any(v.match.finished for v in views[:-1])
    assert set(final.match.versions) == {0, 1} and final.a != final.b
    shown = " ".join(v.status + v.a + v.b for v in views)
    assert "v1" not in shown and "base model" not in shown  # versions stay hidden until the vote
    with pytest.raises(UiError, match="compare two answers first"):
        demo.vote(ctx, "ann", views[0].match, "a")  # mid-stream
    voted, line = demo.vote(ctx, "ann", final.match, "b")
    a, b = ("v1" if v else "base model (v0)" for v in final.match.versions)
    assert line == f"B is better: stored. A was {a}, B was {b} (seed 7)."
    with pytest.raises(UiError, match="already voted"):
        demo.vote(ctx, "ann", voted, "a")
    (stored,) = ctx.store.arena.recent()
    assert (stored.user, stored.prompt, stored.vote, stored.seed) == ("ann", "Name a colour.", "b", 7)
    assert (stored.version_a, stored.version_b) == final.match.versions
    assert (stored.answer_a, stored.answer_b) == final.match.answers
    # Same seed, same version on both sides: the same answer, so a difference above is the adapter's doing.
    same = run_arena(ctx, "0", "0", seed=7)[-1]
    assert same.match.answers[0] == same.match.answers[1]
    assert ctx.deployments.serving == 0  # comparing never changes what annotators are served
    assert ctx.store.labels.total() == 0  # arena votes are not item labels: no training on demo answers


def test_the_side_of_each_contender_is_drawn_at_random(ctx, accounts, add_version):
    add_version(scale=1.0)
    sides = {run_arena(ctx, "1", "0", seed=3, rng_seed=r)[-1].match.versions for r in range(6)}
    assert sides == {(1, 0), (0, 1)}


def test_arena_standings_count_wins_ties_and_both_bad_with_an_interval(ctx, accounts, boss, ann):
    from app.arena import standings

    user = ctx.store.users.get("ann").user_id
    for versions, vote in [((2, 1), "a"), ((1, 2), "b"), ((1, 2), "a"), ((2, 1), "tie"), ((1, 2), "both_bad"),
                           ((0, 2), "a")]:
        ctx.store.arena.add(user, "p", versions, ("x", "y"), vote, seed=1)
    with pytest.raises(InvalidValue, match="vote must be one of"):
        ctx.store.arena.add(user, "p", (1, 2), ("x", "y"), "maybe")
    first, second = standings(ctx.store)
    assert (first["older"], first["newer"], first["votes"], first["n"]) == (1, 2, 5, 5)
    assert (first["newer_wins"], first["older_wins"], first["ties"], first["both_bad"]) == (2, 1, 1, 1)
    assert first["newer_win_rate"] == pytest.approx(3 / 5)
    assert first["ci95"][0] < 0.6 < first["ci95"][1]
    assert (second["older"], second["newer"], second["older_wins"]) == (0, 2, 1)
    r = boss.get("/api/arena")
    assert r.status_code == 200 and r.json()[0]["votes"] == 5
    assert ann.get("/api/arena").status_code == 403
    from app.ui import admin

    table, recent = admin.arena_tables(ctx, "boss")  # the Admin UI's Arena tab
    assert table.iloc[0]["pair"] == "v2 vs v1" and table.iloc[0]["votes (n)"] == 5 and len(recent) == 6
    with pytest.raises(admin.Forbidden, match="admins only"):
        admin.arena_tables(ctx, "ann")


def test_demo_generation_is_bounded(ctx, accounts):
    slots = GenerationSlots(size=1)
    slots.acquire()
    with pytest.raises(PolicyBusy, match="the model is busy"):
        next(demo.chat(ctx, slots, "ann", (), "hi"))
    slots.release()
    assert demo.demo_params(ctx, 10_000).max_new_tokens == demo.DEMO_MAX_NEW_TOKENS
    assert demo.demo_params(ctx).max_new_tokens == ctx.config.sampling.max_new_tokens
    with pytest.raises(NotFound, match="no policy version 9"):
        next(demo.chat(ctx, slots, "ann", (), "hi", "9"))
    with pytest.raises(UiError, match="not logged in"):
        next(demo.chat(ctx, slots, None, (), "hi"))
    with pytest.raises(UiError, match="type a message"):
        next(demo.chat(ctx, slots, "ann", (), "  "))
    labels = [label for label, _ in demo.version_choices(ctx)]
    assert labels == ["deployed (base model (v0))", "base model (v0)"]


def test_send_to_annotation_queues_an_annotators_prompt_and_pools_an_admins(ctx, accounts):
    before = ctx.store.prompts.count()
    assert demo.send_to_annotation(ctx, "ann", "  What do herons eat in winter?  ").startswith("Sent as suggestion")
    with pytest.raises(Conflict, match="already waits for an admin's review"):
        demo.send_to_annotation(ctx, "bob", "What do herons eat in winter?")
    assert ctx.store.prompts.count() == before  # an admin approves it first (tests/security/test_write_checks.py)
    (pending,) = ctx.store.suggestions.list()
    assert (pending.user, pending.text) == ("ann", "What do herons eat in winter?")
    assert demo.send_to_annotation(ctx, "boss", "Name a bird that cannot fly.").startswith("Added")
    assert ctx.store.prompts.count() == before + 1
    source = ctx.store.db.cursor().execute(
        "SELECT source FROM prompts WHERE text = 'Name a bird that cannot fly.'").fetchone()
    assert source == ("demo:boss",)


def test_labels_are_accepted_while_a_demo_answer_streams(ctx, server, accounts, sample_items):
    (item_id,) = sample_items(1)
    slots = ctx.generation_slots
    stream = demo.chat(ctx, slots, "bob", (), "Write a long story.", max_new_tokens=128)
    next(stream)  # the answer has started and is not finished: labels must not wait for it
    token = accounts["ann"][1]
    headers = {"authorization": f"Bearer {token}"}
    shown = httpx.get(f"{server.url}/api/items/next", headers=headers).json()
    ranking = [a["answer_id"] for a in shown["answers"]]
    response = httpx.post(f"{server.url}/api/items/{item_id}/ranking", json={"ranking": ranking}, headers=headers)
    assert response.status_code == 201
    assert ctx.store.labels.counts().rankings == 1
    assert len(list(stream)) >= 1  # the answer was still streaming when the label was stored, and completes


def test_gradio_client_demo_streams_compares_and_sends(ctx, server, accounts, add_version):
    from gradio_client import Client

    add_version(scale=1.0)
    ui = Client(f"{server.url}/ui/", auth=("ann", "ann-password"), verbose=False)
    job = ui.submit("Hello there", "deployed", 24, api_name="/demo_chat")  # gr.State is not an API input
    job.result()
    assert len(job.outputs()) > 1, "the chat endpoint did not stream"
    job = ui.submit("Name a colour.", "1", "0", 7, 8, api_name="/demo_arena")
    a_side, b_side, status, *_ = job.result()
    assert len(job.outputs()) > 2 and status.startswith("Both answered") and a_side != b_side
    assert "v1" not in str(job.outputs())  # the versions are not in anything the page receives
    assert str(ui.predict(api_name="/demo_vote_tie")).startswith("Tie: stored. A was ")
    assert "you already voted on this comparison" in str(ui.predict(api_name="/demo_vote_a"))
    assert len(ctx.store.arena.recent()) == 1
    assert ui.predict("Count to three.", api_name="/demo_send_to_annotation").startswith("Sent as suggestion")
    assert [s.text for s in ctx.store.suggestions.list()] == ["Count to three."]  # queued, not in the pool
    with pytest.raises(Exception, match="type a message"):
        ui.predict("", "0", "0", None, 8, api_name="/demo_arena")
