"""Deployments and the blind canary through the real server: scripted rankings promote, roll back or leave a canary
undecided; staleness follows the serving lineage; a rejected version needs force; kill -9 during a canary leaves one
version serving everyone and the canary's state consistent."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import torch
from test_crash import start_server as crash_start_server
from test_crash import wait_for

from app.server import free_port
from app.ui.admin_canary import canary_panel, has_canary
from learner.data import hash_fraction
from storage.store import Store

# Every new item is a canary item; 4 rankings (16 comparisons at K=4) allow a decision; 4 ranked items end the test.
QUICK_CANARY = {"canary_share": 1.0, "canary_min_comparisons": 16, "canary_max_items": 4, "canary_threshold": 0.5}


def canary_of(boss: httpx.Client, version: int) -> dict:
    return {v["version"]: v for v in boss.get("/api/versions").json()}[version]


def rank_canary_item(ctx, annotator: httpx.Client, candidate_first: bool) -> None:
    """Sample one item, fetch it as the annotator would, and rank the candidate's answers above (or below) the
    serving version's, reading which is which from the store (the API never shows it)."""
    assert ctx.buffer.fill_once()
    shown = annotator.get("/api/items/next").json()
    versions = {a.answer_id: a.policy_version for a in ctx.store.items.get(shown["item_id"]).answers}
    candidate = ctx.deployments.canary.version
    order = sorted((a["answer_id"] for a in shown["answers"]),
                   key=lambda answer_id: (versions[answer_id] == candidate) != candidate_first)
    r = annotator.post(f"/api/items/{shown['item_id']}/ranking", json={"ranking": order})
    assert r.status_code == 201, r.text


def start_canary(ctx, boss, add_version) -> int:
    assert boss.patch("/api/settings", json=QUICK_CANARY).status_code == 200
    version = add_version()
    r = boss.post(f"/api/versions/{version}/canary")
    assert r.status_code == 200, r.text
    return version


def test_annotators_who_prefer_the_candidate_promote_it(ctx, server, boss, ann, add_version):
    v1 = start_canary(ctx, boss, add_version)
    entry = canary_of(boss, v1)
    assert entry["status"] == "canary" and not entry["deployed"]
    assert entry["canary"] == {"comparisons": 0, "win_rate": None, "ci95": None, "decision": "pending", "items": 0,
                               "untrained_items": 0}
    for _ in range(3):
        rank_canary_item(ctx, ann, candidate_first=True)
    item = ctx.store.items.get(ctx.store.items.count())
    assert item.policy_version == 0 and sorted(a.policy_version for a in item.answers) == [0, 0, v1, v1]
    assert canary_of(boss, v1)["canary"] == {"comparisons": 12, "win_rate": 1.0, "ci95": [1.0, 1.0],
                                              "decision": "pending", "items": 4, "untrained_items": 0}  # 12 < 16
    assert boss.get("/api/health").json()["policy_version"] == 0
    rank_canary_item(ctx, ann, candidate_first=True)
    entry = canary_of(boss, v1)
    assert entry["status"] == "deployed" and entry["deployed"]
    # Its items took any prompt: v1 recorded no prompt split (a real round's version does; see the next test).
    assert entry["canary"] == {"comparisons": 16, "win_rate": 1.0, "ci95": [1.0, 1.0], "decision": "promoted",
                               "items": 5, "untrained_items": 0}
    assert boss.get("/api/health").json()["policy_version"] == v1
    assert canary_of(boss, 0)["status"] == "candidate" and canary_of(boss, 0)["canary"] is None
    # New items come from the promoted version alone; the canary's items (serving version 0) are one step stale.
    assert ctx.buffer.fill_once()
    newest = ctx.store.items.get(ctx.store.items.count())
    assert newest.policy_version == v1 and {a.policy_version for a in newest.answers} == {v1}
    assert ctx.buffer.served_versions == [v1, 0]


