"""The REST API of the learning loop: training rounds, runs, versions (admin), under /api."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from app.api import Admin, Ctx
from app.api_models import RunInfo, RunStarted, VersionInfo, errors
from storage.runs import Run
from storage.versions import PolicyVersion

router = APIRouter(prefix="/api")


def run_json(run: Run) -> dict:
    return {"run_id": run.run_id, "status": run.status, "algorithm": run.algorithm, "progress": run.progress,
            "step": run.step, "loss": run.loss, "metrics": run.metrics or {}, "version": run.version,
            "error": run.error}


def version_json(v: PolicyVersion, deployed: int) -> dict:
    return {"version": v.version, "parent": v.parent, "algorithm": v.algorithm, "status": v.status,
            "deployed": v.version == deployed, "labels_used": v.labels_used, "reason": v.reason,
            "metrics": v.metrics or {}, "config": v.config or {},
            "created_at": v.created_at.isoformat() if v.created_at else None}


@router.post("/train", status_code=202, response_model=RunStarted, responses=errors({
    409: "a round is already in progress", 422: "an unknown RoundConfig key or a value out of range"}))
def train(user: Admin, c: Ctx, body: Annotated[dict[str, Any], Body()] = None) -> dict:
    """Start a round: `{"algorithm": "dpo"|"kto"|"reward", ...RoundConfig overrides}`. 409 while one runs."""
    return {"run_id": c.scheduler.start(body or {})}


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
    deployed = c.policy.version
    return [version_json(v, deployed) for v in c.store.versions.list()]


@router.post("/versions/{version}/deploy", responses=errors({
    404: "no such version", 409: "the gate rejected this version: deploy it with ?force=true",
    503: "the version's adapter cannot be loaded"}))
def deploy(version: int, user: Admin, c: Ctx, force: bool = False) -> dict:
    """Roll back or forward to `version` (hot swap; annotators get its answers next)."""
    c.scheduler.deploy(version, force=force)
    return {"version": version, "status": "deployed"}


