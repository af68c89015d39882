"""Simulated annotators: N threads that rank items through prefloop's public REST API, each by a persona's taste.

    prefloop simulate --url http://127.0.0.1:7860 --token=ADMIN_TOKEN --persona arithmetic --add-prompts 50 \\
        --annotators 4 --labels 200 [--noise 0.1] [--feedback] [--random-ties]
    python -m app.simulate ...          # the same without the CLI (this module needs only httpx)

It speaks HTTP only (httpx, the standard library and app.personas; nothing from storage or learner), so it runs as
its own process against any prefloop server, as an outside script would.

Accounts: N annotators need N accounts. Given an admin token (or none: then --data-dir's server.json gives the URL
and the local admin token of the server running there), it creates `sim-<persona>-<i>` through `POST /api/users`
(with a random suffix if that name is taken); `--tokens FILE` uses annotator tokens instead, one a line; an annotator
token alone runs one annotator.

Each annotator: `GET /api/items/next`; on 204 (nothing waits) it sleeps --poll seconds and asks again; else it ranks
the K answers by the persona (answers it scores alike as a tie, which yields no pair; --random-ties orders them at
random instead, as annotators had to before ties existed; each adjacent place then swapped with probability --noise),
posts the ranking and, with --feedback, the persona's thumbs. --labels M is the total over all annotators.

Agreement with the current policy (printed every --every seconds over the items seen since the last line): the API
does not tell annotators which version wrote an answer or its log-probs, so this reports what the persona thinks of
the answers it is served, i.e. how far the policy already does what the persona wants:
  approval  = thumbs up / (up + down) over the served answers the persona has an opinion on
  all-tie   = share of items whose K answers all get the same score (no preference: with --random-ties, a coin flip)
  score     = the persona's mean score of the served answers (persona-specific scale)
The deployed policy version (from /api/health) is printed alongside; served items can be up to max_staleness older.

Exit code: 0 when M rankings were stored and no request failed, 1 when any request failed (each is counted and the
first few are printed), 4 when --timeout passed first without errors (2 and 3 are usage and bad input, as for every
prefloop command: app/cli.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from app.personas import PERSONAS, Persona, get_persona, rank

SHOWN_ERRORS = 10  # error messages kept and printed; the rest are counted
Report = Callable[[str], None]  # where progress lines go: print, a logger, a list's append


class SimError(Exception):
    """The simulation cannot start as asked (no server, wrong token, too few tokens)."""


class _Fatal(Exception):
    """This annotator's token is refused: stop this annotator (counted as one error)."""


@dataclass
class ItemView:
    """What the persona thought of one served item."""

    scores: list[float]
    thumbs: list[str | None]

    @property
    def all_tie(self) -> bool:
        return len(set(self.scores)) <= 1


@dataclass
class Summary:
    """What a run did. `acknowledged` holds every ranking id the server answered 201 for."""

    rankings: int = 0
    feedback: int = 0
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timed_out: bool = False
    acknowledged: list[int] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"next": [], "ranking": [], "feedback": []})
    items: list[ItemView] = field(default_factory=list)
    empty_polls: int = 0  # 204 answers: nothing waited
    waiting_seconds: float = 0.0  # annotator time spent waiting for an item (the 204 calls and the pauses after)

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 4 if self.timed_out else 0  # 4: not 2, which is a usage error


def agreement(items: list[ItemView]) -> str:
    """The persona's view of served answers (see the module docstring), as one line."""
    if not items:
        return "no items"
    ups = sum(t == "up" for item in items for t in item.thumbs)
    downs = sum(t == "down" for item in items for t in item.thumbs)
    scores = [s for item in items for s in item.scores if s not in (float("inf"), float("-inf"))]
    approval = f"{100 * ups / (ups + downs):.0f}%" if ups + downs else "n/a"
    ties = 100 * sum(item.all_tie for item in items) / len(items)
    mean = f"{sum(scores) / len(scores):.2f}" if scores else "n/a"
    return f"approval {approval}, all-tie {ties:.0f}%, score {mean} ({len(items)} items)"


