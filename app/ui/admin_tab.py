"""`build_admin_ui`: the Admin UI, its own Gradio app (mounted at /admin), wiring the handlers of admin.py to Gradio
components. No logic lives here.

Only enabled admins get through the door at /admin (app/web_guard.py checks every request before Gradio runs), and
every handler still checks the role itself (`admin.require_admin`). The annotator UI at /ui holds no admin component
or event. Every event has an api_name, so programs (and the tests) reach each action through `gradio_client`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from app.context import AppContext
from app.ui import admin, admin_canary, admin_people, admin_rounds, admin_versions
from app.ui.wiring import FREE, ONE_SWAP, as_toast
from app.web_guard import ANNOTATOR_DOOR

OVERVIEW_EVERY_S = 2.0  # the Overview's live refresh while an admin has the page open


def _form_rows(form: list[admin_rounds.FormField], per_row: int = 3) -> list[gr.components.Component]:
    """The Train form's components for `form`, `per_row` to a row: each labelled with its default, its reason below."""
    made = []
    for start in range(0, len(form), per_row):
        with gr.Row(equal_height=False):
            for f in form[start:start + per_row]:
                label = f"{f.name} (default {f.default}{'; blank = none' if f.nullable else ''})"
                options = {"label": label, "info": f.reason, "elem_id": f"pl-knob-{f.name}"}
                if f.kind == "choice":
                    made.append(gr.Radio(list(f.choices), value=f.default, **options))
                elif f.kind == "bool":
                    made.append(gr.Checkbox(f.default, **options))
                elif f.kind in ("int", "float"):
                    made.append(gr.Number(f.default, precision=0 if f.kind == "int" else None, **options))
                else:
                    made.append(gr.Textbox(f.default, **options))
    return made


def build_admin_ui(ctx: AppContext) -> gr.Blocks:
    """The Admin UI as its own Gradio app, for the admin door at /admin."""
    with gr.Blocks(title="prefloop admin") as admin_ui:
        build_admin_panel(ctx, admin_ui)
    return admin_ui


def build_admin_panel(ctx: AppContext, page: gr.Blocks) -> gr.Column:
    """Every admin component and event, inside `page` (being built): one function per tab, each wiring its own
    events to the handlers of admin*.py (the role check is inside every admin.* call)."""
    with gr.Column(elem_id="pl-admin") as admin_panel:
        gr.Markdown(f"**prefloop admin** · [Annotate]({ANNOTATOR_DOOR.prefix}/) · "
                    f"[Log out]({ANNOTATOR_DOOR.prefix}/logout)")
        with gr.Tabs():
            overview = _overview_layout()
            train_banner = _train_tab(ctx)
            _versions_tab(ctx)
            admin_people.annotators_tab(ctx)
            admin_people.data_tab(ctx)
            admin_people.arena_tab(ctx)
        # Started on load for an admin: it ticks while an Admin page is open, and stops with the page.
        timer = gr.Timer(OVERVIEW_EVERY_S, active=False)

    def on_load(request: gr.Request):
        shown = admin.is_admin(ctx, request.username)
        return [gr.update(visible=shown), gr.Timer(active=shown)]

    gr.on(None, on_load, outputs=[admin_panel, timer], api_visibility="private", **FREE)
    _wire_overview(ctx, page, overview, timer, train_banner)
    return admin_panel


# -- Overview: counts, the round in progress (live), cancel ---------------------------------------------------------
@dataclass(frozen=True)
class _Overview:
    tab: gr.Tab
    outputs: list  # what show_overview fills, except the Train tab's banner
    refresh_btn: gr.Button
    cancel_btn: gr.Button
    confirm_row: gr.Row
    confirm_cancel_btn: gr.Button
    keep_btn: gr.Button


