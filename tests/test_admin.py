"""The Admin tab: handlers called directly on a real store and policy, and every admin endpoint through gradio_client
(an admin is served, an annotator is refused and nothing changes)."""

from __future__ import annotations

import json
import re
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.settings import DEFAULT_GUIDELINES
from app.ui import admin, admin_canary, admin_prompts, admin_rounds, admin_versions, annotate, charts
from app.ui.admin import Forbidden
from app.ui.annotate import UiError
from learner.config import RoundConfig
from learner.errors import ConfigError
from storage.errors import Conflict, PromptFileError

# What a learner round writes into metrics.json (learner/round.py, learner/evaluate.py).
METRICS = {"reward_heldout_accuracy": 0.75, "win_rate_vs_parent": 0.6, "win_rate_vs_base": 0.65,
           "kl_to_reference": 1.5, "entropy": 3.2, "mean_answer_length": 40.0, "eos_rate": 0.5,
           "history": [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6}],
           "reward_history": [{"step": 0, "loss": 0.7}, {"step": 1, "loss": 0.65}]}


def rank_item(ctx, item_id: int, user: str, order=(0, 1, 2, 3)) -> None:
    item = ctx.store.items.get(item_id)
    user_id = ctx.store.users.get(user).user_id
    ctx.store.labels.add_ranking(item_id, user_id, [item.answers[i].answer_id for i in order], seconds=4.0)


def state(ctx) -> dict:
    """Everything an admin action could change."""
    return {"prompts": ctx.store.prompts.count(), "users": [(u.name, u.disabled) for u in ctx.store.users.list()],
            "settings": ctx.store.settings.all(), "deployed": ctx.deployments.serving,
            "versions": [(v.version, v.status) for v in ctx.store.versions.list()],
            "runs": [(r.run_id, r.status) for r in ctx.store.runs.list()], "overlap": ctx.buffer.config.overlap}


# Every handler that acts or reads as an admin, with arguments that would succeed for one.
ADMIN_HANDLERS = {
    "overview": lambda ctx, who: admin_rounds.overview(ctx, who),
    "cancel_round": lambda ctx, who: admin_rounds.cancel_round(ctx, who),
    "triggers": lambda ctx, who: admin_rounds.triggers(ctx, who),
    "start_round": lambda ctx, who: admin_rounds.start_round(ctx, who, {"steps": 0}),
    "save_triggers": lambda ctx, who: admin_rounds.save_triggers(ctx, who, True, 5, 0, {}),
    "versions_table": lambda ctx, who: admin_versions.versions_table(ctx, who),
    "version_charts": lambda ctx, who: admin_versions.version_charts(ctx, who),
    "version_detail": lambda ctx, who: admin_versions.version_detail(ctx, who, 0),
    "run_choices": lambda ctx, who: admin_versions.run_choices(ctx, who),
    "deploy_choices": lambda ctx, who: admin_versions.deploy_choices(ctx, who),
    "run_loss_chart": lambda ctx, who: admin_versions.run_loss_chart(ctx, who, None),
    "deploy_version": lambda ctx, who: admin_versions.deploy_version(ctx, who, 0),
    "roll_back": lambda ctx, who: admin_versions.roll_back(ctx, who),
    "prompt_pool": lambda ctx, who: admin_prompts.prompt_pool(ctx, who, "", 1),
    "remove_prompt": lambda ctx, who: admin_prompts.remove_prompt(ctx, who, 1),
    "annotators": lambda ctx, who: admin.annotators(ctx, who),
    "set_overlap": lambda ctx, who: admin.set_overlap(ctx, who, 3),
    "canary_panel": lambda ctx, who: admin_canary.canary_panel(ctx, who),
    "has_canary": lambda ctx, who: admin_canary.has_canary(ctx, who),
    "canary_rule": lambda ctx, who: admin_canary.canary_rule(ctx, who),
    "save_canary_rule": lambda ctx, who: admin_canary.save_canary_rule(
        ctx, who, {**{f.name: f.default for f in admin_canary.canary_fields()}, "canary_prompts": "untrained"}),
    "add_user": lambda ctx, who: admin.add_user(ctx, who, "mallory", "admin", "mallory-password"),
    "set_user_disabled": lambda ctx, who: admin.set_user_disabled(ctx, who, "boss", True),
    "reset_password": lambda ctx, who: admin.reset_password(ctx, who, "boss", None),
    "rotate_token": lambda ctx, who: admin.rotate_token(ctx, who, "boss"),
    "upload_prompts": lambda ctx, who: admin.upload_prompts(ctx, who, "/etc/hostname.jsonl"),
    "export_labels": lambda ctx, who: admin.export_labels(ctx, who, "dpo"),
    "guidelines_source": lambda ctx, who: admin.guidelines_source(ctx, who),
    "save_guidelines": lambda ctx, who: admin.save_guidelines(ctx, who, "be nice"),
    "pending_suggestions": lambda ctx, who: admin.pending_suggestions(ctx, who),
    "approve_suggestion": lambda ctx, who: admin.decide_suggestion(ctx, who, 1, True),
    "reject_suggestion": lambda ctx, who: admin.decide_suggestion(ctx, who, 1, False),
}


