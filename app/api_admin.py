"""The REST API of the Admin tab's remaining actions (users, settings, roll back), admin only, under /api, and
`POST /api/me/password`, which any user may call for their own account.

Each calls the same function as the Admin tab (`AppContext` or the store), so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from app import suggestions
from app.api import Admin, Body, Ctx, current_user
from app.api_models import ArenaPair, errors
from app.arena import standings as arena_standings
from app.canary import CanaryConfig
from app.errors import ApiError
from app.settings import MAX_GUIDELINES_CHARS, check_settings
from storage.prompts import MAX_PAGE, MAX_SEARCH_CHARS
from storage.suggestions import Suggestion
from storage.users import User, check_new_password

router = APIRouter(prefix="/api")
CANARY_FIELDS = tuple(f.name for f in fields(CanaryConfig))


class DisableBody(Body):
    disabled: bool = True


class PasswordBody(Body):
    # No length rules here: storage.users.check_new_password is the one place they live, with its message.
    password: str | None = Field(default=None, description="the new password; omitted: a generated one, returned")


class OwnPasswordBody(Body):
    current_password: str
    new_password: str


class RollBackBody(Body):
    reason: str | None = Field(default=None, max_length=2000)


class AutoTrainBody(Body):
    every_labels: int = Field(ge=0, description="start a round every N new labels; 0 = off")
    every_minutes: int = Field(ge=0, description="start a round every T minutes; 0 = off")
    config: dict = Field(default_factory=dict, description="RoundConfig overrides for automatic rounds")


class SettingsBody(Body):
    overlap: int | None = Field(default=None, ge=1, le=100)
    daily_goal: int | None = Field(default=None, ge=1, description="rankings a day each annotator counts towards")
    guidelines: str | None = Field(default=None, min_length=1, max_length=MAX_GUIDELINES_CHARS)
    auto_train: AutoTrainBody | None = None
    # The canary (app/canary.py's CanaryConfig holds each default with its reason, and checks the ranges).
    deploy_policy: Literal["canary", "immediate"] | None = None
    canary_share: float | None = Field(default=None, description="share of new items that carry the canary, (0, 1]")
    canary_min_comparisons: int | None = Field(default=None, description="comparisons before any decision")
    canary_max_items: int | None = Field(default=None, description="ranked canary items before an admin decides")
    canary_threshold: float | None = Field(default=None, description="the win-rate to beat, (0, 1)")
    canary_chain: bool | None = Field(default=None, description="rounds while a canary is judged train from it")
    canary_supersede_items: int | None = Field(
        default=None, description="under canary_chain: ranked items after which a pending canary gives way to its "
                                  "newest child; 0 = never")
    canary_prompts: Literal["untrained", "any"] | None = Field(
        default=None, description="canary items on prompts no version in its line trained on, or on any prompt")


@router.get("/users")
def users(user: Admin, c: Ctx) -> list[dict]:
    return [{"name": u.name, "role": u.role, "disabled": u.disabled} for u in c.store.users.list()]


@router.post("/users/{name}/disable")
def disable(name: str, user: Admin, c: Ctx, body: DisableBody | None = None) -> dict:
    """Disable (or, with {"disabled": false}, re-enable) a user: they can neither log in nor use their token."""
    disabled = True if body is None else body.disabled
    if disabled and name == user.name:
        raise ApiError(409, "you cannot disable your own account (another admin can)")
    changed = c.store.users.set_disabled(name, disabled)
    if disabled:  # at once: enabling again must not bring an old session back (app/login.py)
        c.sessions.end_user(changed.user_id)
    return {"name": name, "disabled": disabled}


@router.post("/users/{name}/enable")
def enable(name: str, user: Admin, c: Ctx) -> dict:
    """Re-enable a user. Their old API token stays revoked: rotate it (POST /api/users/{name}/token) for a new one."""
    c.store.users.set_disabled(name, False)
    return {"name": name, "disabled": False}


@router.post("/users/{name}/password")
def reset_password(name: str, user: Admin, c: Ctx, body: PasswordBody | None = None) -> dict:
    """Set a user's password (at least 8 characters); without one, a generated password is set and returned."""
    chosen = body.password if body else None
    password = c.store.users.set_password(name, chosen)
    c.sessions.end_user(c.store.users.get(name).user_id)  # whoever knew the old password is logged out too
    return {"name": name, **({"password": password} if chosen is None else {})}


@router.post("/users/{name}/token")
def rotate_token(name: str, user: Admin, c: Ctx) -> dict:
    """Issue a new API token (shown once, here); the old one stops working at once."""
    return {"name": name, "token": c.store.users.new_token(name)}


@router.post("/me/password")
def change_own_password(body: OwnPasswordBody, user: Annotated[User, Depends(current_user)], c: Ctx) -> dict:
    """Any user: change your own password, given the current one (403 if it is wrong; nothing changes)."""
    if user.user_id < 1:
        raise ApiError(403, "the local CLI token belongs to no account; use `prefloop users passwd NAME`")
    check_new_password(body.new_password)  # a clear 422 before the slow check of the current password
    if c.authenticate_password(user.name, body.current_password) is None:
        raise ApiError(403, "the current password is wrong; nothing was changed")
    c.store.users.set_password(user.name, body.new_password)
    c.sessions.end_user(user.user_id)  # every browser logged in with the old password logs in again
    return {"name": user.name}


