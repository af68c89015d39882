"""The REST API of the learning loop: training rounds, runs, versions (admin), under /api."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from app.api import Admin, Ctx
from app.api_models import RunInfo, RunStarted, TrainState, VersionInfo, errors
from app.deployments import CanaryStatus
from learner.config import RoundConfig, advisories
from storage.runs import Run
from storage.versions import PolicyVersion

router = APIRouter(prefix="/api")


def run_json(run: Run) -> dict:
    return {"run_id": run.run_id, "status": run.status, "algorithm": run.algorithm, "progress": run.progress,
            "step": run.step, "loss": run.loss, "metrics": run.metrics or {}, "version": run.version,
            "error": run.error}


def version_json(v: PolicyVersion, serving: int, canary: CanaryStatus | None) -> dict:
    return {"version": v.version, "parent": v.parent, "algorithm": v.algorithm, "status": v.status,
            "deployed": v.version == serving, "labels_used": v.labels_used, "reason": v.reason,
            "metrics": v.metrics or {}, "config": v.config or {},
            "created_at": v.created_at.isoformat() if v.created_at else None,
            "canary": None if canary is None else canary.to_json()}


@router.post("/train", status_code=202, response_model=RunStarted, responses=errors({
    409: "a round is already in progress", 422: "an unknown RoundConfig key or a value out of range"}))
def train(user: Admin, c: Ctx, body: Annotated[dict[str, Any], Body()] = None) -> dict:
    """Start a round: `{"algorithm": "dpo"|"kto"|"reward", ...RoundConfig overrides}`. 409 while one runs. Its
    `warnings`: combinations of these settings the learning benchmark measured worse (the round repeats them)."""
    config = RoundConfig.from_dict(body or {})
    return {"run_id": c.scheduler.start(config), "warnings": advisories(config)}


@router.get("/train", response_model=TrainState)
def train_state(user: Admin, c: Ctx) -> dict:
    """What training is doing: the round in progress, whether automatic rounds are on, and why they are paused."""
    active, auto = c.store.runs.active(), c.auto_trainer.settings()
    return {"active_run": active.run_id if active else None, "automatic": auto.enabled,
            "paused": c.auto_trainer.pause_reason(auto)}


@router.get("/runs", response_model=list[RunInfo])
def runs(user: Admin, c: Ctx) -> list[dict]:
    return [run_json(r) for r in c.store.runs.list(50)]


@router.get("/runs/{run_id}", response_model=RunInfo, responses=errors({404: "no run with this id"}))
def run(run_id: int, user: Admin, c: Ctx) -> dict:
    return run_json(c.store.runs.get(run_id))


@router.post("/runs/{run_id}/cancel", status_code=202, responses=errors({
    404: "no run with this id", 409: "the run is no longer queued or running"}))
def cancel(run_id: int, user: Admin, c: Ctx) -> dict:
    c.scheduler.cancel(run_id)
    return {"run_id": run_id, "status": "cancelling"}


@router.get("/versions", response_model=list[VersionInfo])
def versions(user: Admin, c: Ctx) -> list[dict]:
    """Every version; `canary` is null, or the human evidence of its test against the serving version."""
    serving, canaries = c.deployments.serving, c.deployments.canary_statuses()
    return [version_json(v, serving, canaries.get(v.version)) for v in c.store.versions.list()]


@router.post("/versions/{version}/deploy", responses=errors({
    404: "no such version", 409: "the gate rejected this version: deploy it with ?force=true",
    503: "the version's adapter cannot be loaded"}))
def deploy(version: int, user: Admin, c: Ctx, force: bool = False) -> dict:
    """Roll back or forward to `version` (hot swap; annotators get its answers next). The canary is promoted; a
    version the gate rejected needs `?force=true` (409 otherwise); a canary against the old version ends undecided."""
    c.deployments.deploy(version, force=force, by=user.name)
    return {"version": version, "status": "deployed"}


@router.post("/versions/{version}/canary")
def start_canary(version: int, user: Admin, c: Ctx) -> dict:
    """Test a candidate on annotators by hand (a round does this itself under deploy_policy "canary")."""
    c.deployments.start_canary(version)
    return {"version": version, "status": "canary"}


@router.post("/versions/{version}/promote")
def promote(version: int, user: Admin, c: Ctx) -> dict:
    """Promote the canary now, whatever its evidence says (409 when `version` is not the canary)."""
    return {"version": version, "status": "deployed", "canary": c.deployments.promote(version, by=user.name).to_json()}


@router.post("/versions/{version}/reject-canary")
def reject_canary(version: int, user: Admin, c: Ctx) -> dict:
    """Roll the canary back now: the serving version stays; the canary is marked rolled_back (409 if not the canary)."""
    status = c.deployments.reject_canary(version, by=user.name)
    return {"version": version, "status": "rolled_back", "canary": status.to_json()}
