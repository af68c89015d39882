"""The blind canary's statistics: the candidate's human win-rate against the serving version, its 95% interval, and
the rule that promotes it, rolls it back or hands it to an admin. Pure functions over counts: no store, no model.

A canary item holds K/2 answers from the candidate and K/2 from the serving version (versions hidden, positions
shuffled). One ranking of it gives (K/2)^2 comparisons, candidate answer vs serving answer; the candidate wins one
when the annotator ranked its answer higher. Comparisons from one ranking share an annotator, a prompt and a mood, so
they are not independent: the interval is a percentile bootstrap that resamples RANKINGS (the cluster), not
comparisons, and computes the pooled win-rate sum(wins) / sum(comparisons) of each resample (Efron & Tibshirani,
"An Introduction to the Bootstrap", ch. 13, percentile intervals; resampling clusters as in Field & Welsh 2007).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from learner.errors import ConfigError
from storage import is_number

DEPLOY_POLICIES = ("canary", "immediate")
CANARY_PROMPTS = ("untrained", "any")
DECISIONS = ("pending", "promoted", "rolled_back", "undecided")
BOOTSTRAP_RESAMPLES = 2000  # the 2.5% tail then holds 50 resamples: the bounds move < 0.01 between seeds at n >= 16
BOOTSTRAP_SEED = 9  # fixed: the same rankings always give the same interval, so a decision can be reproduced


@dataclass(frozen=True)
class CanaryConfig:
    """How a candidate that passed the automatic gate reaches annotators (stored in the settings table; Admin and
    PATCH /api/settings change it)."""

    # Humans judge a version before it serves everyone: the gate's reward model was trained on the same labels.
    deploy_policy: str = "canary"
    # Every new item carries the canary while it is judged: each still holds K/2 answers from the serving version, so
    # its on-policy labels keep coming, and a decision takes half the labels it takes at 0.5. Measured in the loop
    # (bench/loop.py --grid canary, concise, seed 1, bf16): at 0.5 the first canary was still pending at 64 labels and
    # 0.56 [0.46, 0.65] vs base served at 96; at 1.0 v1 was promoted by 48 labels and v2 by 80, 0.94 [0.89, 0.98] at 96.
    canary_share: float = 1.0
    # 64 comparisons = 16 rankings at K=4: below ~16 clusters a percentile bootstrap interval is too narrow.
    canary_min_comparisons: int = 64
    # 60 ranked canary items (~240 comparisons at K=4) bound the interval's half-width to ~0.08 for a typical
    # per-ranking spread: a version no clearer than that is handed to an admin rather than tested forever.
    canary_max_items: int = 60
    # Better than the serving version = wins more than half of the head-to-head comparisons.
    canary_threshold: float = 0.5
    # True: a round started while a canary is judged trains from the canary and waits as a candidate; promoted, the
    # canary hands over to it at once; rolled back, it goes too (app/deployments.py). False: automatic rounds wait for
    # the decision. Why it may help: deployed at once the loop served 0.93 at 64 `concise` labels, under the canary
    # 0.56. Measured (bench.loop --grid canary, concise seeds 0-2, one run each) against the defaults: before
    # canary_supersede_items +0.069 [-0.115, +0.299] at 64 labels, -0.144 [-0.396, +0.229] at 96; with it +0.188
    # [-0.078, +0.443] and +0.120 [-0.130, +0.422] (n = 288; ahead on two seeds, behind on one): not shown, so off.
    canary_chain: bool = False
    # Under canary_chain: a canary still pending after this many ranked items gives way to the newest version trained
    # from it (judged against the serving version instead; the canary ends undecided, a candidate). A marginal canary
    # otherwise holds that version, and the automatic rounds, to canary_max_items: in the loop (concise seeds 0-1) a
    # marginal v1 held its child 48-64 labels. 30, half of canary_max_items: by then a candidate clearly better than
    # the serving one (true win-rate 0.64) is promoted in 91% of simulated runs, a clearly worse one (0.36) rolled
    # back in 62% (bench/canary.py's model, 200 runs each). 0 = never.
    canary_supersede_items: int = 30
    # "untrained": canary items ask prompts that neither the canary nor the serving version (nor any version before
    # them) trained on: the eval and held-out prompts of their rounds' split, by a hash of the prompt text. "any" (the
    # default): the least-sampled prompts, as other items. Measured in the loop (bench/loop.py --grid canary, concise
    # seed 1): "untrained" put all 34 canary items on untrained prompts and still promoted v1 at 0.64 [0.52, 0.75]
    # where the persona gives 0.45 [0.35, 0.54] on its held-out prompts (so in-sample items are not what made the
    # annotators' verdicts run high), and as those labels train nothing the loop served 0.45 at 96 labels against
    # 0.94 with "any" (paired -0.484 [-0.589, -0.380], n = 96; docs/benchmarks.md).
    canary_prompts: str = "any"

    def __post_init__(self) -> None:
        checks = {
            "deploy_policy": (self.deploy_policy in DEPLOY_POLICIES, f"one of {', '.join(DEPLOY_POLICIES)}"),
            "canary_share": (is_number(self.canary_share) and 0 < self.canary_share <= 1, "a number in (0, 1]"),
            "canary_min_comparisons": (_whole(self.canary_min_comparisons) and self.canary_min_comparisons >= 1,
                                       "an integer >= 1"),
            "canary_max_items": (_whole(self.canary_max_items) and self.canary_max_items >= 1, "an integer >= 1"),
            "canary_threshold": (is_number(self.canary_threshold) and 0 < self.canary_threshold < 1,
                                 "a number in (0, 1)"),
            "canary_chain": (isinstance(self.canary_chain, bool), "true or false"),
            "canary_supersede_items": (_whole(self.canary_supersede_items) and self.canary_supersede_items >= 0,
                                       "an integer >= 0"),
            "canary_prompts": (self.canary_prompts in CANARY_PROMPTS, f"one of {', '.join(CANARY_PROMPTS)}"),
        }
        for name, (ok, what) in checks.items():
            if not ok:
                raise ConfigError(f"{name} must be {what}, got {getattr(self, name)!r}")

    @classmethod
    def from_settings(cls, stored: Mapping[str, str]) -> CanaryConfig:
        """The config from settings-table strings; keys that are not stored keep their defaults."""
        values = {}
        for f in fields(cls):
            if stored.get(f.name) is not None:
                kind = type(getattr(cls(), f.name))
                values[f.name] = parse_stored(kind, stored[f.name])
        return cls(**values)

    def replace(self, changes: Mapping[str, object]) -> CanaryConfig:
        """A validated copy with `changes` (unknown keys are a ConfigError naming them)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown canary setting(s): {', '.join(sorted(unknown))}")
        return CanaryConfig(**{**asdict(self), **changes})

    def to_settings(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class WinRate:
    """The candidate's win-rate over its comparisons with the serving version, with a 95% bootstrap interval."""

    rankings: int  # clusters: rankings of canary items
    comparisons: int  # candidate-vs-serving answer pairs in those rankings
    win_rate: float | None  # sum(wins) / sum(comparisons); None with no comparison yet
    ci95: tuple[float, float] | None


def win_rate(rankings: Sequence[tuple[int, int]], resamples: int = BOOTSTRAP_RESAMPLES,
             seed: int = BOOTSTRAP_SEED) -> WinRate:
    """`rankings`: one (wins, comparisons) per ranking, in a fixed order (ranking id), comparisons > 0.

    Point estimate: sum(wins) / sum(comparisons). Interval: draw `resamples` sets of len(rankings) rankings with
    replacement (indices `rng.integers(0, n, size=(resamples, n))`, rng = numpy's default_rng(seed)), take each set's
    pooled win-rate, and report its 2.5th and 97.5th percentiles (numpy's default linear interpolation)."""
    if not rankings:
        return WinRate(0, 0, None, None)
    wins = np.array([w for w, _ in rankings], dtype=np.float64)
    counts = np.array([n for _, n in rankings], dtype=np.float64)
    if (counts <= 0).any() or (wins < 0).any() or (wins > counts).any():
        raise ValueError("each ranking needs 0 <= wins <= comparisons and comparisons > 0")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(rankings), size=(resamples, len(rankings)))
    rates = wins[picks].sum(axis=1) / counts[picks].sum(axis=1)
    low, high = np.percentile(rates, [2.5, 97.5])
    return WinRate(len(rankings), int(counts.sum()), float(wins.sum() / counts.sum()), (float(low), float(high)))


