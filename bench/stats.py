"""Win-rates of the learning benchmark with 95% intervals that respect how the judged pairs were drawn.

A judged pair is one answer of the trained policy and one of the base model to the same held-out prompt (sample j of
prompt p); the persona's verdict on it is 1 (policy wins), 0.5 (tie) or 0 (base wins). Pairs of one prompt are
correlated (an easy prompt is easy for both samples), and so are all the pairs of one training run (one seed), so
neither pairs nor prompts are independent draws. The interval is a percentile bootstrap (Efron & Tibshirani, "An
Introduction to the Bootstrap", ch. 13) over the crossed design seeds x prompts: each resample draws the prompts with
replacement and, independently, the seeds with replacement, and takes the mean verdict of the cells it picked (Owen
2007, "The pigeonhole bootstrap", Ann. Appl. Stat. 1(2): resampling rows and columns independently is the
conservative choice for crossed random effects). With one seed it is the plain cluster bootstrap over prompts, the
same interval as `app.canary.win_rate` gives for (wins, comparisons) per prompt (a test checks it).

A difference between two arms is PAIRED: both arms are judged on the same held-out prompts and samples under the same
seeds, so each resample draws one set of prompts and seeds and takes the difference of the two arms' means on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000  # the 2.5% tail holds 50 resamples: the bounds move < 0.01 between bootstrap seeds at 48 prompts
BOOTSTRAP_SEED = 9  # fixed, as the canary's: the same verdicts always print the same interval


@dataclass(frozen=True)
class Estimate:
    """A mean verdict (or a paired difference of two) with its 95% percentile-bootstrap interval."""

    value: float
    ci95: tuple[float, float]
    n: int  # judged pairs behind the figure (seeds x prompts x samples)
    prompts: int  # clusters resampled
    seeds: int

    def describe(self) -> str:
        return (f"{self.value:.3f} [{self.ci95[0]:.3f}, {self.ci95[1]:.3f}] (n={self.n}: {self.seeds} seed(s) x "
                f"{self.prompts} prompts x {self.n // max(self.seeds * self.prompts, 1)} samples)")


def cell_means(verdicts) -> np.ndarray:
    """(seeds, prompts, samples) verdicts in [0, 1] -> (seeds, prompts) means. Refuses ragged or out-of-range input."""
    array = np.asarray(verdicts, dtype=np.float64)
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"verdicts must be a non-empty seeds x prompts x samples array, got shape {array.shape}")
    if not np.isfinite(array).all() or (array < 0).any() or (array > 1).any():
        raise ValueError("every verdict must be in [0, 1] (1 = policy wins, 0.5 = tie, 0 = base wins)")
    return array.mean(axis=2)


def _draws(seeds: int, prompts: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Resampled (prompt, seed) index sets. Prompts are drawn first with the call `app.canary.win_rate` makes, so one
    seed reproduces its interval exactly."""
    rng = np.random.default_rng(seed)
    prompt_picks = rng.integers(0, prompts, size=(resamples, prompts))
    seed_picks = rng.integers(0, seeds, size=(resamples, seeds))
    return prompt_picks, seed_picks


def _resampled_means(cells: np.ndarray, prompt_picks: np.ndarray, seed_picks: np.ndarray) -> np.ndarray:
    """Mean of cells[seed_picks[b]][:, prompt_picks[b]] for every resample b."""
    return cells[seed_picks[:, :, None], prompt_picks[:, None, :]].mean(axis=(1, 2))


def _estimate(cells: np.ndarray, samples: int, resamples: int, seed: int) -> Estimate:
    prompt_picks, seed_picks = _draws(cells.shape[0], cells.shape[1], resamples, seed)
    low, high = np.percentile(_resampled_means(cells, prompt_picks, seed_picks), [2.5, 97.5])
    return Estimate(float(cells.mean()), (float(low), float(high)), cells.size * samples, cells.shape[1],
                    cells.shape[0])


def win_rate(verdicts, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """Mean verdict over a (seeds, prompts, samples) array, with the seeds x prompts bootstrap interval."""
    array = np.asarray(verdicts, dtype=np.float64)
    return _estimate(cell_means(array), array.shape[2], resamples, seed)


def paired_difference(first, second, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """mean(first) - mean(second) for two (seeds, prompts, samples) arrays judged on the same seeds, prompts and
    samples (index for index), with the interval of the same resamples applied to both."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a paired difference needs the same seeds x prompts x samples, got {a.shape} vs {b.shape}")
    return _estimate(cell_means(a) - cell_means(b), a.shape[2], resamples, seed)
