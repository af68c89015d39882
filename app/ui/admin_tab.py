"""`build_admin_ui`: the Admin UI, its own Gradio app (mounted at /admin), wiring the handlers of admin.py to Gradio
components. No logic lives here.

Only enabled admins get through the door at /admin (app/web_guard.py checks every request before Gradio runs), and
every handler still checks the role itself (`admin.require_admin`). The annotator UI at /ui holds no admin component
or event. Every event has an api_name, so programs (and the tests) reach each action through `gradio_client`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr

from app.context import AppContext
from app.policy import PolicyBusy
from app.ui import admin
from app.ui.annotate import UiError
from app.ui.render import render_markdown, rendered_text
from app.web_guard import ANNOTATOR_DOOR
from learner.config import ALGORITHMS
from learner.errors import LearnerError
from storage.errors import StorageError
from storage.exports import FORMATS
from storage.users import ROLES

HANDLED = (UiError, StorageError, LearnerError, PolicyBusy)  # shown as a toast; anything else is a bug: a 500
OVERVIEW_EVERY_S = 2.0  # the Overview's live refresh while an admin has the page open


@contextmanager
def as_toast() -> Iterator[None]:
    """Refusals and bad input become gr.Error (a toast in the browser, an exception in gradio_client)."""
    try:
        yield
    except HANDLED as exc:
        raise gr.Error(str(exc)) from exc


def build_admin_ui(ctx: AppContext) -> gr.Blocks:
    """The Admin UI as its own Gradio app, for the admin door at /admin."""
    with gr.Blocks(title="prefloop admin") as admin_ui:
        build_admin_panel(ctx, admin_ui)
    return admin_ui


def build_admin_panel(ctx: AppContext, page: gr.Blocks) -> gr.Column:
    """Every admin component and event, inside `page` (being built)."""
    defaults = admin.knob_defaults()
    with gr.Column(elem_id="pl-admin") as admin_panel:
        gr.Markdown(f"**prefloop admin** · [Annotate]({ANNOTATOR_DOOR.prefix}/) · "
                    f"[Log out]({ANNOTATOR_DOOR.prefix}/logout)")
        with gr.Tabs():
            with gr.Tab("Overview") as overview_tab:
                counts = gr.Markdown()
                status = gr.Markdown()
                run = gr.Markdown()
                bar = gr.HTML()
                with gr.Row():
                    refresh_btn = gr.Button("Refresh")
                    cancel_btn = gr.Button("Cancel the round in progress", variant="stop")
                overview_message = gr.Markdown()

            with gr.Tab("Train") as train_tab:
                with gr.Row():
                    algorithm = gr.Radio(list(ALGORITHMS), value=defaults["algorithm"],
                                         label=f"algorithm (default {defaults['algorithm']})",
                                         info="dpo: rankings; kto: thumbs; reward: the reward model only")
                    beta = gr.Number(defaults["beta"], label=f"beta (default {defaults['beta']})")
                    steps = gr.Number(defaults["steps"], precision=0, label=f"steps (default {defaults['steps']})")
                    learning_rate = gr.Number(defaults["learning_rate"],
                                              label=f"learning rate (default {defaults['learning_rate']})")
                with gr.Row():
                    sync_every = gr.Number(defaults["sync_every"], precision=0,
                                           label=f"sync_every (default {defaults['sync_every']})",
                                           info="optimizer steps between regenerating on-policy pairs")
                    max_staleness = gr.Number(defaults["max_staleness"], precision=0,
                                              label=f"max_staleness (default {defaults['max_staleness']})",
                                              info="versions back a label may be; blank = all labels")
                    rollout_prompts = gr.Number(defaults["rollout_prompts"], precision=0,
                                                label=f"rollout prompts (default {defaults['rollout_prompts']})")
                    ref_sync = gr.Checkbox(defaults["ref_sync"], label=f"ref_sync (default {defaults['ref_sync']})",
                                           info="reference = the parent version instead of the base model")
                start_btn = gr.Button("Start a round", variant="primary")
                train_message = gr.Markdown()
                gr.Markdown("### Automatic rounds (with the settings above)")
                with gr.Row():
                    auto_on = gr.Checkbox(label="on")
                    every_labels = gr.Number(0, precision=0, label="every N new labels (0 = off)")
                    every_minutes = gr.Number(0, precision=0, label="every T minutes (0 = off)")
                    save_auto_btn = gr.Button("Save")
                auto_message = gr.Markdown()

            with gr.Tab("Versions") as versions_tab:
                versions = gr.Dataframe(interactive=False, label="versions, newest first")
                with gr.Row():
                    deploy_to = gr.Dropdown(label="version", allow_custom_value=True)
                    force = gr.Checkbox(label="force (deploy a version the gate rejected)")
                    deploy_btn = gr.Button("Deploy", variant="primary")
                    rollback_btn = gr.Button("Roll back to the parent")
                versions_message = gr.Markdown()
                with gr.Row():
                    rates_plot = gr.LinePlot(x="version", y="value", color="metric", y_lim=[0, 1],
                                             title="Reward-model accuracy, win-rates, EOS rate")
                    kl_plot = gr.LinePlot(x="version", y="value", color="metric", title="KL to reference (nats)")
                with gr.Row():
                    entropy_plot = gr.LinePlot(x="version", y="value", color="metric", title="Logit entropy")
                    length_plot = gr.LinePlot(x="version", y="value", color="metric",
                                              title="Mean answer length (tokens)")
                run_picker = gr.Dropdown(label="round", allow_custom_value=True)
                loss_plot = gr.LinePlot(x="step", y="loss", color="curve", title="Loss per step")
                versions_refresh_btn = gr.Button("Refresh")

            with gr.Tab("Annotators") as annotators_tab:
                stats = gr.Dataframe(interactive=False, label="labels per annotator (median seconds per ranking)")
                agreement = gr.Markdown()
                agreement_table = gr.Dataframe(interactive=False, label="agreement by annotator")
                flags = gr.Dataframe(interactive=False, label="flagged items to review, newest first")
                with gr.Row():
                    overlap = gr.Number(ctx.config.overlap, precision=0, label="overlap: annotators per item")
                    overlap_btn = gr.Button("Set overlap")
                users = gr.Dataframe(interactive=False, label="users")
                with gr.Row():
                    new_name = gr.Textbox(label="new user name")
                    new_role = gr.Radio(list(ROLES), value="annotator", label="role")
                    new_password = gr.Textbox(label="password (blank = generate one)", type="password")
                    add_user_btn = gr.Button("Add user")
                new_account = gr.Textbox(label="new password / API token, shown once", lines=3,
                                         interactive=False)
                with gr.Row():
                    user_name = gr.Textbox(label="user name")
                    disabled = gr.Checkbox(True, label="disabled")
                    disable_btn = gr.Button("Apply")
                with gr.Row():
                    reset_password = gr.Textbox(label="new password for that user (blank = generate one)",
                                                type="password")
                    reset_password_btn = gr.Button("Reset password")
                    rotate_token_btn = gr.Button("Rotate API token")
                annotators_message = gr.Markdown()
                annotators_refresh_btn = gr.Button("Refresh")

            with gr.Tab("Data") as data_tab:
                with gr.Row():
                    upload = gr.File(label="prompts file (.jsonl, .json, .csv, .parquet)",
                                     file_types=[".jsonl", ".json", ".csv", ".parquet"], type="filepath")
                    with gr.Column():
                        skip_invalid = gr.Checkbox(label="skip invalid rows (otherwise a file with errors imports "
                                                         "nothing)")
                        import_btn = gr.Button("Import", variant="primary")
                import_result = gr.Textbox(label="import", lines=3, interactive=False)
                with gr.Row():
                    export_format = gr.Radio(list(FORMATS), value="dpo", label="export format")
                    export_btn = gr.Button("Export")
                    export_file = gr.File(label="download", interactive=False)
                export_message = gr.Markdown()
                guidelines = gr.Textbox(label="annotator guidelines (Markdown)", lines=10)
                save_guidelines_btn = gr.Button("Save guidelines")
                guidelines_preview = rendered_text(container=True, padding=True)
                guidelines_message = gr.Markdown()
        # Started on load for an admin: it ticks while an Admin page is open, and stops with the page.
        timer = gr.Timer(OVERVIEW_EVERY_S, active=False)

    # -- handlers: (inputs, request) -> component values; the role check is inside every admin.* call ----------
    def show_overview(view: admin.OverviewView) -> list:
        return [view.counts, view.status, view.run, admin.progress_html(view.progress), view.message]

    def on_overview(request: gr.Request):
        with as_toast():
            return show_overview(admin.overview(ctx, request.username))

    def on_cancel(request: gr.Request):
        with as_toast():
            return show_overview(admin.cancel_round(ctx, request.username))

    def knobs(*values) -> dict:
        return dict(zip(admin.TRAIN_KNOBS, values, strict=True))

    def show_triggers(view: admin.TriggersView) -> list:
        return [view.enabled, view.every_labels, view.every_minutes, view.message]

    def on_train_state(request: gr.Request):
        with as_toast():
            return show_triggers(admin.triggers(ctx, request.username))

    def on_start(algorithm, beta, steps, learning_rate, sync_every, max_staleness, ref_sync, rollout_prompts,
                 request: gr.Request):
        with as_toast():
            return admin.start_round(ctx, request.username, knobs(
                algorithm, beta, steps, learning_rate, sync_every, max_staleness, ref_sync, rollout_prompts))

    def on_save_triggers(enabled, labels, minutes, algorithm, beta, steps, learning_rate, sync_every, max_staleness,
                         ref_sync, rollout_prompts, request: gr.Request):
        with as_toast():
            return show_triggers(admin.save_triggers(ctx, request.username, enabled, labels, minutes, knobs(
                algorithm, beta, steps, learning_rate, sync_every, max_staleness, ref_sync, rollout_prompts)))

    def on_versions(request: gr.Request):
        with as_toast():
            table = admin.versions_table(ctx, request.username)
            plots = admin.version_plots(ctx, request.username)
            choices = admin.run_choices(ctx, request.username)
            active = ctx.store.runs.active()
            selected = active.run_id if active else (choices[0][1] if choices else None)
            return [table, gr.update(choices=admin.deploy_choices(ctx, request.username), value=None), plots.rates,
                    plots.kl, plots.entropy, plots.length, gr.update(choices=choices, value=selected),
                    admin.loss_curve(ctx, request.username, selected)]

    def on_loss_curve(run_id, request: gr.Request):
        with as_toast():
            return admin.loss_curve(ctx, request.username, run_id or None)

    def on_deploy(version, force_it, request: gr.Request):
        with as_toast():
            message = admin.deploy_version(ctx, request.username, version, force_it)
        return [message, *on_versions(request)]

    def on_roll_back(request: gr.Request):
        with as_toast():
            message = admin.roll_back(ctx, request.username)
        return [message, *on_versions(request)]

    def show_annotators(view: admin.AnnotatorsView) -> list:
        return [view.stats, view.agreement, view.agreement_by_annotator, view.flags, view.overlap, view.users,
                view.message]

    def on_annotators(request: gr.Request):
        with as_toast():
            return show_annotators(admin.annotators(ctx, request.username))

    def on_set_overlap(value, request: gr.Request):
        with as_toast():
            return show_annotators(admin.set_overlap(ctx, request.username, value))

    def on_add_user(name, role, password, request: gr.Request):
        with as_toast():
            created = admin.add_user(ctx, request.username, name, role, password)
            return [created.text, *show_annotators(created.view)]

    def on_disable(name, disable, request: gr.Request):
        with as_toast():
            return show_annotators(admin.set_user_disabled(ctx, request.username, name, disable))

    def on_reset_password(name, password, request: gr.Request):
        with as_toast():
            changed = admin.reset_password(ctx, request.username, name, password)
            return [changed.text, *show_annotators(changed.view)]

    def on_rotate_token(name, request: gr.Request):
        with as_toast():
            rotated = admin.rotate_token(ctx, request.username, name)
            return [rotated.text, *show_annotators(rotated.view)]

    def on_import(path, skip, request: gr.Request):
        with as_toast():
            return admin.upload_prompts(ctx, request.username, path, skip)

    def on_export(fmt, request: gr.Request):
        with as_toast():
            view = admin.export_labels(ctx, request.username, fmt)
            return [view.path, view.message]

    def on_guidelines(request: gr.Request):
        with as_toast():
            text = admin.guidelines_source(ctx, request.username)
            return [text, render_markdown(text), ""]

    def on_save_guidelines(text, request: gr.Request):
        with as_toast():
            message = admin.save_guidelines(ctx, request.username, text)
            return [text, render_markdown(text), message]

    def on_load(request: gr.Request):
        shown = admin.is_admin(ctx, request.username)
        return [gr.update(visible=shown), gr.Timer(active=shown)]

    # -- wiring -----------------------------------------------------------------------------------------------
    knob_inputs = [algorithm, beta, steps, learning_rate, sync_every, max_staleness, ref_sync, rollout_prompts]
    overview_outputs = [counts, status, run, bar, overview_message]
    versions_outputs = [versions, deploy_to, rates_plot, kl_plot, entropy_plot, length_plot, run_picker, loss_plot]
    annotators_outputs = [stats, agreement, agreement_table, flags, overlap, users, annotators_message]
    free = {"concurrency_limit": None}  # admin reads are quick; nobody queues behind another admin

    gr.on(None, on_load, outputs=[admin_panel, timer], api_visibility="private", **free)
    gr.on([page.load, overview_tab.select, refresh_btn.click], on_overview, outputs=overview_outputs,
          api_name="admin_overview", **free)
    timer.tick(on_overview, outputs=overview_outputs, api_visibility="private", show_progress="hidden", **free)
    cancel_btn.click(on_cancel, outputs=overview_outputs, api_name="admin_cancel_round", **free)
    train_tab.select(on_train_state, outputs=[auto_on, every_labels, every_minutes, auto_message],
                     api_name="admin_train_state", **free)
    start_btn.click(on_start, knob_inputs, train_message, api_name="admin_start_round", **free)
    save_auto_btn.click(on_save_triggers, [auto_on, every_labels, every_minutes, *knob_inputs],
                        [auto_on, every_labels, every_minutes, auto_message], api_name="admin_save_triggers", **free)
    gr.on([versions_tab.select, versions_refresh_btn.click], on_versions, outputs=versions_outputs,
          api_name="admin_versions", **free)
    run_picker.input(on_loss_curve, run_picker, loss_plot, api_name="admin_loss_curve", **free)
    deploy_btn.click(on_deploy, [deploy_to, force], [versions_message, *versions_outputs], api_name="admin_deploy",
                     concurrency_limit=1, concurrency_id="admin_deploy")  # one hot swap at a time
    rollback_btn.click(on_roll_back, None, [versions_message, *versions_outputs], api_name="admin_roll_back",
                       concurrency_limit=1, concurrency_id="admin_deploy")
    gr.on([annotators_tab.select, annotators_refresh_btn.click], on_annotators, outputs=annotators_outputs,
          api_name="admin_annotators", **free)
    overlap_btn.click(on_set_overlap, overlap, annotators_outputs, api_name="admin_set_overlap", **free)
    add_user_btn.click(on_add_user, [new_name, new_role, new_password], [new_account, *annotators_outputs],
                       api_name="admin_add_user", **free)
    disable_btn.click(on_disable, [user_name, disabled], annotators_outputs, api_name="admin_set_user_disabled",
                      **free)
    reset_password_btn.click(on_reset_password, [user_name, reset_password], [new_account, *annotators_outputs],
                             api_name="admin_reset_password", **free)
    rotate_token_btn.click(on_rotate_token, user_name, [new_account, *annotators_outputs],
                           api_name="admin_rotate_token", **free)
    import_btn.click(on_import, [upload, skip_invalid], import_result, api_name="admin_upload_prompts", **free)
    export_btn.click(on_export, export_format, [export_file, export_message], api_name="admin_export", **free)
    data_tab.select(on_guidelines, outputs=[guidelines, guidelines_preview, guidelines_message],
                    api_name="admin_guidelines", **free)
    save_guidelines_btn.click(on_save_guidelines, guidelines, [guidelines, guidelines_preview, guidelines_message],
                              api_name="admin_save_guidelines", **free)
    return admin_panel
