"""The Admin UI in real Chromium (tests/test_browser.py's browser and login), as an admin: every screen opened and
screenshotted into test-artifacts/, a short round started from the Train form and watched on the Overview (phase,
step x of y, elapsed, ETA, the live loss chart), Cancel confirmed, the Versions charts and detail, the prompt pool."""

from __future__ import annotations

import re

import test_browser

browser = test_browser.browser
login = test_browser.login
ARTIFACTS = test_browser.ARTIFACTS

RATE = {"value": 0.62, "n": 16, "ci95": [0.41, 0.79]}
METRICS = {"reward_heldout_accuracy": {"value": 0.7, "n": 10, "ci95": [0.4, 0.89]}, "win_rate_vs_parent": RATE,
           "win_rate_vs_base": RATE, "kl_to_reference": 1.5, "entropy": 3.2, "mean_answer_length": 40.0,
           "eos_rate": 0.5, "warnings": ["KTO weights outside [1, 4/3]"], "gate": {"passed": True, "reason": None}}


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"admin-{name}.png"), full_page=True)


def test_admin_screens_a_watched_round_and_a_confirmed_cancel(ctx, server, login, sample_items, add_version):
    ctx.store.versions.add(1, 0, "dpo", "candidate", None, {"beta": 0.1, "steps": 12}, METRICS, 24)
    ctx.store.versions.add(2, 1, "dpo", "rejected", None, {"beta": 0.1}, {**METRICS, "kl_to_reference": 2.5},
                           30, reason="KL too high")
    user = ctx.store.users.get("ann").user_id
    for item_id in sample_items(4):
        ctx.store.labels.add_ranking(item_id, user, [a.answer_id for a in ctx.store.items.get(item_id).answers])
    page = login("boss")
    page.goto(f"{server.url}/admin/")
    page.locator("#pl-run").get_by_text("No training round yet").wait_for()
    shot(page, "overview-empty")

    page.get_by_role("tab", name="Train").click()
    page.get_by_role("button", name="Quick round (CPU, ~1 min)").click()
    page.locator("#pl-knob-max_new_tokens input").first.wait_for()
    page.wait_for_function("document.querySelector('#pl-knob-max_new_tokens input').value === '16'")
    page.get_by_text("Advanced: every other setting").click()
    page.locator("#pl-knob-lora_r").wait_for()
    shot(page, "train-form")
    page.locator("#pl-knob-steps input").first.fill("400")  # long enough to watch, then cancel
    # blank = none: on-policy pairs fill the 400 steps even though 4 rankings cannot show the reward model above chance
    page.locator("#pl-knob-rollouts_min_reward_accuracy input").first.fill("")
    page.get_by_role("button", name="Start a round").click()
    page.get_by_text(re.compile(r"Round \d+ started")).wait_for()
    page.locator("#pl-train-banner").get_by_text(re.compile(r"Round \d+ is running")).wait_for()
    shot(page, "train-round-running")

    page.get_by_role("tab", name="Overview").click()
    run = page.locator("#pl-run")
    run.get_by_text(re.compile(r"policy update, step \d+ of 400")).wait_for(timeout=240_000)
    run.get_by_text(re.compile(r"elapsed .* · about .* left")).wait_for()
    page.locator("#pl-loss-live .pl-point").first.wait_for()  # the live loss chart has its first points
    shot(page, "overview-round-running")
    page.get_by_role("button", name="Cancel the round in progress").click()
    page.get_by_role("button", name="Yes, cancel the round").wait_for()
    assert ctx.store.runs.get(1).status == "running"  # the first click only asks
    shot(page, "overview-confirm-cancel")
    page.get_by_role("button", name="Yes, cancel the round").click()
    run.get_by_text(re.compile(r"Round 1 \(dpo\): cancelled")).wait_for(timeout=60_000)
    assert ctx.store.runs.get(1).status == "cancelled" and ctx.deployments.serving == 0

    page.get_by_role("tab", name="Versions").click()
    charts = page.locator("#pl-version-charts .pl-chart")
    charts.first.wait_for()
    assert charts.count() == 7 and page.locator("#pl-version-charts .pl-point").count() > 7
    page.locator("#pl-version-detail").get_by_text("KL too high").wait_for()  # the newest version's details
    shot(page, "versions")
    assert ctx.deployments.canary is None  # no canary: nothing to promote or roll back, and no buttons for it
    assert page.get_by_role("button", name="Promote the canary").count() == 0
    assert page.get_by_role("button", name="Roll back the canary").count() == 0
    # The canary's rule as a form: filled in with the rule in force; a choice changed and saved is stored.
    page.get_by_text("Canary rule").click()
    prompts = page.locator("#pl-knob-canary_prompts")
    prompts.get_by_label("any").wait_for()
    assert prompts.get_by_label("any").is_checked()
    prompts.get_by_label("untrained").check()
    page.get_by_role("button", name="Save the canary rule").click()
    page.get_by_text("Canary rule saved").wait_for()
    assert ctx.deployments.canary_config.canary_prompts == "untrained"
    assert ctx.store.settings.get("canary_prompts") == "untrained"
    page.locator("#pl-canary").get_by_text("canary items on prompts no version in its line trained on").wait_for()
    shot(page, "versions-canary-rule")
    # A canary running: its buttons show; Promote serves it to everyone and hides them again.
    canary = add_version()
    ctx.deployments.start_canary(canary)
    page.get_by_role("button", name="Refresh", exact=True).click()
    page.get_by_role("button", name="Roll back the canary").wait_for()
    shot(page, "versions-canary")
    page.get_by_role("button", name="Promote the canary").click()
    page.get_by_text(f"Promoted v{canary}: it serves everyone now.").wait_for()
    assert ctx.deployments.serving == canary and ctx.deployments.canary is None
    page.get_by_role("button", name="Promote the canary").wait_for(state="hidden")

    page.get_by_role("tab", name="Data").click()
    summary = page.locator("#pl-pool-summary")
    summary.get_by_text(re.compile(r"prompts in the pool \(\d+ of them starter prompts\)")).wait_for()
    total = ctx.store.prompts.count()
    page.get_by_label("search prompts (words they contain)").fill("zzz-nothing")
    page.get_by_role("button", name="Search").click()
    summary.get_by_text("nothing matches").wait_for()
    page.get_by_label("search prompts (words they contain)").fill("")
    page.get_by_role("button", name="Search").click()
    summary.get_by_text("showing 1-").wait_for()
    newest = ctx.store.prompts.page("", 1).prompts[0]
    page.get_by_label("id of the prompt to remove").fill(str(newest.prompt_id))
    page.get_by_role("button", name="Remove it from the pool").click()
    page.get_by_text(f"Removed prompt {newest.prompt_id}").wait_for()
    assert ctx.store.prompts.count() == total - 1
    shot(page, "data-prompt-pool")

    for tab in ("Annotators", "Arena"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_load_state("networkidle")
        shot(page, tab.lower())