def test_annotators_who_prefer_the_serving_version_roll_the_candidate_back(ctx, server, boss, ann, add_version):
    v1 = start_canary(ctx, boss, add_version)
    for _ in range(4):
        rank_canary_item(ctx, ann, candidate_first=False)
    entry = canary_of(boss, v1)
    assert entry["status"] == "rolled_back" and "interval below 0.5" in entry["reason"]
    assert entry["canary"] == {"comparisons": 16, "win_rate": 0.0, "ci95": [0.0, 0.0], "decision": "rolled_back",
                               "items": 5, "untrained_items": 0}
    assert boss.get("/api/health").json()["policy_version"] == 0
    assert ctx.deployments.canary is None
    assert ctx.buffer.fill_once()
    assert {a.policy_version for a in ctx.store.items.get(ctx.store.items.count()).answers} == {0}
    assert boss.post(f"/api/versions/{v1}/promote").status_code == 409  # it is no longer the canary


def test_canary_items_ask_prompts_no_version_in_its_line_trained_on(ctx, server, boss, ann, add_version):
    """A round records the hash below which no prompt trained it (learner/data.py); the canary's items take those
    prompts even when prompts it trained on have fewer items, fall back to any prompt when none is left, and record
    which. With canary_prompts "any" they are the least-sampled prompts, as before."""
    pool = sorted(ctx.store.prompts.least_sampled(1000), key=lambda p: hash_fraction(p.text))
    bound = hash_fraction(pool[3].text)  # three pool prompts are below it
    untrained = {p.prompt_id for p in pool[:3]}
    assert boss.get("/api/settings").json()["canary_prompts"] == "any"  # the default
    assert boss.patch("/api/settings", json={**QUICK_CANARY, "canary_prompts": "untrained"}).status_code == 200
    v1 = add_version(metrics={"gate": {"passed": True}, "heldout": {"untrained_below": bound}})
    assert boss.post(f"/api/versions/{v1}/canary").status_code == 200
    assert ctx.deployments.untrained_below() == bound
    assert ctx.buffer.fill_once(up_to=4) == 4  # one batch of 4 canary items: 3 untrained prompts, then any prompt
    items = [ctx.store.items.get(i) for i in range(1, 5)]
    assert {i.prompt_id for i in items} >= untrained
    assert sorted(i.sampling_params["canary_prompt_untrained"] for i in items) == [False, True, True, True]
    assert all(i.sampling_params["canary_prompt_untrained"] == (i.prompt_id in untrained) for i in items)
    canary = canary_of(boss, v1)["canary"]
    assert (canary["items"], canary["untrained_items"]) == (4, 3)
    assert "3 of 4 canary items on untrained prompts" in canary_panel(ctx, "boss")
    assert "canary items on prompts no version in its line trained on" in canary_panel(ctx, "boss")

    assert boss.patch("/api/settings", json={"canary_prompts": "everywhere"}).status_code == 422
    assert boss.patch("/api/settings", json={"canary_prompts": "any"}).json()["canary_prompts"] == "any"
    assert ctx.deployments.untrained_below() is None
    assert ctx.buffer.fill_once(up_to=8) == 4  # the least-sampled prompts: none of the three has 0 items
    later = [ctx.store.items.get(i) for i in range(5, 9)]
    assert not {i.prompt_id for i in later} & untrained and all(i.sampling_params["canary"] == v1 for i in later)
    assert not any(i.sampling_params["canary_prompt_untrained"] for i in later)
    assert (canary_of(boss, v1)["canary"]["items"], canary_of(boss, v1)["canary"]["untrained_items"]) == (8, 3)


def test_an_undecided_canary_stops_mixing_and_waits_for_an_admin(ctx, server, boss, ann, add_version):
    v1 = start_canary(ctx, boss, add_version)
    for i in range(4):  # half the comparisons each way: the interval straddles 0.5 when the budget runs out
        rank_canary_item(ctx, ann, candidate_first=bool(i % 2))
    entry = canary_of(boss, v1)
    assert entry["status"] == "canary" and entry["canary"]["decision"] == "undecided"
    assert entry["canary"]["comparisons"] == 16 and entry["canary"]["win_rate"] == 0.5
    low, high = entry["canary"]["ci95"]
    assert low < 0.5 < high
    assert ctx.buffer.fill_once()  # mixing stopped: the next item is the serving version's alone
    assert {a.policy_version for a in ctx.store.items.get(ctx.store.items.count()).answers} == {0}
    assert boss.post("/api/versions/0/promote").status_code == 409  # not the canary
    assert ann.post(f"/api/versions/{v1}/promote").status_code == 403
    r = boss.post(f"/api/versions/{v1}/promote")
    assert r.status_code == 200 and r.json()["canary"]["decision"] == "promoted"
    assert boss.get("/api/health").json()["policy_version"] == v1


