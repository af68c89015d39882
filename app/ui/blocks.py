"""`build_ui`: the annotator UI (mounted at /ui): the Annotate tab's wiring (handlers in annotate.py), then the Demo
tab. No logic lives here. The Admin UI is a separate Gradio app at /admin (admin_tab.py): nothing of it is here.

Keyboard shortcuts: Gradio has no hotkey API, so HEAD holds a small script that clicks the radios by `elem_id`, and
the CSS that draws each answer's "#n" badge from its checked rank (CSS `:has()`, so no script has to keep it in step).

Refusals (a rank missing, a flag without a reason, an item no longer yours) are one message in
`#pl-message`, above the buttons; the form keeps what was entered. Raising gr.Error instead would paint an error
over every output (the radios to fix among them) and log a traceback for an ordinary mistake.
"""

from __future__ import annotations

import html
import inspect
import logging
from dataclasses import dataclass
from functools import partial

import gradio as gr

from app.context import AppContext
from app.ui import admin, annotate
from app.ui.annotate import AnnotateView, Session, UiError
from app.ui.demo_tab import ARENA_CSS, build_demo_tab
from app.ui.render import rendered_text
from app.ui.wiring import FREE
from app.web_guard import ADMIN_DOOR, ANNOTATOR_DOOR
from storage.errors import StorageError

log = logging.getLogger(__name__)

POLL_SECONDS = 3.0  # how often an empty Annotate tab asks for a new item: one cheap DuckDB read per open tab

# Keys: digits 1..9 give that answer the next free rank (and make it the answer U / D give thumbs to; so does a
# click on it); Shift + digit gives it the last rank given instead (a tie with the answer ranked before it); once all
# answers but one are ranked, none tied, the last gets the rank left (mouse too). Backspace takes back the last rank
# given (with the one filled in for you); N marks every answer equally good (rank 1 for all: no preference); Enter
# submits; Escape clears; S skips; Z undoes the last submitted ranking. Ignored while typing in a text field.
# Shifted digits are read from `ev.code` ("Digit3"): `ev.key` is "#" or "§" depending on the keyboard layout.
SCRIPT = """
<script>
(() => {
  const typing = (el) => el && (el.tagName === "TEXTAREA" ||
      (el.tagName === "INPUT" && !["radio", "checkbox", "button"].includes(el.type)));
  const groups = () => Array.from(document.querySelectorAll(".pl-rank")).filter((g) => g.offsetParent !== null);
  const rankOf = (g) => g.querySelector("input[type=radio]:checked")?.value;
  const freeRanks = (gs) => {
    const used = new Set(gs.map(rankOf));
    return gs.map((_, i) => String(i + 1)).filter((r) => !used.has(r));
  };
  const choose = (group, rank) => group.querySelector(`input[type=radio][value="${rank}"]`)?.click();
  let current = -1;
  const fillLast = () => {
    const gs = groups();
    const empty = gs.filter((g) => !rankOf(g));
    const free = freeRanks(gs);
    if (gs.length > 1 && empty.length === 1 && free.length === 1) choose(empty[0], free[0]);
  };
  const press = (selector) => {
    const button = document.querySelector(selector);
    if (!button || button.offsetParent === null) return false;
    button.click();
    return true;
  };
  document.addEventListener("change", (ev) => {
    if (ev.target.closest && ev.target.closest(".pl-rank")) setTimeout(fillLast, 0);
  });
  document.addEventListener("click", (ev) => {
    const card = ev.target.closest && ev.target.closest(".pl-card");
    if (card) current = Number(card.id.replace("pl-card-", ""));
  });
  document.addEventListener("keydown", (ev) => {
    if (typing(document.activeElement) || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const gs = groups();
    const key = ev.key.length === 1 ? ev.key.toLowerCase() : ev.key;
    const digit = /^Digit[1-9]$/.test(ev.code) ? Number(ev.code.slice(5)) : 0;
    let done = false;
    if (ev.shiftKey && digit && gs[digit - 1]) {
      const group = gs[digit - 1];
      const last = Math.max(0, ...gs.map(rankOf).filter(Boolean).map(Number));
      current = digit - 1;
      if (!rankOf(group) && last > 0) choose(group, String(last));
      done = true;
    } else if (/^[1-9]$/.test(key) && gs[Number(key) - 1]) {
      const group = gs[Number(key) - 1];
      current = Number(key) - 1;
      if (!rankOf(group)) choose(group, freeRanks(gs)[0]);
      done = true;
    } else if ((key === "u" || key === "d") && gs[current]) {
      const value = key === "u" ? "up" : "down";
      document.querySelector(`#pl-thumbs-${current} input[type=radio][value="${value}"]`)?.click();
      done = true;
    } else if (key === "Backspace" && gs.length) {
      document.querySelector("#pl-unrank")?.click();
      done = true;
    } else if (key === "Enter") {
      done = press("#pl-submit");
    } else if (key === "Escape") {
      done = press("#pl-clear");
    } else if (key === "s") {
      done = press("#pl-skip");
    } else if (key === "z") {
      done = press("#pl-undo");
    } else if (key === "n") {
      done = press("#pl-alike");
    }
    if (done) ev.preventDefault();
  });
})();
</script>
"""

