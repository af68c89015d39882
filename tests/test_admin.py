"""The Admin tab: handlers called directly on a real store and policy, and every admin endpoint through gradio_client
(an admin is served, an annotator is refused and nothing changes)."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest

from app.scheduler import TRIGGER_CONFIG, TRIGGER_LABELS, TRIGGER_MINUTES
from app.ui import admin, annotate
from app.ui.admin import Forbidden
from app.ui.annotate import UiError
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
            "settings": ctx.store.settings.all(), "deployed": ctx.policy.version,
            "versions": [(v.version, v.status) for v in ctx.store.versions.list()],
            "runs": [(r.run_id, r.status) for r in ctx.store.runs.list()], "overlap": ctx.buffer.config.overlap}


# Every handler that acts or reads as an admin, with arguments that would succeed for one.
ADMIN_HANDLERS = {
    "overview": lambda ctx, who: admin.overview(ctx, who),
    "cancel_round": lambda ctx, who: admin.cancel_round(ctx, who),
    "triggers": lambda ctx, who: admin.triggers(ctx, who),
    "start_round": lambda ctx, who: admin.start_round(ctx, who, {"steps": 0}),
    "save_triggers": lambda ctx, who: admin.save_triggers(ctx, who, True, 5, 0, {}),
    "versions_table": lambda ctx, who: admin.versions_table(ctx, who),
    "version_plots": lambda ctx, who: admin.version_plots(ctx, who),
    "run_choices": lambda ctx, who: admin.run_choices(ctx, who),
    "deploy_choices": lambda ctx, who: admin.deploy_choices(ctx, who),
    "loss_curve": lambda ctx, who: admin.loss_curve(ctx, who, None),
    "deploy_version": lambda ctx, who: admin.deploy_version(ctx, who, 0),
    "roll_back": lambda ctx, who: admin.roll_back(ctx, who),
    "annotators": lambda ctx, who: admin.annotators(ctx, who),
    "set_overlap": lambda ctx, who: admin.set_overlap(ctx, who, 3),
    "add_user": lambda ctx, who: admin.add_user(ctx, who, "mallory", "admin", "mallory-password"),
    "set_user_disabled": lambda ctx, who: admin.set_user_disabled(ctx, who, "boss", True),
    "reset_password": lambda ctx, who: admin.reset_password(ctx, who, "boss", None),
    "rotate_token": lambda ctx, who: admin.rotate_token(ctx, who, "boss"),
    "upload_prompts": lambda ctx, who: admin.upload_prompts(ctx, who, "/etc/hostname.jsonl"),
    "export_labels": lambda ctx, who: admin.export_labels(ctx, who, "dpo"),
    "guidelines_source": lambda ctx, who: admin.guidelines_source(ctx, who),
    "save_guidelines": lambda ctx, who: admin.save_guidelines(ctx, who, "be nice"),
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
    ctx.store.runs.update(run_id, status="running", progress=0.5, step=6, loss=0.6931)

    view = admin.overview(ctx, "boss")
    assert "| rankings | 1 | 1 |" in view.counts and "| flags | 1 | 1 |" in view.counts
    assert "| skips | 1 | 1 |" in view.counts and "| thumbs | 0 | 0 |" in view.counts
    assert "base model (v0)" in view.status and "items waiting" in view.status
    assert view.active_run == run_id and view.progress == 0.5
    assert f"Round **{run_id}** (dpo): **running**" in view.run and "loss 0.6931" in view.run
    assert admin.progress_html(view.progress).startswith('<progress value="50" max="100"')
    ctx.store.runs.update(run_id, status="failed", error="<script>alert(1)</script>")
    view = admin.overview(ctx, "boss")
    assert view.progress is None and "<script>" not in view.run
    with pytest.raises(UiError, match="no round is in progress"):
        admin.cancel_round(ctx, "boss")


def test_versions_table_plots_and_loss_curves_come_from_real_rows(ctx, accounts):
    ctx.store.versions.add(1, 0, "dpo", "candidate", None, {}, METRICS, 12)
    ctx.store.versions.add(2, 1, "kto", "rejected", None, {}, {**METRICS, "kl_to_reference": 30.0, "history": []},
                           20, reason="KL too high")
    run_id = ctx.store.runs.create("dpo", {})
    for step, loss in [(1, 0.69), (2, 0.62), (3, 0.55)]:
        ctx.store.runs.add_step(run_id, step, loss, {"phase": "policy"})
    ctx.store.runs.update(run_id, status="succeeded", version=1)
    history_only = ctx.store.runs.create("kto", {})
    ctx.store.runs.update(history_only, status="rejected", version=2)

    table = admin.versions_table(ctx, "boss")
    assert table["version"].tolist() == [2, 1, 0]
    assert table.loc[0, ["status", "kl_to_reference", "reason"]].tolist() == ["rejected", 30.0, "KL too high"]
    assert table.loc[1, "reward_accuracy"] == 0.75 and table.loc[2, "algorithm"] == "base"

    plots = admin.version_plots(ctx, "boss")
    assert len(plots.rates) == 8  # 2 trained versions x 4 rates; the base model has no metrics
    assert set(plots.rates["metric"]) == {"reward_accuracy", "win_rate_vs_base", "win_rate_vs_parent", "eos_rate"}
    assert plots.kl.set_index("version")["value"].to_dict() == {1: 1.5, 2: 30.0}
    assert plots.length["value"].tolist() == [40.0, 40.0] and len(plots.entropy) == 2

    curve = admin.loss_curve(ctx, "boss", run_id)
    policy = curve[curve["curve"] == "policy"]
    assert policy["loss"].tolist() == [0.69, 0.62, 0.55]  # the stored steps win over the metrics' history
    assert curve[curve["curve"] == "reward model"]["loss"].tolist() == [0.7, 0.65]
    assert admin.loss_curve(ctx, "boss", history_only)["curve"].tolist() == ["reward model"] * 2
    assert admin.run_choices(ctx, "boss")[0] == (f"round {history_only} -> v2 (rejected)", history_only)

    # The frames are what gr.LinePlot takes: Gradio's own postprocess accepts them.
    for frame, x in [(plots.rates, "version"), (plots.kl, "version"), (curve, "step")]:
        payload = gr.LinePlot(x=x, y=frame.columns[1 if x == "step" else 2],
                              color=frame.columns[2 if x == "step" else 1]).postprocess(frame)
        assert len(payload.data) == len(frame)


def test_deploy_and_roll_back_hot_swap_the_policy(ctx, accounts, add_version):
    add_version()
    with pytest.raises(UiError, match="choose a version"):
        admin.deploy_version(ctx, "boss", "latest")
    assert admin.deploy_choices(ctx, "boss") == [("v1 (candidate)", 1), ("base model (v0) (deployed)", 0)]
    assert "Deployed v1" in admin.deploy_version(ctx, "boss", 1)
    assert ctx.policy.version == 1 and ctx.store.versions.deployed().version == 1
    assert admin.roll_back(ctx, "boss") == "Rolled back v1 to base model (v0)."
    assert ctx.policy.version == 0 and ctx.store.versions.get(1).status == "rolled_back"
    with pytest.raises(Conflict, match="nothing to roll back"):
        admin.roll_back(ctx, "boss")


def test_start_round_validates_like_the_api_and_triggers_are_stored(ctx, accounts):
    defaults = admin.knob_defaults()
    assert defaults == {"algorithm": "dpo", "beta": 0.1, "steps": 12, "learning_rate": 1e-4, "sync_every": 4,
                        "max_staleness": 2, "ref_sync": False, "rollout_prompts": 4}
    with pytest.raises(ConfigError, match="beta must be > 0, got -1"):
        admin.start_round(ctx, "boss", {**defaults, "beta": -1.0})
    assert ctx.store.runs.list() == []
    assert admin.overrides_from({"beta": None, "max_staleness": None}) == {"max_staleness": None}

    with pytest.raises(UiError, match="set 'every N labels'"):
        admin.save_triggers(ctx, "boss", True, 0, None, defaults)
    view = admin.save_triggers(ctx, "boss", True, 25, 0, {**defaults, "algorithm": "kto", "beta": None})
    assert (view.enabled, view.every_labels, view.every_minutes) == (True, 25, 0)
    settings = ctx.store.settings
    assert settings.get(TRIGGER_LABELS) == "25" and settings.get(TRIGGER_MINUTES) == "0"
    assert json.loads(settings.get(TRIGGER_CONFIG))["algorithm"] == "kto"
    assert "beta" not in json.loads(settings.get(TRIGGER_CONFIG))
    off = admin.save_triggers(ctx, "boss", False, 25, 10, defaults)
    assert not off.enabled and settings.get(TRIGGER_LABELS) == "0" and off.message == "Automatic rounds off."


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
    assert len(rows) == 6 and set(rows[0]) == {"prompt", "chosen", "rejected"} and view.message.startswith("6 dpo")
    with pytest.raises(UiError, match="export format"):
        admin.export_labels(ctx, "boss", "csv")

    assert admin.guidelines_source(ctx, "boss") == annotate.DEFAULT_GUIDELINES
    admin.save_guidelines(ctx, "boss", "Prefer **short** answers. <script>alert(1)</script>")
    shown = annotate.guidelines(ctx)
    assert "<strong>short</strong>" in shown and "<script>" not in shown and "&lt;script&gt;" in shown
    with pytest.raises(UiError, match="cannot be empty"):
        admin.save_guidelines(ctx, "boss", "   ")


def test_gradio_client_admin_is_served_and_annotator_refused_for_every_action(ctx, server, accounts, tmp_path,
                                                                              add_version):
    from gradio_client import Client, handle_file

    add_version(metrics=METRICS)
    prompts = tmp_path / "more.jsonl"
    prompts.write_text('{"prompt": "Name three rivers."}\n')
    # api_name -> arguments: every admin endpoint of the UI.
    calls = {
        "/admin_overview": (),
        "/admin_train_state": (),
        "/admin_save_triggers": (True, 7, 0, "dpo", 0.1, 12, 1e-4, 4, 2, False, 4),
        "/admin_versions": (),
        "/admin_loss_curve": (None,),
        "/admin_deploy": (1, False),
        "/admin_roll_back": (),
        "/admin_annotators": (),
        "/admin_set_overlap": (2,),
        "/admin_add_user": ("dave", "annotator", "dave-password"),
        "/admin_set_user_disabled": ("dave", True),
        "/admin_upload_prompts": (handle_file(str(prompts)), False),
        "/admin_export": ("rankings",),
        "/admin_guidelines": (),
        "/admin_save_guidelines": ("Be kind.",),
        "/admin_start_round": ("reward", 0.1, 0, 1e-4, 4, 2, False, 0),
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
    assert ctx.store.settings.get(TRIGGER_LABELS) == "7"
    assert results["/admin_deploy"][0].startswith("Deployed v1")
    assert results["/admin_roll_back"][0] == "Rolled back v1 to base model (v0)." and ctx.policy.version == 0
    assert ctx.buffer.config.overlap == 2
    assert ctx.store.users.get("dave").disabled and "API token: " in results["/admin_add_user"][0]
    assert results["/admin_upload_prompts"].startswith("imported 1 prompts from more.jsonl")
    assert results["/admin_guidelines"][0] == annotate.DEFAULT_GUIDELINES
    assert ctx.store.settings.get("guidelines") == "Be kind."
    assert Path(results["/admin_export"][0]).read_text(encoding="utf-8") == ""  # no rankings yet: an empty file
    (run,) = ctx.store.runs.list()
    assert ctx.scheduler.wait(run.run_id, timeout=60) == "cancelled"
