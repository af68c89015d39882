"""The Admin tab's handlers: plain functions of (context, user name, inputs) returning views or DataFrames.

Every handler calls `require_admin` first. A hidden tab is only cosmetic: Gradio ships its components and answers its
endpoints for any logged-in user (a browser's devtools or `gradio_client` reach them), so the role is checked here, on
the server, from the user name Gradio authenticated. Actions go through the same functions as the REST API and the
CLI (`ctx.scheduler`, `ctx.store`, `storage.imports`, `storage.exports`); this file only shapes what they return.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from app.context import AppContext
from app.ui.annotate import DEFAULT_GUIDELINES, UiError, user_of
from app.ui.render import escape_markdown
from learner.config import RoundConfig
from storage import analytics
from storage.errors import InvalidValue
from storage.exports import FORMATS, export_jsonl
from storage.imports import import_prompt_file
from storage.runs import Run
from storage.users import User

GUIDELINES_SETTING = "guidelines"  # the Annotate tab reads the same key
MAX_GUIDELINES_CHARS = 20_000

# The knobs the Train form shows; every other RoundConfig field keeps its default (the REST API takes them all).
TRAIN_KNOBS = ("algorithm", "beta", "steps", "learning_rate", "sync_every", "max_staleness", "ref_sync",
               "rollout_prompts")

# Metrics plotted across versions: column -> keys tried in a version's metrics.json (the learner's name first).
VERSION_METRICS = {
    "reward_accuracy": ("reward_heldout_accuracy", "reward_accuracy"),
    "win_rate_vs_base": ("win_rate_vs_base",),
    "win_rate_vs_parent": ("win_rate_vs_parent",),
    "kl_to_reference": ("kl_to_reference", "kl"),
    "entropy": ("entropy",),
    "mean_answer_length": ("mean_answer_length", "mean_length"),
    "eos_rate": ("eos_rate",),
}
# One plot per entry: metrics on a shared scale go together.
VERSION_PLOTS = {
    "rates": ("reward_accuracy", "win_rate_vs_base", "win_rate_vs_parent", "eos_rate"),
    "kl": ("kl_to_reference",),
    "entropy": ("entropy",),
    "length": ("mean_answer_length",),
}
PLOT_COLUMNS = ["version", "metric", "value"]
LOSS_COLUMNS = ["step", "loss", "curve"]


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


# -- Overview ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OverviewView:
    counts: str  # Markdown table: labels today / total by kind
    status: str  # Markdown: deployed version, items waiting, sampler trouble
    run: str  # Markdown: the round in progress, or the last one
    progress: float | None  # 0..1 of the round in progress; None when none runs
    active_run: int | None
    message: str = ""


def overview(ctx: AppContext, username: str | None, message: str = "") -> OverviewView:
    require_admin(ctx, username)
    counts = analytics.counts_by_kind(ctx.store)
    rows = [("rankings", "rankings"), ("thumbs", "feedback"), ("skips", "skips"), ("flags", "flags")]
    table = "| labels | today | total |\n| --- | ---: | ---: |\n" + "\n".join(
        f"| {name} | {getattr(counts.today, field)} | {getattr(counts.total, field)} |" for name, field in rows)
    status = (f"Deployed: **{version_name(ctx.policy.version)}** · **{ctx.buffer.waiting_count()}** items waiting "
              f"in the buffer · **{ctx.buffer.reserved_count()}** reserved · overlap {ctx.config.overlap}")
    if ctx.buffer.last_error:
        status += f"\n\nSampler error: {escape_markdown(ctx.buffer.last_error[:300])}"
    active = ctx.store.runs.active()
    last = active or next(iter(ctx.store.runs.list(1)), None)
    return OverviewView(table, status, run_text(last), active.progress if active else None,
                        active.run_id if active else None, message)


def run_text(run: Run | None) -> str:
    if run is None:
        return "No training round yet: start one in **Train**."
    parts = [f"Round **{run.run_id}** ({run.algorithm}): **{run.status}**"]
    if run.step is not None:
        parts.append(f"step {run.step}")
    if run.loss is not None:
        parts.append(f"loss {run.loss:.4f}")
    if run.version is not None:
        parts.append(f"produced {version_name(run.version)}")
    text = " · ".join(parts)
    if run.error:
        text += f"\n\n{escape_markdown(run.error[:500])}"
    return text


def progress_html(progress: float | None) -> str:
    """A progress bar (numbers only, no user text)."""
    if progress is None:
        return ""
    percent = round(100 * min(1.0, max(0.0, progress)))
    return f'<progress value="{percent}" max="100" style="width:100%"></progress> {percent}%'


def cancel_round(ctx: AppContext, username: str | None) -> OverviewView:
    """Cancel the round in progress (same call as POST /api/runs/{id}/cancel)."""
    require_admin(ctx, username)
    active = ctx.store.runs.active()
    if active is None:
        raise UiError("no round is in progress")
    ctx.scheduler.cancel(active.run_id)
    return overview(ctx, username, f"Round {active.run_id} is being cancelled.")


def version_name(version: int) -> str:
    return "base model (v0)" if version == 0 else f"v{version}"


# -- Train ------------------------------------------------------------------------------------------------------
def knob_defaults() -> dict:
    """The Train form's fields with RoundConfig's defaults (shown next to each field)."""
    defaults = RoundConfig().to_dict()
    return {name: defaults[name] for name in TRAIN_KNOBS}


def overrides_from(knobs: dict) -> dict:
    """RoundConfig overrides from the form: a cleared field keeps its default, except max_staleness (None = all
    labels). Types and ranges are RoundConfig.from_dict's to check."""
    unknown = set(knobs) - set(TRAIN_KNOBS)
    if unknown:
        raise UiError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    return {name: value for name, value in knobs.items() if value is not None or name == "max_staleness"}


