"""The Demo tab: streamed chat, side by side from two real versions, the bound on demo generation, and labels
accepted while a demo answer streams."""

from __future__ import annotations

from itertools import pairwise

import httpx
import pytest

from app.policy import GenerationSlots, PolicyBusy
from app.ui import demo
from app.ui.annotate import UiError
from storage.errors import Conflict, NotFound


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


def test_side_by_side_answers_come_from_two_different_versions(ctx, accounts, add_version):
    add_version(scale=1.0)
    slots = ctx.generation_slots
    views = list(demo.side_by_side(ctx, slots, "ann", "Name a colour.", "1", "0", seed=7, max_new_tokens=8))
    assert len(views) == 2 and views[0].right == "" and views[0].right_version is None
    final = views[-1]
    assert (final.left_version, final.right_version) == (1, 0)
    assert final.left != final.right and "v1 vs base model (v0) (seed 7)" == final.status
    # Same seed, same version: the same answer, so the difference above is the adapter's doing.
    same = list(demo.side_by_side(ctx, slots, "ann", "Name a colour.", "0", "0", seed=7, max_new_tokens=8))[-1]
    assert same.left == same.right == final.right
    assert ctx.deployments.serving == 0  # comparing never changes what annotators are served


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
    left, right, status = ui.predict("Name a colour.", "1", "0", 7, 8, api_name="/demo_side_by_side")
    assert status == "v1 vs base model (v0) (seed 7)" and left != right
    assert ui.predict("Count to three.", api_name="/demo_send_to_annotation").startswith("Sent as suggestion")
    assert [s.text for s in ctx.store.suggestions.list()] == ["Count to three."]  # queued, not in the pool
    with pytest.raises(Exception, match="type a message"):
        ui.predict("", "0", "0", None, 8, api_name="/demo_side_by_side")
