"""The Annotate tab's handlers: plain functions of (context, user name, session state, inputs).

They return `AnnotateView`s; `blocks.py` turns those into component updates. Input the annotator must fix raises
`UiError`, and storage refusals come through as `StorageError`: blocks.py shows either as one message beside the
buttons and leaves the form as it was, so the annotator fixes what the message names (no error over each control,
no traceback in the server log for an ordinary refusal).

States of the tab (`AnnotateView.state`): "item" (an item to rank), "waiting" (nothing to rank yet: the tab polls by
itself) and "idle" (an admin who opened the page and has not asked for an item: nothing is reserved for them).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from app import labelling
from app.buffer import shown_answers
from app.context import AppContext
from app.ui.render import quote_block, render_markdown, titled
from storage.items import Answer, Item
from storage.users import User

THUMBS = ("up", "down")
CUT_OFF_HTML = ('<p class="pl-cutoff" title="this answer reached the length limit (max_new_tokens) before it '
                'ended">✂ cut off at the length limit</p>')


class UiError(Exception):
    """Input in the UI the annotator has to correct (a rank missing or out of range, a missing flag reason...)."""


@dataclass(frozen=True)
class Session:
    """What the browser session is working on: the item, its answers in the order shown, and the ranking this
    session submitted last (what Undo takes back; None once undone, skipped or flagged)."""

    item_id: int | None = None
    answer_ids: tuple[int, ...] = ()
    last_ranking: int | None = None


@dataclass(frozen=True)
class AnnotateView:
    """Everything the Annotate tab shows after an action."""

    session: Session
    prompt: str  # safe HTML from app/ui/render.py, for gr.HTML
    answers: tuple[str, ...]  # safe HTML per answer slot, in display order ('' for unused slots)
    counter: str  # HTML of ours: the annotator's own progress today
    message: str = ""
    labels: tuple[str, ...] = field(default=())  # slot titles: "Answer 1"...
    state: str = "item"  # "item" | "waiting" | "idle" (see the module docstring)
    ranks: tuple[str | None, ...] = ()  # ranks to show per slot (Undo brings the withdrawn ones back); () = none
    thumbs: tuple[str | None, ...] = ()


def answer_label(slot: int) -> str:
    return f"Answer {slot + 1}"


def user_of(ctx: AppContext, username: str | None) -> User:
    user = ctx.store.users.get(username) if username else None
    if user is None or user.disabled:
        raise UiError("you are not logged in, or your account is disabled")
    return user


def counter_text(ctx: AppContext, user: User) -> str:
    """The annotator's own progress today (UTC) towards `daily_goal`, as HTML of ours (numbers only)."""
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    done = ctx.store.labels.counts(since=midnight, user_id=user.user_id).rankings
    goal = ctx.settings.get("daily_goal")  # stored (Admin, PATCH /api/settings) > --daily-goal > default
    reached = " · goal reached, thank you!" if done >= goal else ""
    return (f'<div class="pl-progress"><span><b>{done}</b> ranked today · daily goal {goal}{reached}</span> '
            f'<progress max="{goal}" value="{min(done, goal)}" aria-label="today\'s progress"></progress></div>')


def _empty(ctx: AppContext, user: User, text: str, state: str, message: str, last_ranking: int | None) -> AnnotateView:
    return AnnotateView(Session(last_ranking=last_ranking), render_markdown(text), ("",) * ctx.config.k,
                        counter_text(ctx, user), message, state=state)


WAITING_TEXT = ("Nothing to rank right now: new answers are being sampled. This page shows the next item by itself "
                "as soon as one is ready.")
IDLE_TEXT = ("You are signed in as an admin, so nothing is reserved for you until you ask: press **Start "
             "annotating** to rank items.")


def next_view(ctx: AppContext, username: str | None, message: str = "",
              last_ranking: int | None = None) -> AnnotateView:
    """Reserve the user's next item and show it, or say that nothing waits yet (the tab then polls)."""
    user = user_of(ctx, username)
    item = ctx.buffer.next_for(user.user_id)
    if item is None:
        return _empty(ctx, user, WAITING_TEXT, "waiting", message, last_ranking)
    return _item_view(ctx, user, item, message, last_ranking)


def load_view(ctx: AppContext, username: str | None) -> AnnotateView:
    """What opening the page shows: an annotator's next item; for an admin, nothing reserved until they ask."""
    user = user_of(ctx, username)
    if user.role == "admin":
        return _empty(ctx, user, IDLE_TEXT, "idle", "", None)
    return next_view(ctx, username)


def poll(ctx: AppContext, username: str | None, session: Session) -> AnnotateView | None:
    """The waiting tab's periodic check: the next item once one is ready, else None (nothing on screen changes)."""
    if session.item_id is not None:
        return None
    view = next_view(ctx, username, last_ranking=session.last_ranking)
    return view if view.state == "item" else None


def answer_html(slot: int, answer: Answer) -> str:
    cut = CUT_OFF_HTML if answer.finish_reason == "length" else ""
    return titled(answer_label(slot), answer.text) + cut


