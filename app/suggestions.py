"""Prompts for the annotation pool from people other than admins: queued for review (issue 8 item 4).

`POST /api/prompts` and the Admin upload are admin-only; the Demo's "Send to annotation" (and `POST /api/suggestions`)
is open to every logged-in user, so an annotator's prompt waits as a suggestion until an admin approves it, within
the per-user limits of `storage.suggestions.SuggestionLimits`. An admin's own send goes straight to the pool.
The Demo tab and the REST API both call these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.context import AppContext
from storage.errors import Conflict
from storage.prompts import validate_prompt
from storage.suggestions import Suggestion
from storage.users import User


@dataclass(frozen=True)
class Sent:
    status: str  # "pending": waits for an admin; "added": in the pool now (an admin's send)
    suggestion_id: int | None  # for "pending"
    prompt_id: int | None  # for "added"
    message: str  # one line for the person who sent it


def send_to_annotation(ctx: AppContext, user: User, text: str) -> Sent:
    """Queue `text` for review, or add it to the pool when `user` is an admin. Conflict when it is in the pool or
    waiting already; RateLimited over a limit; InvalidValue for a text that cannot be a prompt."""
    if user.role == "admin":
        result = ctx.store.prompts.add([validate_prompt(text)], source=f"demo:{user.name}")
        if not result.added:
            raise Conflict(f"this prompt is already in the annotation pool (prompt {result.prompt_ids[0]})")
        ctx.buffer.wake()
        return Sent("added", None, result.prompt_ids[0], "Added: annotators will rank answers to this prompt soon.")
    suggestion = ctx.store.suggestions.add(user.user_id, text)
    return Sent("pending", suggestion.suggestion_id, None,
                f"Sent as suggestion {suggestion.suggestion_id}: an admin reviews it before annotators see it.")


def decide(ctx: AppContext, suggestion_id: int, admin: User, approve: bool) -> Suggestion:
    """Approve (the prompt enters the pool) or reject a pending suggestion; the caller has checked the role."""
    if approve:
        suggestion = ctx.store.suggestions.approve(suggestion_id, admin.user_id)
        ctx.buffer.wake()
        return suggestion
    return ctx.store.suggestions.reject(suggestion_id, admin.user_id)