# Backspace (a client-side event, no server call): clear the highest rank given; when every answer shown has a
# rank, the last one was filled in by itself, so clear the two highest.
UNRANK_JS = """(...ranks) => {
  const shown = Array.from(document.querySelectorAll(".pl-rank")).filter((g) => g.offsetParent !== null).length;
  const given = ranks.map((r) => (r ? Number(r) : 0));
  const count = given.filter((r) => r > 0).length;
  const top = Math.max(0, ...given);
  const cut = count > 1 && count === shown ? top - 1 : top;
  return ranks.map((r, i) => (given[i] >= cut && given[i] > 0 ? null : r));
}"""

# "All equally good" (a client-side event, no server call): rank 1 for every answer shown, a tie of all of them; the
# annotator still submits it (Enter), so thumbs can go with it.
ALIKE_JS = """(...ranks) => {
  const shown = Array.from(document.querySelectorAll(".pl-rank")).filter((g) => g.offsetParent !== null).length;
  return ranks.map((r, i) => (i < shown ? "1" : r));
}"""


def _badge_css(k: int) -> str:
    return "\n".join(f'.pl-card:has(.pl-rank input[value="{r}"]:checked)::before {{ content: "#{r}"; '
                     "background: var(--color-accent); color: white; border-color: var(--color-accent); }"
                     for r in range(1, k + 1))


CSS = """
.pl-card { position: relative; padding: 10px 10px 10px 64px !important; margin-bottom: 10px;
           border: 1px solid var(--border-color-primary); border-radius: 10px; }
.pl-card::before { content: "#?"; position: absolute; left: 10px; top: 12px; width: 42px; text-align: center;
                   padding: 4px 0; border-radius: 999px; font-weight: 700; font-size: 1.05em;
                   color: var(--body-text-color-subdued); border: 2px dashed var(--border-color-primary); }
.pl-card:has(.pl-rank input:checked) { border-color: var(--color-accent); }
.pl-card .pl-text { max-height: 60vh; overflow-y: auto; }
.pl-cutoff { display: inline-block; margin-top: 6px; padding: 1px 8px; border-radius: 6px; font-size: 0.9em;
             background: var(--color-yellow-100, #fef3c7); color: #92400e; }
.pl-hidden { display: none !important; }
.pl-refusal { padding: 8px 12px; border-radius: 8px; border: 1px solid #dc2626; background: #fef2f2;
              color: #991b1b; }
.pl-notice { padding: 8px 12px; border-radius: 8px; background: var(--background-fill-secondary); }
.pl-progress { display: flex; gap: 12px; align-items: center; }
.pl-progress progress { width: 200px; }
"""


# Badges for up to 9 answers (the digit keys reach 9); server.py mounts the app with this HEAD.
HEAD = f"<style>{CSS}{_badge_css(9)}{ARENA_CSS}</style>{SCRIPT}"


def _notice(text: str) -> str:
    return f'<div class="pl-notice">{html.escape(text)}</div>' if text else ""


