"""The Admin's Overview and Train screens: watch a round (phase, step x of y, elapsed, ETA, loss so far, warnings, log
tail), cancel it, and start one from a form that shows every RoundConfig field with its default and reason.

Plain functions of (context, user name, inputs); each calls `require_admin` first (app/ui/admin.py says why).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from datetime import UTC, datetime

from app.api_docs import config_schema
from app.context import AppContext
from app.ui import charts
from app.ui.admin import require_admin, version_name
from app.ui.annotate import UiError
from app.ui.render import escape_markdown
from learner.config import (
    ALGORITHMS,
    KL_BUDGET_WARN,
    KL_DRIFT_REMEDY,
    LOSS_TYPES,
    ROLLOUT_JUDGES,
    ROLLOUT_PAIRS,
    RoundConfig,
    advisories,
)
from storage import analytics, is_number
from storage.runs import ACTIVE, Run
from storage.versions import PolicyVersion

PHASE_NAMES = {"reward": "reward model", "rollouts": "on-policy rollouts", "policy": "policy update",
               "eval": "evaluation"}
LOG_TAIL_LINES = 12  # the newest lines of a round's log on the Overview: a traceback's last frames fit
ETA_AFTER = 0.05  # progress before an ETA is shown: the first seconds (loading the model) say little of the rest

# The Train form shows these first; every other RoundConfig field sits under "Advanced", in the class's order.
COMMON_FIELDS = ("algorithm", "steps", "beta", "learning_rate", "max_label_staleness", "rollout_prompts",
                 "max_new_tokens", "reward_steps", "eval_prompts")
TRAIN_KNOBS = COMMON_FIELDS + tuple(f.name for f in fields(RoundConfig) if f.name not in COMMON_FIELDS)
CHOICES = {"algorithm": ALGORITHMS, "loss_type": LOSS_TYPES, "rollout_judge": ROLLOUT_JUDGES,
           "rollout_pairs": ROLLOUT_PAIRS}
# "Quick round" on the form: a round that shows the whole loop in about a minute on a 2-core CPU (SmolLM2-135M),
# to try prefloop out or check a setup; its numbers are far too small to improve the model.
QUICK_ROUND = {"steps": 2, "reward_steps": 2, "rollout_prompts": 1, "rollout_n": 2, "eval_prompts": 1, "eval_n": 1,
               "max_new_tokens": 16}


# -- Overview ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OverviewView:
    counts: str  # Markdown table: labels today / total by kind
    status: str  # Markdown: deployed version, items waiting, sampler trouble
    run: str  # Markdown: the round in progress (phase, step x of y, elapsed, ETA), or the last one's outcome
    progress: float | None  # 0..1 of the round in progress; None when none runs
    active_run: int | None
    message: str = ""
    loss_chart: str = ""  # SVG: the round's loss per step so far (policy and reward model)
    warnings: str = ""  # Markdown list of the round's warnings (escaped), "" when none
    log_tail: str = ""  # plain text: the newest lines of the round's log
    train_banner: str = ""  # Markdown for the Train tab: "a round is running" while one does


def overview(ctx: AppContext, username: str | None, message: str = "") -> OverviewView:
    require_admin(ctx, username)
    counts = analytics.counts_by_kind(ctx.store)
    rows = [("rankings", "rankings"), ("thumbs", "feedback"), ("skips", "skips"), ("flags", "flags")]
    table = "| labels | today | total |\n| --- | ---: | ---: |\n" + "\n".join(
        f"| {name} | {getattr(counts.today, field)} | {getattr(counts.total, field)} |" for name, field in rows)
    status = (f"Deployed: **{version_name(ctx.deployments.serving)}** · **{ctx.buffer.waiting_count()}** items waiting "
              f"in the buffer · **{ctx.buffer.reserved_count()}** reserved · overlap {ctx.config.overlap}")
    budget = kl_budget(ctx.store.versions.get(ctx.deployments.serving))
    if budget:
        status += f"\n\n{budget}"
    paused = ctx.auto_trainer.pause_reason()
    if paused:
        status += f"\n\n⏸ {escape_markdown(paused)}"
    if ctx.buffer.last_error:
        status += f"\n\nSampler error: {escape_markdown(ctx.buffer.last_error[:300])}"
    active = ctx.store.runs.active()
    last = active or next(iter(ctx.store.runs.list(1)), None)
    if last is None:
        return OverviewView(table, status, run_text(None), None, None, message,
                            loss_chart(ctx, None), "", "", "")
    log = ctx.store.runs.log(last.run_id, LOG_TAIL_LINES)
    return OverviewView(table, status, run_text(last), active.progress if active else None,
                        active.run_id if active else None, message, loss_chart(ctx, last),
                        warnings_text(ctx, last), "\n".join(line for _, line in log), train_banner(active))


def kl_budget(version: PolicyVersion) -> str:
    """Markdown: how much of max_kl the serving version's lineage has used, warned from KL_BUDGET_WARN on; "" for
    the base model, a version measured from its parent (ref_sync) and one without a KL."""
    kl, max_kl = version.metrics.get("kl_to_reference"), version.config.get("max_kl")
    if version.version == 0 or version.config.get("ref_sync") or not (is_number(kl) and is_number(max_kl)):
        return ""
    text = f"KL to the base model: **{kl:.3g}** nats/answer, {kl / max_kl:.0%} of its round's max_kl {max_kl:g}"
    if kl / max_kl < KL_BUDGET_WARN:
        return text
    return f"⚠ {text}: a round past max_kl is refused; {KL_DRIFT_REMEDY}"


def run_text(run: Run | None, now: datetime | None = None) -> str:
    """Markdown: "Round **3** (dpo): **running** · policy update, step 4 of 12 · elapsed 1 min 5 s · about 2 min
    left · loss 0.6931", or a finished round's outcome and how long it took."""
    if run is None:
        return "No training round yet: start one in **Train** (a quick one takes about a minute on a CPU)."
    now = now or datetime.now(UTC)
    parts = [f"Round **{run.run_id}** ({run.algorithm}): **{run.status}**"]
    if run.status in ACTIVE and run.phase:
        where = PHASE_NAMES.get(run.phase, run.phase)
        if run.phase_step is not None and run.phase_total:
            where += f", step {run.phase_step} of {run.phase_total}"
        parts.append(where)
    if run.started_at is not None:
        elapsed = ((run.finished_at or now) - run.started_at).total_seconds()
        parts.append(("elapsed " if run.status in ACTIVE else "took ") + duration(elapsed))
        if run.status in ACTIVE and run.progress >= ETA_AFTER:
            parts.append(f"about {duration(elapsed * (1 - run.progress) / run.progress)} left")
    if run.step is not None and run.loss is not None:
        parts.append(f"step {run.step} · loss {run.loss:.4f}")
    if run.version is not None:
        parts.append(f"produced {version_name(run.version)}")
    text = " · ".join(parts)
    if run.error:
        text += f"\n\n{escape_markdown(run.error[:500])}"
    return text


