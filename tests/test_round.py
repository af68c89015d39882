import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from learner.config import RoundConfig, advisories
from learner.data import EVAL, HELDOUT, TRAIN, PromptSplit, hash_fraction
from learner.errors import ConfigError, LearnerError
from learner.eval_gate import parent_kl
from learner.evaluate import (
    eval_answers_key,
    gate,
    kl_drift_warning,
    load_eval_answers,
    save_eval_answers,
    win_rate,
)
from learner.phases import within_staleness
from learner.rollouts import Rollout, around_median, best_vs_worst, split_prompts, usable_prompts
from learner.round import run_round
from learner.stats import proportion

# A round small enough for a 2-core CPU in seconds: 3 policy steps, 8-token answers, 2 eval prompts.
TINY = {"steps": 3, "batch_size": 2, "rollout_prompts": 2, "rollout_n": 3, "sync_every": 2, "max_new_tokens": 8,
        "reward_steps": 3, "reward_batch_items": 2, "eval_prompts": 2, "eval_n": 2, "max_length": 96,
        "learning_rate": 1e-2, "reward_learning_rate": 1e-2, "max_kl": 1e9, "min_win_rate": 0.0,
        # on-policy pairs whatever the reward model's held-out accuracy (a tiny round has few or no held-out labels):
        # the round's data flow is what these tests check; the guard has tests of its own
        "rollouts_min_reward_accuracy": None}


def write_snapshot(directory: Path, parent_version: int = 0, n_items: int = 6, k: int = 3,
                   rankings: bool = True) -> Path:
    """A snapshot as storage writes it: pairs.parquet, unary.parquet, prompts.parquet, meta.json."""
    directory.mkdir(parents=True)
    prompts = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(12)],
                            "prompt": [f"Tell me one fact about the number {i}." for i in range(12)]})
    pairs, unary = [], []
    for i in range(n_items):
        answers = [f"Yes! {i} is a fine number.", f"Maybe {i}.", f"no. {i} {i} {i}", "I do not know."][:k]
        item = {"item_id": f"item{i}", "annotator": "ann", "policy_version": parent_version - (i % 2),
                "prompt": prompts.prompt[i], "created_at": pd.Timestamp("2025-01-01"), "staleness": i % 2}
        finish = ["eos", "eos", "length", "eos"]  # the third answer was cut at max_new_tokens
        for (a, chosen), (b, rejected) in itertools.combinations(enumerate(answers), 2):  # ranked best first
            pairs.append(dict(item, ranking_id=f"r{i}", annotator_id=1, prompt_id=prompts.prompt_id[i],
                              chosen_answer_id=f"a{i}-{a}", chosen=chosen, rejected_answer_id=f"a{i}-{b}",
                              rejected=rejected, chosen_rank=a + 1, rejected_rank=b + 1,
                              chosen_finish_reason=finish[a], rejected_finish_reason=finish[b]))
        for a, text in enumerate(answers):
            unary.append(dict(item, feedback_id=f"f{i}-{a}", answer_id=f"a{i}-{a}", completion=text, label=a == 0,
                              finish_reason=finish[a]))
    pairs = pairs if rankings else []  # a thumbs-only deployment: no rankings at all
    pd.DataFrame(pairs, columns=list(pairs_columns(k))).to_parquet(directory / "pairs.parquet")
    pd.DataFrame(unary).to_parquet(directory / "unary.parquet")
    prompts.to_parquet(directory / "prompts.parquet")
    meta = {"created_at": "2025-01-01T00:00:00", "parent_version": parent_version, "base_model": "tiny",
            "counts": {"pairs": len(pairs), "unary": len(unary), "prompts": len(prompts)}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def pairs_columns(k: int) -> tuple[str, ...]:
    return ("item_id", "annotator", "policy_version", "prompt", "created_at", "staleness", "ranking_id",
            "annotator_id", "prompt_id", "chosen_answer_id", "chosen", "rejected_answer_id", "rejected", "chosen_rank",
            "rejected_rank", "chosen_finish_reason", "rejected_finish_reason")


def lora_weights(version: Path) -> dict:
    return load_file(str(version / "adapter" / "adapter_model.safetensors"))


def assert_complete(version: Path) -> dict:
    assert not version.with_name(version.name + ".partial").exists()
    for name in ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "reward/adapter_config.json",
                 "reward/adapter_model.safetensors", "reward/reward_head.safetensors", "config.json"]:
        assert (version / name).is_file(), name

    def no_nan(constant):
        raise AssertionError(f"metrics.json holds {constant}: not strict JSON")

    return json.loads((version / "metrics.json").read_text(), parse_constant=no_nan)


@pytest.fixture(scope="module")
def first_version(tmp_path_factory, tiny_model_dir):
    """Version 1: a DPO round from the base model (parent None), with its progress events."""
    root = tmp_path_factory.mktemp("round")
    events = []
    metrics = run_round(write_snapshot(root / "snapshot"), tiny_model_dir, None, root / "v1",
                        RoundConfig.from_dict(TINY), progress=events.append)
    return root / "v1", metrics, events


# --- config ---------------------------------------------------------------------------------------------------

def test_config_rejects_unknown_keys_and_bad_values_by_name():
    with pytest.raises(ConfigError, match="unknown config key 'betta'; known: algorithm, seed"):
        RoundConfig.from_dict({"betta": 0.1})
    with pytest.raises(ConfigError, match=r"beta must be > 0, got -0.1"):
        RoundConfig.from_dict({"beta": -0.1})
    with pytest.raises(ConfigError, match="algorithm must be one of dpo, kto, reward, got 'ppo'"):
        RoundConfig.from_dict({"algorithm": "ppo"})
    with pytest.raises(ConfigError, match="steps must be an integer, got 'ten'"):
        RoundConfig.from_dict({"steps": "ten"})
    with pytest.raises(ConfigError, match="batch_size must be >= 2 for kto"):
        RoundConfig.from_dict({"algorithm": "kto", "batch_size": 1})
    with pytest.raises(ConfigError, match="label_smoothing only applies to loss_type 'robust'"):
        RoundConfig.from_dict({"label_smoothing": 0.1})
    with pytest.raises(ConfigError, match="rpo_alpha must be >= 0, got -1.0"):
        RoundConfig.from_dict({"rpo_alpha": -1})
    with pytest.raises(ConfigError, match="rpo_alpha applies to algorithm 'dpo'.*got 1.0 with 'kto'"):
        RoundConfig.from_dict({"algorithm": "kto", "rpo_alpha": 1})


