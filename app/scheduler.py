"""The scheduler: one training round at a time, in a subprocess, from a snapshot of the store to a deployed version.

    start() -> snapshot (Parquet, written by storage) -> `python -m learner.round` (subprocess; progress as JSON lines
    on its stdout, stored per step) -> version dir renamed into place by the learner -> handed to Deployments, which
    registers it and, if the gate passed, deploys it or starts its canary (app/deployments.py).

A failed, cancelled or killed round leaves the registry as it was and the same version serving: the learner
writes `<out>.partial` and renames only a complete version, and the store records a version only after that.
Automatic triggers (every N new labels, every T minutes) are off by default and set from Admin or the API. They pause
by themselves after AUTO_PAUSE_AFTER refused rounds in a row from the version serving now with the same settings
(`Scheduler.auto_pause`): the next round would most likely be refused the same way, and each costs minutes of cores
that item sampling needs. They also wait while a canary is being judged: a round finished meanwhile would become the
next canary and end this one undecided, so with the canary's defaults (16 rankings at least) and rounds every 16
labels nearly every canary would be cut short and nothing new would serve. Under `canary_chain` a round started
meanwhile trains from the canary instead (`Deployments.round_parent`) and its version waits for the decision; they
pause only while such a version waits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from app.config import ServeConfig
from app.deployments import Deployments
from app.policy import PolicyService
from app.settings import AppSettings, AutoTrain
from learner.config import RoundConfig
from learner.errors import ConfigError
from learner.lifetime import die_with_parent
from storage import to_json
from storage.errors import Conflict
from storage.exports import write_snapshot
from storage.runs import ACTIVE
from storage.store import Store

log = logging.getLogger(__name__)

# Refused rounds in a row (same serving version, same automatic settings) after which automatic rounds pause. One
# refusal can be the round's own sample; a second one from the same parent with the same settings is a pattern. Seen
# in bench.loop's 128-label runs (structured, seeds 1-2): once a lineage passed max_kl from its serving version, every
# later round from it was refused (16.2, then more), and nothing else changes while the serving version does not.
AUTO_PAUSE_AFTER = 2


def round_launcher(processes: int) -> list[str]:
    """The command that runs learner.round on `processes` processes (torchrun: standalone, on a free port)."""
    if processes == 1:
        return [sys.executable, "-m", "learner.round"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "learner.round"]


class Scheduler:
    def __init__(self, store: Store, policy: PolicyService, config: ServeConfig, deployments: Deployments):
        self.store = store
        self.policy = policy
        self.config = config
        self.deployments = deployments
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._run_id: int | None = None
        self._cancelled: dict[int, str] = {}  # run id -> why it was cancelled, recorded as the run's error
        self._labels_at_last_round = store.labels.total()
        self._last_round_at = time.monotonic()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._algorithm: str | None = None
        self._pause_said: str | None = None  # the pause last logged, so that each is logged once
        self.cores = CoreShare(policy)  # AppContext gives it the buffer to top up before a round

    # -- rounds -------------------------------------------------------------------------------------------------
    def start(self, overrides: dict) -> int:
        """Queue a round now; 409 (Conflict) when one is running, 422 (ConfigError) for unknown/invalid keys."""
        round_config = RoundConfig.from_dict(overrides)
        with self._lock:
            active = self.store.runs.active()
            if active is not None or self._run_id is not None:
                raise Conflict(f"run {active.run_id if active else self._run_id} is already in progress")
            run_id = self.store.runs.create(round_config.algorithm, round_config.to_dict())
            self._run_id = run_id
            self._algorithm = round_config.algorithm
        self._labels_at_last_round = self.store.labels.total()
        self._last_round_at = time.monotonic()
        self._worker = threading.Thread(target=self._execute, args=(run_id, round_config), name=f"round-{run_id}",
                                        daemon=True)
        self._worker.start()
        return run_id

    def cancel(self, run_id: int, reason: str = "cancelled by an admin") -> None:
        run = self.store.runs.get(run_id)  # NotFound -> 404
        if run.status not in ("queued", "running"):
            raise Conflict(f"run {run_id} is {run.status}; only a queued or running round can be cancelled")
        with self._lock:
            self._cancelled.setdefault(run_id, reason)
            process = self._process if self._run_id == run_id else None
        if process is not None:
            # SIGTERM: a round process dies of it (it has no handler), and torchrun first stops the processes it
            # launched (SIGKILL would leave them to die with it only through their own die_with_parent).
            process.terminate()

    def wait(self, run_id: int, timeout: float = 600.0) -> str:
        """Block until the run ends (tests, benchmarks); returns its final status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.store.runs.get(run_id).status
            if status not in ("queued", "running") and self._run_id != run_id:
                return status
            time.sleep(0.2)
        raise TimeoutError(f"run {run_id} still {status} after {timeout} s")

    @property
    def process(self) -> subprocess.Popen | None:
        return self._process

    def _execute(self, run_id: int, round_config: RoundConfig) -> None:
        runs = self.store.runs
        parent = self.store.versions.get(self.deployments.round_parent())
        version = self.store.versions.next_number()
        work = self.config.data_dir / "runs" / f"run-{run_id}"
        out_dir = self.config.versions_dir / f"v{version}"
        stderr_tail: deque[str] = deque(maxlen=40)
        try:
            runs.update(run_id, status="running", started_at=_now())
            # Every label goes into the snapshot: the reward model learns from all human pairs, and the learner
            # itself keeps only those within max_label_staleness for the policy update.
            snapshot = write_snapshot(self.store, work / "snapshot", parent_version=parent.version,
                                      base_model=str(self.policy.base_model_dir))
            log.info("run %s: snapshot %s", run_id, snapshot)
            (work / "round.json").write_text(json.dumps(round_config.to_dict()))
            shutil.rmtree(out_dir, ignore_errors=True)  # a leftover of a round killed before it registered
            command = [*round_launcher(self.config.round_processes), "--snapshot", str(work / "snapshot"),
                       "--base", str(self.policy.base_model_dir), "--out", str(out_dir),
                       "--config", str(work / "round.json"),
                       # The base model's log-probs of the human answers never change: kept across rounds.
                       "--ref-cache", str(self.config.models_dir / "ref-cache")]
            if parent.version != 0 and parent.path:
                command += ["--parent", parent.path]
            round_env = self.cores.before_round(work / "threads", cancelled=lambda: run_id in self._cancelled)
            if round_env:
                command += ["--threads-file", str(work / "threads")]
            with self._lock:
                if run_id in self._cancelled:
                    raise _Cancelled
                env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFLOOP_PRECISION": self.config.precision,
                       **round_env}  # the round computes where and as the server's policy does (--device, --precision)
                if self.config.device:
                    env["PREFLOOP_DEVICE"] = self.config.device
                # Its own session: Ctrl+C or SIGTERM sent to the server's process group (a terminal, systemd,
                # make) reaches the server alone, which cancels the round and records it so; a round killed by
                # the same signal first was recorded "failed". die_with_parent still ends it with the server.
                self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 text=True, env=env, preexec_fn=die_with_parent,
                                                 start_new_session=True)
            drain = threading.Thread(target=self._drain, args=(run_id, self._process.stderr, stderr_tail),
                                     daemon=True)
            drain.start()
            done = None
            for line in self._process.stdout:
                event = _event(line)
                if event and event.get("event") == "progress":
                    self._progress(run_id, event)
                elif event and event.get("event") == "warning":
                    runs.add_log(run_id, str(event.get("message", "")), kind="warning")
                elif event and event.get("event") in ("done", "error"):
                    done = event
            code = self._process.wait()
            drain.join(5)
            if run_id in self._cancelled:
                raise _Cancelled
            if code != 0 or not (out_dir / "metrics.json").is_file():
                said = (done or {}).get("error") or "".join(stderr_tail)[-2000:].strip()
                raise _RoundFailed(f"the round exited with code {code}: {said}")
            self._register(run_id, version, parent.version, out_dir, round_config, done)
        except _Cancelled:
            runs.update(run_id, status="cancelled", finished_at=_now(), error=self._cancelled[run_id])
        except Exception as exc:  # a failed round is recorded on the run, never raised into the app
            if isinstance(exc, _RoundFailed):  # the round said why (no labels yet, ...): one line, no traceback
                log.warning("run %s failed: %s", run_id, exc)
                error = f"RuntimeError: {exc}"  # as runs recorded it before these failures had a class of their own
            else:
                log.exception("run %s failed", run_id)
                error = f"{type(exc).__name__}: {exc}"
            runs.update(run_id, status="failed", finished_at=_now(), error=error)
        finally:
            self.cores.after_round()
            shutil.rmtree(out_dir.with_name(out_dir.name + ".partial"), ignore_errors=True)
            if self._process is not None:
                self._process.stdout.close()
                self._process.stderr.close()
            with self._lock:
                self._process = None
                self._run_id = None
                self._cancelled.pop(run_id, None)

    def _drain(self, run_id: int, stderr, tail: deque[str]) -> None:
        """The round's stderr: the last lines for a failure's message, and each line in the run's log (tqdm's
        progress bars left out: the run's own progress says as much)."""
        for line in stderr:
            tail.append(line)
            if line.strip() and "%|" not in line:
                self.store.runs.add_log(run_id, line)

    def _progress(self, run_id: int, event: dict) -> None:
        # step and loss are the policy's (the reward model's in a reward-only round); progress covers every phase;
        # phase, phase_step and phase_total say where the round is now (the Admin's "step x of y").
        counted = event.get("phase") in ("policy", "reward" if self._algorithm == "reward" else "policy")
        fields = {k: event[k] for k in ("progress", *(("step", "loss") if counted else ())) if event.get(k) is not None}
        if "progress" in fields:
            fields["progress"] = min(1.0, max(0.0, float(fields["progress"])))
        if isinstance(event.get("phase"), str):
            fields["phase"] = event["phase"]
            for name, key in (("phase_step", "step"), ("phase_total", "total")):
                if isinstance(event.get(key), int) and not isinstance(event.get(key), bool):
                    fields[name] = event[key]
        if fields:
            self.store.runs.update(run_id, **fields)
        if event.get("phase") in ("policy", "reward") and event.get("loss") is not None:
            metrics = {k: v for k, v in event.items() if k not in ("event", "step", "loss")}  # "phase" among them
            self.store.runs.add_step(run_id, int(event.get("step", 0)), float(event["loss"]), metrics)

    def _register(self, run_id: int, version: int, parent: int, out_dir: Path, round_config: RoundConfig,
                  done: dict | None) -> None:
        metrics = json.loads((out_dir / "metrics.json").read_text())
        gate = metrics.get("gate") or {}
        passed = bool(gate.get("passed"))
        self.deployments.register(version, parent, round_config.algorithm, out_dir, round_config.to_dict(), metrics,
                                  gate_passed=passed, reason=gate.get("reason"))
        self.store.runs.update(run_id, status="succeeded" if passed else "rejected",
                               finished_at=_now(), version=version, metrics=metrics, progress=1.0,
                               error=None if passed else gate.get("reason"))

    # -- automatic triggers -------------------------------------------------------------------------------------
    def auto_train(self) -> AutoTrain:
        """The triggers as stored (app/settings.py: auto_train_every_labels, _every_minutes, _config)."""
        return AppSettings(self.store.settings, self.config).auto_train()

    def on_label(self) -> None:
        every = self.auto_train().every_labels
        if every and self.store.labels.total() - self._labels_at_last_round >= every:
            self._auto("labels")

    def start_timer(self) -> None:
        if self._timer is None:
            self._timer = threading.Thread(target=self._tick, name="auto-train", daemon=True)
            self._timer.start()

    def stop(self) -> None:
        """Stop the timer; a round in progress is cancelled and recorded as such before this returns."""
        self._stop.set()
        run_id, worker = self._run_id, self._worker
        if run_id is not None:
            with contextlib.suppress(Conflict):  # it ended on its own meanwhile
                self.cancel(run_id, "cancelled: the server stopped")
        if worker is not None:
            worker.join(60)

    def _tick(self) -> None:
        while not self._stop.wait(10.0):
            minutes = self.auto_train().every_minutes
            if minutes and time.monotonic() - self._last_round_at >= minutes * 60:
                self._auto("timer")

    def _auto(self, why: str) -> None:
        auto = self.auto_train()
        paused = self.auto_pause(auto)
        if paused is not None:
            if paused != self._pause_said:
                log.warning("automatic round not started (%s): %s", why, paused)
                self._pause_said = paused
            return
        try:
            run_id = self.start(auto.config)
            log.info("automatic round %s started (%s)", run_id, why)
        except Conflict:
            pass  # a round is already running; the next trigger tries again

    def auto_pause(self, auto: AutoTrain | None = None) -> str | None:
        """Why automatic rounds are paused, or None when they are not (or are off): a canary is still being judged
        (its decision pending; under canary_chain, only while a version trained from it waits), their stored
        settings are no longer a valid RoundConfig, or the newest AUTO_PAUSE_AFTER finished rounds (cancelled ones
        aside) were all refused by the gate, each from the version rounds start from now and with the automatic
        rounds' settings. Read from the store each time, so it holds across restarts and ends by itself when the
        canary is decided, another version serves, the automatic settings change, or a round (one started by hand
        too) ends otherwise. The message stays the same while the reason does, so the log says it once."""
        auto = auto or self.auto_train()
        if not auto.enabled:
            return None
        canary = self.deployments.pending_canary
        if canary is not None and not self.deployments.canary_config.canary_chain:
            return (f"Automatic rounds are paused while the annotators judge the canary v{canary.version}: a round "
                    "finished now would become the next canary and end this one undecided. They start again once "
                    "it is promoted, rolled back or left undecided (Admin -> Versions shows its evidence).")
        waiting = self.store.versions.waiting(canary.version) if canary is not None else []
        if waiting:
            return (f"Automatic rounds are paused: v{waiting[0].version}, trained from the canary v{canary.version}, "
                    "waits for its decision (canary_chain) and becomes the next canary if it is promoted. They start "
                    "again once it is decided.")
        try:
            # as the runs table keeps a round's config (JSON: tuples as lists), to compare with theirs
            settings = json.loads(to_json(RoundConfig.from_dict(auto.config).to_dict(), "config"))
        except ConfigError as exc:  # stored before an upgrade that renamed or removed a RoundConfig field
            return (f"Automatic rounds are paused: their settings are no longer valid ({exc}). Save them again in "
                    "Admin -> Train or with PATCH /api/settings.")
        parent = self.deployments.round_parent()
        refused = []
        for run in self.store.runs.list(AUTO_PAUSE_AFTER + 20):  # a few cancelled runs in between are skipped
            if run.status in (*ACTIVE, "cancelled"):
                continue
            if (run.status != "rejected" or run.version is None or run.config != settings
                    or self.store.versions.get(run.version).parent != parent):
                break
            refused.append(run)
            if len(refused) == AUTO_PAUSE_AFTER:
                break
        if len(refused) < AUTO_PAUSE_AFTER:
            return None
        rounds = ", ".join(str(run.run_id) for run in reversed(refused))
        return (f"Automatic rounds are paused: rounds {rounds} in a row, each from v{parent} with the automatic "
                f"rounds' settings, were refused by the gate (the last: {refused[0].error or 'no reason recorded'}). "
                "They start again when another version serves, their settings change, or a round started by hand "
                "passes the gate.")