def test_ties_through_the_api_count_half_a_comparison_for_the_canary(ctx, server, boss, ann, add_version):
    v1 = start_canary(ctx, boss, add_version)
    assert ctx.buffer.fill_once()
    shown = ann.get("/api/items/next").json()
    versions = {a.answer_id: a.policy_version for a in ctx.store.items.get(shown["item_id"]).answers}
    cand = [a for a, v in versions.items() if v == v1]
    serv = [a for a, v in versions.items() if v != v1]
    bad = ann.post(f"/api/items/{shown['item_id']}/ranking", json={"ranking": [[cand[0]], [], cand[1], *serv]})
    assert bad.status_code == 422 and "body.ranking.1" in bad.json()["error"]  # an empty tie
    # cand0 ties serv0 (half), cand0 > serv1 (win), serv0 > cand1 (loss), cand1 > serv1 (win): 2.5 of 4.
    r = ann.post(f"/api/items/{shown['item_id']}/ranking", json={"ranking": [[cand[0], serv[0]], cand[1], serv[1]]})
    assert r.status_code == 201, r.text
    assert canary_of(boss, v1)["canary"]["comparisons"] == 4 and canary_of(boss, v1)["canary"]["win_rate"] == 0.625
    pairs = ctx.store.db.cursor().execute("SELECT count(*) FROM pairs").fetchone()[0]
    assert pairs == 5  # training pairs: 6 less the tie


def test_admin_rolls_a_canary_back_and_a_new_round_supersedes_one(ctx, server, boss, add_version):
    assert not has_canary(ctx, "boss")  # Admin's Promote / Roll back buttons show only while a canary runs
    v1 = start_canary(ctx, boss, add_version)
    assert has_canary(ctx, "boss")
    r = boss.post(f"/api/versions/{v1}/reject-canary")
    assert r.status_code == 200 and r.json()["canary"]["decision"] == "rolled_back"
    assert not has_canary(ctx, "boss")
    assert canary_of(boss, v1)["status"] == "rolled_back"
    assert boss.post(f"/api/versions/{v1}/reject-canary").status_code == 409
    v2 = add_version()
    assert boss.post(f"/api/versions/{v2}/canary").status_code == 200
    v3 = add_version()
    assert boss.post(f"/api/versions/{v3}/canary").status_code == 200  # supersedes v2, which ends undecided
    assert canary_of(boss, v2)["status"] == "candidate" and canary_of(boss, v2)["canary"]["decision"] == "undecided"
    assert boss.post(f"/api/versions/{v3}/deploy").json() == {"version": v3, "status": "deployed"}  # = promote
    assert canary_of(boss, v3)["canary"]["decision"] == "promoted"
    assert boss.post(f"/api/versions/{v1}/canary").status_code == 409  # only a candidate can become one


def test_automatic_rounds_wait_for_the_canarys_verdict(ctx, server, boss, ann, add_version):
    """A round every label while a canary is judged: none starts (a round finished meanwhile would become the next
    canary and end this one undecided before any verdict: with rounds every 16 labels and the canary's defaults,
    nearly every canary would be cut short). The label that promotes it starts the next round, which trains from it."""
    from test_train_api import QUICK, wait_run

    v1 = start_canary(ctx, boss, add_version)
    assert boss.patch("/api/settings", json={"auto_train": {"every_labels": 1, "every_minutes": 0,
                                                            "config": QUICK}}).status_code == 200
    paused = boss.get("/api/train").json()["paused"]
    assert paused and f"judge the canary v{v1}" in paused, paused
    for _ in range(3):  # 12 comparisons: fewer than the 16 a decision needs
        rank_canary_item(ctx, ann, candidate_first=True)
        assert canary_of(boss, v1)["canary"]["decision"] == "pending"
        assert boss.get("/api/runs").json() == []
        assert boss.get("/api/train").json()["paused"] == paused  # the same words: the log says it once
    rank_canary_item(ctx, ann, candidate_first=True)  # 16 comparisons, all won by the candidate: promoted
    assert canary_of(boss, v1)["canary"]["decision"] == "promoted"
    assert boss.get("/api/health").json()["policy_version"] == v1
    runs = boss.get("/api/runs").json()
    assert len(runs) == 1, runs  # the same label started the next round
    run = wait_run(boss, runs[0]["run_id"])
    assert run["status"] in ("succeeded", "rejected"), run
    assert ctx.store.versions.get(run["version"]).parent == v1