def test_every_admin_handler_refuses_non_admins_and_changes_nothing(ctx, accounts):
    ctx.store.users.add("old-boss", "admin", "old-boss-password")
    ctx.store.users.set_disabled("old-boss", True)
    before = state(ctx)
    for who in ("ann", None, "nobody", "old-boss"):
        for call in ADMIN_HANDLERS.values():
            with pytest.raises(Forbidden, match="admins only"):
                call(ctx, who)
        assert not admin.is_admin(ctx, who)
    assert state(ctx) == before
    assert admin.is_admin(ctx, "boss")


def test_overview_counts_labels_by_kind_and_shows_the_round_in_progress(ctx, accounts, sample_items):
    first, second = sample_items(2)
    rank_item(ctx, first, "ann")
    ann = ctx.store.users.get("ann").user_id
    ctx.store.labels.add_flag(second, ann, "off-topic")
    ctx.store.labels.add_skip(second, ann, "flagged")
    run_id = ctx.store.runs.create("dpo", {"steps": 12})
    started = datetime.now(UTC) - timedelta(seconds=65)
    ctx.store.runs.update(run_id, status="running", progress=0.5, step=6, loss=0.6931, started_at=started,
                          phase="policy", phase_step=6, phase_total=12)
    for step, loss, phase in [(1, 0.7, "reward"), (2, 0.66, "reward"), (5, 0.70, "policy"), (6, 0.6931, "policy")]:
        ctx.store.runs.add_step(run_id, step, loss, {"phase": phase})
    ctx.store.runs.add_log(run_id, "desirable_weight 1.0 is outside [1, 4/3] <b>x</b>", kind="warning")
    ctx.store.runs.add_log(run_id, "Traceback line one")

    view = admin_rounds.overview(ctx, "boss")
    assert "| rankings | 1 | 1 |" in view.counts and "| flags | 1 | 1 |" in view.counts
    assert "| skips | 1 | 1 |" in view.counts and "| thumbs | 0 | 0 |" in view.counts
    assert "base model (v0)" in view.status and "items waiting" in view.status
    assert view.active_run == run_id and view.progress == 0.5
    assert f"Round **{run_id}** (dpo): **running**" in view.run and "loss 0.6931" in view.run
    assert "policy update, step 6 of 12" in view.run
    assert "elapsed 1 min 5 s" in view.run and "about 1 min 5 s left" in view.run  # 50% done after 65 s
    assert "desirable\\_weight 1\\.0" in view.warnings and "<b>" not in view.warnings  # Markdown-escaped
    assert view.log_tail.splitlines() == ["desirable_weight 1.0 is outside [1, 4/3] <b>x</b>", "Traceback line one"]
    assert view.loss_chart.count("<title>policy step") == 2 and view.loss_chart.count("<title>reward model") == 2
    assert f"Round {run_id} is running" in view.train_banner and "step 6 of 12" in view.train_banner
    assert admin_rounds.triggers(ctx, "boss").banner == view.train_banner
    assert admin_rounds.progress_html(view.progress).startswith('<progress value="50" max="100"')

    ctx.store.runs.update(run_id, status="failed", error="<script>alert(1)</script>",
                          metrics={"warnings": ["no human pairs trained the reward model yet"]})
    view = admin_rounds.overview(ctx, "boss")
    assert view.progress is None and "<script>" not in view.run and "took " in view.run
    assert "no human pairs" in view.warnings and view.train_banner == ""
    with pytest.raises(UiError, match="no round is in progress"):
        admin_rounds.cancel_round(ctx, "boss")


