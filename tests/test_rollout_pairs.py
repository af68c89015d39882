"""`rollout_pairs`: which DPO pairs a prompt's rollouts give (best vs worst, or every pair the judge orders), how a
regeneration is sized for them, and that a step takes a prompt's pairs together (their answers share one pass)."""

import math
from collections import Counter

import pytest

from learner.config import RoundConfig
from learner.data import OnPolicyStream, rollout_prompt_count
from learner.errors import ConfigError
from learner.rollouts import Rollout, best_vs_worst, examples_per_prompt, ordered_pairs
from learner.round import run_round
from tests.test_round import TINY, write_snapshot


def rollouts(*texts: str) -> list[Rollout]:
    return [Rollout("q", t, 3, "length" if t.endswith("...") else "eos") for t in texts]


def test_every_ordered_pair_widest_margin_first_ties_and_repeated_texts_dropped():
    answers = rollouts("a", "b...", "c", "d", "b...")  # "b..." sampled twice: one answer
    scores = [0.1, 0.9, 0.5, 0.5, 0.9]
    pairs = ordered_pairs("q", answers, scores)
    # c and d tie (no preference); the widest margin (best vs worst, as best_vs_worst gives it) first.
    assert [(p.chosen, p.rejected) for p in pairs] == [("b...", "a"), ("b...", "c"), ("b...", "d"), ("c", "a"),
                                                      ("d", "a")]
    assert [(p.chosen, p.rejected) for p in best_vs_worst("q", answers, scores)] == [("b...", "a")]
    assert all(p.group == "onpolicy:q" and p.source == "onpolicy" for p in pairs)
    assert (pairs[0].chosen_ended, pairs[0].rejected_ended, pairs[3].chosen_ended) == (False, True, True)
    four = ordered_pairs("q", rollouts("w", "x", "y", "z"), [1.0, 4.0, 2.0, 3.0])
    assert len(four) == 6 == examples_per_prompt("dpo", "all", 4)  # what a human ranking of 4 gives
    rank = {"x": 4.0, "z": 3.0, "y": 2.0, "w": 1.0}
    assert all(rank[p.chosen] > rank[p.rejected] for p in four) and (four[0].chosen, four[0].rejected) == ("x", "w")
    assert examples_per_prompt("dpo", "best_worst", 4) == 1 and examples_per_prompt("kto", "all", 4) == 1


def test_a_regeneration_needs_fewer_prompts_when_each_gives_several_pairs():
    per_step = [12] * 12
    assert rollout_prompt_count(4, per_step, sync_every=4, max_uses=4) == 12  # one pair a prompt
    assert rollout_prompt_count(4, per_step, sync_every=4, max_uses=4, per_prompt=6) == 4  # 2 needed, 4 the floor
    assert rollout_prompt_count(1, per_step, sync_every=4, max_uses=4, per_prompt=6) == 2
    assert rollout_prompt_count(1, per_step, sync_every=12, max_uses=4, per_prompt=6) == 6  # 144 uses / 4 / 6


def grouped(examples: list[str], group) -> list[list[str]]:
    stream = OnPolicyStream(lambda step: examples if step == 0 else [], sync_every=100, seed=3, group=group)
    return [stream.take(step, 3) for step in range(6)]


def test_a_step_takes_a_prompts_pairs_together_and_single_example_groups_shuffle_as_before():
    examples = [f"p{g}-{k}" for g in range(4) for k in range(3)]
    steps = grouped(examples, group=lambda e: e.split("-")[0])
    assert all(len({e.split("-")[0] for e in batch}) == 1 for batch in steps)  # one whole group a step
    assert Counter(e for batch in steps for e in batch) == Counter({e: 1 for e in examples} | {
        e: 2 for batch in steps[4:] for e in batch})  # every group once before any repeats
    assert grouped(examples, group=lambda e: e) == grouped(examples, group=None)


def test_config_takes_rollout_pairs_for_dpo_only():
    assert RoundConfig().rollout_pairs == "best_worst"
    with pytest.raises(ConfigError, match="rollout_pairs must be one of best_worst, all, got 'some'"):
        RoundConfig(rollout_pairs="some")
    with pytest.raises(ConfigError, match="rollout_pairs 'all' applies to dpo only"):
        RoundConfig(algorithm="kto", rollout_pairs="all")


def test_a_round_with_every_pair_trains_on_several_pairs_a_prompt(tmp_path, tiny_model_dir):
    snapshot = write_snapshot(tmp_path / "snapshot")
    metrics = {}
    for pairs in ("best_worst", "all"):
        config = RoundConfig.from_dict(dict(TINY, rollout_pairs=pairs, rollout_prompts=1))
        metrics[pairs] = run_round(snapshot, tiny_model_dir, None, tmp_path / pairs, config)
    best, every = metrics["best_worst"]["data"]["onpolicy"], metrics["all"]["data"]["onpolicy"]
    assert best["examples"] <= best["regenerations"] * best["prompts_per_regeneration"]  # one pair a prompt at most
    assert every["examples"] > every["regenerations"] * every["prompts_per_regeneration"]  # up to 3 of 3 answers
    assert every["prompts_per_regeneration"] <= best["prompts_per_regeneration"]
    for m in metrics.values():
        assert m["status"] == "candidate" and m["data"]["onpolicy_uses"] > 0
        last = m["history"][-1]  # it trained: DPO's part of the loss (less RPO's NLL) has left log 2
        assert last["loss"] - config.rpo_alpha * last["nll_chosen"] != pytest.approx(math.log(2), abs=1e-4)