def test_under_canary_chain_a_round_trains_from_the_canary_and_waits_for_its_decision(ctx, server, boss, ann,
                                                                                       add_version):
    """canary_chain: the automatic round a label starts while v1 is judged trains from v1 (no waiting for the verdict),
    its version waits as a candidate and pauses further rounds; v1 promoted, it becomes the canary at once."""
    from test_train_api import QUICK, wait_run

    v1 = start_canary(ctx, boss, add_version)
    assert boss.patch("/api/settings", json={"canary_chain": "yes"}).status_code == 422  # strict: true or false
    assert boss.patch("/api/settings", json={"canary_chain": True}).json()["canary_chain"] is True
    assert boss.patch("/api/settings", json={"auto_train": {"every_labels": 1, "every_minutes": 0,
                                                            "config": QUICK}}).status_code == 200
    assert boss.get("/api/train").json()["paused"] is None
    rank_canary_item(ctx, ann, candidate_first=True)  # 4 comparisons: pending, and a round starts from the canary
    runs = boss.get("/api/runs").json()
    assert len(runs) == 1, runs
    run = wait_run(boss, runs[0]["run_id"])
    assert run["status"] == "succeeded", run
    v2 = run["version"]
    assert ctx.store.versions.get(v2).parent == v1 and canary_of(boss, v2)["status"] == "candidate"
    assert canary_of(boss, v2)["reason"] == f"waits for the decision on the canary v{v1}, which it was trained from " \
                                            "(canary_chain)"
    assert canary_of(boss, v1)["status"] == "canary" and boss.get("/api/health").json()["policy_version"] == 0
    paused = boss.get("/api/train").json()["paused"]
    assert paused and f"v{v2}, trained from the canary v{v1}, waits" in paused, paused
    rank_canary_item(ctx, ann, candidate_first=True)
    assert len(boss.get("/api/runs").json()) == 1  # one speculative round at a time
    assert boss.post(f"/api/versions/{v1}/promote").status_code == 200
    assert boss.get("/api/health").json()["policy_version"] == v1
    entry = canary_of(boss, v2)
    assert entry["status"] == "canary" and entry["canary"]["decision"] == "pending", entry
    assert ctx.store.versions.active_canary().serving == v1
    assert ctx.deployments.round_parent() == v2


def test_under_canary_chain_what_waits_goes_with_a_rolled_back_canary_and_the_newest_takes_over(
        ctx, server, boss, ann, add_version):
    """What a round hands over (the round itself runs in the test above): children of the canary wait; rolled back,
    they are marked so, even one that finishes afterwards; promoted, the newest becomes the canary."""
    v1 = start_canary(ctx, boss, add_version)
    assert ctx.deployments.round_parent() == 0  # canary_chain off: rounds start from the serving version
    assert boss.patch("/api/settings", json={"canary_chain": True}).status_code == 200
    assert ctx.deployments.round_parent() == v1
    path = Path(ctx.store.versions.get(v1).path)

    def register(version: int, parent: int) -> str:
        return ctx.deployments.register(version, parent, "dpo", path, {}, {"labels_used": 3}, True, None)

    assert register(v1 + 1, v1) == "candidate"
    for _ in range(4):
        rank_canary_item(ctx, ann, candidate_first=False)
    assert canary_of(boss, v1)["canary"]["decision"] == "rolled_back"
    entry = canary_of(boss, v1 + 1)
    assert entry["status"] == "rolled_back" and f"canary v{v1}, which the annotators rolled back" in entry["reason"]
    assert register(v1 + 2, v1) == "rolled_back"  # finished after the verdict
    assert ctx.deployments.round_parent() == 0 and ctx.deployments.canary is None
    v4 = add_version()
    assert boss.post(f"/api/versions/{v4}/canary").status_code == 200
    assert register(v4 + 1, v4) == "candidate" and register(v4 + 2, v4) == "candidate"
    assert boss.post(f"/api/versions/{v4}/promote").status_code == 200
    assert canary_of(boss, v4 + 2)["status"] == "canary" and ctx.store.versions.active_canary().serving == v4
    assert canary_of(boss, v4 + 1)["status"] == "candidate"  # older: an admin can still test or deploy it
    assert canary_of(boss, v4 + 1)["reason"] == f"trained from v{v4}; v{v4 + 2}, trained later, became the next canary"
    assert canary_of(boss, v4 + 2)["reason"] is None
    assert ctx.store.versions.waiting(v4) == [ctx.store.versions.get(v4 + 1)]
    # Stored as "False", read back False (bool("False") is True), and rounds start from the serving version again.
    assert boss.patch("/api/settings", json={"canary_chain": False}).json()["canary_chain"] is False
    assert boss.get("/api/settings").json()["canary_chain"] is False and ctx.deployments.round_parent() == v4


