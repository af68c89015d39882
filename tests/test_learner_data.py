"""What each step learns from (learner/data.py) and the intervals every figure carries (learner/stats.py)."""

from collections import Counter

import pytest

from learner.data import (
    OnPolicyStream,
    even_chunks,
    human_plan,
    onpolicy_count,
    policy_steps,
    reward_batches,
    rollout_prompt_count,
)
from learner.stats import proportion, refusal_probability, wilson_interval


def test_human_labels_are_seen_exactly_human_epochs_times_in_whole_rankings():
    groups = [f"item{i // 3}" for i in range(21)]  # 7 rankings x 3 pairs
    plan = human_plan(groups, epochs=2, steps=5, seed=0)
    assert len(plan) == 5 and sorted(len(c) for c in plan) == [8, 8, 8, 9, 9]  # 42 uses cut evenly
    assert Counter(i for chunk in plan for i in chunk) == {i: 2 for i in range(21)}
    order = [groups[i] for chunk in plan for i in chunk]
    runs = [g for k, g in enumerate(order) if k == 0 or order[k - 1] != g]
    assert len(runs) == 14  # each epoch keeps a ranking's pairs together: 7 runs per epoch
    assert human_plan(groups, 2, 5, seed=0) == plan and human_plan(groups, 2, 5, seed=1) != plan


def test_a_round_with_fewer_human_examples_than_steps_fills_them_with_rollouts_only_when_asked():
    assert policy_steps(12, human_uses=3, minimum=1, rollouts=True, fill=True) == 12  # 9 steps all on-policy
    assert policy_steps(12, human_uses=3, minimum=1, rollouts=True, fill=False) == 3  # a human example every step
    assert policy_steps(12, human_uses=30, minimum=1, rollouts=True, fill=False) == 12
    assert policy_steps(12, human_uses=0, minimum=1, rollouts=True, fill=False) == 12  # no labels: on-policy only
    assert policy_steps(12, human_uses=7, minimum=2, rollouts=False, fill=True) == 3  # KTO without rollouts: pairs
    assert policy_steps(12, human_uses=0, minimum=1, rollouts=False, fill=True) == 0


