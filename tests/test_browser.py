"""The UI in a real browser: Debian's Chromium driven by Playwright, against the real server on a free port.

Screenshots land in test-artifacts/ (ignored by git) so a failure can be looked at.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ARTIFACTS.mkdir(exist_ok=True)
# As root and offline: no sandbox, and none of Chromium's background connections to hosts it cannot reach.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def login(browser, server, request):
    """login(name) -> a page logged in to the UI as that user; screenshots it at the end of the test."""
    pages = []

    def open_as(name: str):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.on("dialog", lambda dialog: dialog.dismiss())  # an alert() would mean injected script ran
        page.goto(f"{server.url}/ui/")
        page.get_by_label("username").fill(name)
        page.get_by_label("password").fill(f"{name}-password")
        page.get_by_role("button", name="Login").click()
        page.get_by_role("tab", name="Annotate").wait_for()
        pages.append((name, page))
        return page

    yield open_as
    for name, page in pages:
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-{name}.png"), full_page=True)
        page.close()


def rank_with_keys(page, order: str) -> None:
    for key in order:
        page.keyboard.press(key)


def test_annotator_ranks_with_the_keyboard_and_gets_the_next_item(ctx, login, sample_items):
    sample_items(2)
    page = login("ann")
    first_prompt = page.locator("#pl-prompt").inner_text()
    page.locator("#pl-answer-0").get_by_text("Answer 1").wait_for()
    rank_with_keys(page, "2143")
    checked = [page.locator(f"#pl-rank-{slot} input:checked").get_attribute("value") for slot in range(4)]
    assert checked == ["2", "1", "4", "3"]
    page.keyboard.press("Enter")
    page.get_by_text("Saved. Here is the next one.").wait_for()
    assert ctx.store.labels.counts().rankings == 1
    stored = ctx.store.db.cursor().execute("SELECT count(*) FROM pairs").fetchone()[0]
    assert stored == 6
    assert page.locator("#pl-counter").get_by_text(re.compile("1.*ranked today")).count() == 1
    assert page.locator("#pl-prompt").inner_text() != first_prompt or ctx.buffer.waiting_count() == 1


def test_html_in_answers_shows_as_text_and_runs_nothing(ctx, login):
    from storage.items import AnswerRecord

    prompt_id = ctx.store.prompts.add(['What does <img src=x onerror="window.__pwned=1"> do?']).prompt_ids[0]
    evil = ["<script>window.__pwned = 1</script>", '<img src=x onerror="window.__pwned=2">',
            "**bold** is fine", "<b>not bold</b>"]
    ctx.store.items.add(prompt_id, 0, {}, [AnswerRecord(t, 5, "eos", -1.0) for t in evil])
    page = login("ann")
    page.locator("#pl-answer-0").get_by_text("Answer 1").wait_for()
    answers = " ".join(page.locator(f"#pl-answer-{s}").inner_text() for s in range(4))
    assert "<script>window.__pwned = 1</script>" in answers
    assert '<img src=x onerror="window.__pwned=2">' in answers
    assert "<b>not bold</b>" in answers
    assert 'onerror="window.__pwned=1"' in page.locator("#pl-prompt").inner_text()
    assert page.locator("#pl-answer-0, #pl-answer-1, #pl-answer-2, #pl-answer-3").locator("script, img").count() == 0
    assert page.evaluate("window.__pwned === undefined")


def test_annotator_does_not_see_the_admin_ui(server, login):
    page = login("ann")
    page.get_by_role("tab", name="Demo").wait_for()
    assert page.get_by_role("tab", name="Admin").count() == 0 and page.locator("#pl-admin").count() == 0
    assert page.get_by_role("link", name="Admin").count() == 0
    response = page.goto(f"{server.url}/admin/")  # the admin door, as an annotator: refused before Gradio
    assert response.status == 403
    page.get_by_text("admins only: 'ann' is an annotator").wait_for()


def test_admin_starts_a_round_sees_live_progress_and_cancels_it(ctx, server, login, sample_items):
    user = ctx.store.users.get("ann").user_id
    for item_id in sample_items(4):
        ctx.store.labels.add_ranking(item_id, user, [a.answer_id for a in ctx.store.items.get(item_id).answers])
    page = login("boss")
    assert page.locator("#pl-nav").get_by_role("link", name="Admin").get_attribute("href") == "/admin/"
    page.goto(f"{server.url}/admin/")  # the Admin UI: its own Gradio app, behind the admin door
    page.get_by_role("tab", name="Train").click()
    page.get_by_label(re.compile(r"^steps \(default")).fill("400")  # long enough to watch, then cancel
    page.get_by_text("Advanced: every other setting").click()
    # blank = none: on-policy pairs fill the 400 steps even though 4 rankings cannot show the reward model above chance
    page.locator("#pl-knob-rollouts_min_reward_accuracy input").first.fill("")
    page.get_by_role("button", name="Start a round").click()
    page.get_by_text(re.compile(r"Round \d+ started")).wait_for()
    page.get_by_role("tab", name="Overview").click()
    # The overview refreshes itself: a progress bar and the policy step/loss while the round runs.
    page.locator("#pl-admin progress").wait_for(timeout=240_000)
    page.get_by_text(re.compile(r"step \d+ · loss \d")).wait_for(timeout=240_000)
    page.screenshot(path=str(ARTIFACTS / "admin-round-in-progress.png"))
    page.get_by_role("button", name="Cancel the round in progress").click()
    page.get_by_role("button", name="Yes, cancel the round").click()  # Cancel asks to confirm
    page.wait_for_function("document.querySelector('#pl-admin').innerText.match(/Round 1 \\(dpo\\): cancelled/)",
                           timeout=60_000)
    assert ctx.store.runs.get(1).status == "cancelled"
    assert ctx.deployments.serving == 0


def test_demo_chat_streams_an_answer(ctx, login):
    page = login("ann")
    page.get_by_role("tab", name="Demo").click()
    # Record every distinct text the chat shows while the answer arrives.
    page.evaluate("""() => {
        window.__texts = [];
        const seen = new Set();
        new MutationObserver(() => {
            const bots = document.querySelectorAll("#pl-demo .message.bot, #pl-demo [data-testid='bot']");
            const text = bots.length ? bots[bots.length - 1].innerText : "";
            if (text && !seen.has(text)) { seen.add(text); window.__texts.push(text); }
        }).observe(document.querySelector("#pl-demo"), {subtree: true, childList: true, characterData: true});
    }""")
    page.get_by_label("number input for max new tokens").fill("48")
    page.get_by_label("number input for max new tokens").press("Tab")
    page.get_by_label("message").fill("Tell me a story")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("window.__texts.length > 0")
    page.wait_for_timeout(3000)
    placeholders = {"Loading content", "(empty answer)"}
    texts = [t for t in page.evaluate("window.__texts") if t.strip() not in placeholders]
    assert len(texts) > 1, texts  # more than one state of the answer: it streamed
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:])), texts
