"""The Admin UI's handlers: plain functions of (context, user name, inputs) returning views or DataFrames. The
Overview and Train screens are in app/ui/admin_rounds.py, Versions in admin_versions.py (its canary panel and rule in
admin_canary.py), the prompt pool in admin_prompts.py; the role check they all call is here.

Every handler calls `require_admin` first. A hidden tab is only cosmetic: Gradio ships its components and answers its
endpoints for any logged-in user (a browser's devtools or `gradio_client` reach them), so the role is checked here, on
the server, from the user name Gradio authenticated. Actions go through the same functions as the REST API and the
CLI (`ctx.scheduler`, `ctx.store`, `storage.imports`, `storage.exports`); this file only shapes what they return.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from app import suggestions
from app.arena import standings as arena_standings
from app.context import AppContext
from app.ui.annotate import UiError, user_of
from storage import analytics
from storage.dataset import write_dataset
from storage.errors import NothingToExport
from storage.exports import FORMATS, export_jsonl
from storage.imports import import_prompt_file
from storage.users import User


class Forbidden(UiError):
    """An admin action asked for by someone who is not an admin."""


def require_admin(ctx: AppContext, username: str | None) -> User:
    """The logged-in admin, or Forbidden. Called first by every handler below."""
    try:
        user = user_of(ctx, username)
    except UiError:
        raise Forbidden("admins only: you are not logged in, or your account is disabled") from None
    if user.role != "admin":
        raise Forbidden(f"admins only: {user.name!r} is an {user.role}")
    return user


def is_admin(ctx: AppContext, username: str | None) -> bool:
    """Whether to show the Admin tab (cosmetic; the handlers check again)."""
    user = ctx.store.users.get(username) if username else None
    return user is not None and not user.disabled and user.role == "admin"


# -- shared by the screens ----------------------------------------------------------------------------------------
def version_name(version: int) -> str:
    return "base model (v0)" if version == 0 else f"v{version}"


# -- Annotators -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnnotatorsView:
    stats: pd.DataFrame  # per annotator: counts, median seconds per ranking
    agreement: str  # Markdown summary
    agreement_by_annotator: pd.DataFrame
    flags: pd.DataFrame  # flagged items to review, newest first
    overlap: int
    users: pd.DataFrame
    message: str = ""


def annotators(ctx: AppContext, username: str | None, message: str = "") -> AnnotatorsView:
    require_admin(ctx, username)
    result = analytics.agreement(ctx.store)
    if result.comparisons:
        summary = (f"**{result.items}** items ranked by more than one annotator ({result.comparisons} comparisons): "
                   f"pairwise agreement **{result.pairwise_agreement:.2f}** (0.5 = chance), "
                   f"Kendall's tau **{result.kendall_tau:.2f}** (0 = chance).")
    else:
        summary = ("No item has been ranked by two annotators yet: set overlap to 2 or more to measure agreement.")
    flags = analytics.flagged_items(ctx.store)
    flags["flagged_at"] = flags["flagged_at"].dt.strftime("%Y-%m-%d %H:%M")
    flags["prompt"] = flags["prompt"].str.slice(0, 300)
    users = pd.DataFrame([(u.name, u.role, u.disabled) for u in ctx.store.users.list()],
                         columns=["name", "role", "disabled"])
    stats = analytics.annotator_stats(ctx.store)
    stats["median_seconds"] = stats["median_seconds"].round(1)
    return AnnotatorsView(stats, summary, analytics.agreement_by_annotator(ctx.store).round(3), flags,
                          ctx.config.overlap, users, message)


def set_overlap(ctx: AppContext, username: str | None, overlap: int | None) -> AnnotatorsView:
    require_admin(ctx, username)
    if overlap is None:
        raise UiError("overlap must be a whole number >= 1")
    ctx.set_overlap(int(overlap))
    return annotators(ctx, username, f"Overlap set to {int(overlap)}: each item now goes to that many annotators.")


@dataclass(frozen=True)
class NewUser:
    text: str  # plain text with a new password and/or token, shown once (new user, reset, rotation)
    view: AnnotatorsView


def add_user(ctx: AppContext, username: str | None, name: str, role: str, password: str | None) -> NewUser:
    """Create a user (same call as POST /api/users); the password and token are shown once."""
    require_admin(ctx, username)
    created, password, token = ctx.store.users.add((name or "").strip(), role, password or None)
    text = f"created {created.role} {created.name!r}\npassword: {password}\nAPI token: {token}"
    return NewUser(text, annotators(ctx, username, f"Created {created.role} {created.name!r}."))


def set_user_disabled(ctx: AppContext, username: str | None, name: str, disabled: bool) -> AnnotatorsView:
    """Disable (or re-enable) a user: a disabled user can neither log in nor use their token."""
    user = require_admin(ctx, username)
    name = (name or "").strip()
    if disabled and name == user.name:
        raise UiError("you cannot disable your own account (another admin can)")
    changed = ctx.store.users.set_disabled(name, bool(disabled))
    if disabled:  # at once: enabling again must not bring an old session back (app/login.py)
        ctx.sessions.end_user(changed.user_id)
    done = ("disabled: no login, API token revoked, sessions ended" if disabled
            else "enabled; the old API token stays revoked: rotate it to issue a new one")
    return annotators(ctx, username, f"{name!r} {done}.")


def reset_password(ctx: AppContext, username: str | None, name: str, password: str | None) -> NewUser:
    """Set a user's password (same call as POST /api/users/{name}/password); blank generates one, shown once."""
    require_admin(ctx, username)
    name, chosen = (name or "").strip(), password or None
    password = ctx.store.users.set_password(name, chosen)
    ctx.sessions.end_user(ctx.store.users.get(name).user_id)  # whoever knew the old password is logged out too
    text = f"password of {name!r} changed" + ("" if chosen else f"\npassword: {password}")
    return NewUser(text, annotators(ctx, username, f"Password of {name!r} changed."))


