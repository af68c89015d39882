"""`build_ui`: the annotator UI (mounted at /ui): the Annotate tab's wiring (handlers in annotate.py), then the Demo
tab. No logic lives here. The Admin UI is a separate Gradio app at /admin (admin_tab.py): nothing of it is here.

Keyboard shortcuts: Gradio has no hotkey API, so HEAD holds a small script that clicks the radios by `elem_id`.
"""

from __future__ import annotations

import inspect

import gradio as gr

from app.context import AppContext
from app.ui import admin, annotate
from app.ui.annotate import AnnotateView, Session, UiError
from app.ui.demo_tab import build_demo_tab
from app.ui.render import rendered_text
from app.web_guard import ADMIN_DOOR, ANNOTATOR_DOOR
from storage.errors import StorageError

# Keys: digits 1..9 give that answer the next free rank; Enter submits; Escape clears; "s" skips.
# Ignored while typing in a text field.
HEAD = """
<script>
(() => {
  const typing = (el) => el && (el.tagName === "TEXTAREA" ||
      (el.tagName === "INPUT" && !["radio", "checkbox", "button"].includes(el.type)));
  const slots = () => Array.from(document.querySelectorAll("[id^=pl-rank-]"))
      .filter((g) => g.offsetParent !== null);
  const checked = (g) => g.querySelector("input[type=radio]:checked");
  document.addEventListener("keydown", (ev) => {
    if (typing(document.activeElement) || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const groups = slots();
    if (!groups.length) return;
    if (/^[1-9]$/.test(ev.key)) {
      const group = groups[Number(ev.key) - 1];
      if (!group || checked(group)) return;
      const next = groups.filter(checked).length + 1;
      const input = group.querySelector(`input[type=radio][value="${next}"]`);
      if (input) { input.click(); ev.preventDefault(); }
    } else if (ev.key === "Enter") {
      document.querySelector("#pl-submit")?.click(); ev.preventDefault();
    } else if (ev.key === "Escape") {
      document.querySelector("#pl-clear")?.click(); ev.preventDefault();
    } else if (ev.key === "s" || ev.key === "S") {
      document.querySelector("#pl-skip")?.click(); ev.preventDefault();
    }
  });
})();
</script>
"""

CSS = ".pl-answer { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px; }"


def build_ui(ctx: AppContext) -> gr.Blocks:
    k = ctx.config.k
    with gr.Blocks(title="prefloop") as blocks:
        session = gr.State(Session())
        nav = gr.Markdown(elem_id="pl-nav")
        with gr.Tab("Annotate"):
            with gr.Accordion("Guidelines", open=False):
                guide = rendered_text(elem_id="pl-guidelines")
            counter = gr.Markdown(elem_id="pl-counter")
            prompt = rendered_text(elem_id="pl-prompt", container=True, padding=True)
            answers, ranks, thumbs = [], [], []
            with gr.Row(equal_height=False):
                for slot in range(k):
                    with gr.Column(min_width=220, elem_classes="pl-answer"):
                        answers.append(rendered_text(label=annotate.answer_label(slot), elem_id=f"pl-answer-{slot}"))
                        ranks.append(gr.Radio([str(r) for r in range(1, k + 1)], label=f"Rank of answer {slot + 1}",
                                              elem_id=f"pl-rank-{slot}"))
                        thumbs.append(gr.Radio(list(annotate.THUMBS), label="Thumbs (optional)",
                                               elem_id=f"pl-thumbs-{slot}"))
            with gr.Row():
                submit_btn = gr.Button("Submit ranking (Enter)", variant="primary", elem_id="pl-submit")
                clear_btn = gr.Button("Clear (Esc)", elem_id="pl-clear")
                skip_btn = gr.Button("Skip (S)", elem_id="pl-skip")
                next_btn = gr.Button("Next item", elem_id="pl-next")
            with gr.Row():
                flag_reason = gr.Textbox(label="Flag reason", placeholder="harmful, broken, off-topic...", scale=4,
                                         elem_id="pl-flag-reason")
                flag_btn = gr.Button("Flag", scale=1, elem_id="pl-flag")
            message = gr.Markdown(elem_id="pl-message")
        build_demo_tab(ctx)

        view_outputs = [session, prompt, counter, message, *answers, *ranks, *thumbs]

        def show(view: AnnotateView) -> list:
            """An AnnotateView as updates for `view_outputs` (ranks and thumbs cleared for the new item)."""
            shown = len(view.session.answer_ids)
            answer_updates = [gr.update(value=view.answers[s], visible=s < shown or shown == 0) for s in range(k)]
            radio_updates = [gr.update(value=None, visible=s < shown) for s in range(k)]
            return [view.session, view.prompt, view.counter, view.message, *answer_updates, *radio_updates,
                    *radio_updates]

        def guarded(action):
            """Run a handler; input errors and storage refusals become a toast, never a half-written label."""
            def run(*args):
                try:
                    return show(action(*args))
                except (UiError, StorageError) as exc:
                    raise gr.Error(str(exc)) from exc
            return run

        def on_load(request: gr.Request):
            return [annotate.guidelines(ctx), *guarded(lambda: annotate.next_view(ctx, request.username))()]

        def on_submit(state, *values):
            *choices, request = values
            return guarded(annotate.submit)(ctx, request.username, state, choices[:k], choices[k:])

        # Gradio finds gr.Request by the signature; a variadic one hides it, so spell the K-dependent one out.
        on_submit.__signature__ = inspect.Signature(
            [inspect.Parameter("state", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            + [inspect.Parameter(f"choice_{i}", inspect.Parameter.POSITIONAL_OR_KEYWORD) for i in range(2 * k)]
            + [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)])
        on_submit.__annotations__ = {"request": gr.Request}

        def on_skip(state, request: gr.Request):
            return guarded(annotate.skip)(ctx, request.username, state)

        def on_flag(state, reason, request: gr.Request):
            return guarded(annotate.flag)(ctx, request.username, state, reason)

        def on_next(request: gr.Request):
            return guarded(annotate.next_view)(ctx, request.username)

        def on_nav(request: gr.Request):
            links = [f"[Log out]({ANNOTATOR_DOOR.prefix}/logout)"]
            if admin.is_admin(ctx, request.username):  # only a link: the admin door checks the role itself
                links.insert(0, f"[Admin]({ADMIN_DOOR.prefix}/)")
            return " · ".join(links)

        blocks.load(on_load, outputs=[guide, *view_outputs], concurrency_limit=None)
        blocks.load(on_nav, outputs=nav, concurrency_limit=None, api_visibility="private")
        submit_btn.click(on_submit, [session, *ranks, *thumbs], view_outputs, concurrency_limit=None,
                         api_name="submit_ranking")
        skip_btn.click(on_skip, [session], view_outputs, concurrency_limit=None, api_name="skip")
        flag_btn.click(on_flag, [session, flag_reason], view_outputs, concurrency_limit=None, api_name="flag")
        next_btn.click(on_next, None, view_outputs, concurrency_limit=None, api_name="next_item")
        clear_btn.click(lambda: [gr.update(value=None)] * (2 * k), None, [*ranks, *thumbs], api_name=False)
    return blocks
