"""The Annotate tab's handlers: plain functions of (context, user name, session state, inputs).

They return `AnnotateView`s; `blocks.py` turns those into component updates. They raise `UiError` for input the
annotator must fix (shown as a toast), and let storage errors through for `blocks.py` to turn into messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from app import labelling
from app.buffer import shown_answers
from app.context import AppContext
from app.ui.render import quote_block, render_markdown, titled
from storage.items import Item
from storage.users import User

THUMBS = ("up", "down")


class UiError(Exception):
    """Input in the UI the annotator has to correct (a rank used twice, a missing flag reason...)."""


@dataclass(frozen=True)
class Session:
    """What the browser session is working on: the item and its answers in the order shown."""

    item_id: int | None = None
    answer_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class AnnotateView:
    """Everything the Annotate tab shows after an action."""

    session: Session
    prompt: str  # safe HTML from app/ui/render.py, for gr.HTML
    answers: tuple[str, ...]  # safe HTML per answer slot, in display order ('' for unused slots)
    counter: str
    message: str = ""
    labels: tuple[str, ...] = field(default=())  # slot titles: "Answer 1"...


def answer_label(slot: int) -> str:
    return f"Answer {slot + 1}"


def user_of(ctx: AppContext, username: str | None) -> User:
    user = ctx.store.users.get(username) if username else None
    if user is None or user.disabled:
        raise UiError("you are not logged in, or your account is disabled")
    return user


def counter_text(ctx: AppContext, user: User) -> str:
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    today = ctx.store.labels.counts(since=midnight, user_id=user.user_id)
    waiting = ctx.buffer.waiting_count()
    return f"**{today.rankings}** rankings today · **{waiting}** items waiting"


def next_view(ctx: AppContext, username: str | None, message: str = "") -> AnnotateView:
    """Reserve the user's next item and show it, or say that nothing waits yet."""
    user = user_of(ctx, username)
    item = ctx.buffer.next_for(user.user_id)
    if item is None:
        empty = ("",) * ctx.config.k
        waiting = render_markdown("Nothing to rank right now: new answers are being sampled. "
                                  "Press **Next item** in a moment.")
        return AnnotateView(Session(), waiting, empty, counter_text(ctx, user), message)
    return _item_view(ctx, user, item, message)


def _item_view(ctx: AppContext, user: User, item: Item, message: str) -> AnnotateView:
    answers = shown_answers(item, user.user_id)
    texts = tuple(titled(answer_label(i), a.text) for i, a in enumerate(answers))
    texts += ("",) * (ctx.config.k - len(answers))
    return AnnotateView(
        Session(item.item_id, tuple(a.answer_id for a in answers)),
        quote_block(item.prompt),
        texts,
        counter_text(ctx, user),
        message,
        tuple(answer_label(i) for i in range(len(answers))),
    )


def ranking_from(session: Session, ranks: list[str | None]) -> list[int]:
    """Answer ids best first from the rank chosen for each slot; every rank 1..K used exactly once."""
    k = len(session.answer_ids)
    ranks = list(ranks)[:k]
    missing = [answer_label(i) for i, r in enumerate(ranks) if not r]
    if missing:
        raise UiError(f"give every answer a rank: {', '.join(missing)} has none")
    by_rank: dict[int, list[int]] = {}
    for slot, rank in enumerate(ranks):
        if not str(rank).isdigit() or not 1 <= int(rank) <= k:
            raise UiError(f"{answer_label(slot)}: rank must be 1..{k}, got {rank!r}")
        by_rank.setdefault(int(rank), []).append(slot)
    for rank, slots in sorted(by_rank.items()):
        if len(slots) > 1:
            raise UiError(f"rank {rank} is used by {' and '.join(answer_label(s) for s in slots)}; use each once")
    return [session.answer_ids[by_rank[r][0]] for r in range(1, k + 1)]


def submit(ctx: AppContext, username: str | None, session: Session, ranks: list[str | None],
           thumbs: list[str | None]) -> AnnotateView:
    """Store the ranking (and any thumbs, in the same transaction), then show the next item."""
    user = user_of(ctx, username)
    if session.item_id is None:
        raise UiError("there is no item to rank; press Next item")
    ranking = ranking_from(session, ranks)
    feedback = {}
    for slot, value in enumerate(list(thumbs)[: len(session.answer_ids)]):
        if value:
            if value not in THUMBS:
                raise UiError(f"{answer_label(slot)}: thumbs must be up or down, got {value!r}")
            feedback[session.answer_ids[slot]] = value
    labelling.rank(ctx, user, session.item_id, ranking, feedback or None)
    return next_view(ctx, username, "Saved. Here is the next one.")


def skip(ctx: AppContext, username: str | None, session: Session, reason: str = "") -> AnnotateView:
    user = user_of(ctx, username)
    if session.item_id is None:
        return next_view(ctx, username)
    labelling.skip(ctx, user, session.item_id, reason.strip() or None)
    return next_view(ctx, username, "Skipped.")


def flag(ctx: AppContext, username: str | None, session: Session, reason: str) -> AnnotateView:
    """Flag the item for review and move on (a flagged item is also skipped for this annotator)."""
    user = user_of(ctx, username)
    if session.item_id is None:
        raise UiError("there is no item to flag")
    if not reason.strip():
        raise UiError("say why you flag it (harmful, broken, off-topic...)")
    labelling.flag(ctx, user, session.item_id, reason.strip(), and_skip=True)
    return next_view(ctx, username, "Flagged for review, thank you.")


def guidelines(ctx: AppContext) -> str:
    """The annotator guidelines as safe HTML (an admin wrote them, but they render like any other text)."""
    return render_markdown(ctx.store.settings.get("guidelines") or DEFAULT_GUIDELINES)


DEFAULT_GUIDELINES = """Rank the answers from best (1) to worst. Prefer answers that are correct, helpful and honest;
then clear and concise. Thumbs are optional: up for an answer you would be glad to receive, down for one you would not.
Skip what you cannot judge; flag anything harmful or broken.

Keys: press the answers' numbers in order, best first, to rank them; Enter submits; Escape clears; S skips."""