def test_rpo_alpha_defaults_to_1_for_dpo_and_to_0_where_no_pair_has_a_chosen_answer():
    assert RoundConfig().rpo_alpha == RoundConfig.from_dict({}).rpo_alpha == 1.0
    assert RoundConfig.from_dict({"algorithm": "kto"}).rpo_alpha == 0.0
    assert RoundConfig.from_dict({"algorithm": "reward"}).rpo_alpha == 0.0
    assert RoundConfig.from_dict({"algorithm": "dpo", "rpo_alpha": 0}).rpo_alpha == 0.0  # plain DPO on request
    # Built directly, a kto config names the fix.
    with pytest.raises(ConfigError, match="got 1.0 with 'kto': set rpo_alpha 0"):
        RoundConfig(algorithm="kto")


def test_settings_measured_worse_together_are_advised_against_and_nothing_else_is():
    online = RoundConfig.from_dict({"sync_every": 1})
    (advice,) = advisories(online)
    assert "rpo_alpha 1 with sync_every 1" in advice and "paired -0.137 [-0.227, -0.042], n = 288" in advice
    assert "set rpo_alpha 0" in advice
    assert "rpo_alpha 0.5 with" in advisories(RoundConfig.from_dict({"sync_every": 1, "rpo_alpha": 0.5}))[0]
    (all_pairs,) = advisories(RoundConfig.from_dict({"rollout_pairs": "all"}))
    assert "rollout_pairs 'all' with rpo_alpha 1" in all_pairs and "paired -0.095 [-0.215, -0.005]" in all_pairs
    assert len(advisories(RoundConfig.from_dict({"rollout_pairs": "all", "sync_every": 1}))) == 2
    for quiet in ({}, {"sync_every": 1, "rpo_alpha": 0}, {"sync_every": 2}, {"algorithm": "kto", "sync_every": 1},
                  {"algorithm": "reward", "sync_every": 1}, {"rollout_pairs": "all", "rpo_alpha": 0}):
        assert advisories(RoundConfig.from_dict(quiet)) == [], quiet


def test_config_round_trips_through_a_dict():
    config = RoundConfig.from_dict({"beta": 0.2, "steps": 5.0, "max_label_staleness": None, "ref_sync": True})
    assert config.steps == 5 and isinstance(config.steps, int) and config.max_label_staleness is None
    assert RoundConfig.from_dict(config.to_dict()) == config
    assert config.sampling.max_new_tokens == config.max_new_tokens


# --- pieces -----------------------------------------------------------------------------------------------------

def test_staleness_keeps_labels_within_deployed_versions_only():
    # `staleness` is what storage computed along the serving lineage; None = a version with no known lineage.
    frame = pd.DataFrame({"policy_version": [7, 6, 5, 2, 9], "staleness": [0, 1, 1, 2, None]})
    assert within_staleness(frame, 1)["policy_version"].tolist() == [7, 6, 5]
    assert within_staleness(frame, 0)["policy_version"].tolist() == [7]
    assert len(within_staleness(frame, None)) == 5


def rate(wins: float, n: int) -> dict:
    return proportion(wins, n).to_dict()


def test_gate_names_its_reason_and_refuses_on_the_win_rate_only_when_the_upper_bound_is_below():
    config = RoundConfig(max_kl=5.0, min_win_rate=0.4)
    good = {"kl_to_reference": 1.0, "win_rate_vs_parent": rate(4, 8)}
    verdict = gate([{"step": 0, "loss": 0.6}], None, good, config, check_win_rate=True)
    assert verdict["passed"] and verdict["reason"] is None
    check = verdict["win_rate_check"]
    assert check["n"] == 8 and check["statement"].startswith("win-rate check: n=8 comparisons, 95% CI [0.2")
    assert 0 < check["refusal_rate_at_min_win_rate"] <= 0.05 and 0 < check["pass_rate_at_0.25"] < 1
    assert "loss is nan at step 1" in gate([{"step": 1, "loss": float("nan")}], None, good, config, True)["reason"]
    assert "KL" in gate([], None, dict(good, kl_to_reference=9.0), config, True)["reason"]
    # 1 win in 8 (0.125): the upper bound 0.47 is above 0.4, so 8 comparisons cannot refuse it ...
    assert gate([], None, dict(good, win_rate_vs_parent=rate(1, 8)), config, True)["passed"]
    # ... but 10 in 80 can (upper bound ~0.22).
    refused = gate([], None, dict(good, win_rate_vs_parent=rate(10, 80)), config, True)
    assert not refused["passed"] and "upper bound" in refused["reason"] and "n=80" in refused["reason"]
    assert gate([], None, dict(good, win_rate_vs_parent=rate(10, 80)), config, check_win_rate=False)["passed"]
    assert win_rate([[2.0, 0.0]], [[1.0, 0.0]]).value == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert win_rate([[2.0, 0.0]], [[1.0, 0.0]]).n == 4


def test_a_kl_refusal_says_whether_the_lineage_drifted_or_the_round_jumped_and_what_to_do():
    config = RoundConfig(max_kl=15.0)
    metrics = {"kl_to_reference": 15.8}
    drifted = gate([], None, metrics, config, True, parent_kl=10.0)["reason"]
    assert drifted == ("KL to reference 15.8 > max_kl 15.0 (the parent's 10, +5.8 in this round); the lineage had "
                       "used 67% of it: raise max_kl if the serving version's answers still read well (a canary lets "
                       "annotators judge that), or set ref_sync so that each round is measured from its parent")
    jumped = gate([], None, metrics, config, True, parent_kl=2.0)["reason"]
    assert jumped == ("KL to reference 15.8 > max_kl 15.0 (the parent's 2, +13.8 in this round); this round alone "
                      "took 92% of it: lower learning_rate or steps, raise beta, or set kl_checkpoints")
    # Both: seed 1 of `structured` at 128 labels went 7.73 (52% of the budget) -> 16.2 (+8.44, 56%).
    both = gate([], None, {"kl_to_reference": 16.17}, config, True, parent_kl=7.73)["reason"]
    assert "the lineage had used 52% of it: raise max_kl" in both and "this round alone took 56% of it: lower" in both
    assert gate([], None, metrics, config, True)["reason"] == (  # no parent, or ref_sync: the KL is one round's
        "KL to reference 15.8 > max_kl 15.0 in one round: lower learning_rate or steps, raise beta, or set "
        "kl_checkpoints")


