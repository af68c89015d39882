"""The buffer samples items in batches (several prompts x K answers per generate call) and sizes itself."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.buffer import BufferSizer


class RecordingBackend:
    """A PolicyBackend that passes every call to a real one and records the item batches it was given."""

    def __init__(self, real):
        self.real = real
        self.batches: list[list] = []

    def sample_items(self, requests, params):
        self.batches.append(list(requests))
        return self.real.sample_items(requests, params)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def batch_ctx(serve_config):
    from app.server import open_context

    context = open_context(replace(serve_config, batch_items=3, buffer_size=3, buffer_max=7))
    context.policy.backend = RecordingBackend(context.policy.backend)
    yield context
    context.stop()
    context.store.close()


def test_one_fill_samples_a_batch_of_items_in_one_call(batch_ctx):
    ctx = batch_ctx
    assert ctx.buffer.fill_once() == 3
    (batch,) = ctx.policy.backend.batches
    assert [(r.k, r.version) for r in batch] == [(4, 0)] * 3
    assert len({r.prompt for r in batch}) == 3  # three different prompts
    assert ctx.buffer.waiting_count() == 3
    assert ctx.buffer.fill_once() == 0  # the floor is met and nobody is labelling: nothing more to sample
    for item_id in ctx.store.items.waiting(1, ctx.buffer.served_versions, 1, limit=10):
        item = ctx.store.items.get(item_id)
        assert len(item.answers) == 4 and {a.policy_version for a in item.answers} == {0}


def test_canary_items_in_a_batch_take_half_their_answers_from_the_canary(batch_ctx, add_version):
    ctx = batch_ctx
    ctx.store.settings.set("canary_share", "1.0")
    ctx.deployments.canary_config = replace(ctx.deployments.canary_config, canary_share=1.0)
    version = add_version()
    ctx.deployments.start_canary(version)
    assert ctx.buffer.fill_once() == 3
    (batch,) = ctx.policy.backend.batches
    assert sorted((r.version, r.k) for r in batch) == [(0, 2)] * 3 + [(version, 2)] * 3
    for item_id in ctx.store.items.waiting(1, ctx.buffer.served_versions, 1, limit=10):
        versions = sorted(a.policy_version for a in ctx.store.items.get(item_id).answers)
        assert versions == [0, 0, version, version]


def test_a_canarys_items_are_handed_out_before_older_items_of_the_serving_version(batch_ctx, add_version):
    """Its decision needs rankings of its own items: it must not wait for the buffer's older ones to be ranked."""
    ctx = batch_ctx
    assert ctx.buffer.fill_once() == 3  # three items of version 0, sampled before the canary
    older = ctx.store.items.waiting(1, ctx.buffer.served_versions, 1, limit=10)
    version = add_version()
    ctx.deployments.canary_config = replace(ctx.deployments.canary_config, canary_share=1.0)
    ctx.deployments.start_canary(version)
    assert ctx.buffer.fill_once(up_to=6) == 3
    mixed = [i for i in ctx.store.items.waiting(1, ctx.buffer.served_versions, 1, limit=10) if i not in older]
    assert len(mixed) == 3 and min(mixed) > max(older)  # newer items, yet annotators get them first
    handed = [ctx.buffer.next_for(user_id).item_id for user_id in (1, 2, 3, 4)]
    assert handed[:3] == mixed and handed[3] == older[0], (handed, mixed, older)
    # the store's own order, without a canary to put first: oldest first
    assert ctx.store.items.waiting(5, ctx.buffer.served_versions, 1, limit=10, exclude=handed) == older[1:]


def test_top_up_fills_to_the_ceiling(batch_ctx):
    assert batch_ctx.buffer.top_up(seconds=600) == 7
    assert batch_ctx.buffer.waiting_count() == 7
    assert max(len(b) for b in batch_ctx.policy.backend.batches) <= 3


def test_top_up_stops_between_batches_when_told(batch_ctx):
    """A cancelled round (the server stopping) ends its top-up at the next batch, not TOP_UP_SECONDS later."""
    assert batch_ctx.buffer.top_up(seconds=600, stop=lambda: True) == 0
    assert batch_ctx.policy.backend.batches == []
    batches = batch_ctx.policy.backend.batches
    assert batch_ctx.buffer.top_up(seconds=600, stop=lambda: len(batches) == 1) == 3  # one batch, then told
    assert len(batches) == 1


def test_the_target_follows_the_hand_out_rate_and_the_batch_time():
    sizer = BufferSizer()
    assert sizer.target(floor=4, ceiling=32, now=1000.0) == 4  # no traffic, no batch measured: the floor
    sizer.sampled(items=4, seconds=8.0)
    for i in range(60):  # 60 items handed out in the last 120 s: 0.5 items/s
        sizer.handed(900.0 + 2 * i)
    assert sizer.rate(1019.0) == pytest.approx(0.5)
    assert sizer.target(floor=4, ceiling=32, now=1019.0) == 8  # 0.5 items/s x 2 x 8 s
    assert sizer.target(floor=4, ceiling=6, now=1019.0) == 6  # the ceiling wins
    assert sizer.target(floor=4, ceiling=32, now=5000.0) == 4  # the traffic is long gone
    sizer.sampled(items=4, seconds=18.0)  # slower batches: a moving average, not the last one
    assert sizer.batch_seconds == pytest.approx(0.7 * 8 + 0.3 * 18)