def test_overview_before_any_round_says_what_to_do(ctx, accounts):
    view = admin_rounds.overview(ctx, "boss")
    assert view.run.startswith("No training round yet: start one in **Train**")
    assert "the loss appears here when a round trains" in view.loss_chart
    assert (view.warnings, view.log_tail, view.train_banner, view.active_run) == ("", "", "", None)


def test_overview_shows_how_much_of_max_kl_the_serving_lineage_has_used(ctx, accounts, add_version):
    assert "KL to the base model" not in admin_rounds.overview(ctx, "boss").status  # the base model serves
    ctx.deployments.deploy(add_version(metrics={"kl_to_reference": 4.0}, config={"max_kl": 15.0}))
    status = admin_rounds.overview(ctx, "boss").status
    assert "KL to the base model: **4** nats/answer, 27% of its round's max_kl 15" in status and "⚠" not in status
    ctx.deployments.deploy(add_version(metrics={"kl_to_reference": 10.0}, config={"max_kl": 15.0}))
    status = admin_rounds.overview(ctx, "boss").status
    assert "⚠ KL to the base model: **10** nats/answer, 67% of its round's max_kl 15: a round past max_kl is " \
           "refused; raise max_kl" in status and "set ref_sync" in status
    # Measured from its parent (ref_sync), or without a KL: no budget to show.
    ctx.deployments.deploy(add_version(metrics={"kl_to_reference": 10.0}, config={"max_kl": 15.0, "ref_sync": True}))
    assert "KL to the base model" not in admin_rounds.overview(ctx, "boss").status
    ctx.deployments.deploy(add_version(metrics={"kl_to_reference": None}, config={"max_kl": 15.0}))
    assert "KL to the base model" not in admin_rounds.overview(ctx, "boss").status


def test_duration_and_eta_words():
    assert [admin_rounds.duration(s) for s in (0.4, 45, 125, 3725)] == ["0 s", "45 s", "2 min 5 s", "1 h 2 min"]


def test_versions_table_charts_detail_and_loss_curves_come_from_real_rows(ctx, accounts, add_version):
    rate = {"value": 0.6, "n": 16, "ci95": [0.39, 0.78]}
    ctx.store.versions.add(1, 0, "dpo", "candidate", None, {"beta": 0.1}, {**METRICS, "win_rate_vs_parent": rate}, 12)
    ctx.store.versions.add(2, 1, "kto", "rejected", None, {}, {
        **METRICS, "kl_to_reference": 30.0, "history": [], "warnings": ["KTO weights <i>off</i>"],
        "gate": {"passed": False, "reason": "KL 30.0 > 15.0"}}, 20, reason="KL too high")
    run_id = ctx.store.runs.create("dpo", {})
    for step, loss in [(1, 0.69), (2, 0.62), (3, 0.55)]:
        ctx.store.runs.add_step(run_id, step, loss, {"phase": "policy"})
    ctx.store.runs.update(run_id, status="succeeded", version=1)
    history_only = ctx.store.runs.create("kto", {})
    ctx.store.runs.update(history_only, status="rejected", version=2)

    table = admin_versions.versions_table(ctx, "boss")
    assert table["version"].tolist() == [2, 1, 0]
    assert table.loc[0, ["status", "kl_to_reference", "reason"]].tolist() == ["rejected", "30", "KL too high"]
    assert table.loc[1, "win_rate_vs_parent"] == "0.6 [0.39, 0.78] n=16"  # every win-rate with n and its interval
    assert table.loc[1, "reward_accuracy"] == "0.75" and table.loc[2, "algorithm"] == "base"
    assert table.loc[2, "status"] == "serving"
    add_version()  # v3, deployed: the base model is then shown as the base model, never as a "candidate"
    ctx.deployments.deploy(3)
    table = admin_versions.versions_table(ctx, "boss")
    assert table.set_index("version").loc[0, "status"] == "base model"
    assert ("base model (v0)", 0) in admin_versions.deploy_choices(ctx, "boss")

    html = admin_versions.version_charts(ctx, "boss")
    assert html.count('class="pl-chart"') == len(admin_versions.VERSION_METRICS)  # one small chart per metric
    assert "v1: 0.6 [0.39, 0.78] n=16" in html  # the point's tooltip carries n and the interval
    assert ">base<" in html and ">v1<" in html and ">v2<" in html  # an integer version axis with v0 as the base
    assert "base model vs itself: 0.5" in html

    detail = admin_versions.version_detail(ctx, "boss", "v2")
    assert "**Gate**: refused: KL 30\\.0 \\> 15\\.0" in detail and "KTO weights" in detail and "<i>" not in detail
    assert "| kl\\_to\\_reference | 30 |" in detail  # Markdown-escaped: the text shows as written
    assert "| beta | 0\\.1 |" in admin_versions.version_detail(ctx, "boss", 1)
    assert "baseline" in admin_versions.version_detail(ctx, "boss", 0)

    curve = admin_versions.run_loss_chart(ctx, "boss", run_id)
    assert curve.count("<title>policy step") == 3  # the stored steps win over the metrics' history
    assert curve.count("<title>reward model") == 0
    fallback = admin_versions.run_loss_chart(ctx, "boss", history_only)
    assert fallback.count("<title>reward model") == 2 and "<title>policy" not in fallback
    assert admin_versions.run_choices(ctx, "boss")[0] == (f"round {history_only} -> v2 (rejected)", history_only)


