"""bench/canary.py: the simulation of the canary's decision rule that README's error rates come from."""

import numpy as np
import pytest

from app.canary import CanaryConfig
from bench.canary import one_canary, rule, true_win_rate


def test_a_rule_takes_canary_changes_and_names_a_bad_one():
    assert rule([]) == CanaryConfig()
    assert rule(["canary_max_items=32", "canary_threshold=0.55"]) == CanaryConfig(canary_max_items=32,
                                                                                   canary_threshold=0.55)
    with pytest.raises(SystemExit, match="canary_max_item"):
        rule(["canary_max_item=32"])
    with pytest.raises(SystemExit, match="canary_max_items must be an integer >= 1"):
        rule(["canary_max_items=0"])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        rule(["canary_max_items"])


def test_a_canary_that_cannot_decide_holds_the_whole_item_budget():
    # 4 comparisons a ranking: 16 rankings give 64, below the minimum, so only the item budget ends it
    config = CanaryConfig(canary_min_comparisons=65, canary_max_items=16)
    rng = np.random.default_rng(0)
    assert {one_canary(rng, 0.5, config) for _ in range(5)} == {("undecided", 16)}


def test_a_clearly_better_canary_is_promoted_and_a_clearly_worse_one_rolled_back():
    config = CanaryConfig()
    rng = np.random.default_rng(0)
    better = [one_canary(rng, 2.0, config) for _ in range(20)]
    worse = [one_canary(rng, -2.0, config) for _ in range(20)]
    assert {d for d, _ in better} == {"promoted"} and {d for d, _ in worse} == {"rolled_back"}
    # no decision before canary_min_comparisons (64 = 16 rankings of 4)
    assert min(n for _, n in better + worse) == 16
    assert true_win_rate(0.0) == 0.5 and round(true_win_rate(2.0), 2) == 0.92