def test_under_canary_chain_a_canary_still_pending_after_half_its_budget_gives_way_to_its_child(
        ctx, server, boss, ann, add_version):
    """A marginal canary would hold the version trained from it (and the automatic rounds) to canary_max_items; after
    canary_supersede_items the newest waiting version is judged instead, against the version serving."""
    v1 = start_canary(ctx, boss, add_version)  # QUICK_CANARY: 4 ranked items at most, 16 comparisons to decide
    path = Path(ctx.store.versions.get(v1).path)
    rank_canary_item(ctx, ann, candidate_first=True)
    assert boss.patch("/api/settings", json={"canary_supersede_items": -1}).status_code == 422
    assert boss.patch("/api/settings", json={"canary_chain": True, "canary_supersede_items": 2}).status_code == 200
    for child in (v1 + 1, v1 + 2):
        assert ctx.deployments.register(child, v1, "dpo", path, {}, {"labels_used": 3}, True, None) == "candidate"
    assert ctx.deployments.canary.version == v1  # 1 ranked item: not yet 2
    rank_canary_item(ctx, ann, candidate_first=False)  # 2 of 4, 8 comparisons: pending, marginal
    entry = canary_of(boss, v1)
    assert entry["status"] == "candidate" and entry["canary"]["decision"] == "undecided"
    assert entry["reason"] == f"ended undecided: superseded by the canary v{v1 + 2}"
    canary = ctx.store.versions.active_canary()
    assert (canary.version, canary.serving, canary.decision) == (v1 + 2, 0, "pending")
    assert canary_of(boss, v1 + 1)["reason"] == f"trained from v{v1}; v{v1 + 2}, trained later, became the next canary"
    assert ctx.deployments.round_parent() == v1 + 2  # rounds go on from the new canary
    rank_canary_item(ctx, ann, candidate_first=True)
    assert {a.policy_version for a in ctx.store.items.get(ctx.store.items.count()).answers} == {0, v1 + 2}


def test_a_restart_between_a_promotion_and_the_hand_over_hands_over_once(ctx, add_version):
    """The process stopped after the store recorded the canary's promotion and before the waiting version's canary
    started (the two are separate writes): the next start hands over. Once a canary ran against the promoted version,
    or for a version passed over by a newer sibling, a restart starts nothing."""
    from app.deployments import Deployments

    assert ctx.deployments.set_canary_config({"canary_chain": True}).canary_chain
    v1 = add_version()
    ctx.deployments.start_canary(v1)
    path = Path(ctx.store.versions.get(v1).path)
    for child in (v1 + 1, v1 + 2):
        assert ctx.deployments.register(child, v1, "dpo", path, {}, {"labels_used": 3}, True, None) == "candidate"
    ctx.store.versions.decide_canary(v1, "promoted", 64, 0.7, (0.6, 0.8), "promoted: ...")  # ... and the stop

    restarted = Deployments(ctx.store, ctx.policy)
    assert restarted.serving == v1 and restarted.canary.version == v1 + 2 and restarted.canary.serving == v1
    passed_over = f"trained from v{v1}; v{v1 + 2}, trained later, became the next canary"
    assert ctx.store.versions.get(v1 + 1).reason == passed_over
    restarted.reject_canary(v1 + 2)
    again = Deployments(ctx.store, ctx.policy)  # v1 + 1 was passed over, and a canary ran against v1: nothing starts
    assert again.canary is None and ctx.store.versions.get(v1 + 1).status == "candidate"