def _item_view(ctx: AppContext, user: User, item: Item, message: str, last_ranking: int | None = None,
               ranks: tuple[str | None, ...] = (), thumbs: tuple[str | None, ...] = ()) -> AnnotateView:
    answers = shown_answers(item, user.user_id)
    texts = tuple(answer_html(i, a) for i, a in enumerate(answers))
    texts += ("",) * (ctx.config.k - len(answers))
    return AnnotateView(
        Session(item.item_id, tuple(a.answer_id for a in answers), last_ranking),
        quote_block(item.prompt),
        texts,
        counter_text(ctx, user),
        message,
        tuple(answer_label(i) for i in range(len(answers))),
        ranks=ranks,
        thumbs=thumbs,
    )


def _names(slots: list[int]) -> str:
    return ", ".join(answer_label(s) for s in slots)


def ranking_from(session: Session, ranks: list[str | None]) -> list[int | list[int]]:
    """Answer ids best first from the rank chosen for each slot (1..K); answers given the same rank are tied (equally
    good: no pair between them), returned as a list in place of one id. When every answer but one has a rank and no
    two share one, the one left gets the rank left (the page fills it in too)."""
    k = len(session.answer_ids)
    ranks = [str(r) if r else None for r in list(ranks)[:k]] + [None] * max(0, k - len(ranks))
    for slot, rank in enumerate(ranks):
        if rank is not None and (not rank.isdigit() or not 1 <= int(rank) <= k):
            raise UiError(f"{answer_label(slot)}: rank must be 1..{k}, got {rank!r}")
    by_rank: dict[int, list[int]] = {}
    for slot, rank in enumerate(ranks):
        if rank is not None:
            by_rank.setdefault(int(rank), []).append(slot)
    missing = [slot for slot, rank in enumerate(ranks) if rank is None]
    if len(missing) == 1 and len(by_rank) == k - 1:
        (left,) = set(range(1, k + 1)) - set(by_rank)
        by_rank[left] = missing
    elif missing:
        raise UiError(f"give every answer a rank: {_names(missing)} "
                      f"{'has' if len(missing) == 1 else 'have'} none (the same rank for two answers ties them)")
    ids = session.answer_ids
    return [ids[slots[0]] if len(slots) == 1 else [ids[s] for s in slots] for _, slots in sorted(by_rank.items())]


def thumbs_from(session: Session, thumbs: list[str | None]) -> dict[int, str]:
    feedback = {}
    for slot, value in enumerate(list(thumbs)[: len(session.answer_ids)]):
        if value:
            if value not in THUMBS:
                raise UiError(f"{answer_label(slot)}: thumbs must be up or down, got {value!r}")
            feedback[session.answer_ids[slot]] = value
    return feedback


def submit(ctx: AppContext, username: str | None, session: Session, ranks: list[str | None],
           thumbs: list[str | None]) -> AnnotateView:
    """Store the ranking (and any thumbs, in the same transaction), then show the next item."""
    user = user_of(ctx, username)
    if session.item_id is None:
        raise UiError("there is no item to rank; press Next item")
    ranking = ranking_from(session, ranks)
    feedback = thumbs_from(session, thumbs)
    ranking_id = labelling.rank(ctx, user, session.item_id, ranking, feedback or None)
    view = next_view(ctx, username, last_ranking=ranking_id)
    undo = f"Undo takes it back for {labelling.UNDO_SECONDS:.0f} s."
    saved = (f"Saved. Here is the next one. {undo}" if view.state == "item"
             else f"Saved. {undo} Nothing else waits right now: the next item appears here when it is ready.")
    return replace(view, message=saved)


def undo(ctx: AppContext, username: str | None, session: Session) -> AnnotateView:
    """Retract this session's last ranking (a new event, nothing deleted) and show its item again with the ranks
    and thumbs that were given, to change and submit again."""
    user = user_of(ctx, username)
    if session.last_ranking is None:
        raise UiError("there is no ranking of yours to undo in this session")
    retraction, handed_back = labelling.retract(ctx, user, session.last_ranking)
    if not handed_back:
        return next_view(ctx, username, "Undone: your ranking is withdrawn. That item is no longer served, so "
                                        "here is your next one.")
    item = ctx.store.items.get(retraction.item_id)
    tiers, given_thumbs = ctx.store.labels.given(retraction.ranking_id)
    rank_of = {a: str(place + 1) for place, tier in enumerate(tiers) for a in tier}  # tied answers share a rank
    shown = [a.answer_id for a in shown_answers(item, user.user_id)]
    ranks = tuple(rank_of.get(a) for a in shown)
    thumbs = tuple(given_thumbs.get(a) for a in shown)
    return _item_view(ctx, user, item, "Undone: your ranking is withdrawn. Change it and submit again.",
                      None, ranks, thumbs)


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
    if not (reason or "").strip():
        raise UiError("say why you flag it (harmful, broken, off-topic...) in the Flag reason box")
    labelling.flag(ctx, user, session.item_id, reason.strip(), and_skip=True)
    return next_view(ctx, username, "Flagged for review, thank you.")


def refusal_html(message: str) -> str:
    """A refusal as one inline message (HTML of ours; the message is escaped)."""
    return f'<div class="pl-refusal" role="alert">{html.escape(message)}</div>'


def guidelines(ctx: AppContext) -> str:
    """The annotator guidelines as safe HTML (an admin wrote them, but they render like any other text)."""
    return render_markdown(ctx.settings.get("guidelines"))

