"""Policy versions (deploy, roll back, rejected ones refused), training runs (lifecycle, loss curve, crash recovery)
and settings."""

import math

import pytest

from storage.errors import Conflict, InvalidValue, NotFound
from storage.store import Store


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path) as store:
        yield store


def add_version(store, version, parent, status="candidate", reason=None):
    return store.versions.add(
        version, parent, "dpo", status, f"/versions/{version}", {"beta": 0.1}, {"rm_accuracy": 0.7}, 40, reason
    )


def test_deploy_and_roll_back(store):
    v1 = add_version(store, store.versions.next_number(), 0)
    assert (v1.version, v1.status, v1.config, v1.metrics, v1.labels_used) == (1, "candidate", {"beta": 0.1},
                                                                                {"rm_accuracy": 0.7}, 40)
    assert store.versions.next_number() == 2
    deployed = store.versions.deploy(1)
    assert deployed.status == "deployed" and deployed.deployed_at is not None
    assert store.versions.deployed().version == 1
    assert store.versions.get(0).status == "candidate"

    add_version(store, 2, 1)
    store.versions.deploy(2)
    store.versions.deploy(1)  # roll back
    assert store.versions.deployed().version == 1
    assert [(v.version, v.status) for v in store.versions.list()] == [(0, "candidate"), (1, "deployed"),
                                                                     (2, "candidate")]
    store.versions.set_status(2, "rolled_back", reason="worse on the demo prompts")
    assert store.versions.get(2).reason == "worse on the demo prompts"


def test_nan_metrics_are_kept_as_null(store):
    version = store.versions.add(1, 0, "dpo", "rejected", None, {}, {"kl": float("nan"), "loss": [1.0, float("inf")]},
                                 0, reason="loss is NaN")
    assert version.metrics == {"kl": None, "loss": [1.0, None]}


def test_deploy_records_what_it_is_told_and_who_was_taken_down(store):
    # Who may deploy a rejected version is the app's Deployments service's call (tests/test_deployments.py); the
    # registry records it and keeps exactly one version deployed.
    add_version(store, 1, 0, status="rejected", reason="KL 3.2 above the bound 1.0")
    add_version(store, 2, 0)
    assert store.versions.deploy(1).status == "deployed"
    store.versions.deploy(2, taken_down="rolled_back", reason="worse answers")
    assert [(v.version, v.status, v.reason) for v in store.versions.list()] == [
        (0, "candidate", None), (1, "rolled_back", "worse answers"), (2, "deployed", None)]
    with pytest.raises(InvalidValue, match="taken_down must be rolled_back or rejected"):
        store.versions.deploy(0, taken_down="deployed")


def test_a_canary_is_one_transaction_at_every_step(store):
    add_version(store, 1, 0)
    add_version(store, 2, 0)
    canary = store.versions.start_canary(1)
    assert (canary.version, canary.serving, canary.decision, canary.comparisons) == (1, 0, "pending", None)
    assert store.versions.get(1).status == "canary" and store.versions.active_canary() == canary
    with pytest.raises(InvalidValue, match="only a candidate can become the canary; version 1 is canary"):
        store.versions.start_canary(1)
    with pytest.raises(InvalidValue, match="version 1 is the canary: promote it"):
        store.versions.deploy(1)
    with pytest.raises(InvalidValue, match="version 1 is canary"):
        store.versions.set_status(1, "rejected")
    # A second canary supersedes the first, which ends undecided and is a candidate again.
    store.versions.start_canary(2)
    assert store.versions.get(1).status == "candidate" and store.versions.canaries()[1].decision == "undecided"
    assert "superseded by the canary v2" in store.versions.canaries()[1].reason
    with pytest.raises(Conflict, match="version 1 is not the canary \\(v2 is\\)"):
        store.versions.decide_canary(1, "promoted", 64, 0.7, (0.6, 0.8), "test")
    decided = store.versions.decide_canary(2, "promoted", 64, 0.7, (0.6, 0.8), "promoted: interval above 0.5")
    assert (decided.decision, decided.comparisons, decided.ci95) == ("promoted", 64, (0.6, 0.8))
    assert store.versions.deployed().version == 2 and store.versions.get(0).status == "candidate"
    assert store.versions.active_canary() is None and store.versions.lineage(2) == [2, 0]
    # Deploying anything else ends a running canary: it was compared with the version that no longer serves.
    add_version(store, 3, 2)
    store.versions.start_canary(3)
    store.versions.deploy(0)
    assert store.versions.get(3).status == "candidate" and store.versions.canaries()[3].decision == "undecided"
    assert store.versions.lineage(3) == [3, 2, 0]


