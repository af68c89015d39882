"""The learning benchmark's statistics (bench/stats.py) against hand and numpy computations, and its results
directory (bench/loop_results.py): rows survive a crash mid-write, a rerun skips what is done, held-out prompts stay
out of the training pool."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest

from app.canary import CanaryConfig
from app.canary import win_rate as canary_win_rate
from app.personas import PERSONAS
from bench.loop import (
    build_grid,
    check_labels_held_out,
    judge,
    plan,
    round_config,
    round_overrides,
    starter_prompts,
    verdicts,
)
from bench.loop_results import (
    GRIDS,
    LEGACY_CANARY_DEFAULTS,
    Grid,
    append_row,
    grid_settings,
    held_out_prompts,
    load_base_answers,
    load_rows,
    open_results,
    overlap,
    round_settings,
    rounds_precision,
    row_key,
    save_base_answers,
    table,
    today_canary_defaults,
    today_round_defaults,
)
from bench.loop_summary import summary
from bench.stats import RESAMPLES, paired_difference, win_rate
from learner.config import RoundConfig
from storage.items import AnswerRecord


def explicit_bootstrap(cells: np.ndarray, resamples: int = RESAMPLES, seed: int = 9) -> tuple[float, float]:
    """The interval bench/stats.py documents, written as loops: per resample, prompts drawn first, then seeds."""
    rng = np.random.default_rng(seed)
    seeds, prompts = cells.shape
    prompt_picks = rng.integers(0, prompts, size=(resamples, prompts))
    seed_picks = rng.integers(0, seeds, size=(resamples, seeds))
    means = []
    for b in range(resamples):
        total = sum(cells[s, p] for s in seed_picks[b] for p in prompt_picks[b])
        means.append(total / (seeds * prompts))
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def random_verdicts(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).choice([0.0, 0.5, 1.0], size=shape, p=[0.35, 0.1, 0.55])


# -- statistics -----------------------------------------------------------------------------------------------------

def test_two_prompts_one_won_one_lost_is_a_coin_flip_by_hand():
    # Resamples of 2 prompts have mean 0 (1/4), 0.5 (1/2) or 1 (1/4): the 2.5% and 97.5% percentiles are 0 and 1.
    e = win_rate([[[1.0], [0.0]]])
    assert (e.value, e.ci95, e.n, e.prompts, e.seeds) == (0.5, (0.0, 1.0), 2, 2, 1)


def test_unanimous_verdicts_have_a_degenerate_interval():
    e = win_rate(np.ones((3, 5, 2)))
    assert (e.value, e.ci95, e.n) == (1.0, (1.0, 1.0), 30)


def test_interval_matches_the_loop_written_by_hand_for_seeds_x_prompts():
    verdicts = random_verdicts((3, 12, 2))
    cells = verdicts.mean(axis=2)
    e = win_rate(verdicts, resamples=400)
    assert e.value == pytest.approx(verdicts.mean())
    assert e.ci95 == pytest.approx(explicit_bootstrap(cells, resamples=400))
    assert (e.n, e.prompts, e.seeds) == (72, 12, 3)


def test_one_seed_gives_the_canary_interval_over_prompts_as_clusters():
    verdicts = random_verdicts((1, 48, 2), seed=3)
    clusters = [(float(v.sum()), 2) for v in verdicts[0]]  # (wins, comparisons) per prompt, ties half
    canary = canary_win_rate(clusters)
    e = win_rate(verdicts)
    assert e.value == pytest.approx(canary.win_rate)
    assert e.ci95 == pytest.approx(canary.ci95)


def test_prompts_are_resampled_not_pairs():
    # Both samples of a prompt agree: the interval is that of one sample per prompt (48 clusters), and wider than
    # resampling the 96 pairs as if they were independent would make it.
    one = random_verdicts((1, 48, 1), seed=5)
    both = np.repeat(one, 2, axis=2)
    assert win_rate(both).ci95 == pytest.approx(win_rate(one).ci95)
    pairs = both.reshape(1, 96, 1)
    assert np.diff(win_rate(both).ci95)[0] > np.diff(win_rate(pairs).ci95)[0]


def test_paired_difference_by_hand():
    first, second = random_verdicts((2, 10, 2), seed=1), random_verdicts((2, 10, 2), seed=2)
    d = paired_difference(first, second, resamples=300)
    cells = first.mean(axis=2) - second.mean(axis=2)
    assert d.value == pytest.approx(first.mean() - second.mean())
    assert d.ci95 == pytest.approx(explicit_bootstrap(cells, resamples=300))
    assert paired_difference(first, first).ci95 == (0.0, 0.0)


def test_pairing_removes_the_spread_between_prompts():
    # Half the prompts are always won, half always lost; the second arm also wins 3 of the lost ones. Resampled
    # unpaired (each arm's prompts drawn on their own), the difference's interval carries the spread between prompts
    # twice; paired, the difference varies only with those 3 prompts.
    first = np.array([[[1.0]] * 24 + [[0.0]] * 24])
    second = first.copy()
    second[0, 24:27] = 1.0
    d = paired_difference(second, first)
    assert d.value == pytest.approx(3 / 48)
    rng = np.random.default_rng(0)
    draws = rng.integers(0, 48, (2, 2000, 48))
    unpaired = second[0, draws[0], 0].mean(axis=1) - first[0, draws[1], 0].mean(axis=1)
    unpaired_width = np.diff(np.percentile(unpaired, [2.5, 97.5]))[0]
    assert d.ci95[0] >= 0.0 and d.ci95[1] - d.ci95[0] < 0.5 * unpaired_width


@pytest.mark.parametrize("bad", [[[[1.0, 0.0], [1.0]]], [[[1.5]]], [[[np.nan]]], [[]], [1.0, 0.0]])
def test_bad_verdicts_are_refused(bad):
    with pytest.raises(ValueError):
        win_rate(bad)


def test_paired_difference_needs_the_same_design():
    with pytest.raises(ValueError, match="same seeds x prompts x samples"):
        paired_difference(np.ones((1, 4, 2)), np.ones((1, 5, 2)))


# -- held-out prompts -------------------------------------------------------------------------------------------

def test_held_out_prompts_are_many_distinct_deterministic_and_not_in_the_training_pool():
    prompts = held_out_prompts(GRIDS["full"].held_out)
    assert len(prompts) == len(set(prompts)) >= 48
    assert prompts == held_out_prompts(48)
    assert overlap(held_out_prompts(82), starter_prompts()) == []


def test_overlap_ignores_case_punctuation_and_spelling():
    assert overlap(["Why do leaves change colour in autumn?", "Why do cats purr?"],
                   {"why do leaves change color in autumn"}) == ["Why do leaves change colour in autumn?"]


@pytest.mark.parametrize("n", [0, 10_000])
def test_held_out_count_out_of_range(n):
    with pytest.raises(ValueError, match="held-out prompts must be"):
        held_out_prompts(n)


# -- grid and round configs ---------------------------------------------------------------------------------------

def test_full_grid_is_what_issue_9_asks():
    g = GRIDS["full"]
    assert g.held_out * g.samples >= 96 and len(g.seeds) >= 3 and len(g.personas) == 2
    assert set(g.arms) == {"offline", "semi-online", "online", "kto"}
    assert g.checkpoints("semi-online") == (16, 32, 64, 128) and g.checkpoints("offline") == (32,)


def test_the_canary_arm_has_its_own_grid_and_leaves_the_full_grids_identity_alone():
    assert GRIDS["full"].settings()["arms"] == ["offline", "semi-online", "online", "kto"]  # grid.json of its dirs
    canary = GRIDS["canary"]
    assert canary.arms == ("canary",) and canary.labels == 64 and canary.every == 16
    assert canary.held_out == GRIDS["full"].held_out and canary.samples == GRIDS["full"].samples  # rows pair
    # the same rounds as the default arm: only how they start and deploy differs
    assert round_config(canary, "canary", 2, 0) == round_config(GRIDS["full"], "semi-online", 2, 0)
    assert plan(canary, {}, set(), {"concise"}, False) == [("concise", "canary", s, [64, 96]) for s in (0, 1, 2)]


def test_canary_settings_are_checked_and_apply_to_the_canary_arm_only(tmp_path):
    canary = replace(GRIDS["canary"], canary={"canary_share": 1.0})
    assert canary.settings()["canary"] == {"canary_share": 1.0}
    for changes, problem in (({"canary_share": 0}, "canary_share must be a number in"),
                             ({"canary_sharing": 1}, "unknown canary setting"),
                             ({"deploy_policy": "immediate"}, "deploy_policy is canary by definition")):
        with pytest.raises(ValueError, match=problem):
            replace(GRIDS["canary"], canary=changes)
    with pytest.raises(ValueError, match="canary arm only"):
        replace(GRIDS["full"], canary={"canary_share": 1.0})
    args = argparse.Namespace(grid="canary", labels=None, every=None, held_out=None, samples=None, seeds=None,
                              random_ties=False, precision=None, round=None, canary=["canary_max_items=0"])
    with pytest.raises(SystemExit, match="canary_max_items must be an integer >= 1"):
        build_grid(args)
    (tmp_path / "grid.json").write_text(json.dumps({k: v for k, v in GRIDS["full"].settings().items()
                                                    if k != "canary"}))
    open_results(tmp_path, GRIDS["full"])  # a directory from before the field resumes


def test_grid_refuses_budgets_that_are_not_whole_rounds():
    with pytest.raises(ValueError, match="multiple of every=16"):
        Grid(personas=("concise",), arms=("offline",), seeds=(0,), held_out=4, samples=1, labels=24, every=16)
    with pytest.raises(ValueError, match="unknown arm 'sft'"):
        Grid(personas=("concise",), arms=("sft",), seeds=(0,), held_out=4, samples=1, labels=16, every=16)


def test_round_configs_define_the_arms_and_are_valid():
    grid = GRIDS["full"]
    configs = {arm: round_config(grid, arm, seed=1, index=0) for arm in grid.arms}
    for config in configs.values():
        RoundConfig.from_dict(config)
    steps = RoundConfig().steps * 2  # two rounds of the retraining arms at 32 labels, every 16
    assert configs["offline"] == {"algorithm": "dpo", "max_label_staleness": None, "steps": steps,
                                  "sync_every": steps, "seed": 1000}
    assert configs["online"]["sync_every"] == 1
    assert configs["semi-online"]["sync_every"] == RoundConfig().sync_every > 1
    assert configs["kto"]["algorithm"] == "kto"


def test_round_overrides_cannot_make_two_arms_alike():
    grid = Grid(personas=("concise",), arms=("offline", "online"), seeds=(0,), held_out=4, samples=1, labels=8,
                every=4, round={"steps": 2, "sync_every": 2})
    assert round_config(grid, "online", 0, 0)["sync_every"] == 1
    offline = round_config(grid, "offline", 0, 0)
    assert offline["steps"] == offline["sync_every"] == 4  # 2 steps x 2 rounds


def test_a_grid_s_rpo_alpha_and_rollout_pairs_are_for_its_dpo_arms_and_kto_still_runs():
    grid = Grid(personas=("concise",), arms=("semi-online", "kto"), seeds=(0,), held_out=4, samples=1, labels=8,
                every=4, round={"rpo_alpha": 0.5, "rollout_pairs": "all"})
    semi = RoundConfig.from_dict(round_config(grid, "semi-online", 0, 0))
    assert (semi.rpo_alpha, semi.rollout_pairs) == (0.5, "all")
    kto = RoundConfig.from_dict(round_config(grid, "kto", 0, 0))  # not a ConfigError mid-grid
    assert (kto.algorithm, kto.rpo_alpha, kto.rollout_pairs) == ("kto", 0.0, "best_worst")


def test_round_overrides_parse_json_values_and_plain_strings():
    assert round_overrides(["steps=2", "loss_type=ipo", "max_label_staleness=null", "learning_rate=1e-4"]) == {
        "steps": 2, "loss_type": "ipo", "max_label_staleness": None, "learning_rate": 1e-4}
    with pytest.raises(SystemExit, match="--round takes KEY=VALUE"):
        round_overrides(["steps"])


def test_unknown_round_knob_is_refused_before_anything_runs():
    args = argparse.Namespace(grid="small", labels=None, every=None, held_out=None, samples=None, seeds=None,
                              round=["max_staleness=2"], random_ties=False, precision=None, canary=None)
    with pytest.raises(SystemExit, match="unknown config key 'max_staleness'"):
        build_grid(args)
    args.round, args.random_ties, args.precision = None, True, "fp32"
    grid = build_grid(args)
    assert grid.ties is False and GRIDS["small"].ties is True
    assert grid.precision == "fp32" and GRIDS["small"].precision == "auto"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'half'"):
        replace(GRIDS["small"], precision="half")


# -- the results directory ------------------------------------------------------------------------------------------

def row(persona="concise", arm="offline", seed=0, labels=32, verdicts=None, prompts=4) -> dict:
    verdicts = verdicts if verdicts is not None else random_verdicts((prompts, 2), seed=seed).tolist()
    return {"key": row_key(persona, arm, seed, labels), "persona": persona, "arm": arm, "seed": seed,
            "labels": labels, "prompts": held_out_prompts(len(verdicts)), "verdicts": verdicts, "words": 30.0,
            "base_words": 40.0, "rounds": [{"status": "succeeded"}], "final_version": 1, "minutes": 1.0,
            "round_defaults": today_round_defaults()}


def legacy(r: dict) -> dict:
    """A row as written before rows recorded the RoundConfig defaults they ran under."""
    return {k: v for k, v in r.items() if k != "round_defaults"}


def test_rows_survive_a_torn_last_line_and_the_next_append_repairs_it(tmp_path):
    append_row(tmp_path, row(seed=0))
    with open(tmp_path / "rows.jsonl", "a", encoding="utf-8") as f:
        f.write('{"key": "concise/offline/seed1/lab')  # a crash in the middle of the second append
    assert list(load_rows(tmp_path)) == ["concise/offline/seed0/labels32"]
    append_row(tmp_path, row(seed=1))
    assert list(load_rows(tmp_path)) == ["concise/offline/seed0/labels32", "concise/offline/seed1/labels32"]
    assert all(json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines())


def test_a_damaged_row_in_the_middle_is_named(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(SystemExit, match="line 2 is not JSON"):
        load_rows(tmp_path)


def test_results_dir_refuses_another_grid(tmp_path):
    open_results(tmp_path, GRIDS["small"])
    open_results(tmp_path, GRIDS["small"])  # the same grid resumes
    with pytest.raises(SystemExit, match="differs in held_out"):
        open_results(tmp_path, replace(GRIDS["small"], held_out=20))
    with pytest.raises(SystemExit, match="differs in ties"):
        open_results(tmp_path, replace(GRIDS["small"], ties=False))


def test_a_results_dir_from_before_ties_resumes_only_with_random_ties_and_fp32(tmp_path):
    """grid.json written before the `ties` and `precision` fields existed: those rows were ranked with ties in random
    order, by a server computing in fp32."""
    settings = GRIDS["full"].settings()
    del settings["ties"], settings["precision"]
    (tmp_path / "grid.json").write_text(json.dumps(settings))
    open_results(tmp_path, replace(GRIDS["full"], ties=False, precision="fp32"))
    with pytest.raises(SystemExit, match="differs in ties"):
        open_results(tmp_path, replace(GRIDS["full"], precision="fp32"))
    with pytest.raises(SystemExit, match="differs in precision"):
        open_results(tmp_path, replace(GRIDS["full"], ties=False))


def test_rerun_plans_only_missing_rows_and_the_curve_reruns_from_zero(tmp_path):
    grid = GRIDS["full"]
    done = {row_key("concise", "offline", 0, 32): {}, row_key("concise", "semi-online", 0, 16): {},
            row_key("concise", "semi-online", 0, 32): {}}
    jobs = plan(grid, done, only={"offline", "semi-online"}, personas={"concise"}, no_curve=False)
    assert ("concise", "semi-online", 0, [64, 128]) in jobs
    assert not any(j[1] == "offline" and j[2] == 0 for j in jobs)
    assert {j[1] for j in jobs} == {"offline", "semi-online"} and {j[0] for j in jobs} == {"concise"}
    assert len(plan(grid, {}, set(), set(), no_curve=False)) == 2 * 3 * 4
    without_curve = plan(grid, done, {"semi-online"}, {"concise"}, no_curve=True)
    assert [j[3] for j in without_curve] == [[32], [32]]  # seeds 1 and 2; seed 0's 32 is done
    assert [j[2] for j in plan(grid, done, {"kto"}, set(), no_curve=False, seeds={2})] == [2, 2]  # two personas


def test_base_answers_are_kept_per_seed_and_checked(tmp_path):
    prompts = held_out_prompts(3)
    assert load_base_answers(tmp_path, 0, prompts, 2) is None
    save_base_answers(tmp_path, 0, prompts, [["a", "b"]] * 3)
    assert load_base_answers(tmp_path, 0, prompts, 2) == [["a", "b"]] * 3
    with pytest.raises(SystemExit, match="other held-out prompts"):
        load_base_answers(tmp_path, 0, held_out_prompts(4), 2)


def test_table_prints_each_row_pooled_rows_differences_and_the_curve_with_n_and_intervals(tmp_path):
    rows = {}
    for seed in (0, 1):
        for arm, labels in (("offline", 32), ("semi-online", 16), ("semi-online", 32)):
            r = row(arm=arm, seed=seed, labels=labels, prompts=6)
            rows[r["key"]] = r
    text = table(rows, 32)
    seed0 = win_rate([rows["concise/offline/seed0/labels32"]["verdicts"]])
    assert f"| offline | 0 | {seed0.value:.2f} | [{seed0.ci95[0]:.2f}, {seed0.ci95[1]:.2f}] | 12 (1 x 6 x 2) |" in text
    pooled = win_rate([rows[f"concise/semi-online/seed{s}/labels32"]["verdicts"] for s in (0, 1)])
    assert f"| **semi-online** | all | **{pooled.value:.2f}** |" in text and "24 (2 x 6 x 2)" in text
    d = paired_difference([rows[f"concise/semi-online/seed{s}/labels32"]["verdicts"] for s in (0, 1)],
                          [rows[f"concise/offline/seed{s}/labels32"]["verdicts"] for s in (0, 1)])
    assert f"| semi-online - offline | {d.value:+.3f} | [{d.ci95[0]:+.3f}, {d.ci95[1]:+.3f}] |" in text
    assert "Learning curve" in text and "| 16 |" in text
    assert "rankings:" not in text  # no settings given
    legacy = {k: v for k, v in replace(GRIDS["full"], round={"steps": 4}).settings().items()
              if k not in ("ties", "precision")}
    (tmp_path / "grid.json").write_text(json.dumps(legacy))  # a results dir from before the ties field
    old = grid_settings(tmp_path)
    assert ("rankings: the personas order answers they score alike at random (--random-ties); precision: fp32; "
            "RoundConfig overrides: steps=4") in table(rows, 32, old)
    assert "the personas tie answers they score alike" in table(rows, 32, GRIDS["full"].settings())



def test_table_lists_each_runs_rounds_with_what_they_trained_on_and_their_held_out_figures():
    r = row(arm="semi-online", seed=1, labels=48)
    heldout = {"value": 0.2143, "ci95": [0.0757, 0.4759], "n": 14}
    r["rounds"] = [
        {"status": "succeeded", "version": 1, "gate_reason": None, "kl_to_reference": 0.34, "reward_heldout_accuracy":
         None, "policy_heldout_accuracy": {"value": 1.0, "ci95": [0.4385, 1.0], "n": 3},
         "data": {"steps": 12, "human_uses": 3, "onpolicy_uses": 39}, "timings_s": {"reward": 52.6, "policy": 120.4,
                                                                                     "eval": 36.9}},
        {"status": "rejected", "version": 2, "gate_reason": "KL 9.1 over max_kl 8", "kl_to_reference": 9.1,
         "reward_heldout_accuracy": heldout, "policy_heldout_accuracy": None, "data": {"steps": 3},
         "timings_s": {"reward": 10.0}},
        {"status": "failed", "version": None, "error": "out of memory"},
        {"status": "succeeded", "version": 4, "gate_reason": None, "kl_to_reference": 7.94,
         "kl_checkpoints": {"kept_step": 9, "steps": 12, "tried": [{"step": 12, "kl_to_reference": 9.31},
                                                                   {"step": 9, "kl_to_reference": 7.94}]}},
    ]
    text = table({r["key"]: r}, 48)
    assert "| v4 | succeeded | - | - | - | - | 7.94 (step 9 of 12 kept; tried 12: 9.3, 9: 7.9) | - |" in text
    assert ("| semi-online | 48 | 1 | v1 | succeeded | 12 | 3 / 39 | - | 1.00 [0.44, 1.00] (3) | 0.34 | 53 / 120 / 37 |"
            in text)
    assert ("| semi-online | 48 | 1 | v2 | rejected: KL 9.1 over max_kl 8 | 3 | - | 0.21 [0.08, 0.48] (14) | - "
            "| 9.10 | 10 |") in text
    assert "| semi-online | 48 | 1 | - | failed | - | - | - | - | - | - |" in text
    old = row()  # a row from before rounds kept their figures
    assert "| offline | 32 | 0 | - | succeeded | - | - | - | - | - | - |" in table({old["key"]: old}, 32)


def test_table_sets_each_canarys_human_decision_beside_the_personas_judgement_of_the_same_versions():
    r = row(arm="canary", seed=2, labels=64)
    persona = [[1.0, 1.0], [1.0, 0.5], [0.0, 1.0], [1.0, 1.0]]  # 0.8125 by hand
    r["canaries"] = [
        {"version": 1, "parent": 0, "decision": "promoted", "comparisons": 68, "win_rate": 0.7647,
         "ci95": [0.6324, 0.8824], "persona_verdicts": persona},
        {"version": 3, "parent": 1, "decision": "pending", "comparisons": 0, "win_rate": None, "ci95": None,
         "persona_verdicts": [[0.0, 0.5]] * 4},
    ]
    r["timeline"] = [{"labels": 16, "canaries": {}}, {"labels": 32, "canaries": {"1": "pending"}},
                     {"labels": 48, "canaries": {"1": "promoted"}}, {"labels": 64, "canaries": {"1": "promoted",
                                                                                                 "3": "pending"}}]
    text = table({r["key"]: r}, 64)
    e = win_rate([persona])
    assert e.value == 0.8125
    assert (f"| 64 | 2 | v1 vs v0 | promoted | 48 | 0.76 [0.63, 0.88] (68) | 0.81 [{e.ci95[0]:.2f}, {e.ci95[1]:.2f}] "
            "(8 (1 x 4 x 2)) |") in text
    assert "| 64 | 2 | v3 vs v1 | pending | - | - (0) | 0.25 " in text
    assert "Canaries" not in table({"x": row(arm="semi-online")}, 32)  # the other arms have none


def test_verdicts_pair_the_jth_answers_and_score_ties_half():
    concise = PERSONAS["concise"]
    prompts = held_out_prompts(2)
    mine = [["Short.", "A much longer answer than the other one here."], ["Same.", "Same."]]
    theirs = [["A longer answer than the first one.", "Short."], ["Same.", "Other."]]
    assert verdicts(concise, prompts, mine, theirs) == [[1.0, 0.0], [0.5, 0.5]]
    with pytest.raises(ValueError):
        verdicts(concise, prompts, mine, theirs[:1])  # a prompt without the other version's answers


def results_dir(root, name: str, rows: list[dict], base: dict[int, list[list[str]]], **grid_changes) -> None:
    directory = root / name
    open_results(directory, replace(GRIDS["small"], held_out=4, **grid_changes))
    for r in rows:
        append_row(directory, r)
    for seed, answers in base.items():
        save_base_answers(directory, seed, held_out_prompts(4), answers)


def test_summary_keeps_a_canary_setting_apart_and_pairs_it_with_the_canary_defaults(tmp_path):
    base = {0: [["a", "b"]] * 4}
    grid = {"arms": ("canary",), "labels": 64, "curve": ()}
    today = {"canary_defaults": today_canary_defaults()}
    defaults = {**row(arm="canary", seed=0, labels=64, verdicts=random_verdicts((4, 2), seed=1).tolist()), **today}
    half = {**row(arm="canary", seed=0, labels=64, verdicts=random_verdicts((4, 2), seed=2).tolist()), **today}
    explicit = {**row(arm="canary", seed=1, labels=64, verdicts=random_verdicts((4, 2), seed=3).tolist()), **today}
    older = {**row(arm="canary", seed=0, labels=64, verdicts=random_verdicts((4, 2), seed=4).tolist()),
             "canary_defaults": {**today_canary_defaults(), "canary_prompts": "untrained"}}  # another default then
    results_dir(tmp_path, "a", [defaults], base, **grid)
    results_dir(tmp_path, "b", [half], base, canary={"canary_share": 0.5}, **grid)
    # a setting given explicitly at today's default value is the defaults
    results_dir(tmp_path, "c", [explicit], {1: [["c", "d"]] * 4}, canary={"canary_share": CanaryConfig().canary_share},
                **grid)
    # a row run under another default shows that default as its setting; one from before rows recorded their
    # defaults ran under LEGACY_CANARY_DEFAULTS, today's too: it pools with the defaults
    results_dir(tmp_path, "d", [older], base, **grid)
    unrecorded = row(arm="canary", seed=2, labels=64, verdicts=random_verdicts((4, 2), seed=5).tolist())
    results_dir(tmp_path, "e", [unrecorded], {2: [["e", "f"]] * 4}, **grid)
    text = summary(tmp_path)
    assert "| 64 | canary | defaults | 4 x 2 | 0, 1, 2 (unrecorded) |" in text and "| a, c, e |" in text, text
    assert "| 64 | canary | canary_share=0.5 | 4 x 2 | 0 (unrecorded) |" in text
    d = paired_difference([half["verdicts"]], [defaults["verdicts"]])
    assert f"| 64 | canary: canary_share=0.5 - defaults | 0 (unrecorded) | {d.value:+.3f} |" in text
    assert LEGACY_CANARY_DEFAULTS["canary_prompts"] == CanaryConfig().canary_prompts
    assert LEGACY_CANARY_DEFAULTS["canary_supersede_items"] != CanaryConfig().canary_supersede_items  # chain only
    assert '| 64 | canary | canary_prompts="untrained" | 4 x 2 | 0 (unrecorded) |' in text
    d = paired_difference([older["verdicts"]], [defaults["verdicts"]])
    assert f'| 64 | canary: canary_prompts="untrained" - defaults | 0 (unrecorded) | {d.value:+.3f} |' in text


def test_a_setting_that_acts_only_under_canary_chain_shows_only_there_and_goes_when_the_chain_is_undone(tmp_path):
    """canary_supersede_items was added with canary_chain's supersede rule: older rows ran without it (0). A run
    without the chain differs in nothing there; one with it shows the old value, and pairs with the defaults."""
    grid = {"arms": ("canary",), "labels": 64, "curve": ()}
    base = {0: [["a", "b"]] * 4}
    plain = row(arm="canary", seed=0, labels=64, verdicts=random_verdicts((4, 2), seed=1).tolist())  # no record
    chained = row(arm="canary", seed=0, labels=64, verdicts=random_verdicts((4, 2), seed=2).tolist())
    today = {**row(arm="canary", seed=0, labels=64, verdicts=random_verdicts((4, 2), seed=3).tolist()),
             "canary_defaults": today_canary_defaults()}
    results_dir(tmp_path, "a", [plain], base, **grid)
    results_dir(tmp_path, "b", [chained], base, canary={"canary_chain": True}, **grid)
    results_dir(tmp_path, "c", [today], base, canary={"canary_chain": True}, **grid)
    text = summary(tmp_path)
    assert "| 64 | canary | defaults | 4 x 2 | 0 (unrecorded) |" in text, text
    assert "| 64 | canary | canary_chain=true, canary_supersede_items=0 | 4 x 2 | 0 (unrecorded) |" in text
    assert "| 64 | canary | canary_chain=true | 4 x 2 | 0 (unrecorded) |" in text
    for first, second, name in ((chained, plain, "canary_chain=true, canary_supersede_items=0 - defaults"),
                                (chained, today, "canary_chain=true, canary_supersede_items=0 - canary_chain=true"),
                                (today, plain, "canary_chain=true - defaults")):
        d = paired_difference([first["verdicts"]], [second["verdicts"]])
        assert f"| 64 | canary: {name} | 0 (unrecorded) | {d.value:+.3f} |" in text, name


def test_summary_sets_the_canarys_human_win_rate_beside_the_personas_on_held_out_prompts(tmp_path):
    """Canary calibration: per setting, decided canaries only, annotators minus persona averaged over canaries."""
    def canary(version: int, decision: str, human: float, persona: list[list[float]]) -> dict:
        return {"version": version, "parent": version - 1, "decision": decision, "win_rate": human,
                "ci95": [human - 0.1, human + 0.1], "comparisons": 64, "persona_verdicts": persona}

    today = {"canary_defaults": today_canary_defaults()}
    grid = {"arms": ("canary",), "labels": 64, "curve": ()}
    first = {**row(arm="canary", seed=0, labels=64), **today,
             "canaries": [canary(1, "promoted", 0.70, [[1.0, 0.0]] * 4),  # persona 0.5: gap +0.20
                          canary(2, "pending", 0.90, [[0.0, 0.0]] * 4)]}  # not decided: left out
    second = {**row(arm="canary", seed=1, labels=64), **today,
              "canaries": [canary(1, "rolled_back", 0.30, [[0.0, 0.0]] * 3 + [[1.0, 1.0]])]}  # 0.25: gap +0.05
    older = {**row(arm="canary", seed=0, labels=64), "canaries": [canary(1, "promoted", 0.8, [[0.5, 0.5]] * 4)],
             "canary_defaults": {**today_canary_defaults(), "canary_prompts": "untrained"}}
    results_dir(tmp_path, "a", [first, second], {0: [["a", "b"]] * 4, 1: [["c", "d"]] * 4}, **grid)
    results_dir(tmp_path, "b", [older], {0: [["a", "b"]] * 4}, **grid)
    text = summary(tmp_path)
    assert "| defaults | 2 | 0.50 | 0.38 | +0.125 | [+0.050, +0.200] |" in text, text
    assert '| canary_prompts="untrained" | 1 | 0.80 | 0.50 | +0.300 | [+0.300, +0.300] |' in text


def test_summary_pools_directories_by_what_they_measure_and_pairs_runs_by_seed_precision_and_base(tmp_path):
    fp32, bf16 = "float32", "float32 weights, bfloat16 autocast"
    base = {0: [["a", "b"]] * 4, 1: [["c", "d"]] * 4}
    semi = [{**row(arm="semi-online", seed=s, verdicts=random_verdicts((4, 2), seed=10 + s).tolist()),
             "precision": p} for s, p in ((0, bf16), (1, fp32))]
    semi_again = {**row(arm="semi-online", seed=0, verdicts=random_verdicts((4, 2), seed=20).tolist()),
                  "precision": fp32}
    offline = [{**row(arm="offline", seed=s), "precision": fp32} for s in (0, 1)]
    tuned = [{**row(arm="semi-online", seed=s, verdicts=random_verdicts((4, 2), seed=30 + s).tolist()),
              "precision": fp32} for s in (0, 1)]
    results_dir(tmp_path, "a", [semi[0], semi[1], offline[0], offline[1]], base)
    results_dir(tmp_path, "b", [semi_again], base)  # the same measurement, another sitting
    # another setting; seed 1's base answers were drawn anew there, so its seed-1 run pairs with nothing
    results_dir(tmp_path, "c", tuned, {0: base[0], 1: [["x", "y"]] * 4}, round={"steps": 4})
    text = summary(tmp_path)

    pooled = win_rate([r["verdicts"] for r in (semi[0], semi_again, semi[1])])  # runs by seed, then precision
    assert (f"| 32 | semi-online | defaults | 4 x 2 | 0 (bf16); 0, 1 (fp32) | {pooled.value:.2f} | "
            f"[{pooled.ci95[0]:.2f}, {pooled.ci95[1]:.2f}] | 24 | a, b |") in text
    steps = win_rate([r["verdicts"] for r in tuned])
    assert f"| 32 | semi-online | steps=4 | 4 x 2 | 0, 1 (fp32) | {steps.value:.2f} |" in text
    # semi-online - offline: seed 0 has two semi-online runs, the fp32 one pairs with offline's fp32 run
    d = paired_difference([semi_again["verdicts"], semi[1]["verdicts"]], [o["verdicts"] for o in offline])
    assert (f"| 32 | semi-online - offline | 0 (fp32), 1 (fp32) | {d.value:+.3f} | "
            f"[{d.ci95[0]:+.3f}, {d.ci95[1]:+.3f}] | 16 |") in text
    # steps=4 - defaults: seed 0 only (seed 1 judged other base answers), against the fp32 run of seed 0
    d = paired_difference([tuned[0]["verdicts"]], [semi_again["verdicts"]])
    assert f"| 32 | steps=4 - defaults | 0 (fp32) | {d.value:+.3f} | [{d.ci95[0]:+.3f}, {d.ci95[1]:+.3f}] | 8 |" in text
    assert "semi-online - offline | 0 (bf16" not in text


def test_summary_pairs_a_seed_judged_twice_with_the_run_that_stopped_at_the_same_budget(tmp_path):
    """A lineage judged along the way (its 32-label checkpoint) and a run that stopped at 32 both measure the
    defaults at 32 labels; against a third run that stopped at 32, the one that did too is the pair."""
    base = {0: [["a", "b"]] * 4}
    bf16 = "float32 weights, bfloat16 autocast"
    stopped = {**row(arm="semi-online", verdicts=random_verdicts((4, 2), seed=1).tolist()), "precision": bf16}
    checkpoint = {**row(arm="semi-online", verdicts=random_verdicts((4, 2), seed=2).tolist()), "precision": bf16}
    other = {**row(arm="offline", verdicts=random_verdicts((4, 2), seed=3).tolist()), "precision": bf16}
    results_dir(tmp_path, "stopped", [stopped, other], base)
    results_dir(tmp_path, "lineage", [checkpoint], base, labels=64)
    text = summary(tmp_path)
    pooled = win_rate([stopped["verdicts"], checkpoint["verdicts"]])
    assert f"| 32 | semi-online | defaults | 4 x 2 | 0, 0 (bf16) | {pooled.value:.2f} |" in text
    d = paired_difference([stopped["verdicts"]], [other["verdicts"]])
    wrong = paired_difference([checkpoint["verdicts"]], [other["verdicts"]])
    assert wrong.value != d.value  # the data tell the two pairings apart
    rows = [line for line in text.splitlines() if line.startswith("| 32 | semi-online - offline |")]
    assert rows == [f"| 32 | semi-online - offline | 0 (bf16) | {d.value:+.3f} | [{d.ci95[0]:+.3f}, {d.ci95[1]:+.3f}] "
                    f"| 8 |"]


def test_summary_pairs_a_run_with_the_candidate_that_stopped_at_the_nearest_budget(tmp_path):
    """Seed 0 has two semi-online runs judged at 32 labels (one stopped there, one went on to 128) and one offline run
    judged at 32 on its way to 64: the run that stopped at 32 is nearer, so it is the pair; with the two candidates
    equally near (48 and 80 around 64 would be), the seed would be left out."""
    base = {0: [["a", "b"]] * 4}
    short, long, offline = ({**row(arm=arm, verdicts=random_verdicts((4, 2), seed=s).tolist()), "precision": "float32"}
                            for arm, s in (("semi-online", 1), ("semi-online", 2), ("offline", 3)))
    results_dir(tmp_path, "short", [short], base)
    results_dir(tmp_path, "long", [long], base, labels=128)
    results_dir(tmp_path, "offline", [offline], base, labels=64)
    text = summary(tmp_path)
    d = paired_difference([short["verdicts"]], [offline["verdicts"]])
    assert d.value != paired_difference([long["verdicts"]], [offline["verdicts"]]).value
    rows = [line for line in text.splitlines() if line.startswith("| 32 | semi-online - offline |")]
    assert rows == [f"| 32 | semi-online - offline | 0 (fp32) | {d.value:+.3f} | [{d.ci95[0]:+.3f}, {d.ci95[1]:+.3f}] "
                    f"| 8 |"]


def test_summary_leaves_out_a_seed_whose_candidates_stopped_equally_near(tmp_path):
    base = {0: [["a", "b"]] * 4}
    runs = [{**row(arm=arm, verdicts=random_verdicts((4, 2), seed=s).tolist()), "precision": "float32"}
            for arm, s in (("semi-online", 1), ("semi-online", 2), ("offline", 3))]
    results_dir(tmp_path, "to48", [runs[0]], base, labels=48)
    results_dir(tmp_path, "to80", [runs[1]], base, labels=80)
    results_dir(tmp_path, "offline", [runs[2]], base, labels=64)
    assert "| 32 | semi-online - offline |" not in summary(tmp_path)


def test_summary_pools_a_float_setting_whichever_way_it_was_written(tmp_path):
    base = {0: [["a", "b"]] * 4}
    runs = [{**row(arm="online", verdicts=random_verdicts((4, 2), seed=s).tolist()), "precision": "float32"}
            for s in (1, 2)]
    results_dir(tmp_path, "float", [runs[0]], base, round={"rpo_alpha": 0.0})
    results_dir(tmp_path, "int", [runs[1]], base, round={"rpo_alpha": 0})  # `--round rpo_alpha=0`
    assert "| 32 | online | rpo_alpha=0.0 | 4 x 2 | 0, 0 (fp32) |" in summary(tmp_path)


def test_summary_compares_an_override_with_the_same_rankings_without_it(tmp_path):
    base = {0: [["a", "b"]] * 4}
    runs = {name: {**row(arm="semi-online", seed=0, verdicts=random_verdicts((4, 2), seed=seed).tolist()),
                   "precision": "float32"} for name, seed in (("ties", 1), ("random", 2), ("random+steps", 3))}
    results_dir(tmp_path, "ties", [runs["ties"]], base)
    results_dir(tmp_path, "random", [runs["random"]], base, ties=False)
    results_dir(tmp_path, "random-steps", [runs["random+steps"]], base, ties=False, round={"steps": 4})
    text = summary(tmp_path)
    own = paired_difference([runs["random+steps"]["verdicts"]], [runs["random"]["verdicts"]])
    assert (f"| 32 | steps=4, random ties - random ties | 0 (fp32) | {own.value:+.3f} | "
            f"[{own.ci95[0]:+.3f}, {own.ci95[1]:+.3f}] | 8 |") in text
    ties = paired_difference([runs["random"]["verdicts"]], [runs["ties"]["verdicts"]])
    assert f"| 32 | random ties - defaults | 0 (fp32) | {ties.value:+.3f} |" in text
    assert "steps=4, random ties - defaults" not in text  # two changes at once are not one comparison


def test_summary_names_the_arm_of_a_setting_difference_outside_the_default_arm(tmp_path):
    base = {0: [["a", "b"]] * 4}
    runs = {(arm, steps): {**row(arm=arm, seed=0, verdicts=random_verdicts((4, 2), seed=seed).tolist()),
                           "precision": "float32"}
            for arm, steps, seed in (("semi-online", None, 1), ("semi-online", 4, 2), ("offline", None, 3),
                                     ("offline", 4, 4))}
    results_dir(tmp_path, "defaults", [runs["semi-online", None], runs["offline", None]], base)
    results_dir(tmp_path, "steps", [runs["semi-online", 4], runs["offline", 4]], base, round={"steps": 4})
    text = summary(tmp_path)
    offline = paired_difference([runs["offline", 4]["verdicts"]], [runs["offline", None]["verdicts"]])
    semi = paired_difference([runs["semi-online", 4]["verdicts"]], [runs["semi-online", None]["verdicts"]])
    assert f"| 32 | offline: steps=4 - defaults | 0 (fp32) | {offline.value:+.3f} |" in text
    assert f"| 32 | steps=4 - defaults | 0 (fp32) | {semi.value:+.3f} |" in text


def test_rows_say_which_round_defaults_they_ran_under_so_a_changed_default_is_not_pooled_as_the_new_one(tmp_path):
    today = today_round_defaults()
    assert today["rollouts_min_reward_accuracy"] == 0.5 and "seed" not in today
    old = legacy(row(arm="semi-online", seed=0))  # written while the guard was off by default (and RPO too)
    assert round_settings(old, {}) == {"rollouts_min_reward_accuracy": None, "rpo_alpha": 0.0}
    assert round_settings(old, {"rollouts_min_reward_accuracy": 0.5, "rpo_alpha": 1}) == {}  # overrides then
    recorded = row(arm="semi-online", seed=0)
    assert round_settings(recorded, {}) == {} and round_settings(recorded, {"steps": 4}) == {"steps": 4}
    assert round_settings({**recorded, "round_defaults": {**today, "beta": 0.2}}, {}) == {"beta": 0.2}

    def run(seed, verdict_seed, **changes):
        verdicts = random_verdicts((4, 2), seed=verdict_seed).tolist()
        return {**row(arm="semi-online", seed=seed, verdicts=verdicts), "precision": "float32", **changes}

    guard, off, now, op25 = legacy(run(0, 1)), legacy(run(0, 2)), run(1, 3), legacy(run(0, 4))
    rpo = {"rpo_alpha": 1}  # the old runs here ran RPO by override, as today's default does
    results_dir(tmp_path, "old-guard", [guard], {0: [["a", "b"]] * 4}, round={"rollouts_min_reward_accuracy": 0.5,
                                                                                **rpo})
    results_dir(tmp_path, "old-defaults", [off], {0: [["a", "b"]] * 4}, round=rpo)
    results_dir(tmp_path, "old-op25", [op25], {0: [["a", "b"]] * 4}, round={"onpolicy_fraction": 0.25, **rpo})
    results_dir(tmp_path, "new-defaults", [now], {1: [["c", "d"]] * 4})
    text = summary(tmp_path)
    pooled = win_rate([guard["verdicts"], now["verdicts"]])
    assert f"| 32 | semi-online | defaults | 4 x 2 | 0, 1 (fp32) | {pooled.value:.2f} |" in text
    assert "| 32 | semi-online | rollouts_min_reward_accuracy=null | 4 x 2 | 0 (fp32) |" in text
    d = paired_difference([off["verdicts"]], [guard["verdicts"]])
    assert f"| 32 | rollouts_min_reward_accuracy=null - defaults | 0 (fp32) | {d.value:+.3f} |" in text
    # two settings differ from today's defaults: each is undone alone (the other group exists for one of them)
    d = paired_difference([op25["verdicts"]], [off["verdicts"]])
    assert (f"| 32 | onpolicy_fraction=0.25, rollouts_min_reward_accuracy=null - rollouts_min_reward_accuracy=null | "
            f"0 (fp32) | {d.value:+.3f} |") in text
    assert "rollouts_min_reward_accuracy=null - defaults | 0 (fp32) | " in text
    assert "onpolicy_fraction=0.25, rollouts_min_reward_accuracy=null - defaults" not in text


def test_rows_recorded_before_rpo_alpha_existed_ran_plain_dpo_and_kto_rows_never_differ_by_it():
    today = today_round_defaults()
    assert today["rpo_alpha"] == 1.0
    before = {k: v for k, v in today.items() if k != "rpo_alpha"}  # recorded before the field existed
    assert round_settings({**row(arm="semi-online"), "round_defaults": before}, {}) == {"rpo_alpha": 0.0}
    assert round_settings({**row(arm="semi-online"), "round_defaults": {**today, "rpo_alpha": 0.0}}, {}) == {
        "rpo_alpha": 0.0}  # recorded while 0 was the default
    assert round_settings({**row(arm="semi-online"), "round_defaults": before}, {"rpo_alpha": 1}) == {}
    # a float setting written as a JSON integer is the same setting as its float (runs of either pool together)
    assert round_settings(row(arm="online"), {"rpo_alpha": 0}) == {"rpo_alpha": 0.0}
    assert json.dumps(round_settings(row(arm="online"), {"rpo_alpha": 0})) == json.dumps(
        round_settings({**row(arm="online"), "round_defaults": before}, {}))
    assert round_settings({**row(arm="kto"), "round_defaults": before}, {}) == {}  # kto rounds run at 0 always
    # a grid's rollout_pairs is for its DPO arms: kto rounds never pair their rollouts (round_config)
    assert round_settings(row(arm="kto"), {"rollout_pairs": "all"}) == {}
    assert round_settings(row(arm="semi-online"), {"rollout_pairs": "all"}) == {"rollout_pairs": "all"}
    assert round_settings(legacy(row(arm="kto")), {}) == {"rollouts_min_reward_accuracy": None}


def test_summary_refuses_to_pool_runs_judged_on_other_prompts_and_says_when_there_is_nothing(tmp_path):
    assert summary(tmp_path) == f"no bench.loop rows under {tmp_path}"
    results_dir(tmp_path, "a", [row(arm="offline", seed=0)], {})
    other = row(arm="offline", seed=1)
    other["prompts"] = [p + "?" for p in other["prompts"]]
    results_dir(tmp_path, "b", [other], {})
    with pytest.raises(SystemExit, match="concise/offline/32 labels: runs judged on different held-out prompts"):
        summary(tmp_path)
    assert "| 32 | offline | defaults | 4 x 2 | 0 (unrecorded) |" in summary(tmp_path / "a")  # one directory alone


def test_rows_record_the_precision_their_rounds_computed_in():
    assert rounds_precision([{"precision": "float32"}, {"precision": "float32"}]) == "float32"
    assert rounds_precision([{"precision": "float32"}, {"precision": "bfloat16"}]) is None
    assert rounds_precision([{"status": "failed"}]) is None


# -- the judge and the leak check against the real server (tiny model) ------------------------------------------------

def test_judge_scores_policy_against_base_answers_in_the_right_direction(boss):
    prompts = held_out_prompts(2)
    base = [["Yes.", "Yes."], [" ".join(["word"] * 500)] * 2]  # unbeatable by a shorter answer / beaten by any
    verdict = judge(boss, PERSONAS["concise"], 0, prompts, base)
    assert verdict["verdicts"][1] == [1.0, 1.0]
    assert all(v in (0.0, 0.5) for v in verdict["verdicts"][0])
    assert len(verdict["answers"]) == 2 and all(len(a) == 2 for a in verdict["answers"])
    assert verdict["base_words"] == pytest.approx((1 + 1 + 500 + 500) / 4)


def test_a_label_on_a_held_out_prompt_stops_the_benchmark(ctx, boss, ann):
    held_out = held_out_prompts(4)
    check_labels_held_out(boss, held_out)  # nothing labelled yet
    prompt_id = ctx.store.prompts.add([held_out[2]]).prompt_ids[0]
    answers = [AnswerRecord(" ".join(["w"] * (i + 1)), i + 1, "eos", -1.0) for i in range(4)]
    ctx.store.items.add(prompt_id, 0, {"k": 4}, answers)
    item = ann.get("/api/items/next").raise_for_status().json()
    assert item["prompt"] == held_out[2]
    ids = [a["answer_id"] for a in item["answers"]]
    ann.post(f"/api/items/{item['item_id']}/ranking", json={"ranking": ids}).raise_for_status()
    with pytest.raises(SystemExit, match="labels were stored on held-out prompts"):
        check_labels_held_out(boss, held_out)