def test_a_passed_version_is_warned_from_half_of_max_kl_and_told_when_a_next_round_at_its_pace_would_pass_it():
    assert kl_drift_warning(7.0, 6.8, 15.0) is None and kl_drift_warning(7.0, None, 15.0) is None  # 47%, slowly
    warning = kl_drift_warning(10.0, 6.8, 15.0)  # 67%; +3.2 again reaches 13.2, under 15
    assert warning.startswith("KL to the base model 10 nats/answer is 67% of max_kl 15 (+3.2 from the parent's 6.8): "
                              "a round past it is refused; raise max_kl")
    soon = kl_drift_warning(6.0, 1.0, 10.0)  # 60%; +5 again reaches 11, over 10
    assert "is 60% of max_kl 10 (+5 from the parent's 1): a next round at this pace would pass it;" in soon
    assert kl_drift_warning(9.0, None, 15.0).startswith("KL to the base model 9 nats/answer is 60% of max_kl 15: a "
                                                        "round past it is refused;")  # no parent to measure a pace
    assert kl_drift_warning(16.0, 4.0, 15.0) is None  # refused: the gate's reason says it
    assert kl_drift_warning(float("nan"), 4.0, 15.0) is None  # refused too (a non-finite metric)


def test_the_parents_kl_counts_only_when_both_rounds_measure_against_the_base_model(tmp_path):
    parent = tmp_path / "v3"
    parent.mkdir()
    (parent / "metrics.json").write_text(json.dumps({"kl_to_reference": 6.8}))
    (parent / "config.json").write_text(json.dumps({"ref_sync": False}))
    assert parent_kl(parent, RoundConfig()) == 6.8
    assert parent_kl(parent, RoundConfig(ref_sync=True)) is None and parent_kl(None, RoundConfig()) is None
    (parent / "config.json").write_text(json.dumps({"ref_sync": True}))  # the parent was measured from its own parent
    assert parent_kl(parent, RoundConfig()) is None
    (parent / "config.json").write_text(json.dumps({}))
    (parent / "metrics.json").write_text(json.dumps({"kl_to_reference": None}))  # a NaN KL, stored as null
    assert parent_kl(parent, RoundConfig()) is None
    (parent / "metrics.json").write_text("{not json")
    assert parent_kl(parent, RoundConfig()) is None


def rollouts(*texts: str) -> list[Rollout]:
    return [Rollout("q", t, 3, "length" if t.endswith("...") else "eos") for t in texts]


def test_onpolicy_examples_drop_ties_and_keep_finish_reasons():
    pair = best_vs_worst("q", rollouts("a", "b...", "c"), [0.1, 0.9, -0.3])
    assert [(p.chosen, p.rejected, p.source, p.chosen_ended, p.rejected_ended) for p in pair] == [
        ("b...", "c", "onpolicy", False, True)]
    assert best_vs_worst("q", rollouts("a", "b"), [0.5, 0.5]) == []
    unary = around_median("q", rollouts("a", "b", "c", "d", "e..."), [3.0, 1.0, 2.0, 2.0, 0.0])
    assert [(u.answer, u.desirable, u.ended) for u in unary] == [("a", True, True), ("b", False, True),
                                                                 ("e...", False, False)]


def test_prompts_split_into_eval_heldout_and_train_for_good(tiny_tokenizer):
    prompts = pd.DataFrame({"prompt_id": range(50), "prompt": [f"Prompt number {i}?" for i in range(50)]})
    usable = usable_prompts(prompts, tiny_tokenizer, 96)
    split = PromptSplit.build(usable, 0.2, 0.2)
    rollout, held = split_prompts(usable, split, 4)
    assert len(held) == 4 and set(held) <= split.eval
    assert not set(rollout) & (split.eval | split.heldout) and split.heldout and not split.eval & split.heldout
    more = usable + ["New?", "Newer?"]
    again = PromptSplit.build(more, 0.2, 0.2)
    assert again.eval >= split.eval and again.heldout >= split.heldout  # a prompt never changes sides
    tiny = PromptSplit.build(usable[:1], 0.0, 0.0, fallback_eval=usable[0])
    assert split_prompts(usable[:1], tiny, 4) == ([], [usable[0]])
    # Every prompt hashed below untrained_below trained nothing: here the whole eval + heldout share.
    assert split.untrained_below == 0.4 == again.untrained_below
    assert {p for p in more if hash_fraction(p) < 0.4} == again.eval | again.heldout


def test_a_first_round_whose_few_labels_all_fell_on_eval_or_heldout_prompts_still_trains(tiny_tokenizer):
    """The starter pool hashes 13 of its 62 prompts to eval: 3 labels all on eval prompts (~1% of first rounds) made
    a round fail with "no training examples" (seen in a fresh-clone test run). Those labels train; eval keeps the
    other eval prompts."""
    prompts = pd.DataFrame({"prompt_id": range(50), "prompt": [f"Prompt number {i}?" for i in range(50)]})
    usable = usable_prompts(prompts, tiny_tokenizer, 96)
    split = PromptSplit.build(usable, 0.2, 0.2)
    on_eval, on_heldout = sorted(split.eval)[:3], sorted(split.heldout)[:2]
    for labelled in (on_eval, on_heldout):
        first = PromptSplit.build(usable, 0.2, 0.2, labelled=labelled)
        assert {first.role(p) for p in labelled} == {TRAIN}, labelled
        rollout, held = split_prompts(usable, first, 4)
        assert held and not set(held) & set(labelled)
    mixed = PromptSplit.build(usable, 0.2, 0.2, labelled=on_eval[:1] + on_heldout)  # the held-out ones train
    assert [mixed.role(p) for p in on_eval[:1] + on_heldout] == [EVAL, TRAIN, TRAIN]
    # ... so prompts from the lowest of their hashes up may have trained: the canary's untrained items stay below it.
    assert mixed.untrained_below == min(hash_fraction(p) for p in on_heldout) < 0.4
    assert all(mixed.role(p) != TRAIN for p in usable if hash_fraction(p) < mixed.untrained_below)
    # Once one labelled prompt trains anyway, the others keep their sides.
    train_prompt = next(p for p in usable if split.role(p) == TRAIN)
    later = PromptSplit.build(usable, 0.2, 0.2, labelled=on_eval + on_heldout + [train_prompt])
    assert [later.role(p) for p in on_eval + on_heldout] == [EVAL] * 3 + [HELDOUT] * 2