def rotate_token(ctx: AppContext, username: str | None, name: str) -> NewUser:
    """A new API token for a user (same call as POST /api/users/{name}/token), shown once; the old one stops."""
    require_admin(ctx, username)
    name = (name or "").strip()
    token = ctx.store.users.new_token(name)
    text = f"new API token for {name!r} (the old one no longer works):\n{token}"
    return NewUser(text, annotators(ctx, username, f"API token of {name!r} rotated."))


# -- Data -------------------------------------------------------------------------------------------------------
def upload_prompts(ctx: AppContext, username: str | None, path: str | None, skip_invalid: bool = False) -> str:
    """Import a prompts file with the CLI's function (`storage.imports`): same validation, same messages; a file
    with problems imports nothing (PromptFileError names each one) unless `skip_invalid`."""
    require_admin(ctx, username)
    if not path:
        raise UiError("choose a prompts file (.jsonl, .json, .csv or .parquet) first")
    result = import_prompt_file(ctx.store, Path(path), skip_invalid=bool(skip_invalid))
    ctx.buffer.wake()
    return "\n".join(result.report(Path(path).name))


@dataclass(frozen=True)
class ExportView:
    path: str  # a JSONL file (or a dataset's zip) in a fresh temporary directory, for gr.File to serve
    message: str


def export_labels(ctx: AppContext, username: str | None, fmt: str, dataset: bool = False) -> ExportView:
    """DPO / KTO JSONL (TRL's columns) or raw rankings, written by the CLI's `export_jsonl`; with `dataset`, the
    CLI's `--dataset` directory (the rows and their card) as a zip."""
    require_admin(ctx, username)
    if fmt not in FORMATS:
        raise UiError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    # Gradio serves files from the system temp dir; a directory of its own per export keeps two admins apart.
    work = Path(tempfile.mkdtemp(prefix="prefloop-export-"))
    if not dataset:
        out = work / f"prefloop-{fmt}.jsonl"
        rows = export_jsonl(ctx.store, fmt, out)
        return ExportView(str(out), f"{rows} {fmt} rows in {out.name}")
    directory = work / f"prefloop-{fmt}"
    try:
        rows = write_dataset(directory, fmt, "conversational", False, lambda path: export_jsonl(ctx.store, fmt, path))
    except NothingToExport as exc:
        raise UiError(str(exc)) from None
    archive = shutil.make_archive(str(directory), "zip", root_dir=work, base_dir=directory.name)
    shutil.rmtree(directory)
    return ExportView(archive, f"{rows} {fmt} rows in {Path(archive).name}: unzip it, then "
                               f"`datasets.load_dataset(\"{directory.name}\")` (its README.md is the dataset card)")