class Simulator:
    """N annotator threads, one token each, sharing a budget of `labels` rankings."""

    def __init__(self, url: str, tokens: list[str], persona: Persona, labels: int, noise: float = 0.0,
                 feedback: bool = False, timeout: float = 600.0, poll: float = 0.5, think: float = 0.0,
                 seed: int = 0, log: IO[str] | None = None, request_timeout: float = 30.0, ties: bool = True):
        if labels < 0:
            raise SimError(f"labels must be >= 0, got {labels}")
        if not 0.0 <= noise <= 1.0:
            raise SimError(f"noise must be in [0, 1], got {noise}")
        self.url = url.rstrip("/")
        self.tokens = tokens
        self.persona = persona
        self.noise = noise
        self.ties = ties  # answers the persona scores alike are sent as a tie (False: in random order)
        self.feedback = feedback
        self.timeout = timeout
        self.poll = poll
        self.think = think
        self.seed = seed
        self.log = log  # one JSON line per acknowledged ranking, flushed at once (a crash test reads it)
        self.request_timeout = request_timeout
        self.labels = labels
        self.summary = Summary()
        self._remaining = labels  # rankings not yet claimed by an annotator
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self, report: Report = print, every: float = 5.0) -> Summary:
        """Run the annotators until the labels are done or the timeout passes; print a line every `every` s."""
        start = time.monotonic()
        deadline = start + self.timeout
        threads = [threading.Thread(target=self._annotate, args=(i, token), name=f"sim-{i}", daemon=True)
                   for i, token in enumerate(self.tokens)]
        for thread in threads:
            thread.start()
        shown = 0
        next_report = start + every
        while alive := [t for t in threads if t.is_alive()]:
            now = time.monotonic()
            if now >= deadline and not self._stop.is_set():
                self._stop.set()
                self.summary.timed_out = True
            if now >= next_report:
                shown = self._report(report, start, shown)
                next_report = now + every
            alive[0].join(0.1)  # a stopped run still waits for requests in flight (bounded by request_timeout)
        self.summary.seconds = time.monotonic() - start
        self._report(report, start, shown)
        return self.summary

    def stop(self) -> None:
        """Ask every annotator to finish its current request and stop."""
        self._stop.set()

    def _report(self, report: Report, start: float, shown: int) -> int:
        with self._lock:
            s = self.summary
            recent = s.items[shown:]
            line = (f"[{time.monotonic() - start:6.1f} s] {s.rankings} rankings "
                    f"({s.rankings / max(time.monotonic() - start, 1e-9):.1f} labels/s), {s.feedback} thumbs, "
                    f"{s.errors} errors")
            shown = len(s.items)
        report(f"{line} | policy v{self._policy_version()} | {self.persona.name}: {agreement(recent)}")
        return shown

    def _policy_version(self) -> str:
        try:
            return str(httpx.get(f"{self.url}/api/health", timeout=5).json()["policy_version"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return "?"

    # -- one annotator --------------------------------------------------------------------------------------------
    def _claim(self) -> bool:
        """Take one ranking of the budget; False once all are acknowledged or the run stops. While the rest of the
        budget is held by other annotators, wait: one of them may hand its claim back (204, an error)."""
        while True:
            with self._lock:
                if self._stop.is_set() or self.summary.rankings >= self.labels:
                    return False
                if self._remaining > 0:
                    self._remaining -= 1
                    return True
            self._stop.wait(0.05)

    def _unclaim(self) -> None:
        with self._lock:
            self._remaining += 1

    def _error(self, message: str) -> None:
        with self._lock:
            self.summary.errors += 1
            if len(self.summary.error_messages) < SHOWN_ERRORS:
                self.summary.error_messages.append(message)

    def _timed(self, name: str, seconds: float) -> None:
        with self._lock:
            self.summary.latencies[name].append(seconds)

    def _annotate(self, index: int, token: str) -> None:
        rng = random.Random(self.seed * 1_000_003 + index)
        headers = {"authorization": f"Bearer {token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=self.request_timeout) as http:
            while self._claim():
                done = False
                try:
                    done = self._label_one(http, rng)
                except _Fatal as exc:
                    self._error(f"annotator {index}: {exc}")
                    return
                except httpx.HTTPError as exc:  # the server is down or restarting: count it, wait, go on
                    self._error(f"annotator {index}: {type(exc).__name__}: {exc}")
                    self._stop.wait(self.poll)
                except (ValueError, KeyError, TypeError) as exc:  # a body that is not the contract's
                    self._error(f"annotator {index}: unexpected response: {exc!r}")
                    self._stop.wait(self.poll)
                finally:
                    if not done:
                        self._unclaim()
                if done and self.think:
                    self._stop.wait(self.think)

    def _label_one(self, http: httpx.Client, rng: random.Random) -> bool:
        """Fetch, rank and submit one item; True when the server acknowledged the ranking."""
        t0 = time.perf_counter()
        r = http.get("/api/items/next")
        self._timed("next", time.perf_counter() - t0)
        if r.status_code == 204:
            self._stop.wait(self.poll)
            with self._lock:
                self.summary.empty_polls += 1
                self.summary.waiting_seconds += time.perf_counter() - t0
            return False
        if r.status_code in (401, 403):
            raise _Fatal(f"GET /api/items/next -> {r.status_code}: {_message(r)}")
        if r.status_code != 200:
            self._error(f"GET /api/items/next -> {r.status_code}: {_message(r)}")
            self._stop.wait(self.poll)
            return False
        item = r.json()
        prompt = item["prompt"]
        answers = [(a["answer_id"], a["text"]) for a in item["answers"]]
        order = rank(self.persona, prompt, answers, rng, self.noise, ties=self.ties)
        view = ItemView([self.persona.score(prompt, text) for _, text in answers],
                        [self.persona.thumbs(prompt, text) for _, text in answers])
        t0 = time.perf_counter()
        r = http.post(f"/api/items/{item['item_id']}/ranking", json={"ranking": order})
        self._timed("ranking", time.perf_counter() - t0)
        if r.status_code != 201:
            self._error(f"POST /api/items/{item['item_id']}/ranking -> {r.status_code}: {_message(r)}")
            return False
        ranking_id = r.json()["ranking_id"]
        with self._lock:
            self.summary.rankings += 1
            self.summary.acknowledged.append(ranking_id)
            self.summary.items.append(view)
            if self.log is not None:
                self.log.write(json.dumps({"ranking_id": ranking_id, "item_id": item["item_id"]}) + "\n")
                self.log.flush()
        if self.feedback:
            self._send_thumbs(http, answers, view.thumbs)
        return True

    def _send_thumbs(self, http: httpx.Client, answers: list[tuple[int, str]], thumbs: list[str | None]) -> None:
        for (answer_id, _), value in zip(answers, thumbs):
            if value is None:
                continue
            t0 = time.perf_counter()
            r = http.post(f"/api/answers/{answer_id}/feedback", json={"value": value})
            self._timed("feedback", time.perf_counter() - t0)
            if r.status_code == 201:
                with self._lock:
                    self.summary.feedback += 1
            else:
                self._error(f"POST /api/answers/{answer_id}/feedback -> {r.status_code}: {_message(r)}")


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200]


# -- setting up: server, accounts, prompts -----------------------------------------------------------------------
def server_from_data_dir(data_dir: Path) -> tuple[str, str]:
    """(url, local admin token) from the server.json a running `prefloop serve` leaves in its data dir."""
    path = Path(data_dir) / "server.json"
    try:
        info = json.loads(path.read_text())
        return info["url"], info["token"]
    except (OSError, ValueError, KeyError) as exc:
        raise SimError(f"no running server found through {path} ({exc}); pass --url and --token") from None


def _call(http: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response:
    try:
        return http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise SimError(f"cannot reach {http.base_url}: {exc}") from None


def whoami(http: httpx.Client) -> dict:
    r = _call(http, "GET", "/api/me")
    if r.status_code != 200:
        raise SimError(f"the server refused the token: {r.status_code} {_message(r)}")
    return r.json()


def account_name(persona: str, index: int, suffix: str = "") -> str:
    safe = re.sub(r"[^A-Za-z0-9_.@-]", "-", persona)[:40]
    return f"sim-{safe}-{index}" + (f"-{suffix}" if suffix else "")


def create_annotators(http: httpx.Client, persona: str, n: int, report: Report = print) -> list[str]:
    """N annotator accounts `sim-<persona>-<i>` (a random suffix where the name is taken); their tokens."""
    tokens, names = [], []
    suffix = secrets.token_hex(2)
    for i in range(n):
        for name in (account_name(persona, i), account_name(persona, i, suffix)):
            r = _call(http, "POST", "/api/users", json={"name": name, "role": "annotator"})
            if r.status_code == 201:
                tokens.append(r.json()["token"])
                names.append(name)
                break
            if r.status_code != 409:
                raise SimError(f"cannot create annotator {name!r}: {r.status_code} {_message(r)}")
        else:
            raise SimError(f"cannot create annotator {account_name(persona, i)!r}: both names are taken")
    report(f"created {n} annotator accounts: {names[0]}" + (f" .. {names[-1]}" if n > 1 else ""))
    return tokens


def annotator_tokens(http: httpx.Client, persona: str, n: int, tokens_file: Path | None,
                     report: Report = print) -> list[str]:
    """The N tokens the annotators use: from --tokens FILE, new accounts (admin token) or the token itself."""
    if tokens_file is not None:
        try:
            lines = [line.strip() for line in Path(tokens_file).read_text().splitlines()]
        except OSError as exc:
            raise SimError(f"cannot read tokens file: {exc}") from None
        tokens = [line for line in lines if line and not line.startswith("#")]
        if len(tokens) < n:
            raise SimError(f"--annotators {n} needs {n} tokens, {tokens_file} has {len(tokens)}")
        return tokens[:n]
    me = whoami(http)
    if me["role"] == "admin":
        return create_annotators(http, persona, n, report)
    if n != 1:
        raise SimError(f"--annotators {n} needs an admin token (to create accounts) or --tokens FILE; "
                       f"{me['name']!r} is an {me['role']}")
    return [http.headers["authorization"].partition(" ")[2]]


def add_prompts(http: httpx.Client, persona: Persona, n: int, seed: int, report: Report = print) -> None:
    if persona.prompts is None:
        raise SimError(f"persona {persona.name!r} has no prompt generator; --add-prompts works with: "
                       + ", ".join(p.name for p in PERSONAS.values() if p.prompts))
    r = _call(http, "POST", "/api/prompts", json={"prompts": persona.prompts(n, seed)})
    if r.status_code != 201:
        raise SimError(f"cannot add prompts: {r.status_code} {_message(r)}")
    body = r.json()
    report(f"added {body['added']} {persona.name} prompts ({body['duplicates']} already there)")


# -- command line ------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="the server, e.g. http://127.0.0.1:7860 (default: from --data-dir's server.json)")
    p.add_argument("--token", default=os.environ.get("PREFLOOP_TOKEN"),
                   help="an admin token (creates the annotators) or one annotator's token "
                        "(default: $PREFLOOP_TOKEN, else the local token in --data-dir's server.json); "
                        "write --token=TOKEN, as a token may start with '-'")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("PREFLOOP_DATA_DIR") or "prefloop-data"),
                   help="where a running server left server.json (used when --url or --token is missing)")
    p.add_argument("--tokens", type=Path, help="a file of annotator tokens, one a line, instead of new accounts")
    p.add_argument("--persona", default="concise",
                   help=f"{', '.join(PERSONAS)}, or package.module:attribute (default concise)")
    p.add_argument("--annotators", type=int, default=1, help="concurrent annotators (default 1)")
    p.add_argument("--labels", type=int, default=100, help="rankings to submit, all annotators together")
    p.add_argument("--noise", type=float, default=0.0, help="probability of swapping each adjacent pair (0..1)")
    p.add_argument("--feedback", action="store_true", help="also send the persona's thumbs up/down")
    p.add_argument("--random-ties", action="store_true",
                   help="order answers the persona scores alike at random instead of sending them as a tie")
    p.add_argument("--add-prompts", type=int, default=0, metavar="N",
                   help="first add N of the persona's prompts (admin token; arithmetic has a generator)")
    p.add_argument("--timeout", type=float, default=600.0, help="stop after this many seconds (default 600)")
    p.add_argument("--poll", type=float, default=0.5, help="seconds to wait when nothing waits (204)")
    p.add_argument("--think", type=float, default=0.0, help="seconds each annotator pauses after a label")
    p.add_argument("--every", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("--seed", type=int, default=0, help="seeds the rankings' tie-breaks and noise")
    p.add_argument("--log", type=Path, help="append every acknowledged ranking as a JSON line (flushed at once)")


def run(args: argparse.Namespace, report: Report = print) -> int:
    """Run a simulation from parsed arguments; the exit code (see the module docstring)."""
    try:
        if args.annotators < 1:
            raise SimError(f"--annotators must be >= 1, got {args.annotators}")
        try:
            persona = get_persona(args.persona)
        except ValueError as exc:
            raise SimError(str(exc)) from None
        url, token = args.url, args.token
        needs_token = args.tokens is None or args.add_prompts  # annotator tokens from a file need no admin
        if url is None or (token is None and needs_token):
            found_url, found_token = server_from_data_dir(args.data_dir)
            url, token = url or found_url, token or found_token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            if args.add_prompts:
                add_prompts(http, persona, args.add_prompts, args.seed, report)
            tokens = annotator_tokens(http, persona.name, args.annotators, args.tokens, report)
        with open(args.log, "a", encoding="utf-8") if args.log else contextlib.nullcontext() as log:
            simulator = Simulator(url, tokens, persona, args.labels, noise=args.noise, feedback=args.feedback,
                                  timeout=args.timeout, poll=args.poll, think=args.think, seed=args.seed, log=log,
                                  ties=not args.random_ties)
            summary = simulator.run(report, every=args.every)
    except SimError as exc:
        print(f"prefloop simulate: {exc}", file=sys.stderr)
        return 1
    for message in summary.error_messages:
        print(f"error: {message}", file=sys.stderr)
    ending = "timed out" if summary.timed_out else "done"
    report(f"{ending}: {summary.rankings} rankings, {summary.feedback} thumbs in {summary.seconds:.1f} s "
           f"({summary.rankings / max(summary.seconds, 1e-9):.1f} labels/s), {summary.errors} errors; "
           f"{persona.name} overall: {agreement(summary.items)}")
    return summary.exit_code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prefloop simulate", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
