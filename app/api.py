"""The REST API under /api (OpenAPI docs at /api/docs). Scripts and tests are written against this contract.

Every handler is a plain `def`: FastAPI runs it in its thread pool, and each thread gets its own DuckDB cursor.
Each label is committed before the 201 leaves; a request that fails writes nothing.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app import labelling, suggestions
from app.api_models import (
    FeedbackCreated,
    FlagCreated,
    Generated,
    GeneratedBatch,
    Health,
    ItemToLabel,
    Me,
    PromptsAdded,
    RankingCreated,
    RankingRetracted,
    SkipCreated,
    UserCreated,
    errors,
)
from app.buffer import shown_answers
from app.context import AppContext
from app.errors import ApiError
from app.login import TOKEN_ACCEPTED
from app.policy import MAX_GENERATE_TOKENS, with_max_new_tokens
from storage.exports import iter_export
from storage.items import Item
from storage.labels import MAX_REASON_CHARS
from storage.prompts import MAX_PROMPT_CHARS
from storage.users import User

router = APIRouter(prefix="/api")



class Body(BaseModel):
    # strict: "3" is not an answer id; extra="forbid": a misspelt key is an error, not silently ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class RankingBody(Body):
    ranking: list[int | Annotated[list[int], Field(min_length=1, max_length=64)]] = Field(
        description="answer ids, best first; every answer of the item exactly once. A list of ids in place of one "
                    "marks those answers as equally good and yields no pair between them: [[12, 13], 11, 14] ties 12 "
                    "and 13 for best; [[11, 12, 13, 14]] says you have no preference",
        max_length=64, examples=[[12, 11, 14, 13], [[12, 13], 11, 14]])


class FeedbackBody(Body):
    value: Literal["up", "down"]


class SkipBody(Body):
    reason: str | None = Field(default=None, max_length=MAX_REASON_CHARS)


class FlagBody(Body):
    reason: str = Field(min_length=1, max_length=MAX_REASON_CHARS)


class PromptsBody(Body):
    prompts: list[str] = Field(min_length=1, max_length=10_000)


class SuggestionBody(Body):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class UserBody(Body):
    name: str
    role: Literal["annotator", "admin"] = "annotator"
    password: str | None = None  # length rules: storage.users.check_new_password, one place, one message


class GenerateBody(Body):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    version: int | None = Field(default=None, ge=0)
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_GENERATE_TOKENS)


# One sampling batch: on a 2-core CPU 32 rows of SmolLM2 give ~10x the tokens/s of one row (bench/sampling.py), and
# 32 answers of 96 tokens hold the model ~20 s (a single 256-token answer ~10-20 s): an evaluation script's batch.
MAX_BATCH_ANSWERS = 32


class GenerateBatchBody(Body):
    prompts: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]] = Field(
        min_length=1, max_length=MAX_BATCH_ANSWERS, description="each answered `n` times")
    n: int = Field(default=1, ge=1, le=MAX_BATCH_ANSWERS, description="answers per prompt")
    version: int | None = Field(default=None, ge=0)
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_GENERATE_TOKENS)

    @model_validator(mode="after")
    def _one_batch(self) -> GenerateBatchBody:
        if len(self.prompts) * self.n > MAX_BATCH_ANSWERS:
            raise ValueError(f"{len(self.prompts)} prompts x n = {self.n} is {len(self.prompts) * self.n} answers; "
                             f"one call makes at most {MAX_BATCH_ANSWERS} (split the prompts over several calls)")
        return self


def ctx(request: Request) -> AppContext:
    return request.app.state.ctx


# Declares the scheme in the OpenAPI document (the docs' Authorize button); auto_error=False: without a token
# current_user answers our own 401 {"error"} rather than FastAPI's 403 {"detail"}.
bearer = HTTPBearer(auto_error=False, description="an API token: `prefloop users add` prints one")


def current_user(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> User:
    """The user behind `Authorization: Bearer <token>`; 401 without a valid one."""
    token = credentials.credentials.strip() if credentials else ""
    if not token:
        raise ApiError(401, "missing token: send 'Authorization: Bearer <token>'")
    user = ctx(request).authenticate_token(token)
    if user is None:
        raise ApiError(401, "invalid, revoked or disabled token")
    request.scope[TOKEN_ACCEPTED] = True  # app.web_guard: this token passes a lockout of its address
    return user


def annotator(user: Annotated[User, Depends(current_user)]) -> User:
    """A person who labels: the CLI's local token is for admin commands only."""
    if user.user_id < 1:
        raise ApiError(403, "the local CLI token cannot label; use a user's token")
    return user


