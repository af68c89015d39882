"""How often the canary's decision rule (app/canary.py, checked after every ranking) promotes, rolls back or hands to
an admin, simulated with the default CanaryConfig (or `--canary KEY=VALUE` changes) at K=4: each ranking orders 2
candidate and 2 serving answers by a latent quality ~ N(mu, 1) (candidate) / N(0, 1) (serving), so its 4
comparisons are correlated as real ones are.

    .venv/bin/python -m bench.canary [--runs 200] [--seed 0] [--canary canary_max_items=32 ...]

Prints, per true per-comparison win-rate, the share of runs promoted / rolled back / undecided (n runs, with a 95%
Wilson interval on the promoted share), how many rankings of canary items a decision took (median and 90th
percentile over the runs that promoted or rolled back), and how many rankings the canary held on average over every
run, the undecided ones included: automatic rounds wait that long (as many labels at `canary_share` 1.0, twice as
many at 0.5, plus the items already sampled when the canary started). ~20 CPU-seconds per 200 runs.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict

import numpy as np

from app.canary import CanaryConfig, decide, win_rate
from bench.loop_results import round_overrides
from bench.loop_summary import canary_settings
from learner.errors import ConfigError
from learner.stats import wilson_interval

SHIFTS = (-0.5, -0.25, 0.0, 0.12, 0.25, 0.5)  # candidate quality shift in serving-answer standard deviations


def one_canary(rng: np.random.Generator, shift: float, config: CanaryConfig) -> tuple[str, int]:
    """(decision, rankings it took)."""
    rankings: list[tuple[int, int]] = []
    while True:
        candidate = rng.normal(shift, 1.0, 2)
        serving = rng.normal(0.0, 1.0, 2)
        rankings.append((int((candidate[:, None] > serving[None, :]).sum()), 4))
        decision = decide(win_rate(rankings), len(rankings), config)
        if decision != "pending":
            return decision, len(rankings)


def true_win_rate(shift: float) -> float:
    """P(candidate answer above a serving answer) = Phi(shift / sqrt 2)."""
    return 0.5 * (1 + math.erf(shift / 2))


def rule(changes: list[str]) -> CanaryConfig:
    """The default CanaryConfig with `KEY=VALUE` changes (VALUE as JSON: 32, 0.55)."""
    try:
        return CanaryConfig().replace(round_overrides(changes, "--canary", "a CanaryConfig field"))
    except ConfigError as exc:
        raise SystemExit(f"--canary: {exc}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--canary", action="append", default=[], metavar="KEY=VALUE",
                        help="a CanaryConfig change, e.g. canary_max_items=32 (repeatable)")
    args = parser.parse_args()
    config = rule(args.canary)
    changed = canary_settings(asdict(config))
    print(f"rule: {config}" + (f" (changed from the defaults: {changed})" if changed else " (the defaults)"))
    print("true win-rate | promoted [95% CI]    | rolled back | undecided | rankings to a decision: median, p90 "
          "| rankings held: mean | n runs")
    for shift in SHIFTS:
        rng = np.random.default_rng(args.seed)
        runs = [one_canary(rng, shift, config) for _ in range(args.runs)]
        outcomes = [decision for decision, _ in runs]
        decided = [n for decision, n in runs if decision in ("promoted", "rolled_back")]
        promoted = outcomes.count("promoted")
        low, high = wilson_interval(promoted, args.runs)
        took = (f"{np.median(decided):.0f}, {np.percentile(decided, 90):.0f} ({len(decided)} decided)" if decided
                else "- (none decided)")
        held = np.mean([n for _, n in runs])
        print(f"{true_win_rate(shift):13.2f} | {promoted / args.runs:.3f} [{low:.3f}, {high:.3f}] | "
              f"{outcomes.count('rolled_back') / args.runs:11.3f} | {outcomes.count('undecided') / args.runs:9.3f} | "
              f"{took} | {held:.1f} | {args.runs}")


if __name__ == "__main__":
    main()