def test_the_kl_chart_draws_the_newest_rounds_max_kl_as_its_budget(ctx, accounts):
    ctx.store.versions.add(1, 0, "dpo", "candidate", None, {"beta": 0.1}, {"kl_to_reference": 4.0}, 12)
    html = admin_versions.version_charts(ctx, "boss")
    assert "max_kl" not in html  # no round recorded one
    dashed = html.count('stroke-dasharray="4 3"')
    ctx.store.versions.add(2, 1, "dpo", "candidate", None, {"max_kl": 15.0}, {"kl_to_reference": 10.0}, 12)
    ctx.store.versions.add(3, 2, "dpo", "rejected", None, {"max_kl": 20.0}, {"kl_to_reference": 15.8}, 12)
    html = admin_versions.version_charts(ctx, "boss")
    assert "KL to reference (nats/answer); dashed: max_kl 20" in html
    assert html.count('stroke-dasharray="4 3"') == dashed + 1


def test_version_charts_empty_state(ctx, accounts):
    html = admin_versions.version_charts(ctx, "boss")
    assert html.count("train a round to see metrics") == len(admin_versions.VERSION_METRICS)


def test_chart_ticks_are_round_numbers():
    assert charts.nice_ticks(0, 1) == [0.0, 0.5, 1.0]
    assert charts.nice_ticks(0.613, 2.71) == [0.0, 1.0, 2.0, 3.0]
    assert charts.nice_ticks(0.01, 0.034) == [0.01, 0.02, 0.03, 0.04]
    assert charts.nice_ticks(3, 3) == [3.0, 4.0, 5.0, 6.0]


def test_deploy_and_roll_back_hot_swap_the_policy(ctx, accounts, add_version):
    add_version()
    with pytest.raises(UiError, match="choose a version"):
        admin_versions.deploy_version(ctx, "boss", "latest")
    assert admin_versions.deploy_choices(ctx, "boss") == [("v1 (candidate)", 1), ("base model (v0) (serving)", 0)]
    assert "Deployed v1" in admin_versions.deploy_version(ctx, "boss", 1)
    assert ctx.deployments.serving == 1 and ctx.store.versions.deployed().version == 1
    assert admin_versions.roll_back(ctx, "boss") == "Rolled back v1 to base model (v0)."
    assert ctx.deployments.serving == 0 and ctx.store.versions.get(1).status == "rolled_back"
    with pytest.raises(Conflict, match="nothing to roll back"):
        admin_versions.roll_back(ctx, "boss")


