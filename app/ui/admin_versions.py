"""The Admin's Versions screen: the registry as a table (every win-rate with n and its 95% interval), one small
chart per metric across versions, a readable detail view of one version, a round's loss curve, deploy and roll back.

Plain functions of (context, user name, inputs); each calls `require_admin` first (app/ui/admin.py says why).
The canary's panel and actions live in app/ui/admin.py.
"""

from __future__ import annotations

import json

import pandas as pd

from app.context import AppContext
from app.deployments import CanaryStatus
from app.ui import charts
from app.ui.admin import require_admin, version_name
from app.ui.admin_rounds import loss_chart
from app.ui.annotate import UiError
from app.ui.render import escape_markdown
from storage import is_number
from storage.versions import PolicyVersion

# Metrics across versions: column -> (keys tried in metrics.json, the learner's name first; the chart's title;
# its y range (None: from the data); the dashed reference line: chance for a rate, None otherwise).
VERSION_METRICS = {
    "reward_accuracy": (("reward_heldout_accuracy", "reward_accuracy"), "Reward model held-out accuracy", (0, 1), 0.5),
    "win_rate_vs_base": (("win_rate_vs_base",), "Win-rate vs base model", (0, 1), 0.5),
    "win_rate_vs_parent": (("win_rate_vs_parent",), "Win-rate vs parent", (0, 1), 0.5),
    "kl_to_reference": (("kl_to_reference", "kl"), "KL to reference (nats/answer)", None, None),
    "entropy": (("entropy",), "Next-token entropy (nats)", None, None),
    "mean_answer_length": (("mean_answer_length", "mean_length"), "Mean answer length (tokens)", None, None),
    "eos_rate": (("eos_rate",), "EOS rate (answers that ended)", (0, 1), None),
}
EMPTY_CHARTS = "train a round to see metrics"


def figure(metrics: dict, column: str) -> tuple[float | None, int | None, tuple[float, float] | None]:
    """A version's metric by column name, whichever key the learner wrote it under: (value, n, ci95); a plain
    number has no n or interval; (None, None, None) when missing."""
    for key in VERSION_METRICS[column][0]:
        value = metrics.get(key)
        n = ci = None
        if isinstance(value, dict):  # a rate with its evidence: {"value", "n", "ci95"} (learner/stats.py)
            n, ci, value = value.get("n"), value.get("ci95"), value.get("value")
            ci = tuple(ci) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), n if isinstance(n, int) else None, ci
    return None, None, None


def metric(metrics: dict, column: str) -> float | None:
    return figure(metrics, column)[0]


def figure_text(metrics: dict, column: str) -> str:
    """"0.62 [0.51, 0.72] n=16" for a rate with its evidence, "1.5" for a plain number, "" when missing."""
    value, n, ci = figure(metrics, column)
    if value is None:
        return ""
    text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    if ci is not None:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return text + (f" n={n}" if n is not None else "")


def status_text(v: PolicyVersion, serving: int) -> str:
    """A version's status as an admin reads it: the base model is "base model", or "serving" when it serves."""
    if v.version == serving:
        return "serving"
    return "base model" if v.version == 0 else v.status


def versions_table(ctx: AppContext, username: str | None) -> pd.DataFrame:
    """The registry, newest first: version, parent, algorithm, status, labels used, key metrics (each rate with its
    95% interval and n), the canary's human win-rate, time, reason."""
    require_admin(ctx, username)
    canaries = ctx.deployments.canary_statuses()
    serving = ctx.deployments.serving
    rows = []
    for v in reversed(ctx.store.versions.list()):
        rows.append({"version": v.version, "parent": "" if v.parent is None else v.parent, "algorithm": v.algorithm,
                     "status": status_text(v, serving), "labels_used": v.labels_used,
                     **{column: figure_text(v.metrics, column) for column in VERSION_METRICS},
                     "human_win_rate": _canary_cell(canaries.get(v.version)),
                     "created_at": v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else "",
                     "reason": v.reason or ""})
    columns = ["version", "parent", "algorithm", "status", "labels_used", *VERSION_METRICS, "human_win_rate",
               "created_at", "reason"]
    return pd.DataFrame(rows, columns=columns)


def _canary_cell(status: CanaryStatus | None) -> str:
    """A canary's human win-rate as one cell: "0.62 [0.51, 0.72] n=96 pending"; '' for a version never tested."""
    if status is None:
        return ""
    stats = status.stats
    if stats.win_rate is None:
        return f"n=0 {status.decision}"
    return (f"{stats.win_rate:.2f} [{stats.ci95[0]:.2f}, {stats.ci95[1]:.2f}] n={stats.comparisons} "
            f"{status.decision}")


def version_charts(ctx: AppContext, username: str | None) -> str:
    """HTML: one small SVG chart per metric across versions (integer version axis, the base model as v0, whiskers
    for 95% intervals, chance as a dashed line for rates); the empty state says how to get metrics."""
    require_admin(ctx, username)
    versions = ctx.store.versions.list()
    panels = []
    for column, (_, title, y_range, reference) in VERSION_METRICS.items():
        if column == "kl_to_reference" and (max_kl := newest_max_kl(versions)) is not None:
            title, reference = f"{title}; dashed: max_kl {max_kl:g}", max_kl  # the gate's budget, as rounds now set it
        points = []
        for v in versions:
            value, n, ci = figure(v.metrics, column)
            if value is not None:
                note = f"{version_name(v.version)}: {figure_text(v.metrics, column)}"
                points.append(charts.Point(v.version, value, *(ci or (None, None)), note=note))
        if column == "win_rate_vs_base" and points:
            points.append(charts.Point(0, 0.5, note="base model vs itself: 0.5 by definition"))
        panels.append(charts.panel(title, {title: points}, y_range=y_range, reference=reference,
                                   empty=EMPTY_CHARTS))
    return charts.panels(panels)