def _answer_card(k: int, slot: int) -> tuple:
    """One answer as a full-width card: its text on the left, its rank and thumbs on the right, so the controls of
    every answer line up however long the answers are."""
    with gr.Row(equal_height=False, elem_classes="pl-card", elem_id=f"pl-card-{slot}") as card:
        with gr.Column(scale=4, elem_classes="pl-text"):
            text = rendered_text(elem_id=f"pl-answer-{slot}")
        with gr.Column(scale=1, min_width=300):
            rank = gr.Radio([str(r) for r in range(1, k + 1)], label=f"Rank of answer {slot + 1}",
                            elem_id=f"pl-rank-{slot}", elem_classes="pl-rank")
            thumbs = gr.Radio(list(annotate.THUMBS), label="Thumbs (optional)", elem_id=f"pl-thumbs-{slot}")
    return card, text, rank, thumbs


def build_ui(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title="prefloop") as blocks:
        nav = gr.Markdown(elem_id="pl-nav")
        with gr.Tab("Annotate", elem_id="pl-annotate"):
            _annotate_tab(ctx, blocks)
        build_demo_tab(ctx)

        def on_nav(request: gr.Request):
            links = [f"[Log out]({ANNOTATOR_DOOR.prefix}/logout)"]
            if admin.is_admin(ctx, request.username):  # only a link: the admin door checks the role itself
                links.insert(0, f"[Admin]({ADMIN_DOOR.prefix}/)")
            return " · ".join(links)

        blocks.load(on_nav, outputs=nav, concurrency_limit=None, api_visibility="private")
    return blocks


@dataclass(frozen=True)
class _AnnotateTab:
    session: gr.State
    guide: gr.HTML
    prompt: gr.HTML
    counter: gr.HTML
    message: gr.HTML
    cards: list
    answers: list
    ranks: list
    thumbs: list
    item_actions: gr.Row
    submit_btn: gr.Button
    clear_btn: gr.Button
    alike_btn: gr.Button
    skip_btn: gr.Button
    undo_btn: gr.Button
    next_btn: gr.Button
    unrank_btn: gr.Button
    flag_row: gr.Row
    flag_reason: gr.Textbox
    flag_btn: gr.Button
    timer: gr.Timer

    @property
    def view_outputs(self) -> list:
        """What every handler fills (an AnnotateView), in `_annotate_tab`'s `show` order."""
        return [self.session, self.prompt, self.counter, self.message, *self.cards, *self.answers, *self.ranks,
                *self.thumbs, self.next_btn, self.undo_btn, self.timer, self.item_actions, self.flag_row]


def _annotate_layout(k: int) -> _AnnotateTab:
    session = gr.State(Session())
    with gr.Accordion("Guidelines and keys", open=False):
        guide = rendered_text(elem_id="pl-guidelines")
    counter = rendered_text(elem_id="pl-counter")
    prompt = rendered_text(elem_id="pl-prompt", container=True, padding=True)
    cards, answers, ranks, thumbs = map(list, zip(*(_answer_card(k, slot) for slot in range(k)), strict=True))
    message = rendered_text(elem_id="pl-message")
    # What acts on an item shows only while there is one (`show`): with nothing to rank, Submit, Skip and Flag
    # could only be refused.
    with gr.Row(visible=False, elem_id="pl-item-actions") as item_actions:
        submit_btn = gr.Button("Submit ranking (Enter)", variant="primary", elem_id="pl-submit")
        clear_btn = gr.Button("Clear (Esc)", elem_id="pl-clear")
        alike_btn = gr.Button("All equally good (N)", elem_id="pl-alike")
        skip_btn = gr.Button("Skip (S)", elem_id="pl-skip")
    with gr.Row():
        undo_btn = gr.Button("Undo last ranking (Z)", visible=False, elem_id="pl-undo")
        next_btn = gr.Button("Next item", elem_id="pl-next")
        unrank_btn = gr.Button("Take back the last rank", elem_id="pl-unrank", elem_classes="pl-hidden")
    with gr.Row(visible=False, elem_id="pl-flag-row") as flag_row:
        flag_reason = gr.Textbox(label="Flag reason", placeholder="harmful, broken, off-topic...", scale=4,
                                 elem_id="pl-flag-reason")
        flag_btn = gr.Button("Flag", scale=1, elem_id="pl-flag")
    timer = gr.Timer(POLL_SECONDS, active=False)
    return _AnnotateTab(session, guide, prompt, counter, message, cards, answers, ranks, thumbs, item_actions,
                        submit_btn, clear_btn, alike_btn, skip_btn, undo_btn, next_btn, unrank_btn, flag_row,
                        flag_reason, flag_btn, timer)