def admin(user: Annotated[User, Depends(current_user)]) -> User:
    if user.role != "admin":
        raise ApiError(403, f"user {user.name!r} is an {user.role}; this needs an admin")
    return user


Annotator = Annotated[User, Depends(annotator)]
Admin = Annotated[User, Depends(admin)]
Ctx = Annotated[AppContext, Depends(ctx)]


def item_json(item: Item, user_id: int) -> dict:
    """The item as an annotator sees it: answers in an order of their own, no policy version."""
    return {"item_id": item.item_id, "prompt": item.prompt,
            "answers": [{"answer_id": a.answer_id, "text": a.text} for a in shown_answers(item, user_id)]}


@router.get("/health", response_model=Health)
def health(c: Ctx) -> dict:
    """`policy_version`: the version serving everyone (a canary under test answers only its share of items)."""
    return {"status": "ok", "policy_version": c.deployments.serving, "labels": c.store.labels.total()}


@router.get("/me", response_model=Me)
def me(user: Annotated[User, Depends(current_user)]) -> dict:
    return {"name": user.name, "role": user.role}


@router.get("/items/next", response_model=ItemToLabel, responses={204: {"description": "nothing waits to be labelled"}})
def next_item(user: Annotator, c: Ctx):
    item = c.buffer.next_for(user.user_id)
    if item is None:
        return Response(status_code=204)
    return item_json(item, user.user_id)


@router.post("/items/{item_id}/ranking", status_code=201, response_model=RankingCreated, responses=errors({
    403: "the item was not handed to you, or this token cannot label", 404: "no item with this id",
    409: "you already ranked or skipped this item, or it has its `overlap` annotators"}))
def rank(item_id: int, body: RankingBody, user: Annotator, c: Ctx) -> dict:
    """Rank an item `GET /api/items/next` handed to you (403 otherwise; 409 once it has its `overlap` annotators).
    Mark answers you find equally good as a tie rather than ordering them at random: a made-up order trains the
    reward model and the policy as if it were a preference."""
    return {"ranking_id": labelling.rank(c, user, item_id, body.ranking)}


@router.post("/answers/{answer_id}/feedback", status_code=201, response_model=FeedbackCreated, responses=errors({
    403: "the answer's item was not handed to you", 404: "no answer with this id",
    409: "this answer already has your thumbs"}))
def feedback(answer_id: int, body: FeedbackBody, user: Annotator, c: Ctx) -> dict:
    """Thumbs on an answer of an item handed to you (or one you ranked)."""
    return {"feedback_id": labelling.thumb(c, user, answer_id, body.value)}


@router.post("/items/{item_id}/skip", status_code=201, response_model=SkipCreated, responses=errors({
    403: "the item was not handed to you", 404: "no item with this id",
    409: "you already ranked or skipped this item, or it has its `overlap` annotators"}))
def skip(item_id: int, user: Annotator, c: Ctx, body: SkipBody | None = None) -> dict:
    """Be done with an item handed to you without ranking it."""
    return {"skip_id": labelling.skip(c, user, item_id, body.reason if body else None)}


@router.post("/items/{item_id}/flag", status_code=201, response_model=FlagCreated, responses=errors({
    403: "the item was not handed to you", 404: "no item with this id", 409: "you already flagged this item"}))
def flag(item_id: int, body: FlagBody, user: Annotator, c: Ctx) -> dict:
    """Flag an item handed to you for an admin to review (harmful, broken, off-topic), once. It stays in your queue
    unless skipped."""
    return {"flag_id": labelling.flag(c, user, item_id, body.reason)}


@router.post("/rankings/{ranking_id}/retract", status_code=201, response_model=RankingRetracted, responses=errors({
    404: "you have no ranking with this id", 409: "already retracted, or stored longer ago than the undo window"}))
def retract(ranking_id: int, user: Annotator, c: Ctx) -> dict:
    """Undo: take back your own ranking within `UNDO_SECONDS` (60) of storing it. Nothing is deleted: a retraction
    is a new event, and the ranking and its thumbs leave the pairs, exports and training snapshots. The item is
    handed back to you (`handed_back`) to rank again: POST its ranking as before."""
    retraction, handed_back = labelling.retract(c, user, ranking_id)
    return {"retraction_id": retraction.retraction_id, "ranking_id": ranking_id, "item_id": retraction.item_id,
            "handed_back": handed_back}


