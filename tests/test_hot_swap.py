"""Hot swap: a new version starts answering without a restart, and no request fails during the swap."""

from __future__ import annotations

import threading

import httpx
import pytest


def test_deploy_switches_generation_and_health(ctx, server, accounts, add_version):
    v1 = add_version()
    token = accounts["ann"][1]
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {token}"}, timeout=60) as c:
        before = c.post("/api/generate", json={"prompt": "hello", "max_new_tokens": 3}).json()
        assert before["version"] == 0
        boss = {"authorization": f"Bearer {accounts['boss'][1]}"}
        assert c.post(f"/api/versions/{v1}/deploy", headers=boss).status_code == 200
        assert c.get("/api/health").json()["policy_version"] == v1
        assert c.post("/api/generate", json={"prompt": "hello", "max_new_tokens": 3}).json()["version"] == v1
        # The base model stays reachable by number, and the two versions really differ.
        answers = [c.post("/api/generate", json={"prompt": "hello", "max_new_tokens": 8, "version": v}).json()
                           for v in (0, v1)]
        assert [t["version"] for t in answers] == [0, v1]
        versions = c.get("/api/versions", headers=boss).json()
        assert [v["version"] for v in versions if v["deployed"]] == [v1]


def test_adapters_change_the_answers(ctx, add_version):
    from app.generation.backend import ItemRequest
    from learner.sampling import SamplingParams

    v1 = add_version()
    ctx.deployments.ensure_loadable(v1)
    near_greedy = SamplingParams(max_new_tokens=6, temperature=1e-4, top_p=1.0)
    base, tuned = ctx.policy.sample_items([ItemRequest("hello", 1, 0, 0), ItemRequest("hello", 1, v1, 0)], near_greedy)
    # The same prompt, seed and decoding: only the adapter differs, so the log-probs of the answers do.
    assert base[0].token_logprobs != pytest.approx(tuned[0].token_logprobs, abs=1e-4)


def test_no_request_fails_during_swaps(ctx, server, accounts, add_version):
    versions = [add_version(), add_version()]
    token = accounts["ann"][1]
    results: list[tuple[int, int]] = []
    stop = threading.Event()

    def generate() -> None:
        with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {token}"}, timeout=120) as c:
            while not stop.is_set():
                r = c.post("/api/generate", json={"prompt": "count", "max_new_tokens": 4})
                results.append((r.status_code, r.json().get("version", -1)))

    threads = [threading.Thread(target=generate) for _ in range(ctx.generation_slots.size)]
    for t in threads:
        t.start()
    for v in [*versions, 0, versions[0]]:
        ctx.deployments.deploy(v)
    stop.set()
    for t in threads:
        t.join(120)
    assert results and all(status == 200 for status, _ in results)
    assert {version for _, version in results} <= {0, *versions}
    assert ctx.deployments.serving == versions[0]


def test_stale_items_stop_being_served_after_a_deploy(ctx, accounts, add_version, sample_items):
    sample_items(1)  # sampled by version 0
    annotator = ctx.store.users.get("ann").user_id
    assert ctx.buffer.waiting_count() == 1
    for _ in range(3):  # max_item_staleness is 2: three deployed versions later, version 0's item is stale
        ctx.deployments.deploy(add_version())
    assert ctx.buffer.waiting_count() == 0
    assert ctx.buffer.next_for(annotator) is None
    assert ctx.buffer.fill_once()  # the sampler replaces it with an item of the deployed version
    item = ctx.buffer.next_for(annotator)
    assert item is not None and item.policy_version == ctx.deployments.serving


def test_rejected_version_needs_force(ctx, add_version):
    from storage.errors import Conflict

    v = add_version(status="rejected")
    with pytest.raises(Conflict, match="rejected"):
        ctx.deployments.deploy(v)
    assert ctx.deployments.serving == 0
