"""The Admin's prompt pool (Data tab): how many prompts, a page of them with a search, and removal (soft: items and
labels keep their prompt; storage/prompts.py). The same store calls as GET /api/prompts and DELETE /api/prompts/{id}.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from app.context import AppContext
from app.ui.admin import require_admin
from app.ui.annotate import UiError

POOL_PAGE = 25  # prompts per page in the Data tab: a screenful
POOL_PREVIEW_CHARS = 300  # enough to recognise a prompt in a table cell; GET /api/prompts returns the whole text
POOL_COLUMNS = ["prompt_id", "prompt", "source", "items", "added"]


@dataclass(frozen=True)
class PoolView:
    table: pd.DataFrame  # a page of prompts, newest first (POOL_COLUMNS)
    summary: str  # Markdown: "62 prompts in the pool (62 starter) · 3 match "capital" · showing 1-3"
    page: int  # 1-based, clamped to the pages there are
    message: str = ""


def prompt_pool(ctx: AppContext, username: str | None, search: str | None = "", page: int | float | None = 1,
                message: str = "") -> PoolView:
    require_admin(ctx, username)
    search = (search or "").strip()
    total = ctx.store.prompts.count()
    starter = ctx.store.prompts.count(source="starter")
    page = max(1, int(page or 1))
    found = ctx.store.prompts.page(search, POOL_PAGE, (page - 1) * POOL_PAGE)
    pages = max(1, -(-found.total // POOL_PAGE))
    if page > pages:  # a search or a removal left fewer pages: show the last one
        page = pages
        found = ctx.store.prompts.page(search, POOL_PAGE, (page - 1) * POOL_PAGE)
    rows = [(p.prompt_id, p.text[:POOL_PREVIEW_CHARS], p.source, p.items, p.created_at.strftime("%Y-%m-%d %H:%M"))
            for p in found.prompts]
    summary = f"**{total}** prompts in the pool ({starter} of them starter prompts)"
    if search:
        summary += f" · **{found.total}** contain the search"
    if found.total:
        first = (page - 1) * POOL_PAGE + 1
        summary += f" · showing {first}-{first + len(rows) - 1}, page {page} of {pages}"
    elif search:
        summary += " · nothing matches: try fewer words"
    else:
        summary += " · the pool is empty: import prompts above, or approve suggestions below"
    return PoolView(pd.DataFrame(rows, columns=POOL_COLUMNS), summary, page, message)


def remove_prompt(ctx: AppContext, username: str | None, prompt_id: int | float | str | None, search: str | None = "",
                  page: int | float | None = 1) -> PoolView:
    """Take one prompt out of the pool (same call as DELETE /api/prompts/{id}); the view is refreshed."""
    require_admin(ctx, username)
    text = str(prompt_id if prompt_id is not None else "").strip().removesuffix(".0")
    if not text.isdigit():
        raise UiError(f"enter the id of a prompt in the pool (the table's first column), got {prompt_id!r}")
    removed = ctx.store.prompts.remove(int(text))  # NotFound, or Conflict when removed already
    preview = removed.text if len(removed.text) <= 60 else removed.text[:57] + "..."
    return prompt_pool(ctx, username, search, page,
                       f"Removed prompt {removed.prompt_id} ({preview!r}): it is not sampled again; its labels stay.")