def _with_request_last(handler, names: list[str]):
    """Gradio finds gr.Request by the signature, and a variadic one hides it: spell out the parameters `names`
    (the API's parameter names), then `request`."""
    handler.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names]
        + [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)])
    handler.__annotations__ = {"request": gr.Request}
    return handler


def _annotate_tab(ctx: AppContext, blocks: gr.Blocks) -> None:
    k = ctx.config.k
    tab = _annotate_layout(k)
    view_outputs = tab.view_outputs

    def show(view: AnnotateView) -> list:
        """An AnnotateView as updates for `view_outputs` (ranks and thumbs as the view says: cleared by default)."""
        shown = len(view.session.answer_ids)
        ranks_shown = view.ranks or (None,) * k
        thumbs_shown = view.thumbs or (None,) * k
        return [view.session, view.prompt, view.counter, _notice(view.message),
                *[gr.update(visible=s < shown) for s in range(k)],
                *[view.answers[s] for s in range(k)],
                *[gr.update(value=ranks_shown[s] if s < shown else None) for s in range(k)],
                *[gr.update(value=thumbs_shown[s] if s < shown else None) for s in range(k)],
                gr.update(value="Start annotating" if view.state == "idle" else "Next item"),
                gr.update(visible=view.session.last_ranking is not None),
                gr.Timer(active=view.state == "waiting"),
                *[gr.update(visible=view.state == "item")] * 2]

    def refused(message_text: str) -> list:
        """One message in one place; every other output (the form the annotator is fixing) stays as it is."""
        updates = [gr.skip()] * len(view_outputs)
        updates[view_outputs.index(tab.message)] = annotate.refusal_html(message_text)
        return updates

    def guarded(action):
        """Run a handler; input errors and storage refusals become the inline message, never a half-written label,
        an error over each output, or a traceback in the log."""
        def run(*args):
            try:
                return show(action(*args))
            except (UiError, StorageError) as exc:
                log.info("annotate: refused: %s", exc)
                return refused(str(exc))
        return run

    def on_load(request: gr.Request):
        return [annotate.guidelines(ctx), *guarded(annotate.load_view)(ctx, request.username)]

    @partial(_with_request_last, names=["state", *(f"choice_{i}" for i in range(2 * k))])
    def on_submit(state, *values):
        *choices, request = values
        return guarded(annotate.submit)(ctx, request.username, state, choices[:k], choices[k:])

    def on_skip(state, request: gr.Request):
        return guarded(annotate.skip)(ctx, request.username, state)

    def on_flag(state, reason, request: gr.Request):
        return guarded(annotate.flag)(ctx, request.username, state, reason)

    def on_next(request: gr.Request):
        return guarded(annotate.next_view)(ctx, request.username)

    def on_undo(state, request: gr.Request):
        return guarded(annotate.undo)(ctx, request.username, state)

    def on_poll(state, request: gr.Request):
        try:
            view = annotate.poll(ctx, request.username, state)
        except (UiError, StorageError):
            view = None
        return [gr.skip()] * len(view_outputs) if view is None else show(view)

    blocks.load(on_load, outputs=[tab.guide, *view_outputs], **FREE)
    tab.submit_btn.click(on_submit, [tab.session, *tab.ranks, *tab.thumbs], view_outputs, api_name="submit_ranking",
                         **FREE)
    tab.skip_btn.click(on_skip, [tab.session], view_outputs, api_name="skip", **FREE)
    tab.flag_btn.click(on_flag, [tab.session, tab.flag_reason], view_outputs, api_name="flag", **FREE)
    tab.next_btn.click(on_next, None, view_outputs, api_name="next_item", **FREE)
    tab.undo_btn.click(on_undo, [tab.session], view_outputs, api_name="undo", **FREE)
    tab.timer.tick(on_poll, [tab.session], view_outputs, show_progress="hidden", api_visibility="private", **FREE)
    tab.clear_btn.click(None, None, [*tab.ranks, *tab.thumbs], js=f"() => Array({2 * k}).fill(null)", api_name=False)
    tab.unrank_btn.click(None, tab.ranks, tab.ranks, js=UNRANK_JS, api_name=False)
    tab.alike_btn.click(None, tab.ranks, tab.ranks, js=ALIKE_JS, api_name=False)
