"""What the learning benchmark has shown so far, over every results directory at once.

    .venv/bin/python -m bench.loop --summary                 # every directory under bench-results/
    .venv/bin/python -m bench.loop --summary bench-results

A results directory holds one grid (grid.json), and sittings spread the same measurement over several directories
(`loop-ties` and `loop-ties-bf16` both hold the defaults on `structured` at 64 labels). Here runs are pooled by what
they measure: persona, arm, label budget, held-out prompts x samples, how the personas rank answers they score alike
(ties or random order), and the RoundConfig overrides, whichever directory they are in. Each run (one row) is one
unit of the seeds x prompts bootstrap (bench/stats.py), so two runs of one seed count as two runs: a seed fixes the
rounds' seeds and the base answers, not the items the server samples. Precision is shown per run, not pooled apart
(the default `--precision auto` is bf16 autocast on a CPU with native bf16 and fp32 elsewhere: both are "the
defaults").

Paired differences compare a group with (a) the default arm under the same settings and (b) the same arm with one
of its settings undone (each RoundConfig override in turn, or random ties made ties), over the runs matched by seed
(in the same precision where a seed has several runs) whose base answers are the same file content: the verdicts of
both sides then judge the same base answers on the same prompts. Settings are how the rounds differed from today's
RoundConfig defaults: rows record the defaults they ran under (older rows: bench.loop_results.LEGACY_ROUND_DEFAULTS),
so a default changed since is shown as a setting of the older runs, never pooled with the new default's runs; canary
rows likewise record CanaryConfig's (older ones: LEGACY_CANARY_DEFAULTS).
Every figure has its n (runs x prompts x samples judged pairs) and its 95% interval. Asserts nothing.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np

from app.canary import CanaryConfig
from bench.loop_results import ARMS, DEFAULT_ARM, LEGACY_CANARY_DEFAULTS, grid_settings, load_rows, round_settings
from bench.stats import BOOTSTRAP_SEED, RESAMPLES, Estimate, paired_difference, win_rate


@dataclass(frozen=True)
class Measure:
    """What a pooled group measures (everything but the seed, the precision and the directory)."""

    persona: str
    labels: int
    arm: str
    held_out: int
    samples: int
    ties: bool
    overrides: str  # how the rounds differed from today's RoundConfig defaults, as sorted JSON; "{}": none

    @property
    def default_settings(self) -> bool:
        return self.ties and self.overrides == "{}"

    def settings(self) -> str:
        parts = [f"{k}={json.dumps(v)}" for k, v in json.loads(self.overrides).items()]
        if not self.ties:
            parts.append("random ties")
        return ", ".join(parts) or "defaults"


@dataclass(frozen=True)
class Run:
    row: dict
    directory: Path
    stopped_at: int  # the labels its directory's runs went to (grid.json's `labels`): a run judged at fewer was a
    #   learning-curve checkpoint of a longer lineage

    @property
    def seed(self) -> int:
        return self.row["seed"]

    @property
    def precision(self) -> str:
        return short_precision(self.row.get("precision"))  # rows before 2026-12-01 were filled in

    def base_answers(self) -> str | None:
        return _read(self.directory / "base" / f"seed{self.seed}.json")


@cache
def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def short_precision(precision: str | None) -> str:
    if precision is None:
        return "unrecorded"
    return "bf16" if "bfloat16" in precision else "fp32" if precision == "float32" else precision


def collect(root: Path) -> dict[Measure, list[Run]]:
    """Every row of every results directory under `root` (or `root` itself), grouped by what it measures."""
    directories = [root] if (root / "grid.json").is_file() else sorted(
        d for d in root.iterdir() if (d / "grid.json").is_file())
    groups: dict[Measure, list[Run]] = defaultdict(list)
    for directory in directories:
        settings = grid_settings(directory)
        for row in load_rows(directory).values():
            # the canary arm's CanaryConfig settings sit beside the rounds' (their names never clash: canary_*)
            ran_under = ({**LEGACY_CANARY_DEFAULTS, **row.get("canary_defaults", {})} if row["arm"] == "canary"
                         else {})
            overrides = json.dumps({**round_settings(row, settings.get("round", {})),
                                    **canary_settings(settings.get("canary", {}), ran_under)}, sort_keys=True)
            measure = Measure(row["persona"], row["labels"], row["arm"], settings["held_out"], settings["samples"],
                              settings["ties"], overrides)
            groups[measure].append(Run(row, directory, settings["labels"]))
    for measure, runs in groups.items():
        if any(r.row["prompts"] != runs[0].row["prompts"] for r in runs):
            raise SystemExit(f"{measure.persona}/{measure.arm}/{measure.labels} labels: runs judged on different "
                             f"held-out prompts ({sorted({str(r.directory) for r in runs})}): they cannot be pooled")
        runs.sort(key=lambda r: (r.seed, r.precision, str(r.directory)))
    return groups


# Settings that act only under another: undoing the other undoes them too (canary_settings drops them without it).
ACTS_UNDER = {"canary_chain": ("canary_supersede_items",)}


def canary_settings(stored: dict, ran_under: dict | None = None) -> dict:
    """How a canary arm's server differed from today's CanaryConfig defaults: the defaults its row ran under
    (`ran_under`: the row's canary_defaults, LEGACY_CANARY_DEFAULTS for older rows), then the settings its directory
    was given. A run at a value that has since become the default pools with the defaults' runs; a run under a
    default changed since shows the old value as a setting (loop-concise-canary-share1: canary_prompts "any")."""
    today = asdict(CanaryConfig())
    ran = {**(ran_under or {}), **stored}
    if not {**today, **ran}["canary_chain"]:  # without it, runs differ in nothing there
        for key in ACTS_UNDER["canary_chain"]:
            ran.pop(key, None)
    return {k: v for k, v in ran.items() if today.get(k) != v}


def pooled(runs: list[Run]) -> Estimate:
    return win_rate([r.row["verdicts"] for r in runs])


def matched(first: list[Run], second: list[Run]) -> list[tuple[Run, Run]]:
    """Runs of the two groups paired one to one by seed, where both judged the same base answers: a seed's only run
    on each side, or else its one pair of runs in the same precision, or else its one such pair whose runs stopped at
    the nearest budgets (a run that went to 32 labels pairs with another that did, not with a longer lineage's
    checkpoint at 32; one that went to 64, with a run that went to 32 rather than 128). A seed with several candidate
    pairs still is left out: no way to say which pairs with which. The rule reads only how the runs were set up,
    never their verdicts."""
    pairs = []
    for seed in sorted({r.seed for r in first} & {r.seed for r in second}):
        a = [r for r in first if r.seed == seed]
        b = [r for r in second if r.seed == seed]
        same = [(x, y) for x in a for y in b if x.precision == y.precision]
        nearest = min(map(_budget_gap, same), default=None)
        alike = [pair for pair in same if _budget_gap(pair) == nearest]
        if len(a) == len(b) == 1:
            pairs.append((a[0], b[0]))
        elif len(same) == 1:
            pairs.append(same[0])
        elif len(alike) == 1:
            pairs.append(alike[0])
    return [(x, y) for x, y in pairs if x.base_answers() is not None and x.base_answers() == y.base_answers()]


def _budget_gap(pair: tuple[Run, Run]) -> int:
    return abs(pair[0].stopped_at - pair[1].stopped_at)


def difference(pairs: list[tuple[Run, Run]]) -> Estimate:
    return paired_difference([x.row["verdicts"] for x, _ in pairs], [y.row["verdicts"] for _, y in pairs])


def _runs_cell(runs: list[Run]) -> str:
    by_precision = defaultdict(list)
    for r in runs:
        by_precision[r.precision].append(str(r.seed))
    return "; ".join(f"{', '.join(seeds)} ({p})" for p, seeds in sorted(by_precision.items()))


def _pairs_cell(pairs: list[tuple[Run, Run]]) -> str:
    return ", ".join(f"{x.seed} ({x.precision if x.precision == y.precision else f'{x.precision} / {y.precision}'})"
                     for x, y in pairs)


def _interval(e: Estimate, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.2f}"
    return f"[{f.format(e.ci95[0])}, {f.format(e.ci95[1])}]"


def _order(measure: Measure) -> tuple:
    return (measure.labels, -measure.held_out, not measure.default_settings, measure.settings(),
            ARMS.index(measure.arm) if measure.arm in ARMS else len(ARMS))


def _comparisons(measure: Measure, groups: dict[Measure, list[Run]]) -> list[tuple[str, list[tuple[Run, Run]]]]:
    out = []
    if measure.arm != DEFAULT_ARM:
        other = replace(measure, arm=DEFAULT_ARM)
        out.append((f"{DEFAULT_ARM} - {measure.arm}", matched(groups.get(other, []), groups[measure])))
    overrides = json.loads(measure.overrides)
    # one change at a time: each override's own effect (with the settings that act only under it)
    others = [replace(measure, overrides=json.dumps({k: v for k, v in overrides.items()
                                                     if k != key and k not in ACTS_UNDER.get(key, ())},
                                                    sort_keys=True))
              for key in sorted(overrides)]
    if not measure.ties:
        others.append(replace(measure, ties=True))
    arm = "" if measure.arm == DEFAULT_ARM else f"{measure.arm}: "  # two arms' setting differences read apart
    for other in others:
        out.append((f"{arm}{measure.settings()} - {other.settings()}",
                    matched(groups[measure], groups.get(other, []))))
    return [(name, pairs) for name, pairs in out if pairs]


def summary(root: Path) -> str:
    """Markdown: per persona, every group's pooled win-rate vs the base model, then the paired differences."""
    groups = collect(root)
    if not groups:
        return f"no bench.loop rows under {root}"
    out = ["win-rate = the persona prefers the trained policy's answer to the base model's on a held-out prompt (ties "
           "half); 95% interval: percentile bootstrap over runs and prompts (bench/stats.py); n = runs x prompts x "
           "samples judged pairs; runs: seeds (precision)", ""]
    for persona in sorted({m.persona for m in groups}):
        measures = sorted((m for m in groups if m.persona == persona), key=_order)
        out += [f"### persona `{persona}`", "",
                "| labels | arm | settings | held-out x samples | runs | win-rate | 95% CI | n | directories |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        differences = []
        for m in measures:
            runs = groups[m]
            e = pooled(runs)
            directories = ", ".join(sorted({r.directory.name for r in runs}))
            out.append(f"| {m.labels} | {m.arm} | {m.settings()} | {m.held_out} x {m.samples} | {_runs_cell(runs)} | "
                       f"{e.value:.2f} | {_interval(e)} | {e.n} | {directories} |")
            for name, pairs in _comparisons(m, groups):
                d = difference(pairs)
                differences.append(f"| {m.labels} | {name} | {_pairs_cell(pairs)} | {d.value:+.3f} | "
                                   f"{_interval(d, signed=True)} | {d.n} |")
        if differences:
            out += ["", "Paired differences (runs matched by seed, the same base answers; precisions first / second "
                    "where they differ):", "",
                    "| labels | comparison | runs | difference | 95% CI | n |", "| --- | --- | --- | --- | --- | --- |",
                    *differences]
        out += canary_calibration(groups, persona)
        out.append("")
    return "\n".join(out)


def canary_calibration(groups: dict[Measure, list[Run]], persona: str) -> list[str]:
    """Whether the canary's annotators judged as the persona does on prompts nobody trained on: for every canary
    decided (promoted or rolled back) in the canary arm's runs, its human win-rate against the version it was
    compared with minus the persona's win-rate of the same two versions on the held-out prompts, averaged per
    setting, with a percentile-bootstrap interval over canaries. Above 0: the annotators saw the candidate better
    than it generalises (canary items on prompts it trained on)."""
    gaps: dict[str, dict[tuple, tuple[float, float]]] = defaultdict(dict)
    for m, runs in groups.items():
        if m.persona != persona or m.arm != "canary":
            continue
        for run in runs:
            for c in run.row.get("canaries", []):
                if c["decision"] in ("promoted", "rolled_back") and c["win_rate"] is not None:
                    judged = win_rate([c["persona_verdicts"]]).value
                    gaps[m.settings()][(str(run.directory), run.seed, c["version"])] = (c["win_rate"], judged)
    if not gaps:
        return []
    lines = []
    for setting, found in sorted(gaps.items()):
        human, judged = (np.array(x) for x in zip(*found.values()))
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        picks = rng.integers(0, len(human), size=(RESAMPLES, len(human)))
        low, high = np.percentile((human - judged)[picks].mean(axis=1), [2.5, 97.5])
        lines.append(f"| {setting} | {len(human)} | {human.mean():.2f} | {judged.mean():.2f} | "
                     f"{(human - judged).mean():+.3f} | [{low:+.3f}, {high:+.3f}] |")
    return ["", "Canary calibration (decided canaries: the annotators' win-rate of the candidate against the version "
            "it was compared with, beside the persona's on the held-out prompts; 95% interval: bootstrap over "
            "canaries, n = canaries):", "",
            "| settings | canaries | annotators | persona held out | annotators - persona | 95% CI |",
            "| --- | --- | --- | --- | --- | --- |", *lines]
