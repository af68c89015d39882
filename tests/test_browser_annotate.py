"""The Annotate tab and the Demo arena in real Chromium (tests/test_browser.py's browser and login): ranking with the
keyboard (badges, the last rank filled in, Backspace, thumbs keys, ties by Shift + digit and N), a refusal as one
message with no error pills, Undo, and a blind arena vote. Screenshots of each screen land in test-artifacts/."""

from __future__ import annotations

import test_browser

from storage.items import AnswerRecord

browser = test_browser.browser
login = test_browser.login
ARTIFACTS = test_browser.ARTIFACTS

LONG = " ".join(f"Sentence {i} of a long answer that goes on, so the cards have to stay readable." for i in range(30))


def _add_item(ctx, prompt: str, finish_reasons: list[str]) -> int:
    prompt_id = ctx.store.prompts.add([prompt]).prompt_ids[0]
    texts = [LONG, "A short answer.", "Two sentences. Then it stops.", "A list:\n\n- one\n- two\n- three"]
    return ctx.store.items.add(prompt_id, 0, {}, [AnswerRecord(t, 9, r, -1.0)
                                                  for t, r in zip(texts, finish_reasons, strict=True)]).item_id


def _ranks(page) -> list[str | None]:
    return [page.locator(f"#pl-rank-{slot} input:checked").first.get_attribute("value")
            if page.locator(f"#pl-rank-{slot} input:checked").count() else None for slot in range(4)]


def _badges(page) -> list[str]:
    return page.evaluate("""() => [0, 1, 2, 3].map((s) => getComputedStyle(
        document.querySelector(`#pl-card-${s}`), "::before").content.replaceAll('"', ""))""")


def test_rank_by_keys_see_a_refusal_undo_and_vote_in_the_arena(ctx, login):
    _add_item(ctx, "Explain what a heron eats.", ["length", "eos", "eos", "eos"])
    _add_item(ctx, "Name three rivers.", ["eos"] * 4)
    page = login("ann")
    page.locator("#pl-answer-0").get_by_text("Answer 1").wait_for()
    first_prompt = page.locator("#pl-prompt").inner_text()
    assert page.locator(".pl-cutoff").count() == 1  # the answer cut at max_new_tokens says so
    assert _badges(page) == ["#?"] * 4

    page.keyboard.press("Enter")  # nothing ranked yet: refused, in one place, the radios untouched
    page.locator("#pl-message .pl-refusal").get_by_text("give every answer a rank").wait_for()
    assert page.get_by_text("Error", exact=True).count() == 0  # no error pill over the outputs
    assert all(page.locator(f"#pl-rank-{slot}").is_visible() for slot in range(4))
    page.screenshot(path=str(ARTIFACTS / "annotate-refusal.png"), full_page=True)

    for key in "214":  # answer 2 best, then 1, then 4: answer 3 gets the rank left
        page.keyboard.press(key)
    page.wait_for_function("document.querySelector('#pl-rank-2 input[value=\"4\"]').checked")
    assert _ranks(page) == ["2", "1", "4", "3"]
    assert _badges(page) == ["#2", "#1", "#4", "#3"]
    page.keyboard.press("Backspace")  # takes back rank 3 and the rank 4 filled in after it
    page.wait_for_function("!document.querySelector('#pl-rank-3 input:checked')")
    assert _ranks(page) == ["2", "1", None, None] and _badges(page) == ["#2", "#1", "#?", "#?"]
    page.keyboard.press("3")
    page.wait_for_function("document.querySelector('#pl-rank-3 input[value=\"4\"]').checked")
    page.keyboard.press("1")  # answer 1 already ranked: only chosen for the thumbs keys
    page.keyboard.press("u")
    page.wait_for_function("document.querySelector('#pl-thumbs-0 input[value=\"up\"]').checked")
    assert _ranks(page) == ["2", "1", "3", "4"]
    page.screenshot(path=str(ARTIFACTS / "annotate-ranked.png"), full_page=True)

    page.keyboard.press("Enter")
    page.get_by_text("Saved. Here is the next one.").wait_for()
    assert ctx.store.labels.counts().rankings == 1 and ctx.store.labels.counts().feedback == 1
    page.keyboard.press("z")  # Undo: the ranking is retracted and the item comes back as it was ranked
    page.get_by_text("Undone: your ranking is withdrawn").wait_for()
    assert page.locator("#pl-prompt").inner_text() == first_prompt
    assert _ranks(page) == ["2", "1", "3", "4"]
    assert ctx.store.labels.counts().rankings == 0
    assert ctx.store.db.cursor().execute("SELECT count(*) FROM retractions").fetchone() == (1,)
    page.keyboard.press("Enter")
    page.get_by_text("Saved. Here is the next one.").wait_for()
    assert ctx.store.labels.counts().rankings == 1

    page.get_by_role("tab", name="Demo").click()
    page.get_by_role("tab", name="Arena").click()
    page.locator("#pl-arena-prompt textarea").fill("Name a colour.")
    page.locator("#pl-arena-compare").click()
    page.locator("#pl-arena-status").get_by_text("Both answered").wait_for()
    assert "v0" not in page.locator("#pl-arena").inner_text()  # hidden until the vote
    page.locator("#pl-vote-a").click()
    page.locator("#pl-arena-status").get_by_text("A is better: stored. A was base model (v0)").wait_for()
    assert len(ctx.store.arena.recent()) == 1
    page.screenshot(path=str(ARTIFACTS / "demo-arena-voted.png"), full_page=True)