def _overview_layout() -> _Overview:
    with gr.Tab("Overview") as tab:
        counts = gr.Markdown()
        status = gr.Markdown()
        run = gr.Markdown(elem_id="pl-run")
        bar = gr.HTML()
        with gr.Row():
            loss_live = gr.HTML(elem_id="pl-loss-live")
            with gr.Column():
                run_warnings = gr.Markdown(elem_id="pl-run-warnings")
                log_tail = gr.Textbox(label="round log (newest lines)", lines=6, max_lines=12, interactive=False,
                                      elem_id="pl-run-log")
        with gr.Row():
            refresh_btn = gr.Button("Refresh")
            cancel_btn = gr.Button("Cancel the round in progress", variant="stop", interactive=False)
        with gr.Row(visible=False) as confirm_row:  # a second click, so a stray one cancels nothing
            gr.Markdown("Cancel the round? Its work so far is lost; the serving version stays.")
            confirm_cancel_btn = gr.Button("Yes, cancel the round", variant="stop")
            keep_btn = gr.Button("No, keep it running")
        message = gr.Markdown()
    return _Overview(tab, [counts, status, run, bar, message, loss_live, run_warnings, log_tail], refresh_btn,
                     cancel_btn, confirm_row, confirm_cancel_btn, keep_btn)


def _wire_overview(ctx: AppContext, page: gr.Blocks, tab: _Overview, timer: gr.Timer, train_banner) -> None:
    outputs = [*tab.outputs, train_banner, tab.cancel_btn]

    def show(view: admin_rounds.OverviewView) -> list:
        return [view.counts, view.status, view.run, admin_rounds.progress_html(view.progress), view.message,
                view.loss_chart, view.warnings, view.log_tail, view.train_banner,
                gr.update(interactive=view.active_run is not None)]

    def on_overview(request: gr.Request):
        with as_toast():
            return show(admin_rounds.overview(ctx, request.username))

    def on_cancel(request: gr.Request):
        with as_toast():
            return [*show(admin_rounds.cancel_round(ctx, request.username)), gr.update(visible=False)]

    gr.on([page.load, tab.tab.select, tab.refresh_btn.click], on_overview, outputs=outputs,
          api_name="admin_overview", **FREE)
    timer.tick(on_overview, outputs=outputs, api_visibility="private", show_progress="hidden", **FREE)
    tab.cancel_btn.click(lambda: gr.update(visible=True), outputs=tab.confirm_row, api_visibility="private", **FREE)
    tab.keep_btn.click(lambda: gr.update(visible=False), outputs=tab.confirm_row, api_visibility="private", **FREE)
    tab.confirm_cancel_btn.click(on_cancel, outputs=[*outputs, tab.confirm_row], api_name="admin_cancel_round",
                                 **FREE)


