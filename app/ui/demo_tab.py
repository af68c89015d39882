"""`build_demo_tab`: wiring the handlers of demo.py to Gradio components (any logged-in user). No logic lives here.

Demo events share one concurrency group as wide as the generation slots, apart from the Annotate tab's events,
so a queue at
the Demo never delays a label; `ctx.generation_slots` enforces the same bound for programs calling the endpoints.
"""

from __future__ import annotations

import gradio as gr

from app.context import AppContext
from app.ui import demo
from app.ui.admin_tab import as_toast
from app.ui.render import rendered_chat, rendered_text


def build_demo_tab(ctx: AppContext) -> gr.Tab:
    slots = ctx.generation_slots  # the same bound as /api/generate
    with gr.Tab("Demo", elem_id="pl-demo") as demo_tab, gr.Tabs():
        with gr.Tab("Chat"):
            history = gr.State(())
            with gr.Row():
                chat_version = gr.Dropdown(label="version", value=demo.DEPLOYED, allow_custom_value=True)
                max_new_tokens = gr.Slider(1, demo.DEMO_MAX_NEW_TOKENS, step=1,
                                           value=min(ctx.config.sampling.max_new_tokens, demo.DEMO_MAX_NEW_TOKENS),
                                           label="max new tokens")
            chatbot = rendered_chat(label="chat", height=420, elem_id="pl-chat")
            message = gr.Textbox(label="message", placeholder="Ask the model something, then press Enter")
            with gr.Row():
                send_btn = gr.Button("Send", variant="primary")
                clear_btn = gr.Button("New conversation")
            chat_status = gr.Markdown()

        with gr.Tab("Side by side"):
            prompt = gr.Textbox(label="prompt", lines=3)
            with gr.Row():
                left_version = gr.Dropdown(label="left", value=demo.DEPLOYED, allow_custom_value=True)
                right_version = gr.Dropdown(label="right", value="0", allow_custom_value=True)
                seed = gr.Number(0, precision=0, label="seed, shared by both sides (0 = a new one each time)")
            with gr.Row():
                compare_btn = gr.Button("Compare", variant="primary")
                send_to_pool_btn = gr.Button("Send to annotation")
            with gr.Row(equal_height=False):
                left = rendered_text(container=True, padding=True)
                right = rendered_text(container=True, padding=True)
            compare_status = gr.Markdown()

    def on_versions():
        choices = demo.version_choices(ctx)
        return [gr.update(choices=choices)] * 3

    def on_chat(state, text, version, tokens, request: gr.Request):
        with as_toast():
            for view in demo.chat(ctx, slots, request.username, state, text, version, tokens):
                yield [view.history, view.shown, "", view.status]

    def on_compare(text, left_choice, right_choice, seed_value, tokens, request: gr.Request):
        with as_toast():
            for view in demo.side_by_side(ctx, slots, request.username, text, left_choice, right_choice,
                                          seed_value, tokens):
                yield [view.left, view.right, view.status]

    def on_send_to_pool(text, request: gr.Request):
        with as_toast():
            return demo.send_to_annotation(ctx, request.username, text)

    pickers = [chat_version, left_version, right_version]
    gr.on([demo_tab.select], on_versions, outputs=pickers, api_visibility="undocumented", concurrency_limit=None)
    gr.on([send_btn.click, message.submit], on_chat, [history, message, chat_version, max_new_tokens],
          [history, chatbot, message, chat_status], api_name="demo_chat", concurrency_limit=ctx.generation_slots.size,
          concurrency_id="demo")
    clear_btn.click(lambda: [(), [], ""], None, [history, chatbot, chat_status], api_visibility="private")
    compare_btn.click(on_compare, [prompt, left_version, right_version, seed, max_new_tokens],
                      [left, right, compare_status], api_name="demo_side_by_side",
                      concurrency_limit=ctx.generation_slots.size, concurrency_id="demo")
    send_to_pool_btn.click(on_send_to_pool, prompt, compare_status, api_name="demo_send_to_annotation",
                           concurrency_limit=None)
    return demo_tab
