"""Writing labels: the one path the REST API and the Annotate tab share, so both enforce the same rules.

An annotator may label only what was given to them (issue 8 item 4):
- a ranking, thumbs or skip is accepted only on an item the buffer handed to that annotator (`check_handed`: a live
  reservation, or an expired one whose slot nobody else took), or, for thumbs, one they already ranked;
- only while the item's overlap is not reached: the store counts the annotators done with the item inside the
  label's own transaction, under the write lock, so two annotators racing for the last slot cannot both pass;
- one flag per item per annotator, and only on an item handed to them (or one they already ranked or skipped).
A refused label writes nothing: NotHanded (403) or Conflict (409), each naming the item and what to do instead.

Undo: an annotator may retract their own ranking within UNDO_SECONDS of submitting it; the retraction is a new row
(storage/labels.py `retract_ranking`), and the item is handed back to them to rank again while it is still served.
"""

from __future__ import annotations

from app.context import AppContext
from storage.labels import Retraction
from storage.users import User

UNDO_SECONDS = 60.0  # long enough to notice a slip on the next item, short enough that a round rarely trains on it


def _check_handed(ctx: AppContext, item_id: int, user: User) -> None:
    """NotFound for an unknown item; NotHanded unless the item is this annotator's to label. An item the annotator
    already ranked or skipped passes: it was handed to them, and the store answers a second label with a Conflict."""
    if not ctx.store.items.is_done_by(item_id, user.user_id):
        ctx.buffer.check_handed(item_id, user.user_id)


def rank(ctx: AppContext, user: User, item_id: int, ranking: list[int | list[int]],
         feedback: dict[int, str] | None = None) -> int:
    """Store the ranking (answer ids, best first; a list of ids is a tie) and any thumbs in one transaction; returns
    the ranking id."""
    _check_handed(ctx, item_id, user)
    ranking_id = ctx.store.labels.add_ranking(item_id, user.user_id, ranking,
                                              seconds=ctx.buffer.seconds_taken(item_id, user.user_id),
                                              feedback=feedback, overlap=ctx.config.overlap)
    ctx.buffer.done(item_id, user.user_id)
    ctx.on_label()
    return ranking_id


def thumb(ctx: AppContext, user: User, answer_id: int, value: str) -> int:
    """Thumbs up/down on one answer of an item handed to this annotator; returns the feedback id."""
    item_id = ctx.store.items.answer(answer_id).item_id  # NotFound for an unknown answer
    _check_handed(ctx, item_id, user)
    feedback_id = ctx.store.labels.add_feedback(answer_id, user.user_id, value, overlap=ctx.config.overlap)
    ctx.on_label()
    return feedback_id


def skip(ctx: AppContext, user: User, item_id: int, reason: str | None = None) -> int:
    """The annotator is done with the item without ranking it; returns the skip id."""
    _check_handed(ctx, item_id, user)
    skip_id = ctx.store.labels.add_skip(item_id, user.user_id, reason, overlap=ctx.config.overlap)
    ctx.buffer.done(item_id, user.user_id)
    return skip_id


def flag(ctx: AppContext, user: User, item_id: int, reason: str, and_skip: bool = False) -> int:
    """Flag the item for an admin (once per item and annotator); with `and_skip` (the Annotate tab's Flag button)
    also skip it, in the same transaction. Returns the flag id."""
    _check_handed(ctx, item_id, user)
    flag_id = ctx.store.labels.add_flag(item_id, user.user_id, reason, skip=and_skip, overlap=ctx.config.overlap)
    if and_skip:
        ctx.buffer.done(item_id, user.user_id)
    return flag_id


def retract(ctx: AppContext, user: User, ranking_id: int) -> tuple[Retraction, bool]:
    """Take back the annotator's own ranking (within UNDO_SECONDS) and hand its item back to them; returns the
    retraction and whether the item was handed back (False when it is no longer served: too stale, or full)."""
    retraction = ctx.store.labels.retract_ranking(ranking_id, user.user_id, UNDO_SECONDS)
    handed_back = ctx.buffer.hand_back(retraction.item_id, user.user_id)
    return retraction, handed_back