def test_train_form_shows_every_round_setting_with_its_default_and_reason():
    form = admin_rounds.train_fields()
    assert [f.name for f in form if f.common] == list(admin_rounds.COMMON_FIELDS)
    assert {f.name for f in form} == set(RoundConfig().to_dict())  # every field, none twice
    by_name = {f.name: f for f in form}
    assert by_name["beta"].default == 0.1 and "arXiv 2305.18290" in by_name["beta"].reason
    assert by_name["algorithm"].kind == "choice" and by_name["algorithm"].choices == ("dpo", "kto", "reward")
    assert by_name["max_label_staleness"].nullable and by_name["max_label_staleness"].kind == "int"
    assert "continue" not in by_name["max_label_staleness"].reason and "None = all labels" in \
        by_name["max_label_staleness"].reason  # the reason's continuation lines are read too
    assert by_name["ref_sync"].kind == "bool" and by_name["lora_target_modules"].kind == "text"
    assert all(f.reason for f in form)
    quick = RoundConfig.from_dict(admin_rounds.overrides_from(admin_rounds.quick_values()))
    assert quick.steps == 2 and quick.max_new_tokens == 16 and quick.eval_prompts == 1


def test_start_round_validates_like_the_api_and_triggers_are_stored(ctx, accounts):
    defaults = admin_rounds.knob_defaults()
    assert defaults == RoundConfig().to_dict()
    with pytest.raises(ConfigError, match="beta must be > 0, got -1"):
        admin_rounds.start_round(ctx, "boss", {**defaults, "beta": -1.0})
    assert ctx.store.runs.list() == []
    assert admin_rounds.overrides_from({"beta": None, "max_label_staleness": None}) == {"max_label_staleness": None}
    assert admin_rounds.overrides_from(defaults) == {}  # only what differs from the default is stored or sent
    with pytest.raises(UiError, match="unknown training setting"):
        admin_rounds.overrides_from({"betta": 1})

    with pytest.raises(UiError, match="set 'every N labels'"):
        admin_rounds.save_triggers(ctx, "boss", True, 0, None, defaults)
    view = admin_rounds.save_triggers(ctx, "boss", True, 25, 0, {**defaults, "algorithm": "kto", "beta": None})
    assert (view.enabled, view.every_labels, view.every_minutes) == (True, 25, 0)
    settings = ctx.store.settings
    assert settings.get("auto_train_every_labels") == "25" and settings.get("auto_train_every_minutes") == "0"
    assert json.loads(settings.get("auto_train_config"))["algorithm"] == "kto"
    assert "beta" not in json.loads(settings.get("auto_train_config"))
    assert "Note" not in view.message
    online = admin_rounds.save_triggers(ctx, "boss", True, 25, 0, {**defaults, "sync_every": 1})  # with RPO: advised
    assert "**Note:** rpo_alpha 1 with sync_every 1" in online.message, online.message
    off = admin_rounds.save_triggers(ctx, "boss", False, 25, 10, defaults)
    assert not off.enabled and settings.get("auto_train_every_labels") == "0" and off.message == "Automatic rounds off."


def test_annotators_agreement_users_and_overlap(ctx, accounts, sample_items):
    (item,) = sample_items(1)
    assert "No item has been ranked by two" in admin.annotators(ctx, "boss").agreement
    ctx.set_overlap(2)  # so bob may rank the item ann ranked
    rank_item(ctx, item, "ann", (0, 1, 2, 3))
    rank_item(ctx, item, "bob", (1, 0, 2, 3))
    view = admin.annotators(ctx, "boss")
    assert "pairwise agreement **0.83**" in view.agreement and "Kendall's tau **0.67**" in view.agreement
    stats = view.stats.set_index("annotator")
    assert stats.loc["ann", "rankings"] == 1 and stats.loc["ann", "median_seconds"] == 4.0
    assert view.overlap == 2 and ctx.store.settings.get("overlap") == "2"

    view = admin.set_overlap(ctx, "boss", 1)
    assert ctx.buffer.config.overlap == ctx.config.overlap == 1 and view.overlap == 1
    with pytest.raises(ConfigError, match="overlap must be >= 1"):
        admin.set_overlap(ctx, "boss", 0)

    created = admin.add_user(ctx, "boss", "carol", "annotator", None)
    token = created.text.rsplit("API token: ", 1)[1]
    assert ctx.authenticate_token(token).name == "carol"
    assert "carol" in created.view.users["name"].tolist()
    admin.set_user_disabled(ctx, "boss", "carol", True)
    assert ctx.authenticate_token(token) is None
    with pytest.raises(UiError, match="cannot disable your own account"):
        admin.set_user_disabled(ctx, "boss", "boss", True)