def test_ranks_cut_one_plan_between_them():
    groups = [f"g{i}" for i in range(16)]
    ranks = [human_plan(groups, 1, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(4):
        assert not set(ranks[0][step]) & set(ranks[1][step])
    assert sorted(i for r in ranks for chunk in r for i in chunk) == list(range(16))


def test_onpolicy_share_of_a_step():
    assert onpolicy_count(human=6, fraction=0.5, batch_size=4) == 6
    assert onpolicy_count(human=6, fraction=0.25, batch_size=4) == 2
    assert onpolicy_count(human=6, fraction=0.0, batch_size=4) == 0
    assert onpolicy_count(human=0, fraction=0.5, batch_size=4) == 4  # no labels: the batch is all on-policy
    assert [len(c) for c in even_chunks(list(range(7)), 3)] == [2, 2, 3]


def stream(sync_every: int) -> tuple[OnPolicyStream, list[int]]:
    calls: list[int] = []

    def regenerate(step: int) -> list[str]:
        calls.append(step)
        return [f"s{step}-{k}" for k in range(3)]

    return OnPolicyStream(regenerate, sync_every, seed=0), calls


def test_sync_every_decides_what_each_step_learns_from():
    online, calls = stream(sync_every=1)
    for step in range(4):
        assert {e.split("-")[0] for e in online.take(step, 2)} == {f"s{step}"}  # fresh answers every step
    assert calls == [0, 1, 2, 3]
    offline, calls = stream(sync_every=100)
    seen = [offline.take(step, 2) for step in range(4)]
    assert calls == [0]  # generated once, before the first step
    assert all(len(set(batch)) == 2 for batch in seen)  # no example twice within a step
    assert offline.stats() == {"examples": 3, "uses": 8, "mean_uses_per_example": 2.667}
    semi, calls = stream(sync_every=2)
    for step in range(5):
        semi.take(step, 1)
    assert calls == [0, 2, 4]


def test_a_regeneration_is_large_enough_that_no_example_serves_more_than_max_uses_steps():
    per_step = [5] * 24  # 24 steps needing 5 on-policy pairs each
    # semi-online (every 4 steps): one step's need already keeps the reuse at 4
    assert rollout_prompt_count(4, per_step, sync_every=4, max_uses=4) == 5
    # offline (one window of 24 steps = 120 uses): 30 prompts, not 5 pairs repeated 24 times
    assert rollout_prompt_count(4, per_step, sync_every=24, max_uses=4) == 30
    assert rollout_prompt_count(4, per_step, sync_every=24, max_uses=1) == 120  # every use a distinct pair
    assert rollout_prompt_count(4, per_step, sync_every=1, max_uses=4) == 5  # online: one step's need
    assert rollout_prompt_count(8, [1, 1], sync_every=2, max_uses=4) == 8  # rollout_prompts is the floor
    assert rollout_prompt_count(4, [0, 0], sync_every=2, max_uses=4) == 4  # no on-policy share
    assert rollout_prompt_count(4, [3, 9, 2], sync_every=2, max_uses=2) == 9  # the largest window (12) and step (9)
    # Through the stream: offline with a regeneration that size uses each example at most max_uses times.
    made = []

    def regenerate(step: int) -> list[str]:
        made.append(step)
        return [f"e{k}" for k in range(rollout_prompt_count(4, per_step, 24, 4))]

    offline = OnPolicyStream(regenerate, 24, seed=0)
    uses = Counter(e for step in range(24) for e in offline.take(step, 5))
    assert made == [0] and max(uses.values()) == 4 and sum(uses.values()) == 120


def test_ranks_draw_distinct_reward_model_batches():
    per_rank = [reward_batches(n_items=12, batch_items=2, steps=9, seed=5, rank=r, world_size=3) for r in range(3)]
    for step in range(9):
        batches = [set(per_rank[r][step]) for r in range(3)]
        assert all(len(b) == 2 for b in batches)
        assert not (batches[0] & batches[1] or batches[0] & batches[2] or batches[1] & batches[2])
    # Epoch order: 3 ranks x 2 items x 9 steps = 54 draws = 4.5 epochs of 12, so every item is drawn 4 or 5 times.
    counts = Counter(i for r in per_rank for batch in r for i in batch)
    assert set(counts) == set(range(12)) and set(counts.values()) <= {4, 5}
    single = reward_batches(n_items=1, batch_items=2, steps=2, seed=0)
    assert single == [[0], [0]]


def test_wilson_interval_matches_hand_values():
    # p = 0.5, n = 8: centre 0.5, half = 1.96 sqrt(0.25/8 + 1.96²/256) / (1 + 1.96²/8) = 0.3184...
    lo, hi = wilson_interval(4, 8)
    assert (lo, hi) == (pytest.approx(0.2152, abs=1e-4), pytest.approx(0.7848, abs=1e-4))
    lo, hi = wilson_interval(0, 10)  # no successes: [0, z²/(n + z²)]
    assert lo == 0 and hi == pytest.approx(1.959964**2 / (10 + 1.959964**2), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    figure = proportion(6.5, 10).to_dict()
    assert figure["value"] == 0.65 and figure["n"] == 10 and figure["ci95"][0] < 0.65 < figure["ci95"][1]
    assert "independent" in figure["interval"]


def test_the_gate_rule_error_rates_are_exact_binomial_sums():
    # n = 8, threshold 0.4: only k = 0 has an upper bound below 0.4 (k = 1: 0.47), so P(refuse) = (1 - p)^8.
    assert wilson_interval(0, 8)[1] < 0.4 < wilson_interval(1, 8)[1]
    assert refusal_probability(8, 0.4, 0.4) == pytest.approx(0.6**8)
    assert refusal_probability(8, 0.25, 0.4) == pytest.approx(0.75**8)