@router.post("/versions/rollback")
def roll_back(user: Admin, c: Ctx, body: RollBackBody | None = None) -> dict:
    """Deploy the deployed version's parent; the version taken down is marked rolled_back."""
    taken_down = c.deployments.serving
    parent = c.deployments.roll_back(reason=(body.reason if body and body.reason else f"rolled back by {user.name}"))
    return {"version": parent, "rolled_back": taken_down}


@router.get("/settings")
def settings(user: Admin, c: Ctx) -> dict:
    """Every admin setting with its value now (app/settings.py: stored > serve flag/env > default)."""
    stored = c.settings
    auto = stored.auto_train()
    return {"overlap": c.config.overlap, "daily_goal": stored.get("daily_goal"), "guidelines": stored.get("guidelines"),
            "auto_train": {"every_labels": auto.every_labels, "every_minutes": auto.every_minutes,
                           "config": auto.config},
            **asdict(c.deployments.canary_config)}


@router.patch("/settings")
def update_settings(body: SettingsBody, user: Admin, c: Ctx) -> dict:
    """Change any of overlap, daily_goal, guidelines, auto_train and the canary settings; validated as a whole
    before anything is stored."""
    canary = {name: value for name in CANARY_FIELDS if (value := getattr(body, name)) is not None}
    c.deployments.canary_config.replace(canary)  # ConfigError (422) names a bad value before anything is stored
    plain = {name: value for name in ("daily_goal", "guidelines") if (value := getattr(body, name)) is not None}
    if "guidelines" in plain:
        plain["guidelines"] = plain["guidelines"].strip()
    check_settings(plain)
    if body.auto_train is not None:
        a = body.auto_train
        c.set_auto_train(a.every_labels, a.every_minutes, a.config)
    if body.overlap is not None:
        c.set_overlap(body.overlap)
    c.settings.update(plain)
    if canary:
        c.deployments.set_canary_config(canary)
    return settings(user, c)


def suggestion_json(s: Suggestion) -> dict:
    return {"suggestion_id": s.suggestion_id, "user": s.user, "prompt": s.text, "status": s.status,
            "created_at": s.created_at.isoformat(), "decided_by": s.decided_by,
            "decided_at": s.decided_at.isoformat() if s.decided_at else None, "prompt_id": s.prompt_id}


@router.get("/suggestions")
def list_suggestions(user: Admin, c: Ctx,
                     status: Literal["pending", "approved", "rejected", "all"] = "pending") -> list[dict]:
    """Prompts annotators suggested for the pool, newest first (pending ones by default)."""
    return [suggestion_json(s) for s in c.store.suggestions.list(None if status == "all" else status)]


@router.post("/suggestions/{suggestion_id}/approve")
def approve_suggestion(suggestion_id: int, user: Admin, c: Ctx) -> dict:
    """Add the suggested prompt to the annotation pool (409 unless the suggestion is pending)."""
    return suggestion_json(suggestions.decide(c, suggestion_id, user, approve=True))


@router.post("/suggestions/{suggestion_id}/reject")
def reject_suggestion(suggestion_id: int, user: Admin, c: Ctx) -> dict:
    """Reject a pending suggestion: nothing enters the pool (409 unless it is pending)."""
    return suggestion_json(suggestions.decide(c, suggestion_id, user, approve=False))


@router.get("/arena", response_model=list[ArenaPair])
def arena(user: Admin, c: Ctx) -> list[dict]:
    """The Demo arena's blind votes per pair of versions (app/arena.py): wins, ties, both-bad, and the newer
    version's win-rate with n and a 95% interval."""
    return arena_standings(c.store)


class PoolPromptOut(BaseModel):
    prompt_id: int
    prompt: str
    source: str = Field(description='where it came from: "starter", "import:FILE", "api:NAME", "suggestion"...')
    created_at: str
    items: int = Field(description="items sampled for it so far")
    removed: bool


class PromptPageOut(BaseModel):
    total: int = Field(description="prompts matching the search, over all pages")
    prompts: list[PoolPromptOut]


@router.get("/prompts", response_model=PromptPageOut)
def list_prompts(user: Admin, c: Ctx, search: Annotated[str, Query(max_length=MAX_SEARCH_CHARS)] = "",
                 limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50, offset: Annotated[int, Query(ge=0)] = 0,
                 removed: bool = False) -> dict:
    """The prompt pool, newest first: prompts containing `search` (ignoring case), `limit` from `offset`;
    `removed=true` lists removed prompts too. Starter prompts have source "starter"."""
    page = c.store.prompts.page(search, limit, offset, include_removed=removed)
    return {"total": page.total, "prompts": [
        {"prompt_id": p.prompt_id, "prompt": p.text, "source": p.source, "created_at": p.created_at.isoformat(),
         "items": p.items, "removed": p.removed} for p in page.prompts]}


@router.delete("/prompts/{prompt_id}", responses=errors({404: "no prompt with this id",
                                                           409: "the prompt was removed already"}))
def remove_prompt(prompt_id: int, user: Admin, c: Ctx) -> dict:
    """Take a prompt out of the pool: it is never sampled again and its waiting items are not handed out; items and
    labels already stored keep it (exports are unchanged)."""
    removed = c.store.prompts.remove(prompt_id)
    return {"prompt_id": removed.prompt_id, "removed": True, "pool": c.store.prompts.count()}