def start_round(ctx: AppContext, username: str | None, knobs: dict) -> str:
    """Start a round now (same call as POST /api/train); ConfigError names a bad value, Conflict a running round."""
    require_admin(ctx, username)
    run_id = ctx.scheduler.start(overrides_from(knobs))
    return f"Round {run_id} started. Watch it in **Overview**; its loss curve appears in **Versions**."


@dataclass(frozen=True)
class TriggersView:
    enabled: bool
    every_labels: int  # 0 = off
    every_minutes: int  # 0 = off
    config: dict  # RoundConfig overrides automatic rounds use
    message: str = ""


def triggers(ctx: AppContext, username: str | None, message: str = "") -> TriggersView:
    require_admin(ctx, username)
    auto = ctx.scheduler.auto_train()
    if not message and auto.enabled:
        settings_used = ", ".join(f"{k}={v}" for k, v in auto.config.items()) or "the defaults"
        message = f"Automatic rounds are on, with {settings_used}."
    return TriggersView(auto.enabled, auto.every_labels, auto.every_minutes, auto.config, message)


def save_triggers(ctx: AppContext, username: str | None, enabled: bool, every_labels: int | None,
                  every_minutes: int | None, knobs: dict) -> TriggersView:
    """Turn automatic rounds on (every N new labels and/or T minutes, with the Train form's settings) or off."""
    require_admin(ctx, username)
    labels, minutes = int(every_labels or 0), int(every_minutes or 0)
    if enabled and not (labels or minutes):
        raise UiError("to turn automatic rounds on, set 'every N labels' or 'every T minutes' above 0")
    if not enabled:
        labels = minutes = 0
    ctx.set_auto_train(labels, minutes, overrides_from(knobs))
    message = (f"Automatic rounds on: every {labels or '-'} labels / {minutes or '-'} minutes."
               if enabled else "Automatic rounds off.")
    return triggers(ctx, username, message)


# -- Versions ---------------------------------------------------------------------------------------------------
def metric(metrics: dict, column: str) -> float | None:
    """A version's metric by its column name, whichever key the learner wrote it under; None when missing."""
    for key in VERSION_METRICS[column]:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def versions_table(ctx: AppContext, username: str | None) -> pd.DataFrame:
    """The registry, newest first: version, parent, algorithm, status, labels used, key metrics, time."""
    require_admin(ctx, username)
    rows = []
    for v in reversed(ctx.store.versions.list()):
        rows.append({"version": v.version, "parent": v.parent, "algorithm": v.algorithm, "status": v.status,
                     "labels_used": v.labels_used,
                     **{column: _round(metric(v.metrics, column)) for column in VERSION_METRICS},
                     "created_at": v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else "",
                     "reason": v.reason or ""})
    columns = ["version", "parent", "algorithm", "status", "labels_used", *VERSION_METRICS, "created_at", "reason"]
    return pd.DataFrame(rows, columns=columns)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass(frozen=True)
class VersionPlots:
    """Long frames (version, metric, value) for gr.LinePlot(x="version", y="value", color="metric")."""

    rates: pd.DataFrame  # reward-model accuracy, win-rates vs base and parent, EOS rate: all in [0, 1]
    kl: pd.DataFrame
    entropy: pd.DataFrame
    length: pd.DataFrame


def version_plots(ctx: AppContext, username: str | None) -> VersionPlots:
    require_admin(ctx, username)
    versions = ctx.store.versions.list()
    frames = {}
    for plot, columns in VERSION_PLOTS.items():
        rows = [(v.version, column, value) for v in versions for column in columns
                if (value := metric(v.metrics, column)) is not None]
        frames[plot] = pd.DataFrame(rows, columns=PLOT_COLUMNS).astype({"version": "int64", "value": "float64"})
    return VersionPlots(**frames)


