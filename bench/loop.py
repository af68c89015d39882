"""The learning benchmark: at the same budget of human labels, does training on labels of the current policy
(semi-online, online) beat training on labels of a stale one (offline), and does the loop learn a preference at all?
A miniature of arXiv 2506.21495 / 2405.08448, end to end, with intervals (issue 9, section 4).

    .venv/bin/python -m bench.loop --grid small                    # CPU sanity run, ~40 min on 2 cores
    .venv/bin/python -m bench.loop --grid full [--only semi-online,offline] [--persona concise] [--no-curve]
    .venv/bin/python -m bench.loop --grid canary [--persona concise]  # the default deploy policy in the loop
    .venv/bin/python -m bench.loop --table bench-results/loop-full # the table of whatever rows exist
    .venv/bin/python -m bench.loop --summary                       # all directories pooled (bench/loop_summary.py)

Every job (persona x arm x seed) runs the real server (`prefloop serve`, its own process, the real SmolLM2) and the
real scheduler: simulated annotators of the persona label through the REST API only, rounds start with
`POST /api/train` and deploy at once when the automatic gate passes them (all but `canary`). Arms (same persona,
label budget, prompts and seed; rounds take RoundConfig's defaults unless named):
  offline      all labels collected on version 0, then one DPO round on all of them (max_label_staleness None) with
               as many optimizer steps as the retraining arms take in all their rounds (same compute), its on-policy
               pairs generated once before the first step (sync_every = steps)
  semi-online  a DPO round every `every` labels, redeployed; the server serves only the deployed version's items
               (max_item_staleness 0), so every label is on the current policy; sync_every = RoundConfig's default
  online       as semi-online with sync_every = 1 (fresh on-policy pairs every step)
  kto          as semi-online, KTO on the persona's thumbs
  canary       (its own grid) semi-online's rounds as a deployment runs them by default: the scheduler starts one
               every `every` labels (waiting while a canary is judged), labelling goes on during rounds, and a version
               the gate passes serves everyone only once the annotators' canary rankings promote it. Judged on what
               serves, and every canary is also judged by the persona against the version it was compared with, so
               the annotators' decision stands beside the persona's judgement of the same two versions
The semi-online job also goes on to the grid's learning-curve budgets (16/32/64/128 labels), judged at each.
The personas send answers they score alike as a tie (no pair), as the Annotate tab lets people do; `--random-ties`
orders them at random instead, as the grids run before ties existed did (a results directory keeps one or the other).
Each job's server computes in the grid's `--precision` (default auto: bf16 autocast on a CPU with native bf16); the
directories written before precision was a setting ran in fp32 and resume only with `--precision fp32`.

The judge is the persona, not our reward model: on held-out prompts that are not in the training pool (checked at
start, and again against every label the job stored), the final policy and the base model each answer
(`POST /api/generate/batch`, `samples` times per prompt) and the persona prefers one (ties count half). Intervals:
bench/stats.py. Each judged budget is one row of `rows.jsonl`, written the moment it is judged; a rerun skips the
rows already there, so the grid can be spread over sittings (bench/loop_results.py: the results directory).
Prints the table and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

from app.api import MAX_BATCH_ANSWERS
from app.personas import get_persona
from app.server import free_port
from app.simulate import Simulator, create_annotators
from bench.loop_results import (
    ARMS,
    GRIDS,
    Grid,
    append_row,
    grid_settings,
    held_out_prompts,
    load_base_answers,
    load_rows,
    open_results,
    overlap,
    round_overrides,
    rounds_precision,
    row_key,
    save_base_answers,
    table,
    today_canary_defaults,
    today_round_defaults,
)
from bench.loop_summary import summary
from bench.stats import win_rate
from learner.config import DPO_ONLY, RoundConfig
from learner.errors import ConfigError
from learner.model import DEFAULT_MODEL, converted_dir, needs_conversion
from learner.params import PRECISIONS

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "prefloop-data" / "models"
JUDGE_TOKENS = 96  # the app's max_new_tokens: the persona judges answers as long as the ones annotators rank
SERVER_ENV = {  # the server each job starts (app/config.py names)
    "PREFLOOP_MAX_NEW_TOKENS": str(JUDGE_TOKENS),
    "PREFLOOP_BUFFER_SIZE": "4",  # one batch of items (batch_items 4): labels wait on sampling, not the reverse
    "PREFLOOP_BUFFER_MAX": "8",  # items sampled ahead go stale at each deploy: keep the CPU for rounds instead
}


def starter_prompts() -> set[str]:
    """The training pool: the prompts a fresh server seeds and samples items and rollouts from."""
    with open(ROOT / "storage" / "starter_prompts.jsonl", encoding="utf-8") as f:
        return {json.loads(line)["prompt"] for line in f if line.strip()}


def start_server(data_dir: Path, log_path: Path, max_item_staleness: int, model: str | None,
                 precision: str = "auto") -> tuple:
    """`prefloop serve` on a free port, its output in `log_path`; (process, url) once /api/health answers."""
    port = free_port()
    env = {**os.environ, **SERVER_ENV, "PREFLOOP_MAX_ITEM_STALENESS": str(max_item_staleness)}
    command = [sys.executable, "-m", "app.cli", "serve", "--data-dir", str(data_dir), "--port", str(port),
               "--precision", precision]
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen(command + (["--model", model] if model else []), env=env, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a loaded CPU imports torch and loads the model slowly
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the server exited: see {log_path}")
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"the server did not start in 10 minutes: see {log_path}")


def admin_token(data_dir: Path) -> str:
    """`prefloop init`: the data dir's DuckDB file and its admin account; the admin's API token."""
    out = subprocess.run([sys.executable, "-m", "app.cli", "init", "--data-dir", str(data_dir)], capture_output=True,
                         text=True, cwd=ROOT)
    tokens = [line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if "API token:" in line]
    if out.returncode != 0 or not tokens:
        raise SystemExit(f"`prefloop init` failed: {out.stderr.strip() or out.stdout.strip()}")
    return tokens[0]


def train(http: httpx.Client, config: dict) -> dict:
    """One round through the API; its outcome in a few figures (the full metrics stay in the version's dir)."""
    run_id = http.post("/api/train", json=config).raise_for_status().json()["run_id"]
    while (run := http.get(f"/api/runs/{run_id}").raise_for_status().json())["status"] in ("queued", "running"):
        time.sleep(2)
    return outcome(run)


def outcome(run: dict) -> dict:
    """A finished run (GET /api/runs/ID) in the figures a row keeps."""
    m = run.get("metrics") or {}
    kept = ("kl_to_reference", "entropy", "mean_answer_length", "eos_rate", "labels_used", "reward_heldout_accuracy",
            "policy_heldout_accuracy", "data", "timings_s", "precision", "kl_checkpoints")
    return {"status": run["status"], "version": run["version"], "error": (run.get("error") or "")[:300],
            "gate_reason": (m.get("gate") or {}).get("reason"), **{k: m[k] for k in kept if k in m}}


def settle(http: httpx.Client) -> list[dict]:
    """Wait for the round in progress, if any (an automatic one); then the outcome of every round so far, oldest
    first. A label's request starts its automatic round before it answers, so none can start after this returns
    while nobody labels."""
    while http.get("/api/train").raise_for_status().json()["active_run"] is not None:
        time.sleep(2)
    runs = http.get("/api/runs").raise_for_status().json()  # the newest 50: a canary job has a handful
    return [outcome(run) for run in sorted(runs, key=lambda r: r["run_id"])]


def generate(http: httpx.Client, prompts: list[str], samples: int, version: int) -> list[list[str]]:
    """`samples` answers to each prompt from `version`, as many prompts per `POST /api/generate/batch` call as one
    sampling batch holds (the answers are drawn as one-answer calls draw them; a batch is ~10x faster on a CPU)."""
    per_call = max(1, MAX_BATCH_ANSWERS // samples)
    answers: list[list[str]] = []
    for start in range(0, len(prompts), per_call):
        body = {"prompts": prompts[start:start + per_call], "n": samples, "version": version,
                "max_new_tokens": JUDGE_TOKENS}
        served = _post_until_served(http, "/api/generate/batch", body)
        answers += [[a["text"] for a in item] for item in served["answers"]]
    return answers


def _post_until_served(http: httpx.Client, path: str, body: dict) -> dict:
    for _ in range(60):
        r = http.post(path, json=body)
        if r.status_code != 429:  # both generation slots busy (the prefetcher's batch): wait as asked
            return r.raise_for_status().json()
        time.sleep(float(r.headers.get("retry-after", "1")))
    raise SystemExit(f"POST {path} answered 429 for a minute or more")


def base_answers(http: httpx.Client, results: Path, seed: int, prompts: list[str], samples: int) -> list[list[str]]:
    """The base model's answers for this seed: made by the first job of the seed, judged against every arm."""
    stored = load_base_answers(results, seed, prompts, samples)
    if stored is None:
        stored = generate(http, prompts, samples, 0)
        save_base_answers(results, seed, prompts, stored)
    return stored


def judge(http: httpx.Client, persona, version: int, prompts: list[str], base: list[list[str]],
          answers: list[list[str]] | None = None) -> dict:
    """The persona compares `version`'s j-th answer to each prompt with the base model's j-th: 1 / 0.5 / 0.
    `answers`: the version's answers when they were already drawn (else they are drawn now)."""
    answers = answers if answers is not None else generate(http, prompts, len(base[0]), version)
    return {"verdicts": verdicts(persona, prompts, answers, base), "answers": answers, "words": words(answers),
            "base_words": words(base)}


def verdicts(persona, prompts: list[str], mine: list[list[str]], theirs: list[list[str]]) -> list[list[float]]:
    """Per prompt, per sample j: 1 when the persona prefers mine[j] to theirs[j], 0.5 on a tie, else 0."""
    out = []
    for prompt, ours, others in zip(prompts, mine, theirs, strict=True):
        scores = [(persona.score(prompt, a), persona.score(prompt, b)) for a, b in zip(ours, others, strict=True)]
        out.append([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in scores])
    return out


def words(groups: list[list[str]]) -> float:
    flat = [len(a.split()) for g in groups for a in g]
    return sum(flat) / len(flat)


def check_labels_held_out(http: httpx.Client, prompts: list[str]) -> None:
    """No stored label may be on a held-out prompt: that would be training on the test set."""
    lines = http.get("/api/export", params={"format": "rankings"}).raise_for_status().text.splitlines()
    labelled = {json.loads(line)["prompt"] for line in lines if line.strip()}
    leaked = overlap(prompts, labelled)
    if leaked:
        raise SystemExit(f"labels were stored on held-out prompts {leaked}: the benchmark would judge on training data")


def round_config(grid: Grid, arm: str, seed: int, index: int) -> dict:
    """The POST /api/train body of round `index` of `arm`: RoundConfig's defaults, then the grid's overrides, then
    what defines the arm (an override cannot make two arms the same)."""
    if arm == "offline":  # as many optimizer steps as the retraining arms take in all their rounds (same compute)
        steps = grid.round.get("steps", RoundConfig().steps) * (grid.labels // grid.every)
        defining = {"algorithm": "dpo", "max_label_staleness": None, "steps": steps, "sync_every": max(steps, 1)}
    elif arm == "online":
        defining = {"algorithm": "dpo", "sync_every": 1}
    elif arm in ("semi-online", "canary"):
        defining = {"algorithm": "dpo", "sync_every": RoundConfig().sync_every}
    else:  # a grid's DPO-only settings (rpo_alpha, rollout_pairs) are for the DPO arms
        defining = {"algorithm": "kto", **DPO_ONLY}
    return {**grid.round, "seed": seed * 1000 + index, **defining}


def run_job(grid: Grid, persona_name: str, arm: str, seed: int, budgets: list[int], results: Path,
            model: str | None) -> None:
    """One persona x arm x seed from a fresh data dir, judged (and a row written) at each budget in `budgets`."""
    job_dir = results / "runs" / f"{persona_name}-{arm}-seed{seed}"
    data_dir = job_dir / "data"
    shutil.rmtree(data_dir, ignore_errors=True)  # an interrupted attempt starts over: its rounds were not judged
    (data_dir / "models").mkdir(parents=True)
    if model is None:
        os.symlink((MODELS / "smollm2").resolve(), data_dir / "models" / "smollm2")
    token = admin_token(data_dir)
    server, url = start_server(data_dir, job_dir / "server.log", 2 if arm == "offline" else 0, model, grid.precision)
    try:
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=600) as http:
            job = Job(grid, get_persona(persona_name), arm, seed, results, http, url)
            if arm == "canary":
                job.canary_rounds(budgets)
            else:
                job.rounds_by_hand(budgets)
    finally:
        server.terminate()
        server.wait(120)
    shutil.rmtree(data_dir, ignore_errors=True)  # adapters of every version: ~20 MB each; the rows hold the result


class Job:
    """One persona x arm x seed against its own server: simulated annotators label, rounds train, the persona judges
    at each budget and a row is written."""

    def __init__(self, grid: Grid, persona, arm: str, seed: int, results: Path, http: httpx.Client, url: str):
        self.grid, self.persona, self.arm, self.seed, self.results = grid, persona, arm, seed, results
        self.http, self.url = http, url
        self.prompts = held_out_prompts(grid.held_out)
        self.tokens = create_annotators(http, persona.name, grid.annotators, report=lambda line: None)
        self.started = time.monotonic()
        self.answers: dict[int, list[list[str]]] = {}  # version -> its answers to the held-out prompts (judging)

    def rounds_by_hand(self, budgets: list[int]) -> None:
        """offline, semi-online, online, kto: label `every` labels (offline: all), then one round through POST
        /api/train, deployed at once when the gate passes it: the persona judges here, not a canary."""
        self.http.patch("/api/settings", json={"deploy_policy": "immediate"}).raise_for_status()
        chunk = max(budgets) if self.arm == "offline" else self.grid.every
        rounds, labelled = [], 0
        for index in range(max(budgets) // chunk):
            self.label(chunk, index)
            labelled += chunk
            rounds.append(train(self.http, round_config(self.grid, self.arm, self.seed, index)))
            self.say(f"{labelled} labels, round {len(rounds)}: {rounds[-1]['status']} -> v{rounds[-1]['version']} "
                     f"{rounds[-1]['error'][:80]}")
            if labelled in budgets:
                self.write_row(labelled, rounds)

    def canary_rounds(self, budgets: list[int]) -> None:
        """canary: the app's defaults as a deployment runs them. The scheduler starts a round every `every` labels
        (waiting while a canary is judged); a version the gate passes becomes the canary, and the annotators'
        rankings of its items promote it, roll it back or leave it undecided. After each `every` labels the
        annotators wait for the round in progress, as the other arms' do: simulated annotators rank in no time, so
        without the wait 64 labels were in before the first round ended, all on the base model. At each budget,
        judge what serves everyone and every canary against the version it was compared with, so the annotators'
        decision stands beside the persona's judgement of the same two versions."""
        auto = {"every_labels": self.grid.every, "every_minutes": 0,
                "config": round_config(self.grid, "canary", self.seed, 0)}
        self.http.patch("/api/settings", json={**self.grid.canary, "deploy_policy": "canary",
                                               "auto_train": auto}).raise_for_status()
        timeline, labelled = [], 0
        for index in range(max(budgets) // self.grid.every):
            self.label(self.grid.every, index)
            labelled += self.grid.every
            rounds = settle(self.http)
            timeline.append(self.moment(labelled))
            self.say(f"{labelled} labels, {len(rounds)} rounds: {timeline[-1]}")
            if labelled in budgets:
                self.write_row(labelled, rounds, timeline=list(timeline), canaries=self.judge_canaries())

    def label(self, n: int, index: int) -> None:
        sim = Simulator(self.url, self.tokens, self.persona, n, noise=self.grid.noise, ties=self.grid.ties,
                        feedback=(self.arm == "kto"), timeout=7200, seed=self.seed * 1000 + index)
        summary = sim.run(report=lambda line: None, every=60)
        if summary.errors or summary.timed_out:
            raise SystemExit(f"{self.arm}: the simulated annotators saw {summary.errors} errors "
                             f"(timed out: {summary.timed_out}): {summary.error_messages[:3]}")

    def moment(self, labelled: int) -> dict:
        """What serves, what is being judged and what trains, after `labelled` labels (the canary's timeline)."""
        state = self.http.get("/api/train").raise_for_status().json()
        canaries = {v["version"]: v["canary"] for v in self.http.get("/api/versions").raise_for_status().json()
                    if v["canary"] is not None}
        return {"labels": labelled, "serving": self.serving(), "rounds_paused": state["paused"] is not None,
                "canaries": {str(v): c["decision"] for v, c in sorted(canaries.items())}}

    def serving(self) -> int:
        return self.http.get("/api/health").raise_for_status().json()["policy_version"]

    def version_answers(self, version: int) -> list[list[str]]:
        if version not in self.answers:
            self.answers[version] = (self.base() if version == 0 else
                                     generate(self.http, self.prompts, self.grid.samples, version))
        return self.answers[version]

    def base(self) -> list[list[str]]:
        return base_answers(self.http, self.results, self.seed, self.prompts, self.grid.samples)

    def judge_canaries(self) -> list[dict]:
        """Every version that was a canary: the annotators' evidence (GET /api/versions) and the persona's verdicts
        on the held-out prompts, canary vs the version it was compared with (its parent, the serving one then)."""
        out = []
        for v in self.http.get("/api/versions").raise_for_status().json():
            if v["canary"] is None:
                continue
            mine, theirs = self.version_answers(v["version"]), self.version_answers(v["parent"])
            out.append({"version": v["version"], "parent": v["parent"], "status": v["status"],
                        "labels_used": v["labels_used"], "reason": v["reason"], **v["canary"],
                        "persona_verdicts": verdicts(self.persona, self.prompts, mine, theirs)})
        return out

    def write_row(self, labelled: int, rounds: list[dict], **extra) -> None:
        check_labels_held_out(self.http, self.prompts)
        final = self.serving()
        # the base model is drawn afresh against its stored answers, as it always was (a sample of 0.5, not 0.5)
        judged = judge(self.http, self.persona, final, self.prompts, self.base(), self.answers.get(final) if final
                       else None)
        if final:
            self.answers[final] = judged["answers"]
        row = {"key": row_key(self.persona.name, self.arm, self.seed, labelled), "persona": self.persona.name,
               "arm": self.arm, "seed": self.seed, "labels": labelled, "prompts": self.prompts, "final_version": final,
               "rounds": list(rounds), "precision": rounds_precision(rounds), "round_defaults": today_round_defaults(),
               **({"canary_defaults": today_canary_defaults()} if self.arm == "canary" else {}),
               **judged, **extra, "minutes": (time.monotonic() - self.started) / 60, "finished_at": time.time()}
        append_row(self.results, row)
        self.say(f"{row['key']}: win-rate vs base {win_rate([row['verdicts']]).describe()}")

    def say(self, line: str) -> None:
        print(f"  [{self.persona.name} {self.arm} seed {self.seed}] {line} at "
              f"{(time.monotonic() - self.started) / 60:.1f} min", flush=True)


def plan(grid: Grid, done: dict, only: set[str], personas: set[str], no_curve: bool,
         seeds: set[int] = frozenset()) -> list[tuple]:
    """(persona, arm, seed, budgets) of every job with a row still to write; empty filters keep everything."""
    jobs = []
    for persona in grid.personas:
        for seed in grid.seeds:
            for arm in grid.arms:
                filters = ((only, arm), (personas, persona), (seeds, seed))
                if any(chosen and value not in chosen for chosen, value in filters):
                    continue
                wanted = (grid.labels,) if no_curve else grid.checkpoints(arm)
                missing = [n for n in wanted if row_key(persona, arm, seed, n) not in done]
                if missing:  # a job reruns from 0 labels and writes only the rows still missing
                    jobs.append((persona, arm, seed, missing))
    return jobs


def build_grid(args) -> Grid:
    """The named grid with the command line's overrides (part of the results directory's identity)."""
    grid = GRIDS[args.grid]
    changes = {k: v for k, v in (("labels", args.labels), ("every", args.every), ("held_out", args.held_out),
                                 ("samples", args.samples)) if v is not None}
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    if args.random_ties:
        changes["ties"] = False
    if args.precision:
        changes["precision"] = args.precision
    if args.round:
        changes["round"] = round_overrides(args.round)
    if args.canary:
        changes["canary"] = round_overrides(args.canary, "--canary", "a CanaryConfig field")
    try:
        grid = replace(grid, **changes)
        RoundConfig.from_dict({k: v for k, v in grid.round.items()})  # an unknown knob fails here, not in a round
    except (ValueError, ConfigError) as exc:
        raise SystemExit(f"bad grid: {exc}") from None
    return grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=sorted(GRIDS), default="small")
    p.add_argument("--results", type=Path, help="results directory (default bench-results/loop-GRID)")
    p.add_argument("--table", type=Path, metavar="DIR",
                   help="print the table of DIR's rows (arms, differences, curve, each run's rounds) and exit")
    p.add_argument("--summary", type=Path, nargs="?", const=ROOT / "bench-results", metavar="ROOT",
                   help="print every results directory under ROOT (default bench-results/) pooled by what the rows "
                        "measure, with paired differences, and exit")
    p.add_argument("--only", default="", help=f"comma-separated arms to run now ({', '.join(ARMS)})")
    p.add_argument("--persona", default="", help="comma-separated personas to run now")
    p.add_argument("--seed", default="", help="comma-separated seeds to run now")
    p.add_argument("--no-curve", action="store_true", help="run the default arm to the comparison budget only")
    p.add_argument("--labels", type=int, help="override: label budget at which arms are compared")
    p.add_argument("--every", type=int, help="override: labels between rounds")
    p.add_argument("--held-out", type=int, help="override: held-out prompts judged")
    p.add_argument("--samples", type=int, help="override: answers per held-out prompt and model")
    p.add_argument("--seeds", type=int, help="override: number of seeds (0..N-1)")
    p.add_argument("--round", action="append", metavar="KEY=JSON", help="RoundConfig override, e.g. steps=4")
    p.add_argument("--canary", action="append", metavar="KEY=JSON",
                   help="the canary arm's CanaryConfig setting, e.g. canary_share=1.0")
    p.add_argument("--random-ties", action="store_true",
                   help="the personas order answers they score alike at random instead of tying them (the grids "
                        "run before ties existed, e.g. bench-results/loop-full)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="the server's --precision (default auto); the directories written before it existed ran in "
                        "fp32 (loop-ties, loop-full, ...): resume them with --precision fp32")
    p.add_argument("--model", help="the server's --model (default: the converted SmolLM2 in prefloop-data/models)")
    args = p.parse_args()
    if args.summary:
        if not args.summary.is_dir():
            raise SystemExit(f"{args.summary} is not a directory")
        print(summary(args.summary))
        return
    if args.table:
        settings = grid_settings(args.table)
        if settings is None:
            raise SystemExit(f"{args.table} is not a bench.loop results directory (no grid.json)")
        print(table(load_rows(args.table), settings["labels"], settings))
        return
    grid = build_grid(args)
    unknown = set(filter(None, args.only.split(","))) - set(grid.arms)
    if unknown:
        raise SystemExit(f"--only names arms not in the grid: {sorted(unknown)} (grid arms: {', '.join(grid.arms)})")
    leaked = overlap(held_out_prompts(grid.held_out), starter_prompts())
    if leaked:
        raise SystemExit(f"held-out prompts must not be in the training pool (the starter set): {leaked}")
    if args.model is None and needs_conversion(DEFAULT_MODEL, MODELS):
        raise SystemExit(f"run `make run` once (or bench.sampling) so that {converted_dir(MODELS)} exists")
    results = args.results or ROOT / "bench-results" / f"loop-{args.grid}"
    open_results(results, grid)
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl+C, so each job's `finally` stops its server: the default action
    # would leave the server and its policy worker running, orphaned (seen when a sitting was stopped early).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    jobs = plan(grid, load_rows(results), set(filter(None, args.only.split(","))),
                set(filter(None, args.persona.split(","))), args.no_curve, {int(s) for s in args.seed.split(",") if s})
    print(f"machine: {os.cpu_count()} cores; {len(jobs)} job(s) to run into {results}", flush=True)
    for persona, arm, seed, budgets in jobs:
        run_job(grid, persona, arm, seed, budgets, results, args.model)
    print()
    print(table(load_rows(results), grid.labels, grid.settings()))


if __name__ == "__main__":
    main()
