"""`build_demo_tab`: wiring the handlers of demo.py to Gradio components (any logged-in user). No logic lives here.

Demo events share one concurrency group as wide as the generation slots, apart from the Annotate tab's events,
so a queue at
the Demo never delays a label; `ctx.generation_slots` enforces the same bound for programs calling the endpoints.
"""

from __future__ import annotations

import gradio as gr

from app.context import AppContext
from app.ui import demo
from app.ui.annotate import UiError
from app.ui.render import rendered_chat, rendered_text
from app.ui.wiring import as_toast
from storage.errors import StorageError

ARENA_CSS = ".pl-side { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 8px; }"


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

        with gr.Tab("Arena", elem_id="pl-arena"):
            match = gr.State(None)
            prompt = gr.Textbox(label="prompt", lines=3, elem_id="pl-arena-prompt")
            with gr.Accordion("Contenders (which one is A is drawn at random)", open=False):
                with gr.Row():
                    first_version = gr.Dropdown(label="one version", value=demo.DEPLOYED, allow_custom_value=True)
                    second_version = gr.Dropdown(label="the other", value="0", allow_custom_value=True)
                    seed = gr.Number(0, precision=0, label="seed, shared by both sides (0 = a new one each time)")
            with gr.Row():
                compare_btn = gr.Button("Compare", variant="primary", elem_id="pl-arena-compare")
                send_to_pool_btn = gr.Button("Send to annotation")
            with gr.Row(equal_height=False):
                with gr.Column(elem_classes="pl-side"):
                    gr.Markdown("### A")
                    side_a = rendered_text(container=True, padding=True, elem_id="pl-arena-a")
                with gr.Column(elem_classes="pl-side"):
                    gr.Markdown("### B")
                    side_b = rendered_text(container=True, padding=True, elem_id="pl-arena-b")
            with gr.Row():
                vote_btns = [gr.Button(label, elem_id=f"pl-vote-{key}", interactive=False)
                             for key, label in demo.VOTE_LABELS.items()]
            compare_status = gr.Markdown(elem_id="pl-arena-status")

    def on_versions():
        choices = demo.version_choices(ctx)
        return [gr.update(choices=choices)] * 3

    def on_chat(state, text, version, tokens, request: gr.Request):
        with as_toast():
            for view in demo.chat(ctx, slots, request.username, state, text, version, tokens):
                yield [view.history, view.shown, "", view.status]

    def on_compare(text, first, second, seed_value, tokens, request: gr.Request):
        with as_toast():
            for view in demo.arena(ctx, slots, request.username, text, first, second, seed_value, tokens):
                votable = gr.update(interactive=view.match.finished)  # vote once both sides are complete
                yield [view.match, view.a, view.b, view.status, *[votable] * len(vote_btns)]

    def on_vote(choice):
        def run(state, request: gr.Request):
            try:
                state, line = demo.vote(ctx, request.username, state, choice)
            except (UiError, StorageError) as exc:  # one line in the status, no error over the answers
                return [gr.skip(), str(exc), *[gr.skip()] * len(vote_btns)]
            return [state, line, *[gr.update(interactive=False)] * len(vote_btns)]
        return run

    def on_send_to_pool(text, request: gr.Request):
        with as_toast():
            return demo.send_to_annotation(ctx, request.username, text)

    pickers = [chat_version, first_version, second_version]
    gr.on([demo_tab.select], on_versions, outputs=pickers, api_visibility="undocumented", concurrency_limit=None)
    gr.on([send_btn.click, message.submit], on_chat, [history, message, chat_version, max_new_tokens],
          [history, chatbot, message, chat_status], api_name="demo_chat", concurrency_limit=ctx.generation_slots.size,
          concurrency_id="demo")
    clear_btn.click(lambda: [(), [], ""], None, [history, chatbot, chat_status], api_visibility="private")
    compare_btn.click(on_compare, [prompt, first_version, second_version, seed, max_new_tokens],
                      [match, side_a, side_b, compare_status, *vote_btns], api_name="demo_arena",
                      concurrency_limit=ctx.generation_slots.size, concurrency_id="demo")
    for key, button in zip(demo.VOTE_LABELS, vote_btns, strict=True):
        button.click(on_vote(key), [match], [match, compare_status, *vote_btns], api_name=f"demo_vote_{key}",
                     concurrency_limit=None)
    send_to_pool_btn.click(on_send_to_pool, prompt, compare_status, api_name="demo_send_to_annotation",
                           concurrency_limit=None)
    return demo_tab