def test_a_round_started_by_hand_during_a_canary_says_it_may_supersede_it(ctx, server, boss, add_version):
    """It does not wait (an admin asked for it), but Admin -> Train says what passing the gate will do."""
    from app.ui import admin_rounds
    from storage.errors import Conflict

    def start_and_stop(knobs: dict | None = None) -> str:
        message = admin_rounds.start_round(ctx, "boss", knobs or {"steps": 1})
        run_id = boss.get("/api/runs").json()[0]["run_id"]
        with contextlib.suppress(Conflict):  # it may have ended on its own already
            ctx.scheduler.cancel(run_id)
        ctx.scheduler.wait(run_id)
        return message

    plain = start_and_stop()
    assert "canary" not in plain and "Note" not in plain
    # An online round with RPO (measured worse than without, learner.config.advisories) is started, with that note.
    assert "**Note:** rpo_alpha 1 with sync_every 1" in start_and_stop({"steps": 1, "sync_every": 1})
    v1 = start_canary(ctx, boss, add_version)
    message = start_and_stop()
    assert f"The canary v{v1} is still being judged" in message and f"v{v1} ends undecided" in message, message


def test_deploy_policy_immediate_and_the_settings_contract(ctx, server, boss, add_version):
    body = boss.get("/api/settings").json()
    assert {k: body[k] for k in QUICK_CANARY} == {"canary_share": 1.0, "canary_min_comparisons": 64,
                                                  "canary_max_items": 60, "canary_threshold": 0.5}
    assert body["deploy_policy"] == "canary" and body["canary_chain"] is False
    for bad in ({"deploy_policy": "later"}, {"canary_share": 0}, {"canary_threshold": 1.5},
                {"canary_min_comparisons": 0}, {"overlap": 2, "canary_max_items": -1}):
        assert boss.patch("/api/settings", json=bad).status_code == 422, bad
    assert boss.get("/api/settings").json() == body  # a refused PATCH stores nothing, not even its valid part
    assert boss.patch("/api/settings", json={"deploy_policy": "immediate"}).json()["deploy_policy"] == "immediate"
    version = add_version()
    path = Path(ctx.store.versions.get(version).path)
    # What a round hands over (tests/test_train_api.py runs the round itself).
    status = ctx.deployments.register(version + 1, version, "dpo", path, {}, {"labels_used": 3}, True, None)
    assert status == "deployed" and boss.get("/api/health").json()["policy_version"] == version + 1


def test_rejected_versions_need_force_in_one_place(ctx, server, boss, add_version):
    v1 = add_version(status="rejected")
    r = boss.post(f"/api/versions/{v1}/deploy")
    assert r.status_code == 409 and "rejected by the gate" in r.json()["error"] and "force" in r.json()["error"]
    assert boss.post(f"/api/versions/{v1}/canary").status_code == 409
    assert boss.post(f"/api/versions/{v1}/deploy", params={"force": "true"}).status_code == 200
    assert boss.get("/api/health").json()["policy_version"] == v1


def test_staleness_counts_deployed_versions_along_the_lineage(ctx, accounts, add_version, sample_items):
    (old,) = sample_items(1)  # version 0's item
    user = ctx.store.users.get("ann").user_id
    rejected = [add_version(status="rejected") for _ in range(3)]  # numbers move on, the lineage does not
    assert ctx.buffer.served_versions == [0] and ctx.buffer.waiting_count() == 1
    v4 = add_version()
    ctx.deployments.deploy(v4)
    (mid,) = sample_items(1)
    ctx.deployments.roll_back("worse")  # v4's items are off the line now: a rolled-back version's answers
    assert ctx.buffer.served_versions == [0]
    assert [ctx.buffer.next_for(user).item_id] == [old] and ctx.store.items.get(mid).policy_version == v4
    v5 = add_version()
    ctx.deployments.deploy(v5)
    v6 = add_version()
    ctx.deployments.deploy(v6)
    assert ctx.store.versions.lineage(v6) == [v6, v5, 0] and ctx.buffer.served_versions == [v6, v5, 0]
    assert rejected == [1, 2, 3]


# -- kill -9 during a canary --------------------------------------------------------------------------------------
def make_adapter(base_dir: Path, out: Path, seed: int) -> None:
    """A real LoRA adapter on the tiny model (as conftest's add_version makes one), saved at `out`."""
    from peft import LoraConfig, get_peft_model

    from learner.model import Device, load_base_model

    base = load_base_model(base_dir, Device(torch.device("cpu"), torch.float32))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                                            task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(out)


