"""Proportions with their sample size and a 95% interval, and the error rates of a decision rule on them.

Every rate a round reports (held-out pair accuracies, win-rates) is a `Proportion`: value, n and a Wilson score
interval (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it over the normal approximation for small n). The
interval treats the n comparisons as independent; pairs from one ranking, or answers to one prompt, are correlated,
so it is optimistic there, and every figure says so through `interval`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion; `successes` may be fractional (ties counted as half a win).

        p = s/n,  centre = (p + z²/2n) / (1 + z²/n),  half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)
    n = 0 gives the uninformative (0, 1)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Proportion:
    """A rate with its evidence: `value` = successes / n, `ci95` its Wilson interval."""

    value: float | None  # None when n = 0
    n: int
    ci95: tuple[float, float]
    interval: str = "wilson, comparisons treated as independent"

    def to_dict(self) -> dict:
        return {**asdict(self), "ci95": [round(self.ci95[0], 4), round(self.ci95[1], 4)]}


def proportion(successes: float, n: int) -> Proportion:
    return Proportion(successes / n if n else None, n, wilson_interval(successes, n))


def _binomial_pmf(k: int, n: int, p: float) -> float:
    return math.comb(n, k) * p**k * (1 - p) ** (n - k)


def refusal_probability(n: int, true_rate: float, threshold: float) -> float:
    """P(the Wilson upper bound of k/n falls below `threshold`) when k ~ Binomial(n, true_rate): how often a rule
    "refuse when the 95% upper bound < threshold" refuses a version whose true rate is `true_rate`."""
    return sum(_binomial_pmf(k, n, true_rate) for k in range(n + 1) if wilson_interval(k, n)[1] < threshold)
