"""The Admin UI's tabs about people and data: Annotators (work, agreement, accounts), Data (import, the prompt
pool, export, guidelines, suggestions) and Arena. Built inside `admin_tab.build_admin_panel`; handlers live in
admin.py and admin_prompts.py, as for the other tabs.
"""

from __future__ import annotations

import gradio as gr

from app.context import AppContext
from app.ui import admin, admin_prompts
from app.ui.render import render_markdown, rendered_text
from app.ui.wiring import FREE, as_toast
from storage.exports import FORMATS
from storage.users import ROLES


# -- Annotators: their work and agreement, overlap, accounts --------------------------------------------------------
def annotators_tab(ctx: AppContext) -> None:
    with gr.Tab("Annotators") as tab:
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
        new_account = gr.Textbox(label="new password / API token, shown once", lines=3, interactive=False)
        with gr.Row():
            user_name = gr.Textbox(label="user name")
            disabled = gr.Checkbox(True, label="disabled")
            disable_btn = gr.Button("Apply")
        with gr.Row():
            reset_password = gr.Textbox(label="new password for that user (blank = generate one)", type="password")
            reset_password_btn = gr.Button("Reset password")
            rotate_token_btn = gr.Button("Rotate API token")
        message = gr.Markdown()
        refresh_btn = gr.Button("Refresh")
    outputs = [stats, agreement, agreement_table, flags, overlap, users, message]

    def show(view: admin.AnnotatorsView) -> list:
        return [view.stats, view.agreement, view.agreement_by_annotator, view.flags, view.overlap, view.users,
                view.message]

    def on_annotators(request: gr.Request):
        with as_toast():
            return show(admin.annotators(ctx, request.username))

    def on_set_overlap(value, request: gr.Request):
        with as_toast():
            return show(admin.set_overlap(ctx, request.username, value))

    def on_add_user(name, role, password, request: gr.Request):
        with as_toast():
            created = admin.add_user(ctx, request.username, name, role, password)
            return [created.text, *show(created.view)]

    def on_disable(name, disable, request: gr.Request):
        with as_toast():
            return show(admin.set_user_disabled(ctx, request.username, name, disable))

    def on_reset_password(name, password, request: gr.Request):
        with as_toast():
            changed = admin.reset_password(ctx, request.username, name, password)
            return [changed.text, *show(changed.view)]

    def on_rotate_token(name, request: gr.Request):
        with as_toast():
            rotated = admin.rotate_token(ctx, request.username, name)
            return [rotated.text, *show(rotated.view)]

    gr.on([tab.select, refresh_btn.click], on_annotators, outputs=outputs, api_name="admin_annotators", **FREE)
    overlap_btn.click(on_set_overlap, overlap, outputs, api_name="admin_set_overlap", **FREE)
    add_user_btn.click(on_add_user, [new_name, new_role, new_password], [new_account, *outputs],
                       api_name="admin_add_user", **FREE)
    disable_btn.click(on_disable, [user_name, disabled], outputs, api_name="admin_set_user_disabled", **FREE)
    reset_password_btn.click(on_reset_password, [user_name, reset_password], [new_account, *outputs],
                             api_name="admin_reset_password", **FREE)
    rotate_token_btn.click(on_rotate_token, user_name, [new_account, *outputs], api_name="admin_rotate_token",
                           **FREE)


# -- Data: import prompts, the prompt pool, export labels, guidelines, suggestions ----------------------------------
def data_tab(ctx: AppContext) -> None:
    with gr.Tab("Data") as tab:
        with gr.Row():
            upload = gr.File(label="prompts file (.jsonl, .json, .csv, .parquet)",
                             file_types=[".jsonl", ".json", ".csv", ".parquet"], type="filepath")
            with gr.Column():
                skip_invalid = gr.Checkbox(label="skip invalid rows (otherwise a file with errors imports nothing)")
                import_btn = gr.Button("Import", variant="primary")
        import_result = gr.Textbox(label="import", lines=3, interactive=False)
        _prompt_pool(ctx, tab)
        with gr.Row():
            export_format = gr.Radio(list(FORMATS), value="dpo", label="export format")
            export_dataset = gr.Checkbox(label="as a Hugging Face dataset (a zip: the rows and a dataset card)")
            export_btn = gr.Button("Export")
            export_file = gr.File(label="download", interactive=False)
        export_message = gr.Markdown()
        _guidelines(ctx, tab)
        _suggestions(ctx, tab)

    def on_import(path, skip, request: gr.Request):
        with as_toast():
            return admin.upload_prompts(ctx, request.username, path, skip)

    def on_export(fmt, dataset, request: gr.Request):
        with as_toast():
            view = admin.export_labels(ctx, request.username, fmt, bool(dataset))
            return [view.path, view.message]

    import_btn.click(on_import, [upload, skip_invalid], import_result, api_name="admin_upload_prompts", **FREE)
    export_btn.click(on_export, [export_format, export_dataset], [export_file, export_message], api_name="admin_export",
                     **FREE)


