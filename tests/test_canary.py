"""The canary's statistics (app/canary.py) against hand values and a direct numpy computation, and its settings."""

from __future__ import annotations

import numpy as np
import pytest

from app.canary import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CanaryConfig, WinRate, decide, should_mix, win_rate
from learner.errors import ConfigError


def test_degenerate_rankings_give_a_point_interval():
    assert win_rate([]) == WinRate(0, 0, None, None)
    # Every resample of identical rankings is the same ranking again.
    assert win_rate([(3, 4)] * 10) == WinRate(10, 40, 0.75, (0.75, 0.75))
    assert win_rate([(4, 4)] * 5).ci95 == (1.0, 1.0)
    assert win_rate([(0, 4)]).ci95 == (0.0, 0.0)


def test_two_opposite_rankings_by_hand():
    # Resamples of {win 4/4, lose 0/4}: rate 1, 0.5, 0 with chances 1/4, 1/2, 1/4, so the 2.5th percentile is 0 and
    # the 97.5th is 1 (with 2000 resamples each end holds ~500 of them, far past 50).
    stats = win_rate([(4, 4), (0, 4)])
    assert (stats.rankings, stats.comparisons, stats.win_rate, stats.ci95) == (2, 8, 0.5, (0.0, 1.0))


def test_the_interval_is_a_percentile_bootstrap_over_rankings_with_a_fixed_seed():
    rankings = [(4, 4), (3, 4), (1, 4), (2, 4), (4, 4), (0, 4), (3, 4), (2, 4), (3, 3), (1, 2)]
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    rates = []
    for _ in range(BOOTSTRAP_RESAMPLES):  # one resample at a time, written out
        picks = rng.integers(0, len(rankings), size=len(rankings))
        rates.append(sum(rankings[i][0] for i in picks) / sum(rankings[i][1] for i in picks))
    expected = (np.percentile(rates, 2.5), np.percentile(rates, 97.5))
    stats = win_rate(rankings)
    assert stats.win_rate == pytest.approx(23 / 37)
    assert stats.ci95 == pytest.approx(expected, abs=1e-12)
    assert win_rate(rankings) == stats  # reproducible: same rankings, same interval
    assert win_rate(rankings, seed=BOOTSTRAP_SEED + 1).ci95 != stats.ci95  # the seed is what fixes it
    low, high = stats.ci95
    assert low < stats.win_rate < high


def test_resampling_rankings_is_wider_than_resampling_comparisons():
    # 20 rankings that are all-or-nothing (4/4 or 0/4): the comparisons inside one ranking agree completely, so the
    # effective sample is 20 rankings, not 80 comparisons; an interval over comparisons would be about half as wide.
    rankings = [(4, 4)] * 12 + [(0, 4)] * 8
    low, high = win_rate(rankings).ci95
    flat = [(1, 1)] * 48 + [(0, 1)] * 32
    flat_low, flat_high = win_rate(flat).ci95
    assert high - low > 1.6 * (flat_high - flat_low)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="0 <= wins <= comparisons"):
        win_rate([(5, 4)])
    with pytest.raises(ValueError, match="comparisons > 0"):
        win_rate([(0, 0)])


def test_decision_rule():
    config = CanaryConfig(canary_min_comparisons=8, canary_max_items=5, canary_threshold=0.5)
    assert decide(WinRate(2, 8, 0.9, (0.6, 1.0)), 2, config) == "promoted"
    assert decide(WinRate(2, 8, 0.1, (0.0, 0.4)), 2, config) == "rolled_back"
    assert decide(WinRate(1, 4, 1.0, (1.0, 1.0)), 1, config) == "pending"  # too few comparisons for any call
    assert decide(WinRate(2, 8, 0.5, (0.3, 0.7)), 4, config) == "pending"
    assert decide(WinRate(2, 8, 0.5, (0.3, 0.7)), 5, config) == "undecided"  # the item budget is spent
    assert decide(WinRate(2, 8, 0.75, (0.5, 1.0)), 2, config) == "pending"  # the bound must clear, not touch


def test_mixing_keeps_the_share():
    mixed = total = 0
    for _ in range(100):
        if should_mix(mixed, total, 0.25):
            mixed += 1
        total += 1
    assert mixed == 25
    assert should_mix(0, 0, 1.0) and should_mix(10, 10, 1.0)
    assert [should_mix(m, t, 0.5) for m, t in [(0, 0), (1, 1), (1, 2), (2, 3)]] == [True, False, True, False]


def test_config_defaults_validation_and_settings_round_trip():
    config = CanaryConfig()
    assert (config.deploy_policy, config.canary_share, config.canary_threshold) == ("canary", 1.0, 0.5)
    assert CanaryConfig.from_settings(config.to_settings()) == config
    assert CanaryConfig.from_settings({"canary_max_items": "7", "other": "x"}).canary_max_items == 7
    # A bool is stored as str(True): "False" must read back False (bool("False") is True).
    chained = config.replace({"canary_chain": True})
    assert CanaryConfig.from_settings(chained.to_settings()) == chained and not config.canary_chain
    assert CanaryConfig.from_settings({"canary_chain": "False"}).canary_chain is False
    with pytest.raises(ValueError, match="not true or false"):
        CanaryConfig.from_settings({"canary_chain": "maybe"})
    assert config.replace({"canary_share": 0.25}).canary_share == 0.25
    for bad, message in [({"deploy_policy": "later"}, "deploy_policy must be one of canary, immediate"),
                         ({"canary_share": 0}, r"canary_share must be a number in \(0, 1\], got 0"),
                         ({"canary_threshold": 1.0}, r"canary_threshold must be a number in \(0, 1\)"),
                         ({"canary_min_comparisons": 2.5}, "canary_min_comparisons must be an integer >= 1"),
                         ({"canary_max_items": True}, "canary_max_items must be an integer >= 1"),
                         ({"canary_chain": 1}, "canary_chain must be true or false, got 1"),
                         ({"canary_sare": 0.2}, "unknown canary setting"),
                         ({"canary_share": float("nan")}, "canary_share must be a number")]:
        with pytest.raises(ConfigError, match=message):
            config.replace(bad)