# -- Train: every knob of a round, start one, automatic rounds -------------------------------------------------------
def _train_tab(ctx: AppContext) -> gr.Markdown:
    """The Train tab; returns its banner ("a round is running"), which the Overview's refresh fills too."""
    with gr.Tab("Train") as tab:
        banner = gr.Markdown(elem_id="pl-train-banner")
        gr.Markdown("Every setting of a round, each with its default and why. On a CPU, **Quick round** "
                    "fills in a round of about a minute (too small to improve the model: it shows the loop).")
        form = admin_rounds.train_fields()
        knob_inputs = _form_rows([f for f in form if f.common])
        with gr.Accordion("Advanced: every other setting", open=False):
            knob_inputs += _form_rows([f for f in form if not f.common])
        with gr.Row():
            quick_btn = gr.Button("Quick round (CPU, ~1 min)")
            defaults_btn = gr.Button("Reset to defaults")
        start_btn = gr.Button("Start a round", variant="primary")
        train_message = gr.Markdown()
        gr.Markdown("### Automatic rounds (with the settings above)")
        with gr.Row():
            auto_on = gr.Checkbox(label="on")
            every_labels = gr.Number(0, precision=0, label="every N new labels (0 = off)")
            every_minutes = gr.Number(0, precision=0, label="every T minutes (0 = off)")
            save_auto_btn = gr.Button("Save")
        auto_message = gr.Markdown()
    triggers = [auto_on, every_labels, every_minutes, auto_message, banner]

    def knobs(values) -> dict:
        return dict(zip(admin_rounds.TRAIN_KNOBS, values, strict=True))

    def show_triggers(view: admin_rounds.TriggersView) -> list:
        return [view.enabled, view.every_labels, view.every_minutes, view.message, view.banner]

    def fill_form(values: dict) -> list:
        return [values[name] for name in admin_rounds.TRAIN_KNOBS]

    def on_train_state(request: gr.Request):
        with as_toast():
            return show_triggers(admin_rounds.triggers(ctx, request.username))

    def on_start(request: gr.Request, *values):
        with as_toast():
            return admin_rounds.start_round(ctx, request.username, knobs(values))

    def on_save_triggers(request: gr.Request, enabled, labels, minutes, *values):
        with as_toast():
            return show_triggers(admin_rounds.save_triggers(ctx, request.username, enabled, labels, minutes,
                                                            knobs(values)))

    tab.select(on_train_state, outputs=triggers, api_name="admin_train_state", **FREE)
    quick_btn.click(lambda: fill_form(admin_rounds.quick_values()), outputs=knob_inputs, api_visibility="private",
                    **FREE)
    defaults_btn.click(lambda: fill_form(admin_rounds.knob_defaults()), outputs=knob_inputs,
                       api_visibility="private", **FREE)
    start_btn.click(on_start, knob_inputs, train_message, api_name="admin_start_round", **FREE)
    save_auto_btn.click(on_save_triggers, [auto_on, every_labels, every_minutes, *knob_inputs], triggers,
                        api_name="admin_save_triggers", **FREE)
    return banner


def _canary_rule(ctx: AppContext, tab: gr.Tab, panel: gr.Markdown) -> None:
    """The canary's rule as a form (every CanaryConfig field with its default and reason), filled in with the rule
    in force when the tab opens; saving it refreshes the canary's panel."""
    form = admin_canary.canary_fields()
    with gr.Accordion("Canary rule", open=False):
        inputs = _form_rows(form)
        save_btn = gr.Button("Save the canary rule")
        message = gr.Markdown()

    def on_rule(request: gr.Request):
        with as_toast():
            rule = admin_canary.canary_rule(ctx, request.username)
            return [rule[f.name] for f in form]

    def on_save(request: gr.Request, *values):
        with as_toast():
            saved = admin_canary.save_canary_rule(ctx, request.username, dict(zip([f.name for f in form], values)))
            return [saved, admin_canary.canary_panel(ctx, request.username)]

    tab.select(on_rule, outputs=inputs, api_name="admin_canary_rule", **FREE)
    save_btn.click(on_save, inputs, [message, panel], api_name="admin_save_canary_rule", **FREE)


