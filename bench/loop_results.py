"""The learning benchmark's grid, held-out prompts, results directory and table (bench/loop.py runs the grid).

A results directory holds:
  grid.json         the settings the grid was started with; a rerun with other settings is refused (its rows
                    would not be comparable), a rerun with the same settings skips every row already there
  rows.jsonl        one JSON object a line, appended (and fsynced) the moment a row is judged
  base/seed<S>.json the base model's answers to the held-out prompts under seed S, generated once and judged
                    against every arm of that seed (common random numbers: arm differences do not carry the base
                    answers' noise)
  runs/<job>/       each job's server.log (its data dir is deleted once the job is done)
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app.canary import CanaryConfig
from bench.stats import Estimate, paired_difference, win_rate
from learner.config import DPO_ONLY, RoundConfig
from learner.errors import ConfigError
from learner.params import PRECISIONS

LEARNING_ARMS = ("offline", "semi-online", "online", "kto")  # how the policy learns: issue 9's comparison
# `canary`: the semi-online rounds under the app's default deploy policy, started by the scheduler every `every` labels
# and served only once the annotators' canary promotes them (what the default configuration delivers, and at what cost)
ARMS = (*LEARNING_ARMS, "canary")
DEFAULT_ARM = "semi-online"  # the round's defaults (sync_every from RoundConfig): the learning curve's arm

# Written for this benchmark, none a paraphrase of a starter prompt (the training pool); storage's starter set has
# "What are the steps to make a cup of tea?", so "How do I make a cup of tea?" is not here.
HAND_WRITTEN = (
    "What is a good way to start learning to draw?", "Why do cats purr?", "How does a bicycle stay upright?",
    "What should I pack for a weekend hike?", "Explain what inflation is.", "How do vaccines work?",
    "Why do onions make people cry?", "Why is the ocean salty?", "What makes a good password?",
    "What is a black hole?", "What is machine learning?", "What causes thunder?", "How do I write a cover letter?",
    "How do submarines dive and surface?", "What is the tallest animal?", "How does a refrigerator keep food cold?",
    "Why is exercise good for you?", "What does a compiler do?",
)
# Beyond the hand-written ones, held-out prompts are templates x topics, template by template (so 48 prompts cover
# every topic): deterministic, and open-ended enough that both a short answer and a list are reasonable.
TEMPLATES = ("Give me some tips for {}.", "What should a beginner know about {}?",
             "What are common mistakes when {}?", "How should I prepare before {}?")
TOPICS = ("learning to swim", "planting a vegetable garden", "saving money each month", "training a puppy",
          "preparing for a job interview", "learning a new language", "running a first marathon",
          "baking bread at home", "keeping houseplants alive", "moving to a new city", "starting to meditate",
          "painting a room", "studying for an exam", "planning a road trip", "taking better photos",
          "learning to play the guitar")
MAX_HELD_OUT = len(HAND_WRITTEN) + len(TEMPLATES) * len(TOPICS)


def held_out_prompts(n: int) -> list[str]:
    """The first `n` held-out prompts: the hand-written ones, then templates x topics."""
    if not 1 <= n <= MAX_HELD_OUT:
        raise ValueError(f"held-out prompts must be 1..{MAX_HELD_OUT}, got {n}")
    generated = [template.format(topic) for template in TEMPLATES for topic in TOPICS]
    return (list(HAND_WRITTEN) + generated)[:n]


def normalise(prompt: str) -> str:
    """Case, spelling (colour/color) and punctuation do not make a prompt new."""
    return re.sub(r"[^a-z0-9]+", " ", prompt.casefold().replace("colour", "color")).strip()


def overlap(held_out: list[str], training: set[str]) -> list[str]:
    """Held-out prompts that are (after `normalise`) in the training pool."""
    pool = {normalise(p) for p in training}
    return [p for p in held_out if normalise(p) in pool]


@dataclass(frozen=True)
class Grid:
    """What one `bench.loop` run covers. Every field is part of the results directory's identity (grid.json)."""

    personas: tuple[str, ...]
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    held_out: int  # prompts judged; each is answered `samples` times by the policy and by the base model
    samples: int
    labels: int  # the label budget (rankings of K answers) at which the arms are compared
    every: int  # labels between rounds for the arms that retrain as labels arrive (all but offline)
    curve: tuple[int, ...] = ()  # label budgets at which the default arm (and `canary`, the default arm as a
    #   deployment runs it) is also judged: its learning curve
    annotators: int = 2  # simulated annotators (threads); more only queue on the sampler
    noise: float = 0.0  # the persona ranks without noise: the benchmark measures learning, not robustness
    # answers the persona scores alike are sent as a tie (no pair), as the Annotate tab lets people do; False orders
    # them at random, as annotators had to before ties existed (the grids of bench-results/ written before then)
    ties: bool = True
    # the server's --precision in every job ("auto": bf16 autocast on a CPU with native bf16, see README); the
    # directories of bench-results/ written before it existed ran in fp32
    precision: str = "auto"
    round: dict = field(default_factory=dict)  # RoundConfig overrides applied to every round (tiny sanity runs)
    canary: dict = field(default_factory=dict)  # CanaryConfig settings of the `canary` arm's server (canary_share...)

    def __post_init__(self) -> None:
        problems = [f"unknown arm {a!r} (known: {', '.join(ARMS)})" for a in self.arms if a not in ARMS]
        budgets = (self.labels, *self.curve)
        if self.every < 1 or any(b < self.every or b % self.every for b in budgets):
            problems.append(f"every label budget ({budgets}) must be a positive multiple of every={self.every}")
        if not 1 <= self.held_out <= MAX_HELD_OUT or self.samples < 1:
            problems.append(f"held-out prompts must be 1..{MAX_HELD_OUT} and samples >= 1, got {self.held_out} x "
                            f"{self.samples}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not (self.personas and self.arms and self.seeds):
            problems.append("the grid needs at least one persona, arm and seed")
        if self.canary:
            problems += self._canary_problems()
        if problems:
            raise ValueError("; ".join(problems))

    def _canary_problems(self) -> list[str]:
        if "canary" not in self.arms:
            return ["canary settings apply to the canary arm only, which this grid does not run"]
        if "deploy_policy" in self.canary:
            return ["the canary arm's deploy_policy is canary by definition"]
        try:
            CanaryConfig().replace(self.canary)
        except ConfigError as exc:
            return [str(exc)]
        return []

    def checkpoints(self, arm: str) -> tuple[int, ...]:
        """The label budgets at which a job of `arm` is judged (one row each)."""
        return tuple(sorted({self.labels, *self.curve})) if arm in (DEFAULT_ARM, "canary") else (self.labels,)

    def settings(self) -> dict:
        """The identity written to grid.json (JSON types: tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


GRIDS = {
    # a CPU sanity run (~40 minutes on 2 cores): does the loop learn at all, is the machinery sound
    "small": Grid(personas=("concise",), arms=("offline", "semi-online"), seeds=(0,), held_out=16, samples=2,
                  labels=32, every=16),
    # the measurement (issue 9): 48 prompts x 2 samples x 3 seeds per arm, two personas, a learning curve
    "full": Grid(personas=("concise", "structured"), arms=LEARNING_ARMS, seeds=(0, 1, 2), held_out=48, samples=2,
                 labels=32, every=16, curve=(16, 32, 64, 128)),
    # the default deploy policy in the loop: does the canary promote what the persona prefers, and how far behind
    # `immediate` does its judging leave the serving version? Compared with the full grid's default arm at 64 labels;
    # a canary needs 16-40 labels after its round (16 canary rankings at least, plus the items already sampled), so 96
    # shows a second decision
    "canary": Grid(personas=("concise", "structured"), arms=("canary",), seeds=(0, 1, 2), held_out=48, samples=2,
                   labels=64, every=16, curve=(64, 96)),
}


def rounds_precision(rounds: list[dict]) -> str | None:
    """How a job's rounds computed (`Device.precision` in their metrics: "float32", "float32 weights, bfloat16
    autocast", ...): `--precision auto` depends on the CPU, so each row says what it was. None if the rounds did not
    say or differ."""
    found = {r.get("precision") for r in rounds}
    return found.pop() if len(found) == 1 else None


def row_key(persona: str, arm: str, seed: int, labels: int) -> str:
    return f"{persona}/{arm}/seed{seed}/labels{labels}"


# -- the results directory ---------------------------------------------------------------------------------------

# Grid fields added after results directories were written, with the value those directories were run with.
LEGACY_FIELDS = {"ties": False, "precision": "fp32", "canary": {}}


# RoundConfig defaults changed after rows were written, with the value those rows' rounds ran with: a row without
# `round_defaults` ran under today's defaults but these.
LEGACY_ROUND_DEFAULTS = {"rollouts_min_reward_accuracy": None}  # 0.5 since 2026-12-01 (docs/benchmarks.md)

# RoundConfig fields whose default changed after rows recorded them absent, with the value those rows' rounds ran
# with: a row's recorded defaults that lack one ran with this.
ROUND_FIELDS_ADDED = {"rpo_alpha": 0.0}  # added 2026-12-04 at 0 (plain DPO, as every earlier round); 1.0 since 12-05

# Fields an arm's rounds never use: its rows never differ from today's defaults by them.
UNUSED_BY_ARM = {"kto": set(DPO_ONLY)}  # kto rounds run at DPO_ONLY's values, whatever the grid says


# CanaryConfig fields added or changed after canary rows were written, with the value those rows' servers ran with:
# a canary row ran under today's defaults but these, then the defaults it recorded (`canary_defaults`) over them.
LEGACY_CANARY_DEFAULTS = {
    "canary_prompts": "any",  # before the setting existed (2026-12-04): "any", still the default
    "canary_supersede_items": 0,  # before the setting existed (2026-12-04): never; 30 since
}


def today_canary_defaults() -> dict:
    """CanaryConfig's defaults as a canary row records them."""
    return asdict(CanaryConfig())


def today_round_defaults() -> dict:
    """RoundConfig's defaults as a row records them (JSON types; the seed is the benchmark's, per round)."""
    return {k: v for k, v in json.loads(json.dumps(RoundConfig().to_dict())).items() if k != "seed"}


def round_settings(row: dict, grid_overrides: dict) -> dict:
    """How a row's rounds were configured unlike today's RoundConfig defaults: the defaults they ran under (recorded
    in the row, else today's with LEGACY_ROUND_DEFAULTS; ROUND_FIELDS_ADDED where the record lacks one), then the
    grid's overrides. What defines an arm (its sync_every, algorithm, ...) is not here: bench.loop's round_config
    adds it to every round of that arm, and the fields it never uses (UNUSED_BY_ARM) are left out."""
    today = today_round_defaults()
    # in the fields' types: `--round rpo_alpha=0` is the setting older rows record as 0.0, and pools with them
    ran = RoundConfig.typed({**today, **ROUND_FIELDS_ADDED, **row.get("round_defaults", LEGACY_ROUND_DEFAULTS),
                             **grid_overrides})
    unused = UNUSED_BY_ARM.get(row.get("arm"), set())
    return {k: v for k, v in ran.items() if k in today and k not in unused and v != today[k]}


def grid_settings(directory: Path) -> dict | None:
    """The settings `directory` was started with (grid.json, fields it predates filled in); None if it has none."""
    path = directory / "grid.json"
    if not path.is_file():
        return None
    return {**LEGACY_FIELDS, **json.loads(path.read_text(encoding="utf-8"))}


def round_overrides(items: list[str], flag: str = "--round", field: str = "a RoundConfig field") -> dict:
    """`KEY=VALUE` pairs (bench.loop's --round and --canary, bench.learner's and bench.canary's): VALUE is JSON (2,
    1e-4, null, true) or else a plain string (loss_type=ipo)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} takes KEY=VALUE ({field}), got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def open_results(directory: Path, grid: Grid) -> None:
    """Create `directory` for `grid`, or check that it was started with the same settings."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = grid.settings()
    stored = grid_settings(directory)
    if stored is not None:
        changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        if changed:
            raise SystemExit(f"{directory} holds rows of another grid (differs in {', '.join(changed)}: "
                             f"{ {k: stored.get(k) for k in changed} }); use another results directory")
        return
    _write_atomic(directory / "grid.json", json.dumps(wanted, indent=2))


def load_rows(directory: Path) -> dict[str, dict]:
    """Rows by key. A last line cut off by a crash mid-write is ignored (its row is simply run again)."""
    path = directory / "rows.jsonl"
    if not path.exists():
        return {}
    rows = {}
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the torn tail of an interrupted append
                continue
            raise SystemExit(f"{path} line {number} is not JSON: move the file aside or repair that line") from None
        rows[row["key"]] = row
    return rows


def append_row(directory: Path, row: dict) -> None:
    """Append one row and fsync it; a torn last line from an earlier crash is cut off first."""
    path = directory / "rows.jsonl"
    with open(path, "a+b") as f:
        f.seek(0)
        content = f.read()
        if content and not content.endswith(b"\n"):
            f.truncate(content.rfind(b"\n") + 1)
        f.seek(0, os.SEEK_END)
        f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def load_base_answers(directory: Path, seed: int, prompts: list[str], samples: int) -> list[list[str]] | None:
    path = directory / "base" / f"seed{seed}.json"
    if not path.exists():
        return None
    stored = json.loads(path.read_text(encoding="utf-8"))
    if stored["prompts"] != prompts or any(len(a) != samples for a in stored["answers"]):
        raise SystemExit(f"{path} was made for other held-out prompts or samples: delete it")
    return stored["answers"]


def save_base_answers(directory: Path, seed: int, prompts: list[str], answers: list[list[str]]) -> None:
    (directory / "base").mkdir(exist_ok=True)
    _write_atomic(directory / "base" / f"seed{seed}.json", json.dumps({"prompts": prompts, "answers": answers}))


# -- the table ---------------------------------------------------------------------------------------------------

def _verdicts(rows: list[dict]) -> list:
    """(seeds, prompts, samples) from rows of one persona/arm/labels, seeds in order; prompts must agree."""
    prompts = rows[0]["prompts"]
    if any(r["prompts"] != prompts for r in rows):
        raise SystemExit("rows of one arm were judged on different held-out prompts: they cannot be pooled")
    return [r["verdicts"] for r in sorted(rows, key=lambda r: r["seed"])]


def _ci(e: Estimate) -> str:
    return f"[{e.ci95[0]:.2f}, {e.ci95[1]:.2f}]"


def _shape(e: Estimate) -> str:
    return f"{e.n} ({e.seeds} x {e.prompts} x {e.n // (e.seeds * e.prompts)})"


def _arm_lines(group: list[dict]) -> list[str]:
    lines = []
    for r in sorted(group, key=lambda r: r["seed"]):
        e = win_rate([r["verdicts"]])
        deployed = sum(x["status"] == "succeeded" for x in r["rounds"])
        lines.append(f"| {r['arm']} | {r['seed']} | {e.value:.2f} | {_ci(e)} | {_shape(e)} | {r['words']:.1f} / "
                     f"{r['base_words']:.1f} | {len(r['rounds'])} ({deployed} / {len(r['rounds']) - deployed}) | "
                     f"v{r['final_version']} | {r['minutes']:.1f} |")
    if len(group) > 1:
        e = win_rate(_verdicts(group))
        lines.append(f"| **{group[0]['arm']}** | all | **{e.value:.2f}** | **{_ci(e)}** | {_shape(e)} | | | | |")
    return lines


def table(rows: dict[str, dict], budget: int, settings: dict | None = None) -> str:
    """Markdown: per persona the arms at the label budget `budget` (each seed, then pooled), the paired
    differences against offline, the default arm's learning curve, then every run's rounds (what each trained on, its
    held-out accuracies, KL and phase times). Every figure with n (seeds x prompts x
    samples) and its 95% interval (bench/stats.py). `settings` (grid_settings) adds how the rankings were made."""
    if not rows:
        return "no rows yet"
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows.values():
        groups[(r["persona"], r["arm"], r["labels"])].append(r)
    out = ["win-rate = the persona prefers the trained policy's answer to the base model's on a held-out prompt (ties "
           "half); 95% interval: percentile bootstrap over prompts and seeds (bench/stats.py); n = seeds x prompts "
           "x samples judged pairs", *_grid_line(settings), ""]
    for persona in sorted({r["persona"] for r in rows.values()}):
        out += [f"### persona `{persona}`, {budget} labels", "",
                "| arm | seed | win-rate | 95% CI | n | words final / base | rounds (deployed / not) | final "
                "| minutes |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for arm in ARMS:
            if (persona, arm, budget) in groups:
                out += _arm_lines(groups[(persona, arm, budget)])
        out += _differences(groups, persona, budget) + _curve(groups, persona)
        mine = sorted((r for r in rows.values() if r["persona"] == persona),
                      key=lambda r: (r["labels"], ARMS.index(r["arm"]), r["seed"]))
        out += _rounds(mine) + _canaries(mine)
        out.append("")
    return "\n".join(out)


def _proportion(figure: dict | None) -> str:
    if not figure:
        return "-"
    return f"{figure['value']:.2f} [{figure['ci95'][0]:.2f}, {figure['ci95'][1]:.2f}] ({figure['n']})"


def _round_line(row: dict, r: dict) -> str:
    data = r.get("data") or {}
    kl = r.get("kl_to_reference")
    kl = kl.get("value") if isinstance(kl, dict) else kl
    uses = (f"{data['human_uses']} / {data['onpolicy_uses']}" if "human_uses" in data and "onpolicy_uses" in data
            else "-")
    phases = r.get("timings_s") or {}
    seconds = " / ".join(f"{phases[p]:.0f}" for p in ("reward", "policy", "eval") if p in phases) or "-"
    kl_text = "-" if kl is None else f"{kl:.2f}"
    fallback = r.get("kl_checkpoints")  # the final step was over max_kl: which kept step the round fell back to
    if fallback:
        tried = ", ".join(f"{t['step']}: {t['kl_to_reference']:.1f}" for t in fallback["tried"])
        kept = fallback["kept_step"]
        kl_text += f" ({'step ' + str(kept) if kept else 'no step'} of {fallback['steps']} kept; tried {tried})"
    status = r["status"] if not r.get("gate_reason") else f"{r['status']}: {r['gate_reason']}"
    version = "-" if r.get("version") is None else f"v{r['version']}"
    return (f"| {row['arm']} | {row['labels']} | {row['seed']} | {version} | {status} | {data.get('steps', '-')} "
            f"| {uses} | {_proportion(r.get('reward_heldout_accuracy'))} "
            f"| {_proportion(r.get('policy_heldout_accuracy'))} | {kl_text} | {seconds} |")


def _rounds(rows: list[dict]) -> list[str]:
    """Each run's rounds: what each trained on and what its held-out figures were (each with n and interval)."""
    lines = [_round_line(row, r) for row in rows for r in row["rounds"]]
    if not lines:
        return []
    return ["", "Rounds of each run (uses: human / on-policy example uses; held-out: pair accuracy on human labels of "
            "held-out prompts, 95% Wilson interval (n); KL: exact, to the reference, nats per answer, with "
            "the step kept where the final one was over max_kl (kl_checkpoints); seconds: reward model / policy / "
            "evaluation phases):", "",
            "| arm | labels | seed | version | status | steps | uses | reward model held-out | policy implicit reward "
            "held-out | KL | seconds |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *lines]


def _canaries(rows: list[dict]) -> list[str]:
    """The canary arm's canaries: the annotators' decision and evidence beside the persona's own judgement of the
    same two versions on the held-out prompts (the canary works when the two agree)."""
    lines = []
    for row in rows:
        for c in row.get("canaries", []):
            human = ("-" if c["win_rate"] is None else
                     f"{c['win_rate']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]" if c["ci95"] else
                     f"{c['win_rate']:.2f}")
            e = win_rate([c["persona_verdicts"]])
            decided = next((m["labels"] for m in row.get("timeline", [])
                            if m["canaries"].get(str(c["version"]), "pending") != "pending"), None)
            lines.append(f"| {row['labels']} | {row['seed']} | v{c['version']} vs v{c['parent']} | {c['decision']} "
                         f"| {'-' if decided is None else decided} | {human} ({c['comparisons']}) | {e.value:.2f} "
                         f"{_ci(e)} ({_shape(e)}) |")
    if not lines:
        return []
    return ["", "Canaries (human: the simulated annotators' rankings of canary items, the candidate's win-rate "
            "against the serving version, bootstrap over rankings (n comparisons); decided by: the label count at "
            "which the decision was first seen, checked every `every` labels; persona: the persona's judgement of the "
            "same two versions on the held-out prompts (n judged pairs)):", "",
            "| labels | seed | canary | decision | decided by | human win-rate [95% CI] (n) | persona win-rate "
            "[95% CI] (n) |", "| --- | --- | --- | --- | --- | --- | --- |", *lines]


def _grid_line(settings: dict | None) -> list[str]:
    if settings is None:
        return []
    ties = ("the personas tie answers they score alike (no pair)" if settings["ties"]
            else "the personas order answers they score alike at random (--random-ties)")
    overrides = ", ".join(f"{k}={v}" for k, v in settings.get("round", {}).items()) or "none"
    canary = "".join(f"; canary: {k}={v}" for k, v in settings.get("canary", {}).items())
    return [f"rankings: {ties}; precision: {settings['precision']}; RoundConfig overrides: {overrides}{canary}"]


def _differences(groups: dict, persona: str, budget: int) -> list[str]:
    lines = []
    offline = {r["seed"]: r for r in groups.get((persona, "offline", budget), [])}
    for arm in ARMS[1:]:
        other = {r["seed"]: r for r in groups.get((persona, arm, budget), [])}
        seeds = sorted(set(offline) & set(other))
        if not seeds:
            continue
        d = paired_difference(_verdicts([other[s] for s in seeds]), _verdicts([offline[s] for s in seeds]))
        lines.append(f"| {arm} - offline | {d.value:+.3f} | [{d.ci95[0]:+.3f}, {d.ci95[1]:+.3f}] | {_shape(d)} |")
    if not lines:
        return []
    return ["", "Paired differences (same prompts, samples and seeds; base answers shared within a seed):", "",
            "| comparison | difference | 95% CI | n |", "| --- | --- | --- | --- |", *lines]


def _curve(groups: dict, persona: str) -> list[str]:
    points = sorted(labels for (p, arm, labels) in groups if p == persona and arm == DEFAULT_ARM)
    if len(points) < 2:
        return []
    lines = ["", f"Learning curve of `{DEFAULT_ARM}` (the round's defaults):", "",
             "| labels | win-rate | 95% CI | n |", "| --- | --- | --- | --- |"]
    for labels in points:
        e = win_rate(_verdicts(groups[(persona, DEFAULT_ARM, labels)]))
        lines.append(f"| {labels} | {e.value:.2f} | {_ci(e)} | {_shape(e)} |")
    return lines