def test_version_errors(store):
    add_version(store, 1, 0)
    with pytest.raises(Conflict, match="policy version 1 already exists"):
        add_version(store, 1, 0)
    with pytest.raises(NotFound, match="parent version 7 of version 2 does not exist"):
        add_version(store, 2, 7)
    with pytest.raises(InvalidValue, match="version status must be one of"):
        add_version(store, 2, 1, status="great")
    with pytest.raises(NotFound, match="no policy version 9"):
        store.versions.deploy(9)
    with pytest.raises(InvalidValue, match="version 0 is deployed"):
        store.versions.set_status(0, "rejected")
    assert [v.version for v in store.versions.list()] == [0, 1]


def test_run_lifecycle(store):
    run_id = store.runs.create("dpo", {"beta": 0.1, "steps": 3})
    assert store.runs.active().run_id == run_id
    run = store.runs.get(run_id)
    assert (run.status, run.progress, run.started_at, run.config) == ("queued", 0.0, None, {"beta": 0.1, "steps": 3})
    assert store.runs.update(run_id, status="running").started_at is not None
    for step, loss in enumerate([0.69, 0.5, float("nan")], start=1):
        store.runs.add_step(run_id, step, loss, {"margin": step / 10})
        store.runs.update(run_id, step=step, loss=loss, progress=step / 3)
    steps = store.runs.steps(run_id)
    assert list(steps.columns) == ["step", "loss", "metrics", "at"]
    assert steps["step"].tolist() == [1, 2, 3] and math.isnan(steps["loss"].iloc[2])
    assert steps["metrics"].iloc[1] == {"margin": 0.2}
    done = store.runs.update(run_id, status="failed", error="loss is NaN at step 3", metrics={"steps": 3})
    assert done.finished_at is not None and done.error == "loss is NaN at step 3" and done.progress == 1.0
    assert store.runs.active() is None
    assert [r.run_id for r in store.runs.list(10)] == [run_id]


def test_run_errors(store):
    run_id = store.runs.create("kto", {})
    with pytest.raises(InvalidValue, match="unknown run field 'colour'"):
        store.runs.update(run_id, colour="red")
    with pytest.raises(InvalidValue, match="progress must be a number in"):
        store.runs.update(run_id, progress=1.5)
    with pytest.raises(InvalidValue, match="run status must be one of"):
        store.runs.update(run_id, status="done")
    with pytest.raises(NotFound, match="no training run with id 99"):
        store.runs.update(99, status="running")
    with pytest.raises(NotFound):
        store.runs.add_step(99, 1, 0.5)
    assert store.runs.get(run_id).status == "queued"
    assert store.runs.steps(run_id).empty


def test_fail_unfinished_after_a_crash(store):
    queued = store.runs.create("dpo", {})
    running = store.runs.create("dpo", {})
    finished = store.runs.create("dpo", {})
    store.runs.update(running, status="running")
    store.runs.update(finished, status="succeeded", version=1)
    assert store.runs.fail_unfinished("the app restarted") == 2
    for run_id in (queued, running):
        run = store.runs.get(run_id)
        assert (run.status, run.error) == ("failed", "the app restarted") and run.finished_at is not None
    assert store.runs.get(finished).status == "succeeded"
    assert store.runs.fail_unfinished("again") == 0


def test_settings(store):
    assert store.settings.get("guidelines") is None
    assert store.settings.get("guidelines", "Rank by helpfulness.") == "Rank by helpfulness."
    store.settings.set("guidelines", "Prefer correct answers.")
    store.settings.set("guidelines", "Prefer short, correct answers.")
    assert store.settings.get("guidelines") == "Prefer short, correct answers."
    with pytest.raises(InvalidValue, match="setting 'k' must be a string, got int"):
        store.settings.set("k", 3)