def newest_max_kl(versions: list[PolicyVersion]) -> float | None:
    """The max_kl of the newest round that recorded one (the budget the KL chart is read against), None if none."""
    for v in reversed(versions):
        value = v.config.get("max_kl")
        if is_number(value):
            return float(value)
    return None


def version_detail(ctx: AppContext, username: str | None, version: int | str | None) -> str:
    """Markdown: one version's status, parent, gate verdict and reason, warnings, config and metrics as tables."""
    require_admin(ctx, username)
    text = str(version if version is not None else "").strip().removeprefix("v")
    if not text.isdigit():
        return "Choose a version above to see its config, gate verdict, warnings and metrics."
    v = ctx.store.versions.get(int(text))  # NotFound names a bad one
    head = (f"### {version_name(v.version)} · {status_text(v, ctx.deployments.serving)}\n"
            f"parent {'-' if v.parent is None else version_name(v.parent)} · {v.algorithm} · "
            f"{v.labels_used} labels used")
    if v.version == 0:
        return head + "\n\nThe base model: every version's baseline; it has no round, config or metrics."
    gate = v.metrics.get("gate") if isinstance(v.metrics.get("gate"), dict) else {}
    verdict = {True: "passed", False: "refused"}.get(gate.get("passed"), "not recorded")
    parts = [head, f"**Gate**: {verdict}" + (f": {escape_markdown(str(gate['reason']))}" if gate.get("reason") else "")]
    if v.reason:
        parts.append(f"**Status reason**: {escape_markdown(v.reason[:500])}")
    warnings = v.metrics.get("warnings") or []
    if warnings:
        parts.append("**Warnings**\n" + "\n".join(f"- ⚠ {escape_markdown(str(w)[:500])}" for w in warnings))
    rows = [(column, figure_text(v.metrics, column)) for column in VERSION_METRICS]
    parts.append(_table("metric", "value (95% interval, n)", [(c, t) for c, t in rows if t]) or "No metrics.")
    config = {k: v for k, v in (v.config or {}).items() if k != "snapshot"}
    parts.append(_table("config", "value", sorted(config.items())) or "No config recorded.")
    return "\n\n".join(parts)


def _table(left: str, right: str, rows: list[tuple[str, object]]) -> str:
    if not rows:
        return ""
    cell = lambda value: escape_markdown(json.dumps(value) if not isinstance(value, str) else value)  # noqa: E731
    return f"| {left} | {right} |\n| --- | --- |\n" + "\n".join(f"| {cell(k)} | {cell(x)} |" for k, x in rows)


def deploy_choices(ctx: AppContext, username: str | None) -> list[tuple[str, int]]:
    """Every version for the Deploy and detail pickers, newest first: ("v2 (candidate)", 2)."""
    require_admin(ctx, username)
    serving = ctx.deployments.serving
    return [(f"{version_name(v.version)} ({status_text(v, serving)})" if v.version else
             f"{version_name(0)}" + (" (serving)" if serving == 0 else ""), v.version)
            for v in reversed(ctx.store.versions.list())]


def run_choices(ctx: AppContext, username: str | None) -> list[tuple[str, int]]:
    """Recent rounds for the loss-curve picker, newest first: ("round 3 -> v2 (succeeded)", 3)."""
    require_admin(ctx, username)
    return [(f"round {r.run_id}" + (f" -> v{r.version}" if r.version is not None else "") + f" ({r.status})",
             r.run_id) for r in ctx.store.runs.list(50)]


def run_loss_chart(ctx: AppContext, username: str | None, run_id: int | None) -> str:
    """SVG: a round's loss per step (the same chart the Overview shows live)."""
    require_admin(ctx, username)
    return loss_chart(ctx, ctx.store.runs.get(int(run_id)) if run_id else None)


def deploy_version(ctx: AppContext, username: str | None, version: int | str | None, force: bool = False) -> str:
    """Deploy any version (same call as POST /api/versions/{v}/deploy): hot swap, annotators get its answers next."""
    require_admin(ctx, username)
    text = str(version if version is not None else "").strip().removeprefix("v")
    if not text.isdigit():
        raise UiError(f"choose a version to deploy, got {version!r}")
    ctx.deployments.deploy(int(text), force=bool(force), by=username or "an admin")
    return f"Deployed {version_name(int(text))}: new items come from it; older ones are replaced as they go stale."


def roll_back(ctx: AppContext, username: str | None) -> str:
    """Deploy the parent of the deployed version; the one taken down is marked rolled_back."""
    user = require_admin(ctx, username)
    current = ctx.deployments.serving
    parent = ctx.deployments.roll_back(reason=f"rolled back by {user.name}")
    return f"Rolled back {version_name(current)} to {version_name(parent)}."