def duration(seconds: float) -> str:
    """"45 s", "2 min 5 s", "1 h 3 min"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def warnings_text(ctx: AppContext, run: Run) -> str:
    """The round's warnings as a Markdown list (escaped): those it reported while running, then metrics.json's."""
    seen = [line for _, line in ctx.store.runs.log(run.run_id, kind="warning")]
    stored = run.metrics.get("warnings") if isinstance(run.metrics, dict) else None
    seen += [str(w) for w in stored or [] if str(w) not in seen]
    return "\n".join(f"- ⚠ {escape_markdown(w[:500])}" for w in seen)


def loss_chart(ctx: AppContext, run: Run | None) -> str:
    """SVG: the loss per step of `run` (policy and reward model), as stored while it runs."""
    series: dict[str, list[charts.Point]] = {}
    if run is not None:
        steps = ctx.store.runs.steps(run.run_id)
        for step, loss, metrics in zip(steps["step"], steps["loss"], steps["metrics"], strict=True):
            if loss == loss:  # NaN is no point to draw (the gate names it)
                name = "reward model" if metrics.get("phase") == "reward" else "policy"
                series.setdefault(name, []).append(charts.Point(int(step), float(loss),
                                                                note=f"{name} step {step}: loss {loss:.4f}"))
        if not series:  # a round from before steps were stored: the histories in its metrics.json
            metrics = ctx.store.versions.get(run.version).metrics if run.version is not None else run.metrics or {}
            for name, key in (("policy", "history"), ("reward model", "reward_history")):
                points = [charts.Point(int(r.get("step", i)), float(r["loss"]), note=f"{name}: loss {r['loss']:.4f}")
                          for i, r in enumerate(metrics.get(key) or []) if isinstance(r, dict)
                          and isinstance(r.get("loss"), (int, float))]
                if points:
                    series[name] = points
    title = f"Loss per step, round {run.run_id}" if run else "Loss per step"
    return charts.panel(title, series, x_name="step", empty="the loss appears here when a round trains")


def progress_html(progress: float | None) -> str:
    """A progress bar (numbers only, no user text)."""
    if progress is None:
        return ""
    percent = round(100 * min(1.0, max(0.0, progress)))
    return f'<progress value="{percent}" max="100" style="width:100%"></progress> {percent}%'


def train_banner(active: Run | None) -> str:
    if active is None:
        return ""
    where = PHASE_NAMES.get(active.phase or "", "starting")
    if active.phase_step is not None and active.phase_total:
        where += f", step {active.phase_step} of {active.phase_total}"
    return (f"⏳ **Round {active.run_id} is running** ({where}): a new round can start when it ends. "
            "Watch or cancel it in **Overview**.")


def cancel_round(ctx: AppContext, username: str | None) -> OverviewView:
    """Cancel the round in progress (same call as POST /api/runs/{id}/cancel); the UI asks to confirm first."""
    require_admin(ctx, username)
    active = ctx.store.runs.active()
    if active is None:
        raise UiError("no round is in progress")
    ctx.scheduler.cancel(active.run_id)
    return overview(ctx, username, f"Round {active.run_id} is being cancelled.")


# -- Train ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FormField:
    """One RoundConfig field as the Train form shows it."""

    name: str
    kind: str  # "choice", "bool", "int", "float" or "text"
    default: object
    reason: str  # the comment beside its default in learner/config.py
    choices: tuple = ()
    nullable: bool = False  # blank means None (max_label_staleness: all labels)
    common: bool = False


def train_fields() -> list[FormField]:
    """Every RoundConfig field, common ones first, with the default and reason the API docs show (one home)."""
    schema = config_schema(RoundConfig)["properties"]
    hints = typing.get_type_hints(RoundConfig)
    result = []
    for name in TRAIN_KNOBS:
        args = set(typing.get_args(hints[name])) or {hints[name]}
        base = next(t for t in args if t is not type(None))
        kind = "choice" if name in CHOICES else {bool: "bool", int: "int", float: "float"}.get(base, "text")
        result.append(FormField(name, kind, schema[name]["default"], schema[name]["description"],
                                CHOICES.get(name, ()), type(None) in args, name in COMMON_FIELDS))
    return result


def knob_defaults() -> dict:
    """The Train form's fields with RoundConfig's defaults (shown next to each field)."""
    return {f.name: f.default for f in train_fields()}


def quick_values() -> dict:
    """The form's values for a quick round: the defaults with QUICK_ROUND over them."""
    return {**knob_defaults(), **QUICK_ROUND}