@router.post("/prompts", status_code=201, response_model=PromptsAdded)
def add_prompts(body: PromptsBody, user: Admin, c: Ctx) -> dict:
    result = c.store.prompts.add(body.prompts, source=f"api:{user.name}")
    c.buffer.wake()
    return {"added": result.added, "duplicates": result.duplicates}


@router.post("/suggestions", status_code=201, responses=errors({
    409: "the prompt is in the pool or waits for review already", 429: "over your suggestion limits"}))
def suggest(body: SuggestionBody, user: Annotated[User, Depends(current_user)], c: Ctx) -> dict:
    """Suggest a prompt for the annotation pool (the Demo's "Send to annotation"): it waits for an admin's review
    (`status` "pending"), within per-user limits; an admin's own goes straight to the pool (`status` "added")."""
    sent = suggestions.send_to_annotation(c, user, body.prompt)
    return {"status": sent.status, "suggestion_id": sent.suggestion_id, "prompt_id": sent.prompt_id,
            "message": sent.message}


@router.post("/users", status_code=201, response_model=UserCreated,
             responses=errors({409: "a user with this name (in any case) exists"}))
def add_user(body: UserBody, user: Admin, c: Ctx) -> dict:
    """Create a user; the password and token are shown once, in this response."""
    created, password, token = c.store.users.add(body.name, body.role, body.password)
    return {"name": created.name, "role": created.role, "password": password, "token": token}


@router.get("/export", responses={200: {"description": "one JSON object a line (storage/exports.py: the columns)",
                                        "content": {"application/jsonl": {}}}})
def export(user: Admin, c: Ctx, format: Annotated[Literal["dpo", "kto", "rankings"], Query()] = "dpo",
           style: Annotated[Literal["conversational", "plain"], Query(
               description="dpo/kto: TRL's chat messages (default) or plain strings")] = "conversational",
           drop_truncated: Annotated[bool, Query(
               description="leave out rows holding an answer cut off by max_new_tokens")] = False):
    """Labels as JSONL in the formats TRL reads (dpo, kto) or raw rankings (storage/exports.py: the columns)."""
    rows = list(iter_export(c.store, format, style, drop_truncated))  # read first: a failure is a clean status
    lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return StreamingResponse(lines, media_type="application/jsonl",
                             headers={"content-disposition": f'attachment; filename="prefloop-{format}.jsonl"'})


@router.post("/generate", response_model=Generated, responses=errors({
    404: "no such version", 429: "both generation slots are busy: retry after the Retry-After seconds",
    503: "the version's adapter cannot be loaded"}))
def generate(body: GenerateBody, user: Annotated[User, Depends(current_user)], c: Ctx) -> dict:
    """One answer from the deployed version, or from `version` (any version the registry knows)."""
    if body.version is not None:
        c.deployments.ensure_loadable(body.version)
    params = with_max_new_tokens(c.config.sampling, body.max_new_tokens)
    with c.generation_slots.held():  # shared with the Demo tab: 429 when both slots are taken
        wanted = c.deployments.serving if body.version is None else body.version
        version, text = c.policy.generate(body.prompt, params, wanted)
    return {"text": text, "version": version}


@router.post("/generate/batch", response_model=GeneratedBatch, responses=errors({
    403: "admins only", 404: "no such version",
    429: "both generation slots are busy: retry after the Retry-After seconds",
    503: "the version's adapter cannot be loaded"}))
def generate_batch(body: GenerateBatchBody, user: Admin, c: Ctx) -> dict:
    """`n` answers to each prompt from the deployed version, or from `version`, in ONE sampling batch (what an
    evaluation script wants: bench/loop.py judges versions with it). Admins only: a batch holds the model for up to
    32 answers' worth of tokens, where `POST /api/generate` holds it for one."""
    if body.version is not None:
        c.deployments.ensure_loadable(body.version)
    params = with_max_new_tokens(c.config.sampling, body.max_new_tokens)
    with c.generation_slots.held():  # shared with the Demo tab and /api/generate: 429 when both slots are taken
        wanted = c.deployments.serving if body.version is None else body.version
        answers = c.policy.sample_prompts(body.prompts, body.n, params, wanted)
    return {"version": wanted,
            "answers": [[{"text": a.text, "token_count": a.token_count, "finish_reason": a.finish_reason}
                         for a in item] for item in answers]}