def start_server(data_dir: Path, port: int, model: Path, log: Path) -> subprocess.Popen:
    return crash_start_server(data_dir, port, model, log, buffer_size=6, max_new_tokens=6)


class Annotators:
    """Threads that fetch and rank items (in the order shown) until stopped; counts what the server refused."""

    def __init__(self, url: str, tokens: list[str]):
        self.url, self.tokens = url, tokens
        self.stop = threading.Event()
        self.ranked = 0
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in tokens]

    def _run(self, token: str) -> None:
        with httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {token}"}, timeout=10) as c:
            while not self.stop.is_set():
                try:
                    r = c.get("/api/items/next")
                    if r.status_code != 200:
                        self.stop.wait(0.2)
                        continue
                    item = r.json()
                    ranking = [a["answer_id"] for a in item["answers"]]
                    if c.post(f"/api/items/{item['item_id']}/ranking", json={"ranking": ranking}).status_code == 201:
                        self.ranked += 1
                except httpx.HTTPError:  # the server is being killed or restarted: try again
                    self.stop.wait(0.3)


def test_kill_9_during_a_canary_leaves_one_version_serving_and_the_canary_consistent(tmp_path, tiny_model_dir):
    data_dir = tmp_path / "data"
    with Store.open(data_dir) as store:
        store.seed_starter_prompts()
        admin = store.users.add("boss", "admin", "boss-password")[2]
        tokens = [store.users.add(f"kill{i}", "annotator", f"kill{i}-password")[2] for i in range(3)]
        make_adapter(tiny_model_dir, data_dir / "versions" / "v1" / "adapter", seed=1)
        store.versions.add(1, 0, "dpo", "candidate", str(data_dir / "versions" / "v1"), {}, {}, 4)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    boss = httpx.Client(base_url=url, headers={"authorization": f"Bearer {admin}"}, timeout=30)
    log = tmp_path / "server.log"
    server = start_server(data_dir, port, tiny_model_dir, log)
    annotators = Annotators(url, tokens)
    try:
        # Rankings in the order shown are random with respect to the versions: with a threshold of 0.05 the
        # candidate is promoted soon after 24 comparisons, so the kill lands before, during or after that write.
        settings = {"canary_share": 1.0, "canary_min_comparisons": 24, "canary_max_items": 1000,
                    "canary_threshold": 0.05}
        assert boss.patch("/api/settings", json=settings).status_code == 200
        assert boss.post("/api/versions/1/canary").status_code == 200
        for t in annotators.threads:
            t.start()
        wait_for(lambda: (canary_of(boss, 1)["canary"] or {}).get("comparisons", 0) >= 16, 240)
        server.send_signal(signal.SIGKILL)
        server.wait(30)
        server = start_server(data_dir, port, tiny_model_dir, log)
        versions = {v["version"]: v for v in boss.get("/api/versions").json()}
        serving = [v for v, entry in versions.items() if entry["status"] == "deployed"]
        assert len(serving) == 1 and boss.get("/api/health").json()["policy_version"] == serving[0]
        decision = versions[1]["canary"]["decision"]
        assert (decision, versions[1]["status"], serving[0]) in {("pending", "canary", 0), ("promoted", "deployed", 1)}
        # The annotators carry on against the restarted server until the canary is decided.
        wait_for(lambda: canary_of(boss, 1)["canary"]["decision"] == "promoted", 240)
        assert boss.get("/api/health").json()["policy_version"] == 1
        recorded = canary_of(boss, 1)["canary"]
    finally:
        annotators.stop.set()
        for t in annotators.threads:
            t.join(30) if t.is_alive() else None
        boss.close()
        server.kill()
        server.wait(30)
    with Store.open(data_dir) as store:  # the evidence recorded at the decision is what the stored rankings say
        assert store.versions.deployed().version == 1 and store.versions.active_canary() is None
        assert recorded["comparisons"] >= 24 and recorded["ci95"][0] > 0.05
        assert recorded["comparisons"] <= independent_comparisons(store, candidate=1, serving=0)
    # What the admin's terminal showed across both starts, loading the canary's adapter each time: no traceback, and
    # no library's deprecation notice (peft reading transformers' `is_gradient_checkpointing` printed one).
    shown = log.read_text()
    assert "Traceback" not in shown and "FutureWarning" not in shown, shown[-3000:]