def overrides_from(knobs: dict) -> dict:
    """RoundConfig overrides from the form: only values that differ from the default; a cleared field keeps its
    default, except a nullable one (max_label_staleness: blank = all labels). RoundConfig.from_dict checks the rest."""
    unknown = set(knobs) - set(TRAIN_KNOBS)
    if unknown:
        raise UiError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    by_name = {f.name: f for f in train_fields()}
    return {name: value for name, value in knobs.items()
            if (value is not None or by_name[name].nullable) and value != by_name[name].default}


def advice_lines(config: RoundConfig) -> str:
    """What the learning benchmark says against these round settings (learner.config.advisories), as Markdown."""
    return "".join(f"\n\n**Note:** {advice}" for advice in advisories(config))


def start_round(ctx: AppContext, username: str | None, knobs: dict) -> str:
    """Start a round now (same call as POST /api/train); ConfigError names a bad value, Conflict a running round."""
    require_admin(ctx, username)
    config = RoundConfig.from_dict(overrides_from(knobs))
    run_id = ctx.scheduler.start(config)
    message = f"Round {run_id} started. Watch it in **Overview**; its metrics appear in **Versions** when it ends."
    message += advice_lines(config)
    canary = ctx.deployments.pending_canary
    if canary is not None and ctx.deployments.round_parent() == canary.version:
        message += (f"\n\nThe canary v{canary.version} is still being judged: this round trains from it "
                    "(canary_chain), and if it passes the gate its version waits for that decision.")
    elif canary is not None:
        message += (f"\n\nThe canary v{canary.version} is still being judged: if this round passes the gate, its "
                    f"version becomes the canary and v{canary.version} ends undecided.")
    return message


@dataclass(frozen=True)
class TriggersView:
    enabled: bool
    every_labels: int  # 0 = off
    every_minutes: int  # 0 = off
    config: dict  # RoundConfig overrides automatic rounds use
    message: str = ""
    banner: str = ""  # "a round is running", else ""


def triggers(ctx: AppContext, username: str | None, message: str = "") -> TriggersView:
    require_admin(ctx, username)
    auto = ctx.settings.auto_train()
    if not message and auto.enabled:
        settings_used = ", ".join(f"{k}={v}" for k, v in auto.config.items()) or "the defaults"
        message = f"Automatic rounds are on, with {settings_used}."
    paused = ctx.auto_trainer.pause_reason(auto)  # also after saving: the same settings stay paused
    if paused:
        message += f"\n\n⏸ {escape_markdown(paused)}"
    return TriggersView(auto.enabled, auto.every_labels, auto.every_minutes, auto.config, message,
                        train_banner(ctx.store.runs.active()))


def save_triggers(ctx: AppContext, username: str | None, enabled: bool, every_labels: int | None,
                  every_minutes: int | None, knobs: dict) -> TriggersView:
    """Turn automatic rounds on (every N new labels and/or T minutes, with the Train form's settings) or off."""
    require_admin(ctx, username)
    labels, minutes = int(every_labels or 0), int(every_minutes or 0)
    if enabled and not (labels or minutes):
        raise UiError("to turn automatic rounds on, set 'every N labels' or 'every T minutes' above 0")
    if not enabled:
        labels = minutes = 0
    overrides = overrides_from(knobs)
    ctx.set_auto_train(labels, minutes, overrides)
    message = (f"Automatic rounds on: every {labels or '-'} labels / {minutes or '-'} minutes."
               if enabled else "Automatic rounds off.")
    return triggers(ctx, username, message + advice_lines(RoundConfig.from_dict(overrides)) if enabled else message)