SUGGESTION_COLUMNS = ["suggestion_id", "user", "sent_at", "prompt"]
SUGGESTION_PREVIEW_CHARS = 500  # enough to judge a prompt in a table cell; the REST API returns the whole text


@dataclass(frozen=True)
class SuggestionsView:
    table: pd.DataFrame  # pending suggestions, newest first (SUGGESTION_COLUMNS)
    message: str = ""


def pending_suggestions(ctx: AppContext, username: str | None, message: str = "") -> SuggestionsView:
    """Prompts annotators sent from the Demo, waiting for an admin (same list as GET /api/suggestions)."""
    require_admin(ctx, username)
    rows = [(s.suggestion_id, s.user, s.created_at.strftime("%Y-%m-%d %H:%M"), s.text[:SUGGESTION_PREVIEW_CHARS])
            for s in ctx.store.suggestions.list("pending")]
    return SuggestionsView(pd.DataFrame(rows, columns=SUGGESTION_COLUMNS), message)


def decide_suggestion(ctx: AppContext, username: str | None, suggestion_id: float | str | None,
                      approve: bool) -> SuggestionsView:
    """Approve (the prompt enters the pool) or reject a pending suggestion (POST /api/suggestions/{id}/approve)."""
    user = require_admin(ctx, username)
    text = str(suggestion_id if suggestion_id is not None else "").strip().removesuffix(".0")
    if not text.isdigit():
        raise UiError(f"enter the id of a pending suggestion, got {suggestion_id!r}")
    decided = suggestions.decide(ctx, int(text), user, approve)
    message = (f"Suggestion {decided.suggestion_id} approved: its prompt is in the pool." if approve
               else f"Suggestion {decided.suggestion_id} rejected.")
    return pending_suggestions(ctx, username, message)


def guidelines_source(ctx: AppContext, username: str | None) -> str:
    """The annotator guidelines as Markdown source, for editing."""
    require_admin(ctx, username)
    return ctx.settings.get("guidelines")


def save_guidelines(ctx: AppContext, username: str | None, text: str) -> str:
    """Replace the guidelines annotators see (the Annotate tab shows them with raw HTML neutralised)."""
    require_admin(ctx, username)
    text = (text or "").strip()
    if not text:
        raise UiError("the guidelines cannot be empty")
    ctx.settings.update({"guidelines": text})  # ConfigError over MAX_GUIDELINES_CHARS (app/settings.py)
    return "Guidelines saved: annotators see them on their next page load."


# -- Arena (the Demo's blind votes; read-only) --------------------------------------------------------------------
def arena_tables(ctx: AppContext, username: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(standings per version pair with n and a 95% interval, the 50 newest votes) for the Admin UI's Arena tab."""
    require_admin(ctx, username)
    standings = pd.DataFrame(
        [{"pair": f"{version_name(r['newer'])} vs {version_name(r['older'])}", "votes (n)": r["votes"],
          "newer wins": r["newer_wins"], "older wins": r["older_wins"], "ties": r["ties"], "both bad": r["both_bad"],
          "newer win-rate": None if r["newer_win_rate"] is None else round(r["newer_win_rate"], 3),
          "95% interval": f"{r['ci95'][0]:.2f}–{r['ci95'][1]:.2f}"} for r in arena_standings(ctx.store)],
        columns=["pair", "votes (n)", "newer wins", "older wins", "ties", "both bad", "newer win-rate",
                 "95% interval"])
    recent = pd.DataFrame(
        [{"vote": v.vote_id, "when": v.created_at.strftime("%Y-%m-%d %H:%M"), "voter": v.user,
          "A": version_name(v.version_a), "B": version_name(v.version_b), "verdict": v.vote,
          "prompt": v.prompt[:120]} for v in ctx.store.arena.recent(50)],
        columns=["vote", "when", "voter", "A", "B", "verdict", "prompt"])
    return standings, recent
