"""The learning benchmark: at the same budget of human labels, does labelling the current policy (semi-online) beat
labelling a stale one (offline)? A miniature of arXiv 2506.21495 / 2405.08448 on this CPU, end to end.

    .venv/bin/python -m bench.loop [--persona concise] [--labels 32] [--every 16] [--eval-prompts 12]

With these defaults the whole table takes about 46 minutes on a 2-core CPU (docs/benchmarks.md).

Every arm runs the real server (`prefloop serve`, a separate process, the real SmolLM2) and the real scheduler:
simulated annotators label through the REST API only, rounds start with `POST /api/train`, and the gate decides what
is deployed. Arms share the persona, the label budget, the prompts and the seed:
  offline      all labels collected on version 0, then one DPO round on all of them (max_staleness None), its
               on-policy pairs generated once at the start (sync_every = steps), with as many optimizer steps as
               the semi-online arm takes in all its rounds (same compute);
  semi-online  a DPO round and a redeploy every `--every` labels; the server serves only the deployed version's
               items (max_staleness 0), so every label is on the current policy;
  kto          as semi-online, but KTO on the persona's thumbs.
The judge is the persona, not our reward model: on held-out prompts never used for training, the final policy and
the base model each answer (`POST /api/generate`), and the persona prefers one (ties count half). KL to the base,
entropy and mean length come from the final version's own evaluation (metrics.json).
Prints the table (markdown) and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from app.personas import get_persona
from app.server import free_port
from app.simulate import Simulator, create_annotators

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "prefloop-data" / "models"
HELD_OUT = [  # never in the training pool (the starter set): the judge's prompts
    "What is a good way to start learning to draw?", "Why do cats purr?", "How does a bicycle stay upright?",
    "What should I pack for a weekend hike?", "Explain what inflation is.", "How do vaccines work?",
    "Why do onions make people cry?", "Why is the ocean salty?", "How do I boil an egg?",
    "What makes a good password?", "Why do leaves change colour in autumn?", "What is a black hole?",
    "How can I improve my sleep?", "What is machine learning?", "How do bees make honey?",
    "What causes thunder?", "How do I write a cover letter?", "How do submarines dive and surface?",
    "What is the tallest animal?", "How does a refrigerator keep food cold?", "What is photosynthesis for?",
    "How do I make a cup of tea?", "Why is exercise good for you?", "What does a compiler do?",
]
ROUND = {"max_new_tokens": 64}  # rollouts and eval answers of a round; everything else is RoundConfig's default
DEFAULT_STEPS = 12  # RoundConfig's default steps per round (learner/config.py)


def starter_prompts() -> set[str]:
    with open(ROOT / "storage" / "starter_prompts.jsonl", encoding="utf-8") as f:
        return {json.loads(line)["prompt"] for line in f if line.strip()}


def start_server(data_dir: Path, max_staleness: int) -> tuple[subprocess.Popen, str]:
    """`prefloop serve` on a free port; its log goes to server.log beside the data dir."""
    port = free_port()
    env = {**os.environ, "PREFLOOP_MAX_ITEM_STALENESS": str(max_staleness), "PREFLOOP_BUFFER_SIZE": "3",
           "PREFLOOP_MAX_NEW_TOKENS": "96"}
    with open(data_dir.parent / "server.log", "w") as log:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--data-dir", str(data_dir), "--port",
                                   str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the server exited: see {data_dir.parent / 'server.log'}")
        time.sleep(0.5)
    raise SystemExit("the server did not start")


def admin_token(data_dir: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "app.cli", "users", "add", "bench", "--role", "admin",
                          "--data-dir", str(data_dir)], capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.strip().splitlines()[-1]


def train(http: httpx.Client, config: dict) -> dict:
    run_id = http.post("/api/train", json=config).raise_for_status().json()["run_id"]
    while (run := http.get(f"/api/runs/{run_id}").json())["status"] in ("queued", "running"):
        time.sleep(2)
    return run


def judge(http: httpx.Client, persona, version: int, prompts: list[str], samples: int) -> dict:
    """The persona compares `version`'s answers with the base model's, prompt by prompt; ties count half."""
    wins, lengths = [], {version: [], 0: []}
    for prompt in prompts:
        for _ in range(samples):
            answers = {}
            for v in (version, 0):
                r = http.post("/api/generate", json={"prompt": prompt, "version": v, "max_new_tokens": 96})
                answers[v] = r.raise_for_status().json()["text"]
                lengths[v].append(len(answers[v].split()))
            a, b = persona.score(prompt, answers[version]), persona.score(prompt, answers[0])
            wins.append(1.0 if a > b else 0.5 if a == b else 0.0)
    return {"win_rate": sum(wins) / len(wins), "words": sum(lengths[version]) / len(lengths[version]),
            "base_words": sum(lengths[0]) / len(lengths[0]), "judged": len(wins)}


def run_arm(arm: str, args, tmp: Path) -> dict:
    persona = get_persona(args.persona)
    data_dir = tmp / arm / "data"
    (data_dir / "models").mkdir(parents=True)
    os.symlink((MODELS / "smollm2").resolve(), data_dir / "models" / "smollm2")
    token = admin_token(data_dir)
    semi_online = arm != "offline"
    server, url = start_server(data_dir, max_staleness=0 if semi_online else 2)
    started = time.monotonic()
    http = httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=300)
    rounds = []
    try:
        # Each round's version serves at once: the simulated annotators judge it through the held-out win-rate, not
        # through a canary (which would hold it back until they had ranked enough mixed items).
        http.patch("/api/settings", json={"deploy_policy": "immediate"}).raise_for_status()
        tokens = create_annotators(http, persona.name, args.annotators, report=lambda line: None)
        n_rounds = args.labels // args.every
        chunks = [args.every] * n_rounds if semi_online else [args.labels]
        for index, labels in enumerate(chunks):
            sim = Simulator(url, tokens, persona, labels, noise=args.noise, feedback=(arm == "kto"),
                            timeout=3600, seed=args.seed * 1000 + index)
            summary = sim.run(report=lambda line: None, every=30)
            if summary.errors:
                raise SystemExit(f"{arm}: the simulated annotators saw {summary.errors} errors")
            if arm == "offline":
                config = {**ROUND, "algorithm": "dpo", "max_label_staleness": None, "steps": DEFAULT_STEPS * n_rounds,
                          "sync_every": DEFAULT_STEPS * n_rounds, "seed": args.seed}
            else:
                config = {**ROUND, "algorithm": "dpo" if arm == "semi-online" else "kto", "seed": args.seed + index}
            run = train(http, config)
            rounds.append(run)
            print(f"  [{arm}] round {len(rounds)}: {run['status']} -> version {run['version']} "
                  f"({(run.get('error') or '')[:80]}) at {time.monotonic() - started:.0f} s", flush=True)
        final = http.get("/api/health").json()["policy_version"]
        versions = {v["version"]: v for v in http.get("/api/versions").json()}
        metrics = versions[final]["metrics"] if final else {}
        verdict = judge(http, persona, final, HELD_OUT[: args.eval_prompts], args.samples)
        return {"arm": arm, "final": final, "rounds": rounds, "metrics": metrics, **verdict,
                "minutes": (time.monotonic() - started) / 60}
    finally:
        server.terminate()
        server.wait(60)


def table(results: list[dict], args) -> str:
    lines = [f"persona `{args.persona}`, {args.labels} labels per arm (rankings of K=4), rounds every {args.every} "
             f"labels, judged on {args.eval_prompts} held-out prompts x {args.samples} samples, seed {args.seed}",
             "",
             "| arm | rounds (deployed / rejected) | final version | win-rate vs base (persona) | words: final / base "
             "| KL to base | entropy | mean length (tokens) | EOS rate | minutes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        m = r["metrics"]
        deployed = sum(run["status"] == "succeeded" for run in r["rounds"])
        rejected = sum(run["status"] == "rejected" for run in r["rounds"])

        def fmt(key):
            value = m.get(key)
            return f"{value:.3f}" if isinstance(value, (int, float)) else "-"

        lines.append(f"| {r['arm']} | {len(r['rounds'])} ({deployed} / {rejected}) | v{r['final']} | "
                     f"{r['win_rate']:.2f} | {r['words']:.1f} / {r['base_words']:.1f} | {fmt('kl_to_reference')} | "
                     f"{fmt('entropy')} | {fmt('mean_answer_length')} | {fmt('eos_rate')} | {r['minutes']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--persona", default="concise")
    p.add_argument("--labels", type=int, default=32, help="label budget per arm (rankings)")
    p.add_argument("--every", type=int, default=16, help="labels between rounds in the semi-online arms")
    p.add_argument("--annotators", type=int, default=2)
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--eval-prompts", type=int, default=12, help=f"held-out prompts judged (at most {len(HELD_OUT)})")
    p.add_argument("--samples", type=int, default=1, help="answers per held-out prompt and model")
    p.add_argument("--arms", default="offline,semi-online,kto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    overlap = set(HELD_OUT) & starter_prompts()
    if overlap:
        raise SystemExit(f"held-out prompts must not be in the training pool (the starter set): {sorted(overlap)}")
    if not (MODELS / "smollm2" / "config.json").is_file():
        raise SystemExit(f"run `make run` once (or bench.sampling) so that {MODELS / 'smollm2'} exists")
    print(f"machine: {os.cpu_count()} cores, no GPU; model SmolLM2-135M-Instruct; arms {args.arms}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm in args.arms.split(","):
            results.append(run_arm(arm, args, Path(tmp)))
            print(f"{arm}: win-rate vs base {results[-1]['win_rate']:.2f} in {results[-1]['minutes']:.1f} min",
                  flush=True)
    print()
    print(table(results, args))


if __name__ == "__main__":
    main()