# --- whole rounds ---------------------------------------------------------------------------------------------

def test_dpo_round_from_the_base_writes_a_complete_candidate(first_version):
    version, metrics, events = first_version
    written = assert_complete(version)
    assert written == metrics
    assert metrics["status"] == "candidate" and metrics["gate"]["passed"] and metrics["gate"]["reason"] is None
    assert [r["step"] for r in metrics["history"]] == [0, 1, 2]
    assert all(isinstance(r["loss"], float) for r in metrics["history"])
    alpha = RoundConfig.from_dict(TINY).rpo_alpha  # RPO's weight on the chosen answers' NLL (the default)
    first = metrics["history"][0]  # a fresh LoRA: policy == reference, so DPO's part is log 2; RPO's NLL adds to it
    assert first["nll_chosen"] > 0
    assert first["loss"] - alpha * first["nll_chosen"] == pytest.approx(math.log(2), abs=1e-3)
    assert metrics["labels_used"] > 0 and metrics["staleness"]["max"] <= 2
    data = metrics["data"]
    assert data["onpolicy"]["regenerations"] == 2  # steps 0 and 2 with sync_every 2
    # Every training label seen exactly once (human_epochs 1), and half of what the steps saw was on-policy.
    assert data["human_uses"] == data["human_examples"] == metrics["labels_used"]
    assert data["onpolicy_share"] == pytest.approx(0.5, abs=0.1)
    # Held-out labels by prompt, with n and intervals; every win-rate carries its n and interval too.
    assert metrics["heldout"]["pairs"] > 0 and metrics["reward_trained_pairs"] == 3 * metrics["reward_train_items"]
    for key in ["reward_heldout_accuracy", "policy_heldout_accuracy", "win_rate_vs_parent", "win_rate_vs_base"]:
        figure = metrics[key]
        assert figure["n"] > 0 and figure["ci95"][0] <= figure["value"] <= figure["ci95"][1], key
    assert metrics["gate"]["win_rate_check"]["n"] == metrics["win_rate_vs_parent"]["n"]
    assert metrics["kl_to_reference"] >= 0 and metrics["kl_to_reference_per_token"] >= 0
    for key in ["reward_mean", "entropy", "mean_answer_length", "eos_rate", "reward_history"]:
        assert key in metrics, key
    # LoRA moved away from the parent (the base: a fresh LoRA's B matrices are zero).
    assert any(w.abs().sum() > 0 for name, w in lora_weights(version).items() if "lora_B" in name)
    config = json.loads((version / "config.json").read_text())
    assert config["beta"] == 0.1 and config["parent_version"] == 0 and config["snapshot"]["base_model"] == "tiny"
    # Progress: every phase, fractions that never go back, ending at 1.
    assert {e["phase"] for e in events} == {"reward", "rollouts", "policy", "eval"}
    fractions = [e["progress"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_round_in_a_chain_reuses_the_base_and_parent_eval_answers_it_would_have_drawn(tmp_path, tiny_model_dir):
    """The base's eval answers are drawn once per base model (kept in the reference cache), the parent's come from
    its version directory: a round with both samples only its policy, and compares the same answers it would have
    drawn itself (each model sampled alone with the eval seed, which the training seed does not change)."""
    config = RoundConfig.from_dict(TINY)
    cache = tmp_path / "cache"
    v1 = run_round(write_snapshot(tmp_path / "s1"), tiny_model_dir, None, tmp_path / "v1", config, ref_cache_dir=cache)
    assert v1["eval_answers_reused"] == []
    stored = json.loads((tmp_path / "v1" / "eval_answers.json").read_text())
    assert len(stored["answers"]) == v1["eval_prompts"] >= 1
    assert all(len(group) == TINY["eval_n"] for group in stored["answers"])
    base_files = list(cache.glob("eval-base-*.json"))
    assert len(base_files) == 1 and json.loads(base_files[0].read_text())["key"] == stored["key"]

    snapshot = write_snapshot(tmp_path / "s2", parent_version=1)
    config = RoundConfig.from_dict({**TINY, "seed": 7})  # another training seed (bench.loop gives each round its own)
    reused = run_round(snapshot, tiny_model_dir, tmp_path / "v1", tmp_path / "v2", config, ref_cache_dir=cache)
    assert reused["eval_answers_reused"] == ["base", "parent"]
    # The same round with nothing stored: it samples the base and the parent itself, and gets the same answers.
    parent = tmp_path / "v1-bare"
    shutil.copytree(tmp_path / "v1", parent)
    (parent / "eval_answers.json").unlink()
    fresh = run_round(snapshot, tiny_model_dir, parent, tmp_path / "v2-fresh", config, ref_cache_dir=tmp_path / "c2")
    assert fresh["eval_answers_reused"] == []
    assert json.loads(next((tmp_path / "c2").glob("eval-base-*.json")).read_text()) == json.loads(
        base_files[0].read_text())
    policy_draws = [(tmp_path / v / "eval_answers.json").read_text() for v in ["v2", "v2-fresh"]]
    assert policy_draws[0] == policy_draws[1]  # the two rounds trained the same policy
    for key in ["reward_mean_parent", "reward_mean_base"]:
        assert reused[key] == pytest.approx(fresh[key], abs=1e-6), key
    for key in ["win_rate_vs_parent", "win_rate_vs_base"]:
        assert reused[key]["value"] == pytest.approx(fresh[key]["value"], abs=1e-9), key
    assert reused["reward_mean_parent"] != pytest.approx(reused["reward_mean_base"], abs=1e-6)  # two models' draws


def test_a_stored_eval_draw_is_used_only_under_its_own_key(tmp_path):
    answers = [[Rollout("p", "an answer", 3, "eos"), Rollout("p", "cut", 8, "length")]]
    path = tmp_path / "eval_answers.json"
    save_eval_answers(path, "k1", answers)
    assert load_eval_answers(path, "k1") == answers
    assert load_eval_answers(path, "k2") is None  # other prompts, sampling, seed or base model
    path.write_text("{not json")
    assert load_eval_answers(path, "k1") is None  # unreadable: sample again
    assert load_eval_answers(tmp_path / "missing.json", "k1") is None
    params = RoundConfig().sampling
    key = eval_answers_key(["a", "b"], 2, params, 1, "m")
    assert key == eval_answers_key(["a", "b"], 2, params, 1, "m")
    assert len({key, eval_answers_key(["b", "a"], 2, params, 1, "m"), eval_answers_key(["a", "b"], 3, params, 1, "m"),
                eval_answers_key(["a", "b"], 2, params, 2, "m"), eval_answers_key(["a", "b"], 2, params, 1, "n")}) == 5


def test_lora_layers_adapts_only_the_top_layers_of_policy_and_reward_model_and_its_child_continues_them(
        tmp_path, tiny_model_dir):
    """`lora_layers` 1 on the 2-layer tiny Llama: every LoRA weight of the policy and of the reward model lies in
    layer 1, none in layer 0, the policy's moved, and a round on top of it continues that adapter (layers unchanged)."""
    config = RoundConfig.from_dict({**TINY, "lora_layers": 1})
    v1 = tmp_path / "v1"
    assert run_round(write_snapshot(tmp_path / "s1"), tiny_model_dir, None, v1, config)["status"] == "candidate"
    for part in ("adapter", "reward"):
        names = list(load_file(str(v1 / part / "adapter_model.safetensors")))
        lora = [n for n in names if "lora_" in n]
        assert lora and all(".layers.1." in n for n in lora), (part, names)
        # every linear layer of that block ("all-linear"), as without lora_layers
        assert {n.split(".layers.1.")[1].split(".lora_")[0] for n in lora} == {
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj"}, part
    assert any(w.abs().sum() > 0 for name, w in lora_weights(v1).items() if "lora_B" in name)
    v2 = tmp_path / "v2"
    run_round(write_snapshot(tmp_path / "s2", parent_version=1), tiny_model_dir, v1, v2, config)
    assert set(lora_weights(v2)) == set(lora_weights(v1))
    assert any(not torch.equal(lora_weights(v2)[n], lora_weights(v1)[n]) for n in lora_weights(v1))
    # a regular expression for the modules is resolved to the names it picks, in the top layers only
    only_v = RoundConfig.from_dict({**TINY, "lora_layers": 1, "lora_target_modules": r".*\.v_proj", "steps": 1})
    run_round(write_snapshot(tmp_path / "s3"), tiny_model_dir, None, tmp_path / "v1-v", only_v)
    assert {n.split(".lora_")[0].split("model.")[-1] for n in lora_weights(tmp_path / "v1-v")} == {
        "layers.1.self_attn.v_proj"}


def test_lora_layers_beyond_the_model_or_targets_that_pick_nothing_are_refused_by_name(tmp_path, tiny_model_dir):
    snapshot = write_snapshot(tmp_path / "s")
    with pytest.raises(ConfigError, match="lora_layers must be at most the model's 2 layers, got 3"):
        run_round(snapshot, tiny_model_dir, None, tmp_path / "v1", RoundConfig.from_dict({**TINY, "lora_layers": 3}))
    with pytest.raises(ConfigError, match="lora_target_modules 'nothing_here' picks no linear layer"):
        run_round(snapshot, tiny_model_dir, None, tmp_path / "v1",
                  RoundConfig.from_dict({**TINY, "lora_layers": 1, "lora_target_modules": "nothing_here"}))
    with pytest.raises(ConfigError, match=r"lora_layers must be >= 0 \(0: every layer\), got -1"):
        RoundConfig.from_dict({"lora_layers": -1})
    assert not (tmp_path / "v1").exists() and not (tmp_path / "v1.partial").exists()


def test_kto_round_continues_the_parent_adapter(first_version, tmp_path, tiny_model_dir):
    parent, _, _ = first_version
    config = RoundConfig.from_dict(dict(TINY, algorithm="kto", ref_sync=True))
    metrics = run_round(write_snapshot(tmp_path / "snapshot", parent_version=1), tiny_model_dir, parent,
                        tmp_path / "v2", config)
    assert_complete(tmp_path / "v2")
    assert metrics["status"] == "candidate", metrics["gate"]
    assert all(isinstance(r["loss"], float) for r in metrics["history"])
    assert metrics["reward_warm_start"] is True
    before, after = lora_weights(parent), lora_weights(tmp_path / "v2")
    assert before.keys() == after.keys()  # the same adapter continued, not a new one stacked on it
    assert any(not (before[k] == after[k]).all() for k in before)
    # ref_sync: the reference is the parent, so the first step's KTO log-ratios are 0 and the loss is 1 - σ(0).
    assert metrics["history"][0]["loss"] == pytest.approx(0.5, abs=1e-3)


def test_a_childs_kl_refusal_names_the_kl_its_parent_directory_recorded(first_version, tmp_path, tiny_model_dir):
    parent, parent_metrics, _ = first_version
    metrics = run_round(write_snapshot(tmp_path / "snapshot", parent_version=1), tiny_model_dir, parent,
                        tmp_path / "v2", RoundConfig.from_dict(dict(TINY, steps=1, max_kl=1e-6)))
    assert metrics["status"] == "rejected"
    step = metrics["kl_to_reference"] - parent_metrics["kl_to_reference"]
    assert (f"> max_kl 1e-06 (the parent's {parent_metrics['kl_to_reference']:.3g}, {step:+.3g} in this round); "
            "the lineage had used") in metrics["gate"]["reason"]


def test_kl_checkpoints_sit_evenly_before_the_last_step():
    from learner.phases import checkpoint_steps

    assert checkpoint_steps(12, 3) == [2, 5, 8]  # after steps 3, 6 and 9 of 12
    assert checkpoint_steps(4, 3) == [0, 1, 2] and checkpoint_steps(2, 3) == [0] and checkpoint_steps(12, 0) == []


def test_a_round_over_max_kl_keeps_its_latest_checkpoint_within_it_or_is_refused(tmp_path, tiny_model_dir):
    """kl_checkpoints: the final step's exact KL over max_kl makes the round measure its kept adapters, latest
    first, and keep the first within budget (its weights are what the version directory holds); with none within
    it the round is refused as before, its final weights saved."""
    snapshot = write_snapshot(tmp_path / "snapshot")
    knobs = dict(TINY, steps=4, kl_checkpoints=3, rollout_prompts=0)
    free = run_round(snapshot, tiny_model_dir, None, tmp_path / "free", RoundConfig.from_dict(knobs))
    final_kl = free["kl_to_reference"]
    assert free["status"] == "candidate" and "kl_checkpoints" not in free and final_kl > 0  # within max_kl 1e9

    # Just under the final step's KL: the same round (same seed and data) keeps an earlier step.
    kept = run_round(snapshot, tiny_model_dir, None, tmp_path / "kept",
                     RoundConfig.from_dict(dict(knobs, max_kl=final_kl * 0.999)))
    tried = kept["kl_checkpoints"]["tried"]
    assert tried[0] == {"step": 4, "kl_to_reference": pytest.approx(final_kl, rel=1e-4)}
    assert kept["status"] == "candidate" and kept["kl_checkpoints"]["steps"] == 4
    step = kept["kl_checkpoints"]["kept_step"]
    assert step in (1, 2, 3) and [t["step"] for t in tried] == list(range(4, step - 1, -1))  # latest first
    assert all(t["kl_to_reference"] > final_kl * 0.999 for t in tried[:-1])
    assert kept["kl_to_reference"] == tried[-1]["kl_to_reference"] <= final_kl * 0.999
    assert f"keeps the policy after step {step} of 4" in " ".join(kept["warnings"])
    assert [r["step"] for r in kept["history"]] == [0, 1, 2, 3]  # every step trained and recorded
    saved, final = lora_weights(tmp_path / "kept"), lora_weights(tmp_path / "free")
    assert any(not torch.equal(saved[name], final[name]) for name in final)  # the kept step's adapter, not the last

    refused = run_round(snapshot, tiny_model_dir, None, tmp_path / "refused",
                        RoundConfig.from_dict(dict(knobs, max_kl=1e-9)))
    assert refused["status"] == "rejected" and "> max_kl 1e-09" in refused["gate"]["reason"]
    assert refused["kl_checkpoints"]["kept_step"] is None and len(refused["kl_checkpoints"]["tried"]) == 4
    assert refused["kl_to_reference"] == pytest.approx(final_kl, rel=1e-4)  # the final step's, as measured first
    saved = lora_weights(tmp_path / "refused")
    assert all(torch.allclose(saved[name], final[name], atol=1e-6) for name in final)


def test_reward_only_round_keeps_the_parent_policy(first_version, tmp_path, tiny_model_dir):
    parent, _, _ = first_version
    metrics = run_round(write_snapshot(tmp_path / "snapshot", parent_version=1), tiny_model_dir, parent,
                        tmp_path / "v2", RoundConfig.from_dict(dict(TINY, algorithm="reward", eval_prompts=0)))
    assert_complete(tmp_path / "v2")
    assert metrics["history"] == [] and metrics["reward_trained"] is True
    assert (parent / "adapter/adapter_model.safetensors").read_bytes() == (
        tmp_path / "v2/adapter/adapter_model.safetensors").read_bytes()


def test_a_round_that_diverges_is_rejected_with_its_reason(tmp_path, tiny_model_dir):
    # A learning rate of 1e30: Adam's first update puts every LoRA weight near ±1e30, the next loss is not finite.
    config = RoundConfig.from_dict(dict(TINY, learning_rate=1e30, rollout_prompts=0))
    metrics = run_round(write_snapshot(tmp_path / "snapshot"), tiny_model_dir, None, tmp_path / "v1", config)
    written = assert_complete(tmp_path / "v1")
    assert written["status"] == "rejected"
    assert "training stopped" in metrics["gate"]["reason"] and ("nan" in metrics["gate"]["reason"]
                                                                or "inf" in metrics["gate"]["reason"])
    assert written["history"][-1]["loss"] is None  # NaN written as null: strict JSON for the Admin's plots


def test_module_prints_json_progress_and_a_done_line(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY, steps=2, eval_prompts=1)))
    (tmp_path / "threads").write_text("1")  # as the app's CoreShare writes it
    snapshot = write_snapshot(tmp_path / "snapshot")
    command = [sys.executable, "-m", "learner.round", "--snapshot", str(snapshot), "--base", str(tiny_model_dir),
               "--out", str(tmp_path / "v1"), "--config", str(tmp_path / "config.json"), "--set", "seed=3",
               "--threads-file", str(tmp_path / "threads")]
    env = dict(os.environ, PREFLOOP_DEVICE="cpu")
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert events and all(e["event"] in ("progress", "warning", "done") for e in events)
    progress = [e for e in events if e["event"] == "progress"]
    assert {"phase", "step", "total", "loss", "progress"} <= progress[0].keys()
    assert events[-1] == {"event": "done", "status": "candidate", "reason": None}
    assert json.loads((tmp_path / "v1/config.json").read_text())["seed"] == 3


def test_heldout_and_eval_prompts_labels_train_nothing(first_version, tmp_path, tiny_model_dir):
    from learner.data import PromptSplit

    _, metrics, _ = first_version
    snapshot = pd.read_parquet(write_snapshot(tmp_path / "snapshot") / "pairs.parquet")
    config = RoundConfig.from_dict(TINY)
    split = PromptSplit.build(list(snapshot["prompt"]), config.eval_fraction, config.heldout_fraction)
    roles = snapshot["prompt"].map(split.role)
    training = snapshot[roles == "train"]
    # The policy used exactly the training prompts' pairs, the reward model their rankings; none held out.
    assert metrics["labels_used"] == len(training) < len(snapshot)
    assert metrics["reward_train_items"] == training["item_id"].nunique()
    assert metrics["heldout"]["pairs"] == int((roles == "heldout").sum()) > 0
    # The version records the hash below which it trained on no prompt (the canary's untrained items use it).
    below = metrics["heldout"]["untrained_below"]
    assert below == config.eval_fraction + config.heldout_fraction
    assert not set(training["prompt"]) & {p for p in snapshot["prompt"] if hash_fraction(p) < below}


def test_a_thumbs_only_round_never_trusts_an_untrained_reward_model(tmp_path, tiny_model_dir):
    config = RoundConfig.from_dict(dict(TINY, algorithm="kto"))
    first = run_round(write_snapshot(tmp_path / "s1", rankings=False), tiny_model_dir, None, tmp_path / "v1", config)
    assert first["reward_trained_pairs"] == 0 and not first["reward_ready"]
    # Round 2 warm-starts from round 1's reward model, which never saw a pair: still not ready to judge.
    second = run_round(write_snapshot(tmp_path / "s2", parent_version=1, rankings=False), tiny_model_dir,
                       tmp_path / "v1", tmp_path / "v2", config)
    assert second["reward_warm_start"] and not second["reward_ready"] and second["reward_trained_pairs"] == 0
    assert second["gate"]["win_rate_check"] is None and "win_rate_vs_parent" not in second
    assert second["data"]["onpolicy"] is None and second["data"]["onpolicy_uses"] == 0
    assert second["status"] == "candidate"


def test_a_sparse_round_keeps_its_on_policy_share_when_told_not_to_fill_steps(tmp_path, tiny_model_dir):
    snapshot = write_snapshot(tmp_path / "snapshot", n_items=3)
    runs, warnings = {}, {}
    for fill in (True, False):
        config = RoundConfig.from_dict(dict(TINY, steps=12, sync_every=12, onpolicy_fill_steps=fill))
        metrics = run_round(snapshot, tiny_model_dir, None, tmp_path / f"v-{fill}", config)
        runs[fill], warnings[fill] = metrics["data"], metrics["warnings"]
    human = runs[True]["human_uses"]
    assert 0 < human < 12 and runs[False]["human_uses"] == human
    assert runs[True]["steps"] == 12 and runs[True]["onpolicy_uses"] > human  # empty steps: batch_size on-policy
    assert runs[False]["steps"] == human and runs[False]["onpolicy_uses"] == human  # one human example a step, 0.5
    assert any(f"takes {human} of its 12 optimizer steps" in w and "onpolicy_fill_steps is off" in w
               for w in warnings[False]), warnings[False]
    assert not any("optimizer steps" in w for w in warnings[True])


def test_rollouts_need_a_reward_model_shown_good_enough_only_when_asked():
    from learner.phases import rollouts_allowed

    good, chance = proportion(27, 30), proportion(18, 30)  # Wilson lower bounds 0.74 and 0.42
    assert rollouts_allowed(chance, None) and rollouts_allowed(None, None)  # no minimum: as before
    assert rollouts_allowed(good, 0.5) and not rollouts_allowed(chance, 0.5)
    assert not rollouts_allowed(None, 0.5) and not rollouts_allowed(proportion(0, 0), 0.5)  # not shown: no
    with pytest.raises(ConfigError, match="rollouts_min_reward_accuracy must be None or in"):
        RoundConfig(rollouts_min_reward_accuracy=1.0)


def test_a_reward_model_not_shown_good_enough_picks_no_on_policy_pairs(tmp_path, tiny_model_dir):
    config = RoundConfig.from_dict(dict(TINY, rollouts_min_reward_accuracy=0.99, heldout_fraction=0.5))
    metrics = run_round(write_snapshot(tmp_path / "snapshot", n_items=8), tiny_model_dir, None, tmp_path / "v1",
                        config)
    assert metrics["reward_heldout_accuracy"]["n"] > 0  # it was measured, and no 3-ranking model reaches 0.99
    assert metrics["data"]["onpolicy"] is None and metrics["data"]["onpolicy_uses"] == 0  # no regeneration at all
    assert metrics["data"]["human_uses"] > 0
    assert any("rollouts_min_reward_accuracy 0.99" in w for w in metrics["warnings"]), metrics["warnings"]


def test_by_default_a_reward_model_not_shown_above_chance_picks_no_on_policy_pairs(tmp_path, tiny_model_dir):
    """The default guard (0.5, docs/benchmarks.md: `structured` at 48 labels): a round whose reward model has no
    held-out labels to show it better than chance trains on its human labels alone, and says so."""
    defaults = {**{k: v for k, v in TINY.items() if k != "rollouts_min_reward_accuracy"}, "steps": 40}
    metrics = run_round(write_snapshot(tmp_path / "snapshot", n_items=3), tiny_model_dir, None, tmp_path / "v1",
                        RoundConfig.from_dict(defaults))
    assert RoundConfig().rollouts_min_reward_accuracy == 0.5
    assert metrics["reward_ready"] and metrics["reward_heldout_accuracy"] is None  # trained, nothing held out
    assert metrics["data"]["onpolicy"] is None and metrics["data"]["onpolicy_uses"] == 0
    assert metrics["data"]["human_uses"] > 0 and metrics["status"] == "candidate"
    assert any("(no held-out labels) is not shown to reach rollouts_min_reward_accuracy 0.5" in w
               for w in metrics["warnings"]), metrics["warnings"]
    steps = metrics["data"]["steps"]  # one pass over the human examples, nothing to fill the other steps with
    assert steps == metrics["data"]["human_uses"] < 40
    assert any(f"takes {steps} of its 40 optimizer steps" in w and "no on-policy pairs fill the rest" in w
               for w in metrics["warnings"]), metrics["warnings"]

def test_rollout_judge_auto_picks_the_judge_that_ranked_held_out_pairs_better(first_version, tmp_path,
                                                                              tiny_model_dir):
    """`rollout_judge` "auto": round 1's fresh LoRA is its reference (implicit reward 0 for every answer), so the
    reward model judges without a comparison that float rounding could decide; from a trained parent, the policy
    judges exactly when its held-out accuracy is the higher, and either way the round trains on on-policy pairs."""
    config = RoundConfig.from_dict({**TINY, "rollout_judge": "auto"})
    first = run_round(write_snapshot(tmp_path / "s1"), tiny_model_dir, None, tmp_path / "a1", config)
    judge = first["data"]["rollout_judge"]
    assert judge["judge"] == "reward_model" and "policy starts this round as its reference" in judge["why"]
    second = run_round(write_snapshot(tmp_path / "s2", parent_version=1), tiny_model_dir, first_version[0],
                       tmp_path / "a2", config)
    judge = second["data"]["rollout_judge"]
    policy, reward = judge["policy_heldout_accuracy"]["value"], judge["reward_model_heldout_accuracy"]["value"]
    assert judge["judge"] == ("policy" if policy > reward else "reward_model")
    assert judge["judge"] == "policy"  # here the parent orders every held-out pair the labels' way, the RM not
    assert second["data"]["onpolicy_uses"] > 0
    assert RoundConfig().rollout_judge == "reward_model"
    assert first_version[1]["data"]["rollout_judge"] == {"judge": "reward_model", "rule": "reward_model"}
    with pytest.raises(ConfigError, match="rollout_judge must be one of reward_model, auto, policy, got 'human'"):
        RoundConfig.from_dict({"rollout_judge": "human"})


def test_rollout_judge_policy_takes_the_implicit_reward_from_round_2_without_waiting_for_evidence(
        first_version, tmp_path, tiny_model_dir):
    """`rollout_judge` "policy": a policy that starts as its reference keeps the reward model (round 1; `ref_sync`),
    and every round from a trained parent ranks its rollouts by the implicit reward, whatever the held-out
    accuracies say (both are still recorded)."""
    config = RoundConfig.from_dict({**TINY, "rollout_judge": "policy"})
    first = run_round(write_snapshot(tmp_path / "s1"), tiny_model_dir, None, tmp_path / "a1", config)
    assert first["data"]["rollout_judge"]["judge"] == "reward_model"
    second = run_round(write_snapshot(tmp_path / "s2", parent_version=1), tiny_model_dir, first_version[0],
                       tmp_path / "a2", config)
    judge = second["data"]["rollout_judge"]
    assert judge["judge"] == "policy" and judge["rule"] == "policy"
    assert judge["policy_heldout_accuracy"]["n"] > 0 and judge["reward_model_heldout_accuracy"]["n"] > 0
    assert second["data"]["onpolicy_uses"] > 0
    synced = run_round(write_snapshot(tmp_path / "s3", parent_version=1), tiny_model_dir, first_version[0],
                       tmp_path / "a3", RoundConfig.from_dict({**TINY, "rollout_judge": "policy", "ref_sync": True}))
    assert synced["data"]["rollout_judge"]["judge"] == "reward_model"


def test_a_dpo_round_on_rankings_that_are_all_ties_says_why_it_has_nothing_to_train(tmp_path, tiny_model_dir):
    """Every ranking "no preference" (all answers tied): no pair, so no reward model and no rollouts either."""
    with pytest.raises(LearnerError, match="a ranking whose answers are all tied gives no pair"):
        run_round(write_snapshot(tmp_path / "snapshot", rankings=False), tiny_model_dir, None, tmp_path / "v1",
                  RoundConfig.from_dict(TINY))
    assert not (tmp_path / "v1").exists()  # nothing half-written


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_round_in_each_precision_trains_the_policy_it_runs(tmp_path, tiny_model_dir, monkeypatch, precision):
    # bf16 autocast is the default on CPUs with native bf16. Autocast caches the bf16 copy of every trainable weight
    # until its context is left, and a round runs in one context: with the cache on, every step ran step 0's LoRA
    # weights (B = 0), so the policy's log-probs stayed the reference's (reward margin and KL 0 at every step) while
    # the fp32 weights moved. Forced to "bf16" here so the test means the same on a CPU without native bf16.
    # A CPU's precisions (on a GPU machine pick_device takes the GPU: tests/test_cuda.py checks that one).
    monkeypatch.setenv("PREFLOOP_DEVICE", "cpu")
    monkeypatch.setenv("PREFLOOP_PRECISION", precision)
    metrics = run_round(write_snapshot(tmp_path / "snapshot"), tiny_model_dir, None, tmp_path / "v1",
                        RoundConfig.from_dict(dict(TINY, rollout_prompts=0)))
    assert metrics["precision"] == {"fp32": "float32", "bf16": "float32 weights, bfloat16 autocast"}[precision]
    later = metrics["history"][1:]
    assert later and all(step["kl"] != 0 and step["reward_chosen"] != 0 for step in later)


def test_precision_is_chosen_by_name_and_refused_when_unknown(monkeypatch):
    from learner.errors import ModelError
    from learner.model import cpu_has_native_bf16, pick_device

    assert pick_device("cpu", "fp32").autocast is None
    from learner.model import cuda_device  # what pick_device gives where torch sees a GPU

    assert cuda_device("fp32").precision == "float32"
    for precision in ("auto", "bf16"):  # bf16 weights, and autocast so that LoRA sums can stay fp32
        assert cuda_device(precision).precision == "bfloat16 weights, bfloat16 autocast"
        assert not cuda_device(precision).merges_for_sampling
    assert pick_device("cpu", "bf16").autocast == torch.bfloat16
    assert pick_device("cpu", "auto").autocast == (torch.bfloat16 if cpu_has_native_bf16() else None)
    monkeypatch.setenv("PREFLOOP_PRECISION", "fp32")
    assert pick_device("cpu").autocast is None
    monkeypatch.setenv("PREFLOOP_PRECISION", "half")
    with pytest.raises(ModelError, match="PREFLOOP_PRECISION.*auto, fp32, bf16.*'half'"):
        pick_device("cpu")


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["cpu-fp32-weights", "gpu-bf16-weights"])
def test_under_bf16_autocast_a_young_adapters_effect_is_kept_by_fp32_sums(weights):
    # peft adds the adapter's output to the frozen layer's and casts the sum to the frozen output's dtype: bf16
    # under autocast, where an addition below half a unit in the last place vanishes. keep_lora_sums_fp32 returns
    # the frozen output in fp32 so that the sum keeps it. Alike for a CPU's fp32 weights and a GPU's bf16 weights
    # (`cuda_device`: bf16 weights under bf16 autocast, emulated here).
    from peft import LoraConfig, get_peft_model

    from learner.model import Device, keep_lora_sums_fp32

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with torch.no_grad():
        base[0].weight.uniform_(1.0, 2.0)  # outputs ~ 96: a bf16 unit in the last place there is 0.5
        base[0].weight.copy_(base[0].weight.bfloat16().float())  # values both dtypes hold exactly
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["0"]))
    with torch.no_grad():
        model.base_model.model[0].lora_A["default"].weight.fill_(0.05)
        model.base_model.model[0].lora_B["default"].weight.fill_(1e-3)  # the adapter adds ~0.006 to each output
    x = torch.rand(8, 64)
    bf16 = Device(torch.device("cpu"), weights, torch.bfloat16)

    def effect() -> torch.Tensor:
        with torch.no_grad(), bf16.compute():
            with model.disable_adapter():
                frozen = model(x)
            return model(x).float() - frozen.float()

    with torch.no_grad(), model.disable_adapter():
        frozen32 = model(x)
    with torch.no_grad():
        exact = model(x) - frozen32
    model.base_model.model[0].base_layer.to(weights)  # the frozen weight in the device's dtype, the adapter in fp32
    assert float(exact.abs().min()) > 1e-3
    assert float(effect().abs().max()) == 0.0  # plain autocast: the adapter does nothing at all
    assert keep_lora_sums_fp32(model, bf16) == 1 and keep_lora_sums_fp32(model, bf16) == 0  # idempotent
    assert torch.allclose(effect(), exact, rtol=0.05, atol=1e-4)