def test_ties_by_shift_digit_and_all_equally_good_by_n(ctx, login):
    _add_item(ctx, "Explain what a heron eats.", ["eos"] * 4)
    _add_item(ctx, "Name three rivers.", ["eos"] * 4)
    page = login("ann")
    page.locator("#pl-answer-0").get_by_text("Answer 1").wait_for()
    assert page.locator("#pl-submit").is_visible() and page.locator("#pl-flag").is_visible()
    page.keyboard.press("2")  # answer 2 best
    page.keyboard.press("Shift+4")  # answer 4 ties with it (Shift + digit: the last rank given)
    page.wait_for_function("document.querySelector('#pl-rank-3 input[value=\"1\"]').checked")
    page.keyboard.press("1")  # the next free rank: 2
    page.wait_for_function("document.querySelector('#pl-rank-0 input[value=\"2\"]').checked")
    assert _ranks(page) == ["2", "1", None, "1"]  # two ranks free (3, 4): nothing filled in for answer 3
    page.keyboard.press("3")
    page.wait_for_function("document.querySelector('#pl-rank-2 input[value=\"3\"]').checked")
    assert _badges(page) == ["#2", "#1", "#3", "#1"]
    page.screenshot(path=str(ARTIFACTS / "annotate-tie.png"), full_page=True)
    page.keyboard.press("Enter")
    page.get_by_text("Saved. Here is the next one.").wait_for()
    cur = ctx.store.db.cursor()
    assert cur.execute("SELECT count(*) FROM pairs").fetchone() == (5,)  # 6 less the tie
    assert cur.execute("SELECT count(DISTINCT tier) FROM ranking_answers").fetchone() == (3,)

    page.keyboard.press("n")  # no preference: rank 1 for all, then submit
    page.wait_for_function("[0, 1, 2, 3].every((s) => document.querySelector(`#pl-rank-${s} input[value=\"1\"]`)"
                           ".checked)")
    page.keyboard.press("Enter")
    page.get_by_text("Nothing else waits right now").wait_for()
    assert ctx.store.labels.counts().rankings == 2
    # nothing to rank: what acts on an item is gone (it could only be refused), Next item stays
    page.locator("#pl-submit").wait_for(state="hidden")
    assert not any(page.locator(f"#{e}").is_visible() for e in ("pl-skip", "pl-flag", "pl-flag-reason", "pl-alike"))
    assert page.locator("#pl-next").is_visible()
    assert cur.execute("SELECT count(*) FROM pairs").fetchone() == (5,)
