"""The REST API of the learning loop: training rounds, runs, versions (admin), under /api."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from app.api import Admin, Ctx
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


@router.post("/train", status_code=202)
def train(user: Admin, c: Ctx, body: Annotated[dict[str, Any], Body()] = None) -> dict:
    """Start a round: `{"algorithm": "dpo"|"kto"|"reward", ...RoundConfig overrides}`. 409 while one runs."""
    return {"run_id": c.scheduler.start(body or {})}


@router.get("/runs")
def runs(user: Admin, c: Ctx) -> list[dict]:
    return [run_json(r) for r in c.store.runs.list(50)]


@router.get("/runs/{run_id}")
def run(run_id: int, user: Admin, c: Ctx) -> dict:
    return run_json(c.store.runs.get(run_id))


@router.post("/runs/{run_id}/cancel", status_code=202)
def cancel(run_id: int, user: Admin, c: Ctx) -> dict:
    c.scheduler.cancel(run_id)
    return {"run_id": run_id, "status": "cancelling"}


@router.get("/versions")
def versions(user: Admin, c: Ctx) -> list[dict]:
    deployed = c.policy.version
    return [version_json(v, deployed) for v in c.store.versions.list()]


@router.post("/versions/{version}/deploy")
def deploy(version: int, user: Admin, c: Ctx, force: bool = False) -> dict:
    """Roll back or forward to `version` (hot swap; annotators get its answers next)."""
    c.scheduler.deploy(version, force=force)
    return {"version": version, "status": "deployed"}