def _prompt_pool(ctx: AppContext, tab: gr.Tab) -> None:
    gr.Markdown("### Prompt pool")
    summary = gr.Markdown(elem_id="pl-pool-summary")
    with gr.Row():
        search = gr.Textbox(label="search prompts (words they contain)", scale=3)
        page_number = gr.Number(1, precision=0, minimum=1, label="page")
        search_btn = gr.Button("Search")
    table = gr.Dataframe(interactive=False, label="prompts in the pool, newest first (items: answers sampled for it "
                         "so far)", elem_id="pl-pool", wrap=True)
    with gr.Row():
        remove_id = gr.Number(None, precision=0, label="id of the prompt to remove")
        remove_btn = gr.Button("Remove it from the pool", variant="stop")
    message = gr.Markdown()
    outputs = [summary, table, page_number, message]

    def show(view: admin_prompts.PoolView) -> list:
        return [view.summary, view.table, view.page, view.message]

    def on_pool(text, page, request: gr.Request):
        with as_toast():
            return show(admin_prompts.prompt_pool(ctx, request.username, text, page))

    def on_remove_prompt(prompt_id, text, page, request: gr.Request):
        with as_toast():
            return show(admin_prompts.remove_prompt(ctx, request.username, prompt_id, text, page))

    gr.on([tab.select, search_btn.click, search.submit], on_pool, [search, page_number], outputs,
          api_name="admin_prompt_pool", **FREE)
    remove_btn.click(on_remove_prompt, [remove_id, search, page_number], outputs, api_name="admin_remove_prompt",
                     **FREE)


def _guidelines(ctx: AppContext, tab: gr.Tab) -> None:
    text = gr.Textbox(label="annotator guidelines (Markdown)", lines=10)
    save_btn = gr.Button("Save guidelines")
    preview = rendered_text(container=True, padding=True)
    message = gr.Markdown()

    def on_guidelines(request: gr.Request):
        with as_toast():
            source = admin.guidelines_source(ctx, request.username)
            return [source, render_markdown(source), ""]

    def on_save_guidelines(source, request: gr.Request):
        with as_toast():
            saved = admin.save_guidelines(ctx, request.username, source)
            return [source, render_markdown(source), saved]

    tab.select(on_guidelines, outputs=[text, preview, message], api_name="admin_guidelines", **FREE)
    save_btn.click(on_save_guidelines, text, [text, preview, message], api_name="admin_save_guidelines", **FREE)


def _suggestions(ctx: AppContext, tab: gr.Tab) -> None:
    table = gr.Dataframe(interactive=False, label="prompts annotators suggested from the Demo, waiting for review "
                                                  "(newest first)")
    with gr.Row():
        suggestion_id = gr.Number(None, precision=0, label="suggestion id")
        approve_btn = gr.Button("Approve: add to the pool")
        reject_btn = gr.Button("Reject")
        refresh_btn = gr.Button("Refresh")
    message = gr.Markdown()

    def on_suggestions(request: gr.Request):
        with as_toast():
            view = admin.pending_suggestions(ctx, request.username)
            return [view.table, view.message]

    def on_decide_suggestion(approve: bool):
        def decide(suggestion, request: gr.Request):
            with as_toast():
                view = admin.decide_suggestion(ctx, request.username, suggestion, approve)
                return [view.table, view.message]
        return decide

    gr.on([tab.select, refresh_btn.click], on_suggestions, outputs=[table, message], api_name="admin_suggestions",
          **FREE)
    approve_btn.click(on_decide_suggestion(True), suggestion_id, [table, message],
                      api_name="admin_approve_suggestion", **FREE)
    reject_btn.click(on_decide_suggestion(False), suggestion_id, [table, message],
                     api_name="admin_reject_suggestion", **FREE)


# -- Arena: the Demo's blind votes, read-only (app/arena.py) --------------------------------------------------------
def arena_tab(ctx: AppContext) -> None:
    with gr.Tab("Arena") as tab:
        standings = gr.Dataframe(interactive=False, label="arena votes per version pair (a tie or both-bad vote is "
                                 "half a win each)", elem_id="pl-arena-standings")
        recent = gr.Dataframe(interactive=False, label="newest votes")

    def on_arena(request: gr.Request):
        with as_toast():
            return list(admin.arena_tables(ctx, request.username))

    tab.select(on_arena, outputs=[standings, recent], api_name="admin_arena", **FREE)
