"""The shapes of /api's answers, as the OpenAPI document at /api/openapi.json (and the docs at /api/docs) show them.

Handlers return plain dicts; FastAPI checks each against its route's `response_model` here. A missing or mistyped
field is a 500 that names it (a broken promise to clients), while a key a model does not list yet still passes
through (`extra="allow"`): declare it here so the docs show it.

Errors: every refusal and failure is `{"error": "..."}` (app/errors.py writes them). The statuses every route can
give (401/403 from its auth dependency, 413/422 for its body, 500) are added to the document by app/api_docs.py;
a route declares the statuses of its own with `responses=errors({409: "why"})`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from storage import runs, versions


class Answer(BaseModel):
    """What the API promises is in the answer; new keys are allowed through (see the module docstring)."""

    model_config = ConfigDict(extra="allow")


class ErrorBody(BaseModel):
    """The body of every error /api answers with."""

    error: str = Field(description="what went wrong, in one line, naming the field, id or setting at fault")


def errors(descriptions: dict[int, str]) -> dict[int, dict]:
    """`responses=` for a route: each status with the `{"error"}` body and what it means on this route."""
    return {status: {"model": ErrorBody, "description": text} for status, text in descriptions.items()}


class Health(Answer):
    status: Literal["ok"]
    policy_version: int = Field(description="the version serving annotators (0 = the base model)")
    labels: int = Field(description="rankings + thumbs stored so far")


class Me(Answer):
    name: str
    role: Literal["annotator", "admin"]


class ItemAnswer(Answer):
    answer_id: int
    text: str


class ItemToLabel(Answer):
    """An item to label: its answers in an order of their own for each annotator; the policy version is never shown."""

    item_id: int
    prompt: str
    answers: list[ItemAnswer]


class RankingCreated(Answer):
    ranking_id: int


class FeedbackCreated(Answer):
    feedback_id: int


class SkipCreated(Answer):
    skip_id: int


class FlagCreated(Answer):
    flag_id: int


class PromptsAdded(Answer):
    added: int = Field(description="new prompts stored")
    duplicates: int = Field(description="prompts already in the pool (or repeated in the request), not stored again")


class UserCreated(Answer):
    """Shown once: neither the password nor the token can be read back later."""

    name: str
    role: Literal["annotator", "admin"]
    password: str
    token: str = Field(description="send as `Authorization: Bearer <token>`")


class Generated(Answer):
    text: str
    version: int = Field(description="the version that generated the text")


class GeneratedAnswer(Answer):
    text: str
    token_count: int = Field(description="new tokens in the answer (its eos not counted)")
    finish_reason: str = Field(description="eos: the model ended it | length: max_new_tokens cut it")


class GeneratedBatch(Answer):
    version: int = Field(description="the version that generated every answer")
    answers: list[list[GeneratedAnswer]] = Field(description="per prompt, in order: its n answers")


class RunStarted(Answer):
    run_id: int
    warnings: list[str] = Field(description="combinations of the round's settings the learning benchmark measured "
                                            "worse than a neighbour (learner.config.advisories), with what to set "
                                            "instead; the round repeats them among its warnings")


class TrainState(Answer):
    active_run: int | None = Field(description="the queued or running round, if any")
    automatic: bool = Field(description="automatic rounds are on (GET/PATCH /api/settings' auto_train)")
    paused: str | None = Field(description="why automatic rounds wait (a canary still being judged, settings no "
                                           "longer valid, or refused rounds in a row from the serving version with "
                                           "their settings), or null")


class RunInfo(Answer):
    run_id: int
    status: str = Field(description=" | ".join(runs.STATUSES))
    algorithm: str = Field(description="dpo | kto | reward")
    progress: float = Field(description="0..1")
    step: int | None
    loss: float | None
    metrics: dict[str, Any]
    version: int | None = Field(description="the policy version the run produced, once it has")
    error: str | None


class VersionInfo(Answer):
    version: int
    parent: int | None
    algorithm: str
    status: str = Field(description=" | ".join(versions.STATUSES))
    deployed: bool = Field(description="serving annotators now")
    labels_used: int
    reason: str | None = Field(description="why it was rejected or rolled back")
    metrics: dict[str, Any]
    config: dict[str, Any]
    created_at: str | None
    canary: dict[str, Any] | None = Field(default=None, description="its canary test, if any: comparisons, win_rate, "
                                           "ci95, decision, items (canary items sampled), untrained_items (of them, "
                                           "on prompts no version in its line trained on)")


class RankingRetracted(Answer):
    """Undo: the ranking (and the thumbs given with it) is out of every view, export and snapshot from now on."""

    retraction_id: int
    ranking_id: int
    item_id: int
    handed_back: bool = Field(description="the item is reserved for you again, to rank anew (false: it is no "
                                          "longer served: too stale, or it has its annotators)")


class ArenaPair(Answer):
    """Blind Demo votes on one pair of versions; a tie or both-bad vote counts half a win for each side."""

    older: int
    newer: int
    votes: int
    newer_wins: int
    older_wins: int
    ties: int
    both_bad: int
    newer_win_rate: float | None
    ci95: list[float] = Field(description="Wilson 95% interval of newer_win_rate, votes treated as independent")
    n: int = Field(description="votes behind the win-rate")