def test_upload_prompts_uses_the_cli_import(ctx, accounts, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "What is DPO?"}\n{"prompt": "  "}\n')
    before = ctx.store.prompts.count()
    with pytest.raises(PromptFileError, match="prompts.jsonl line 2: empty prompt"):
        admin.upload_prompts(ctx, "boss", str(bad))
    assert ctx.store.prompts.count() == before
    message = admin.upload_prompts(ctx, "boss", str(bad), skip_invalid=True)
    assert message.splitlines() == [
        "imported 1 prompts from prompts.jsonl (0 duplicates skipped, 1 invalid rows skipped)",
        "skipped: prompts.jsonl line 2: empty prompt"]
    assert ctx.store.prompts.count() == before + 1
    with pytest.raises(UiError, match="choose a prompts file"):
        admin.upload_prompts(ctx, "boss", None)


def test_export_and_guidelines(ctx, accounts, sample_items):
    (item,) = sample_items(1)
    rank_item(ctx, item, "ann")
    view = admin.export_labels(ctx, "boss", "dpo")
    rows = [json.loads(line) for line in Path(view.path).read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 6 and {"prompt", "chosen", "rejected"} <= set(rows[0]) and view.message.startswith("6 dpo")
    with pytest.raises(UiError, match="export format"):
        admin.export_labels(ctx, "boss", "csv")
    view = admin.export_labels(ctx, "boss", "dpo", dataset=True)  # the CLI's --dataset directory, zipped
    with zipfile.ZipFile(view.path) as archive:
        assert sorted(archive.namelist()) == ["prefloop-dpo/", "prefloop-dpo/README.md",
                                              "prefloop-dpo/data/", "prefloop-dpo/data/train.jsonl"]
        assert len(archive.read("prefloop-dpo/data/train.jsonl").splitlines()) == 6
        assert "| rows | 6 |" in archive.read("prefloop-dpo/README.md").decode()
    assert view.message.startswith("6 dpo rows in prefloop-dpo.zip")
    with pytest.raises(UiError, match="no kto rows to export yet"):  # a dataset needs rows
        admin.export_labels(ctx, "boss", "kto", dataset=True)

    assert admin.guidelines_source(ctx, "boss") == DEFAULT_GUIDELINES
    admin.save_guidelines(ctx, "boss", "Prefer **short** answers. <script>alert(1)</script>")
    shown = annotate.guidelines(ctx)
    assert "<strong>short</strong>" in shown and "<script>" not in shown and "&lt;script&gt;" in shown
    with pytest.raises(UiError, match="cannot be empty"):
        admin.save_guidelines(ctx, "boss", "   ")


def test_gradio_client_admin_is_served_and_annotator_refused_for_every_action(ctx, server, accounts, tmp_path,
                                                                              add_version):
    from gradio_client import Client, handle_file

    add_version(metrics=METRICS)
    for text in ("Suggested by ann?", "Also suggested by ann?"):  # suggestions 1 and 2, for the admin to decide
        ctx.store.suggestions.add(ctx.store.users.get("ann").user_id, text)
    prompts = tmp_path / "more.jsonl"
    prompts.write_text('{"prompt": "Name three rivers."}\n')
    form = admin_rounds.knob_defaults()
    reward_only = {**form, "algorithm": "reward", "steps": 0, "rollout_prompts": 0}
    # api_name -> arguments: every admin endpoint of the UI.
    calls = {
        "/admin_overview": (),
        "/admin_train_state": (),
        "/admin_save_triggers": (True, 7, 0, *form.values()),
        "/admin_versions": (),
        "/admin_loss_curve": (None,),
        "/admin_version_detail": (1,),
        "/admin_deploy": (1, False),
        "/admin_roll_back": (),
        "/admin_annotators": (),
        "/admin_set_overlap": (2,),
        "/admin_canary_rule": (),
        "/admin_save_canary_rule": tuple({**admin_canary.canary_rule(ctx, "boss"), "canary_max_items": 40}.values()),
        "/admin_add_user": ("dave", "annotator", "dave-password"),
        "/admin_set_user_disabled": ("dave", True),
        "/admin_upload_prompts": (handle_file(str(prompts)), False),
        "/admin_export": ("rankings", False),
        "/admin_prompt_pool": ("rivers", 1),
        "/admin_remove_prompt": (1, "", 1),
        "/admin_guidelines": (),
        "/admin_save_guidelines": ("Be kind.",),
        "/admin_suggestions": (),
        "/admin_approve_suggestion": (1,),
        "/admin_reject_suggestion": (2,),
        "/admin_start_round": tuple(reward_only.values()),
        "/admin_cancel_round": (),
    }
    before = state(ctx)
    with pytest.raises(ValueError, match="Could not fetch config"):  # the admin door answers 403 to annotators
        Client(f"{server.url}/admin/", auth=("ann", "ann-password"), verbose=False)
    annotator = Client(f"{server.url}/ui/", auth=("ann", "ann-password"), verbose=False)
    for api_name, args in calls.items():  # and the annotator UI has no admin endpoint at all
        with pytest.raises(ValueError, match="Cannot find a function"):
            annotator.predict(*args, api_name=api_name)
    assert state(ctx) == before

    boss = Client(f"{server.url}/admin/", auth=("boss", "boss-password"), verbose=False)
    results = {api_name: boss.predict(*args, api_name=api_name) for api_name, args in calls.items()}
    assert "| rankings | 0 | 0 |" in results["/admin_overview"][0]
    assert ctx.store.settings.get("auto_train_every_labels") == "7"
    assert results["/admin_deploy"][0].startswith("Deployed v1")
    assert results["/admin_roll_back"][0] == "Rolled back v1 to base model (v0)." and ctx.deployments.serving == 0
    assert ctx.buffer.config.overlap == 2
    assert results["/admin_canary_rule"][-1] == "any" and len(results["/admin_canary_rule"]) == 8
    assert results["/admin_save_canary_rule"][0].startswith("Canary rule saved")
    assert ctx.deployments.canary_config.canary_max_items == 40 == int(ctx.store.settings.get("canary_max_items"))
    assert ctx.store.users.get("dave").disabled and "API token: " in results["/admin_add_user"][0]
    assert results["/admin_upload_prompts"].startswith("imported 1 prompts from more.jsonl")
    assert "**1** contain the search" in results["/admin_prompt_pool"][0]
    assert ctx.store.prompts.get(1).text and ctx.store.prompts.page("", 500, include_removed=True).prompts[-1].removed
    assert "| beta |" in results["/admin_version_detail"]  # the version's config as a table
    assert results["/admin_guidelines"][0] == DEFAULT_GUIDELINES
    assert ctx.store.settings.get("guidelines") == "Be kind."
    assert results["/admin_approve_suggestion"][1] == "Suggestion 1 approved: its prompt is in the pool."
    assert [s.status for s in ctx.store.suggestions.list(None)] == ["rejected", "approved"]
    assert Path(results["/admin_export"][0]).read_text(encoding="utf-8") == ""  # no rankings yet: an empty file
    (run,) = ctx.store.runs.list()
    assert ctx.scheduler.wait(run.run_id, timeout=60) == "cancelled"


def test_the_canary_rule_form_shows_every_setting_with_its_reason_and_stores_only_a_valid_rule(ctx, accounts):
    form = admin_canary.canary_fields()
    assert [f.name for f in form] == list(admin_canary.canary_rule(ctx, "boss"))  # every CanaryConfig field
    kinds = {f.name: (f.kind, f.choices) for f in form}
    assert kinds["canary_prompts"] == ("choice", ("untrained", "any")) and kinds["canary_chain"] == ("bool", ())
    assert kinds["canary_min_comparisons"][0] == "int" and all(f.reason for f in form)
    rule = admin_canary.canary_rule(ctx, "boss")
    before = ctx.store.settings.all()
    for changes, problem in (({"canary_threshold": 1.5}, "canary_threshold must be a number in (0, 1), got 1.5"),
                             ({"canary_max_items": 2.5}, "canary_max_items must be an integer >= 1, got 2.5"),
                             ({"canary_share": None}, "canary_share cannot be blank"),
                             ({"canary_prompts": "some"}, "canary_prompts must be one of untrained, any")):
        with pytest.raises(UiError, match=re.escape(problem)):
            admin_canary.save_canary_rule(ctx, "boss", {**rule, **changes})
    assert ctx.store.settings.all() == before and ctx.deployments.canary_config.canary_prompts == "any"
    saved = admin_canary.save_canary_rule(ctx, "boss", {**rule, "canary_prompts": "untrained",
                                                        "canary_max_items": 48.0})
    assert saved.startswith("Canary rule saved")
    assert admin_canary.canary_rule(ctx, "boss") == {**rule, "canary_prompts": "untrained", "canary_max_items": 48}
    assert ctx.store.settings.get("canary_max_items") == "48"  # a whole number from a number box stays an integer
    assert "canary items on prompts no version in its line trained on" in admin_canary.canary_panel(ctx, "boss")


def test_prompt_pool_counts_searches_pages_and_removes_starter_prompts_too(ctx, accounts, sample_items):
    starters = ctx.store.prompts.count(source="starter")
    assert starters == ctx.store.prompts.count() > admin_prompts.POOL_PAGE  # the shipped starter prompts
    view = admin_prompts.prompt_pool(ctx, "boss")
    assert f"**{starters}** prompts in the pool ({starters} of them starter prompts)" in view.summary
    assert len(view.table) == admin_prompts.POOL_PAGE and view.table["source"].eq("starter").all()
    last = admin_prompts.prompt_pool(ctx, "boss", "", 999)  # past the end: the last page
    assert last.page == -(-starters // admin_prompts.POOL_PAGE) and len(last.table) >= 1

    (item,) = sample_items(1)
    sampled = ctx.store.items.get(item)
    # The whole text, upper-cased: search ignores case; a common first word ("What") can match more than a page.
    found = admin_prompts.prompt_pool(ctx, "boss", sampled.prompt.upper())
    assert sampled.prompt_id in found.table["prompt_id"].tolist() and "contain the search" in found.summary
    assert "nothing matches" in admin_prompts.prompt_pool(ctx, "boss", "zzz-no-such-words").summary

    waiting_before = ctx.store.items.count_waiting([0], 1)
    view = admin_prompts.remove_prompt(ctx, "boss", float(sampled.prompt_id))  # gr.Number may send a float
    assert f"Removed prompt {sampled.prompt_id}" in view.message and ctx.store.prompts.count() == starters - 1
    assert sampled.prompt_id not in [p.prompt_id for p in ctx.store.prompts.least_sampled(starters)]
    assert ctx.store.items.count_waiting([0], 1) == waiting_before - 1  # its waiting item is not handed out
    assert ctx.store.items.get(item).prompt == sampled.prompt  # the item keeps its prompt
    with pytest.raises(Conflict, match="removed already"):
        admin_prompts.remove_prompt(ctx, "boss", sampled.prompt_id)
    with pytest.raises(UiError, match="enter the id of a prompt"):
        admin_prompts.remove_prompt(ctx, "boss", "")
    assert ctx.store.prompts.add([sampled.prompt]).duplicates == 1  # re-adding does not undo a removal
    assert ctx.store.prompts.count() == starters - 1


def test_prompts_rest_lists_searches_and_removes_for_admins_only(ctx, boss, ann):
    total = ctx.store.prompts.count()
    page = boss.get("/api/prompts", params={"limit": 5, "offset": 0}).json()
    assert page["total"] == total and len(page["prompts"]) == 5
    first = page["prompts"][0]
    assert set(first) == {"prompt_id", "prompt", "source", "created_at", "items", "removed"}
    word = first["prompt"].split()[0]
    assert first["prompt_id"] in [p["prompt_id"] for p in boss.get("/api/prompts", params={"search": word}).json()[
        "prompts"]]
    assert boss.get("/api/prompts", params={"limit": 0}).status_code == 422
    assert ann.get("/api/prompts").status_code == 403
    assert ann.delete(f"/api/prompts/{first['prompt_id']}").status_code == 403
    assert ctx.store.prompts.count() == total  # the refused delete changed nothing

    r = boss.delete(f"/api/prompts/{first['prompt_id']}")
    assert r.status_code == 200 and r.json() == {"prompt_id": first["prompt_id"], "removed": True, "pool": total - 1}
    assert boss.delete(f"/api/prompts/{first['prompt_id']}").status_code == 409
    assert boss.delete("/api/prompts/999999").status_code == 404
    listed = boss.get("/api/prompts", params={"limit": 500, "removed": "true"}).json()["prompts"]
    assert [p["removed"] for p in listed if p["prompt_id"] == first["prompt_id"]] == [True]
    assert boss.get("/api/prompts").json()["total"] == total - 1
