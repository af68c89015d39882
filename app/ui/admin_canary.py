"""The Admin's canary, on the Versions screen: the canary under test with its evidence, promote and roll back by hand,
and the rule (CanaryConfig) as a form whose every field shows its default and reason.

Plain functions of (context, user name, inputs); each calls `require_admin` first (app/ui/admin.py says why). The
rule is saved through `Deployments.set_canary_config`, the same call as PATCH /api/settings: every field is checked
before any is stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from app.canary import CANARY_PROMPTS, DEPLOY_POLICIES, CanaryConfig
from app.context import AppContext
from app.reasons import field_reasons
from app.ui.admin import require_admin, version_name
from app.ui.admin_rounds import FormField
from app.ui.annotate import UiError
from app.ui.render import escape_markdown
from learner.errors import ConfigError

CANARY_CHOICES = {"deploy_policy": DEPLOY_POLICIES, "canary_prompts": CANARY_PROMPTS}


def canary_panel(ctx: AppContext, username: str | None) -> str:
    """Markdown: the canary under test (its human win-rate against the serving version with n and the 95%
    interval, the decision so far), the last decided one otherwise, and the rule's settings."""
    require_admin(ctx, username)
    rule = ctx.deployments.canary_config
    where = "prompts no version in its line trained on" if rule.canary_prompts == "untrained" else "any prompt"
    settings = (f"Deploy policy **{rule.deploy_policy}** · share {rule.canary_share} · decide after "
                f"{rule.canary_min_comparisons} comparisons against {rule.canary_threshold} · admin after "
                f"{rule.canary_max_items} ranked items · rounds meanwhile "
                f"{'train from the canary' if rule.canary_chain else 'wait for its decision'} · "
                f"canary items on {where}")
    statuses = ctx.deployments.canary_statuses()
    if not statuses:
        return f"No canary yet: a round whose version passes the gate starts one.\n\n{settings}"
    current = ctx.deployments.canary
    status = statuses[current.version] if current else statuses[max(statuses)]
    stats = status.stats
    figure = ("no comparison yet" if stats.win_rate is None else
              f"win-rate **{stats.win_rate:.2f}**, 95% interval [{stats.ci95[0]:.2f}, {stats.ci95[1]:.2f}], "
              f"n = {stats.comparisons} comparisons in {stats.rankings} rankings")
    head = "Canary" if current else "Last canary"
    text = (f"{head} **{version_name(status.version)}** vs {version_name(status.serving)}: {figure} · "
            f"{status.items_ranked} items ranked · decision **{status.decision}**")
    if rule.canary_prompts == "untrained" or status.untrained_items:
        text += f" · {status.untrained_items} of {status.items} canary items on untrained prompts"
    if current and current.mixing and rule.canary_prompts == "untrained" and ctx.deployments.untrained_below() is None:
        text += ("\n\nIts items take any prompt: a version in its line recorded no prompt split (trained before "
                 "prefloop recorded one), so the prompts it trained on are not known.")
    if status.reason:
        text += f"\n\n{escape_markdown(status.reason[:300])}"
    return f"{text}\n\n{settings}"


def has_canary(ctx: AppContext, username: str | None) -> bool:
    """Whether a canary is running: Promote and Roll back show only then."""
    require_admin(ctx, username)
    return ctx.deployments.canary is not None


def _running_canary(ctx: AppContext, username: str | None):
    """(the admin, the running canary); UiError when there is none."""
    user = require_admin(ctx, username)
    canary = ctx.deployments.canary
    if canary is None:
        raise UiError("no canary is running")
    return user, canary


def promote_canary(ctx: AppContext, username: str | None) -> str:
    """Promote the canary now (same call as POST /api/versions/{v}/promote)."""
    user, canary = _running_canary(ctx, username)
    ctx.deployments.promote(canary.version, by=user.name)
    return f"Promoted {version_name(canary.version)}: it serves everyone now."


def reject_canary(ctx: AppContext, username: str | None) -> str:
    """Roll the canary back now (same call as POST /api/versions/{v}/reject-canary)."""
    user, canary = _running_canary(ctx, username)
    ctx.deployments.reject_canary(canary.version, by=user.name)
    return f"Rolled back the canary {version_name(canary.version)}; {version_name(ctx.deployments.serving)} serves."


def canary_fields() -> list[FormField]:
    """Every CanaryConfig field as the rule's form shows it: its default and the reason written beside it."""
    defaults, reasons = CanaryConfig(), field_reasons(CanaryConfig)
    kinds = {bool: "bool", int: "int", float: "float"}
    return [FormField(f.name, "choice" if f.name in CANARY_CHOICES else kinds[type(getattr(defaults, f.name))],
                      getattr(defaults, f.name), reasons.get(f.name, ""), CANARY_CHOICES.get(f.name, ()))
            for f in fields(CanaryConfig)]


def canary_rule(ctx: AppContext, username: str | None) -> dict:
    """The rule in force, field by field (the form's values)."""
    require_admin(ctx, username)
    config = ctx.deployments.canary_config
    return {f.name: getattr(config, f.name) for f in fields(CanaryConfig)}


def save_canary_rule(ctx: AppContext, username: str | None, values: Mapping[str, object]) -> str:
    """Store the form's rule (same call as PATCH /api/settings); a bad or blank field is a UiError naming it and
    nothing is stored."""
    require_admin(ctx, username)
    changes = {}
    for f in canary_fields():
        value = values.get(f.name)
        if value is None or value == "":
            raise UiError(f"{f.name} cannot be blank (its default is {f.default})")
        if f.kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)  # a number box may hand a whole number over as a float
        changes[f.name] = value
    try:
        ctx.deployments.set_canary_config(changes)
    except ConfigError as exc:
        raise UiError(str(exc)) from None
    return "Canary rule saved: it applies from the next label (and, for the share and prompts, the next item)."