def independent_comparisons(store: Store, candidate: int, serving: int) -> int:
    """Candidate-vs-serving comparisons in every stored ranking, counted in Python from the rankings export."""
    import json

    from storage.exports import iter_export

    total = 0
    for row in iter_export(store, "rankings"):
        row = json.loads(json.dumps(row, default=str))
        versions = [store.items.answer(a).policy_version for a in row["answer_ids"]]
        total += sum(1 for i, a in enumerate(versions) for b in versions[i + 1:] if {a, b} == {candidate, serving})
    return total


def test_a_waiting_version_whose_adapter_cannot_load_is_tried_once_and_says_why(ctx, server, boss, ann, add_version,
                                                                                  tmp_path, caplog):
    """Past canary_supersede_items the newest waiting version is handed the canary; one whose adapter cannot load
    stays a candidate saying why, and is not tried again at every later label (a model load each time)."""
    v1 = start_canary(ctx, boss, add_version)
    rank_canary_item(ctx, ann, candidate_first=True)
    assert boss.patch("/api/settings", json={"canary_chain": True, "canary_supersede_items": 2}).status_code == 200
    broken = tmp_path / "broken"
    broken.mkdir()  # no adapter in it
    assert ctx.deployments.register(v1 + 1, v1, "dpo", broken, {}, {"labels_used": 3}, True, None) == "candidate"
    with caplog.at_level("WARNING", logger="app.deployments"):
        rank_canary_item(ctx, ann, candidate_first=False)  # 2 ranked items: the hand-over is tried, and fails
        assert ctx.deployments.canary.version == v1 and canary_of(boss, v1)["canary"]["decision"] == "pending"
        entry = canary_of(boss, v1 + 1)
        assert entry["status"] == "candidate"
        assert entry["reason"].startswith(f"trained from v{v1}; could not become the canary: ") and \
            "adapter" in entry["reason"], entry["reason"]
        rank_canary_item(ctx, ann, candidate_first=False)  # 3 ranked items, still pending: not tried again
        assert canary_of(boss, v1)["canary"]["decision"] == "pending"
    tries = [r for r in caplog.records if f"canary v{v1 + 1} could not start" in r.getMessage()]
    assert len(tries) == 1, [r.getMessage() for r in caplog.records]


def test_when_the_newest_waiting_version_cannot_load_the_next_newest_becomes_the_canary(ctx, server, boss, ann,
                                                                                        add_version, tmp_path):
    """Newest first: one that cannot load says why and the next newest is tried; only then are the older ones marked
    as passed over, naming the version that did become the canary (not the one that failed)."""
    v1 = start_canary(ctx, boss, add_version)
    rank_canary_item(ctx, ann, candidate_first=True)
    assert boss.patch("/api/settings", json={"canary_chain": True, "canary_supersede_items": 2}).status_code == 200
    path = Path(ctx.store.versions.get(v1).path)
    broken = tmp_path / "broken"
    broken.mkdir()  # no adapter in it
    for child, where in ((v1 + 1, path), (v1 + 2, path), (v1 + 3, broken)):
        assert ctx.deployments.register(child, v1, "dpo", where, {}, {"labels_used": 3}, True, None) == "candidate"
    rank_canary_item(ctx, ann, candidate_first=False)  # 2 ranked items, pending: handed over
    canary = ctx.store.versions.active_canary()
    assert (canary.version, canary.serving, canary.decision) == (v1 + 2, 0, "pending")
    assert canary_of(boss, v1)["reason"] == f"ended undecided: superseded by the canary v{v1 + 2}"
    failed = canary_of(boss, v1 + 3)
    assert failed["status"] == "candidate" and failed["reason"].startswith(
        f"trained from v{v1}; could not become the canary: "), failed["reason"]
    assert canary_of(boss, v1 + 1)["reason"] == f"trained from v{v1}; v{v1 + 2}, trained later, became the next canary"
    rank_canary_item(ctx, ann, candidate_first=True)
    assert {a.policy_version for a in ctx.store.items.get(ctx.store.items.count()).answers} == {0, v1 + 2}
