"""`build_demo_tab`: wiring the handlers of demo.py to Gradio components (any logged-in user). No logic lives here.

Demo events share one concurrency group as wide as the generation slots, apart from the Annotate tab's events,
so a queue at
the Demo never delays a label; `ctx.generation_slots` enforces the same bound for programs calling the endpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from app.context import AppContext
from app.ui import demo
from app.ui.annotate import UiError
from app.ui.render import rendered_chat, rendered_text
from app.ui.wiring import as_toast
from storage.errors import StorageError

ARENA_CSS = ".pl-side { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 8px; }"


@dataclass(frozen=True)
class _ChatView:
    history: gr.State
    version: gr.Dropdown
    max_new_tokens: gr.Slider
    chatbot: gr.Chatbot
    message: gr.Textbox
    send: gr.Button
    clear: gr.Button
    status: gr.Markdown


@dataclass(frozen=True)
class _ArenaView:
    match: gr.State
    prompt: gr.Textbox
    first: gr.Dropdown
    second: gr.Dropdown
    seed: gr.Number
    compare: gr.Button
    send_to_pool: gr.Button
    side_a: gr.Markdown
    side_b: gr.Markdown
    votes: list[gr.Button]
    status: gr.Markdown


def _chat_view(ctx: AppContext) -> _ChatView:
    history = gr.State(())
    with gr.Row():
        version = gr.Dropdown(label="version", value=demo.DEPLOYED, allow_custom_value=True)
        max_new_tokens = gr.Slider(1, demo.DEMO_MAX_NEW_TOKENS, step=1,
                                   value=min(ctx.config.sampling.max_new_tokens, demo.DEMO_MAX_NEW_TOKENS),
                                   label="max new tokens")
    chatbot = rendered_chat(label="chat", height=420, elem_id="pl-chat")
    message = gr.Textbox(label="message", placeholder="Ask the model something, then press Enter")
    with gr.Row():
        send = gr.Button("Send", variant="primary")
        clear = gr.Button("New conversation")
    return _ChatView(history, version, max_new_tokens, chatbot, message, send, clear, gr.Markdown())


def _arena_view() -> _ArenaView:
    match = gr.State(None)
    prompt = gr.Textbox(label="prompt", lines=3, elem_id="pl-arena-prompt")
    with gr.Accordion("Contenders (which one is A is drawn at random)", open=False):
        with gr.Row():
            first = gr.Dropdown(label="one version", value=demo.DEPLOYED, allow_custom_value=True)
            second = gr.Dropdown(label="the other", value="0", allow_custom_value=True)
            seed = gr.Number(0, precision=0, label="seed, shared by both sides (0 = a new one each time)")
    with gr.Row():
        compare = gr.Button("Compare", variant="primary", elem_id="pl-arena-compare")
        send_to_pool = gr.Button("Send to annotation")
    with gr.Row(equal_height=False):
        with gr.Column(elem_classes="pl-side"):
            gr.Markdown("### A")
            side_a = rendered_text(container=True, padding=True, elem_id="pl-arena-a")
        with gr.Column(elem_classes="pl-side"):
            gr.Markdown("### B")
            side_b = rendered_text(container=True, padding=True, elem_id="pl-arena-b")
    with gr.Row():
        votes = [gr.Button(label, elem_id=f"pl-vote-{key}", interactive=False)
                 for key, label in demo.VOTE_LABELS.items()]
    status = gr.Markdown(elem_id="pl-arena-status")
    return _ArenaView(match, prompt, first, second, seed, compare, send_to_pool, side_a, side_b, votes, status)


def build_demo_tab(ctx: AppContext) -> gr.Tab:
    with gr.Tab("Demo", elem_id="pl-demo") as demo_tab, gr.Tabs():
        with gr.Tab("Chat"):
            chat = _chat_view(ctx)
        with gr.Tab("Arena", elem_id="pl-arena"):
            arena = _arena_view()

    def on_versions():
        return [gr.update(choices=demo.version_choices(ctx))] * 3

    gr.on([demo_tab.select], on_versions, outputs=[chat.version, arena.first, arena.second],
          api_visibility="undocumented", concurrency_limit=None)
    _wire_chat(ctx, chat)
    _wire_arena(ctx, arena, chat.max_new_tokens)
    return demo_tab


def _wire_chat(ctx: AppContext, chat: _ChatView) -> None:
    slots = ctx.generation_slots  # the same bound as /api/generate

    def on_chat(state, text, version, tokens, request: gr.Request):
        with as_toast():
            for view in demo.chat(ctx, slots, request.username, state, text, version, tokens):
                yield [view.history, view.shown, "", view.status]

    gr.on([chat.send.click, chat.message.submit], on_chat, [chat.history, chat.message, chat.version,
                                                            chat.max_new_tokens],
          [chat.history, chat.chatbot, chat.message, chat.status], api_name="demo_chat", concurrency_limit=slots.size,
          concurrency_id="demo")
    chat.clear.click(lambda: [(), [], ""], None, [chat.history, chat.chatbot, chat.status], api_visibility="private")


def _wire_arena(ctx: AppContext, arena: _ArenaView, max_new_tokens: gr.Slider) -> None:
    slots = ctx.generation_slots
    votes = arena.votes

    def on_compare(text, first, second, seed_value, tokens, request: gr.Request):
        with as_toast():
            for view in demo.arena(ctx, slots, request.username, text, first, second, seed_value, tokens):
                votable = gr.update(interactive=view.match.finished)  # vote once both sides are complete
                yield [view.match, view.a, view.b, view.status, *[votable] * len(votes)]

    def on_vote(choice):
        def run(state, request: gr.Request):
            try:
                state, line = demo.vote(ctx, request.username, state, choice)
            except (UiError, StorageError) as exc:  # one line in the status, no error over the answers
                return [gr.skip(), str(exc), *[gr.skip()] * len(votes)]
            return [state, line, *[gr.update(interactive=False)] * len(votes)]
        return run

    def on_send_to_pool(text, request: gr.Request):
        with as_toast():
            return demo.send_to_annotation(ctx, request.username, text)

    arena.compare.click(on_compare, [arena.prompt, arena.first, arena.second, arena.seed, max_new_tokens],
                        [arena.match, arena.side_a, arena.side_b, arena.status, *votes], api_name="demo_arena",
                        concurrency_limit=slots.size, concurrency_id="demo")
    for key, button in zip(demo.VOTE_LABELS, votes, strict=True):
        button.click(on_vote(key), [arena.match], [arena.match, arena.status, *votes], api_name=f"demo_vote_{key}",
                     concurrency_limit=None)
    arena.send_to_pool.click(on_send_to_pool, arena.prompt, arena.status, api_name="demo_send_to_annotation",
                             concurrency_limit=None)