# -- Versions: the registry, deploy and roll back, the canary, charts -----------------------------------------------
def _versions_tab(ctx: AppContext) -> None:
    with gr.Tab("Versions") as tab:
        versions = gr.Dataframe(interactive=False, label="versions, newest first")
        with gr.Row():
            deploy_to = gr.Dropdown(label="version", allow_custom_value=True)
            force = gr.Checkbox(label="force (deploy a version the gate rejected)")
            deploy_btn = gr.Button("Deploy", variant="primary")
            rollback_btn = gr.Button("Roll back to the parent")
        versions_message = gr.Markdown()
        canary = gr.Markdown(elem_id="pl-canary")
        with gr.Row():
            promote_btn = gr.Button("Promote the canary", visible=False)  # shown while a canary runs
            reject_btn = gr.Button("Roll back the canary", variant="stop", visible=False)
        _canary_rule(ctx, tab, canary)
        charts = gr.HTML(elem_id="pl-version-charts")
        with gr.Row():
            detail_picker = gr.Dropdown(label="details of version", allow_custom_value=True)
            run_picker = gr.Dropdown(label="loss curve of round", allow_custom_value=True)
        with gr.Row():
            detail = gr.Markdown(elem_id="pl-version-detail")
            loss_plot = gr.HTML(elem_id="pl-loss-plot")
        refresh_btn = gr.Button("Refresh")
    outputs = [versions, deploy_to, charts, run_picker, loss_plot, detail_picker, detail]

    def on_versions(request: gr.Request):
        with as_toast():
            table = admin_versions.versions_table(ctx, request.username)
            choices = admin_versions.run_choices(ctx, request.username)
            versions_list = admin_versions.deploy_choices(ctx, request.username)
            active = ctx.store.runs.active()
            selected = active.run_id if active else (choices[0][1] if choices else None)
            shown = versions_list[0][1] if versions_list else None
            return [table, gr.update(choices=versions_list, value=None),
                    admin_versions.version_charts(ctx, request.username), gr.update(choices=choices, value=selected),
                    admin_versions.run_loss_chart(ctx, request.username, selected),
                    gr.update(choices=versions_list, value=shown),
                    admin_versions.version_detail(ctx, request.username, shown)]

    def on_loss_curve(run_id, request: gr.Request):
        with as_toast():
            return admin_versions.run_loss_chart(ctx, request.username, run_id or None)

    def on_version_detail(version, request: gr.Request):
        with as_toast():
            return admin_versions.version_detail(ctx, request.username, version)

    def on_deploy(version, force_it, request: gr.Request):
        with as_toast():
            message = admin_versions.deploy_version(ctx, request.username, version, force_it)
        return [message, *on_versions(request)]

    def on_roll_back(request: gr.Request):
        with as_toast():
            message = admin_versions.roll_back(ctx, request.username)
        return [message, *on_versions(request)]

    refreshed = [tab.select, refresh_btn.click]
    gr.on(refreshed, on_versions, outputs=outputs, api_name="admin_versions", **FREE)
    run_picker.input(on_loss_curve, run_picker, loss_plot, api_name="admin_loss_curve", **FREE)
    detail_picker.input(on_version_detail, detail_picker, detail, api_name="admin_version_detail", **FREE)
    deploy_btn.click(on_deploy, [deploy_to, force], [versions_message, *outputs], api_name="admin_deploy",
                     **ONE_SWAP)
    rollback_btn.click(on_roll_back, None, [versions_message, *outputs], api_name="admin_roll_back", **ONE_SWAP)
    _canary_actions(ctx, refreshed, [canary, promote_btn, reject_btn], versions_message, outputs, on_versions)


def _canary_actions(ctx: AppContext, refreshed: list, actions: list, message: gr.Markdown, outputs: list,
                    on_versions: Callable) -> None:
    """The canary's panel and its promote / roll back buttons (`actions`), shown while a canary runs; each action
    refreshes the panel and the versions (`outputs`, by `on_versions`)."""
    def on_canary(request: gr.Request):
        with as_toast():
            shown = gr.update(visible=admin_canary.has_canary(ctx, request.username))
            return [admin_canary.canary_panel(ctx, request.username), shown, shown]

    def on_canary_action(action):
        def handler(request: gr.Request):
            with as_toast():
                said = action(ctx, request.username)
            return [said, *on_canary(request), *on_versions(request)]
        return handler

    _, promote_btn, reject_btn = actions
    gr.on(refreshed, on_canary, outputs=actions, api_name="admin_canary", **FREE)
    promote_btn.click(on_canary_action(admin_canary.promote_canary), None, [message, *actions, *outputs],
                      api_name="admin_promote_canary", **ONE_SWAP)
    reject_btn.click(on_canary_action(admin_canary.reject_canary), None, [message, *actions, *outputs],
                     api_name="admin_reject_canary", **ONE_SWAP)