class _Cancelled(Exception):
    """The admin cancelled the run."""


class _RoundFailed(RuntimeError):
    """The round's process ended without a version and said why (its error event or stderr tail)."""


class CoreShare:
    """How a round and generation share a CPU (a GPU machine changes nothing):

    1. before the round starts, the buffer is topped up towards `buffer_max` for up to TOP_UP_SECONDS, so
       annotators have items ranked through most of the round;
    2. while it runs, the policy worker keeps WORKER_THREADS torch threads; the round gets the other cores while
       the worker generates (items or a Demo answer) and every core while it idles (a full buffer, nobody
       chatting: after a labelling session, the usual time for a round). The round reads its share from a small
       file at each step (`learner.round --threads-file`), which this class rewrites whenever generation starts
       or stops, so the two never oversubscribe the cores for longer than one step;
    3. afterwards the worker gets every core back.
    Only the worker backend has threads of its own to give; in-process and remote backends are left alone.
    """

    TOP_UP_SECONDS = 30.0  # ~4 batches of 4 items on a 2-core CPU; a round then starts at most this much later
    WORKER_THREADS = 1  # item sampling goes on at about half speed on 2 cores; the round takes the other core

    def __init__(self, policy: PolicyService, buffer=None, cpus: int | None = None):
        self.policy = policy
        self.buffer = buffer
        self.cpus = cpus or os.cpu_count() or 1
        self._threads_file: Path | None = None
        self._lock = threading.Lock()  # one rewrite of the file at a time, each from the state at that moment

    @property
    def applies(self) -> bool:
        return self.policy.device == "cpu" and hasattr(self.policy.backend, "set_threads")

    def before_round(self, threads_file: Path, cancelled: Callable[[], bool] = lambda: False) -> dict[str, str]:
        """Top the buffer up (until `cancelled()`), give the worker its share, start following generation into
        `threads_file`; the environment variables of the round's process (empty when the rule does not apply: no
        file is written)."""
        if not self.applies:
            return {}
        if self.buffer is not None:
            try:
                added = self.buffer.top_up(self.TOP_UP_SECONDS, stop=cancelled)
                log.info("topped the buffer up with %s items before the round", added)
            except Exception:  # a head start for annotators, not a condition of the round: the round runs
                if cancelled():  # the server is stopping: its worker may be gone mid-batch, as it should be
                    log.info("topping the buffer up before the round ended: the round was cancelled")
                else:
                    log.exception("topping the buffer up before the round failed; the round starts anyway")
        if cancelled():  # the round will not start (the server is stopping): no share to give or follow
            return {}
        self.policy.set_threads(self.WORKER_THREADS)
        with self._lock:
            self._threads_file = threads_file
        self.policy.watch_busy(self.share)
        self.share()
        return {"OMP_NUM_THREADS": str(self.round_threads(self.policy.generating))}

    def round_threads(self, generating: bool) -> int:
        return max(1, self.cpus - self.WORKER_THREADS) if generating else self.cpus

    def share(self) -> None:
        """Write the round's share for what the worker does now (called by the policy service on every change)."""
        with self._lock:
            if self._threads_file is None:
                return
            partial = self._threads_file.with_name(self._threads_file.name + ".partial")
            partial.write_text(str(self.round_threads(self.policy.generating)))
            os.replace(partial, self._threads_file)  # the round never reads half a number

    def after_round(self) -> None:
        if self.applies:
            self.policy.watch_busy(None)
            with self._lock:
                self._threads_file = None
            self.policy.set_threads(self.cpus)


def _event(line: str) -> dict | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _now() -> datetime:
    return datetime.now(UTC)