def decide(stats: WinRate, items_ranked: int, config: CanaryConfig) -> str:
    """"promoted" when, after at least canary_min_comparisons, the interval's lower bound is above the threshold;
    "rolled_back" when (after as many) its upper bound is below it; "undecided" once canary_max_items canary items
    were ranked without either; "pending" otherwise.

    The rule is checked after every ranking, which is repeated testing: the minimum number of comparisons and the
    item budget limit how often a candidate no better than the serving version is promoted by chance, but the rate
    is above the 2.5% of a single look (README states the simulated rates)."""
    if stats.comparisons >= config.canary_min_comparisons and stats.ci95 is not None:
        low, high = stats.ci95
        if low > config.canary_threshold:
            return "promoted"
        if high < config.canary_threshold:
            return "rolled_back"
    if items_ranked >= config.canary_max_items:
        return "undecided"
    return "pending"


def should_mix(canary_items: int, items_since_start: int, share: float) -> bool:
    """Whether the next sampled item should be a canary item: keeps canary items at `share` of the items sampled
    since the canary started, deterministically (share 0.5 alternates), so a restart continues the same schedule."""
    return canary_items < share * (items_since_start + 1)


def parse_stored(kind: type, text: str):
    """A scalar setting as the settings table stores it (`str(value)`), read back as `kind`: int, float and str by
    their constructors; bool from "True" / "False" (bool("False") is True). ValueError for what does not parse."""
    if kind is not bool:
        return kind(text)
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise ValueError(f"not true or false: {text!r}")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