def deploy_choices(ctx: AppContext, username: str | None) -> list[tuple[str, int]]:
    """Every version for the Deploy picker, newest first: ("v2 (candidate)", 2)."""
    require_admin(ctx, username)
    return [(f"{version_name(v.version)} ({v.status})", v.version) for v in reversed(ctx.store.versions.list())]


def run_choices(ctx: AppContext, username: str | None) -> list[tuple[str, int]]:
    """Recent rounds for the loss-curve picker, newest first: ("round 3 -> v2 (succeeded)", 3)."""
    require_admin(ctx, username)
    return [(f"round {r.run_id}" + (f" -> v{r.version}" if r.version is not None else "") + f" ({r.status})",
             r.run_id) for r in ctx.store.runs.list(50)]


def loss_curve(ctx: AppContext, username: str | None, run_id: int | None) -> pd.DataFrame:
    """Per-step losses of a round (step, loss, curve): the policy steps the scheduler stored as they came, else the
    history in the version's metrics; the reward model's steps from the version's metrics when it has them."""
    require_admin(ctx, username)
    empty = pd.DataFrame([], columns=LOSS_COLUMNS).astype({"step": "int64", "loss": "float64"})
    if run_id is None:
        return empty
    run = ctx.store.runs.get(int(run_id))
    steps = ctx.store.runs.steps(run.run_id)
    rows = [(int(step), float(loss), "policy") for step, loss in zip(steps["step"], steps["loss"], strict=True)]
    metrics = ctx.store.versions.get(run.version).metrics if run.version is not None else run.metrics or {}
    if not rows:
        rows = _history_rows(metrics.get("history"), "policy")
    rows += _history_rows(metrics.get("reward_history"), "reward model")
    if not rows:
        return empty
    return pd.DataFrame(rows, columns=LOSS_COLUMNS).astype({"step": "int64", "loss": "float64"})


def _history_rows(history, curve: str) -> list[tuple[int, float, str]]:
    """(step, loss, curve) from a learner history: a list of {"step", "loss", ...}; anything else is skipped."""
    rows = []
    for record in history if isinstance(history, list) else []:
        if isinstance(record, dict) and isinstance(record.get("loss"), (int, float)):
            rows.append((int(record.get("step", len(rows))), float(record["loss"]), curve))
    return rows


def deploy_version(ctx: AppContext, username: str | None, version: int | str | None, force: bool = False) -> str:
    """Deploy any version (same call as POST /api/versions/{v}/deploy): hot swap, annotators get its answers next."""
    require_admin(ctx, username)
    text = str(version if version is not None else "").strip().removeprefix("v")
    if not text.isdigit():
        raise UiError(f"choose a version to deploy, got {version!r}")
    ctx.scheduler.deploy(int(text), force=bool(force))
    return f"Deployed {version_name(int(text))}: new items come from it; older ones are replaced as they go stale."


def roll_back(ctx: AppContext, username: str | None) -> str:
    """Deploy the parent of the deployed version; the one taken down is marked rolled_back."""
    user = require_admin(ctx, username)
    current = ctx.policy.version
    parent = ctx.roll_back(reason=f"rolled back by {user.name}")
    return f"Rolled back {version_name(current)} to {version_name(parent)}."


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
    path: str  # a JSONL file in a fresh temporary directory, for gr.File to serve
    message: str


def export_labels(ctx: AppContext, username: str | None, fmt: str) -> ExportView:
    """DPO / KTO JSONL (TRL's columns) or raw rankings, written by the CLI's `export_jsonl`."""
    require_admin(ctx, username)
    if fmt not in FORMATS:
        raise UiError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    # Gradio serves files from the system temp dir; a directory of its own per export keeps two admins apart.
    out = Path(tempfile.mkdtemp(prefix="prefloop-export-")) / f"prefloop-{fmt}.jsonl"
    rows = export_jsonl(ctx.store, fmt, out)
    return ExportView(str(out), f"{rows} {fmt} rows in {out.name}")


def guidelines_source(ctx: AppContext, username: str | None) -> str:
    """The annotator guidelines as Markdown source, for editing."""
    require_admin(ctx, username)
    return ctx.store.settings.get(GUIDELINES_SETTING) or DEFAULT_GUIDELINES


def save_guidelines(ctx: AppContext, username: str | None, text: str) -> str:
    """Replace the guidelines annotators see (the Annotate tab shows them with raw HTML neutralised)."""
    require_admin(ctx, username)
    text = (text or "").strip()
    if not text:
        raise UiError("the guidelines cannot be empty")
    if len(text) > MAX_GUIDELINES_CHARS:
        raise InvalidValue(f"the guidelines are {len(text)} characters, the limit is {MAX_GUIDELINES_CHARS}")
    ctx.store.settings.set(GUIDELINES_SETTING, text)
    return "Guidelines saved: annotators see them on their next page load."
