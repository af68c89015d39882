"""The scheduler: one training round at a time, in a subprocess, from a snapshot of the store to a deployed version.

    start() -> snapshot (Parquet, written by storage) -> `python -m learner.round` (subprocess; progress as JSON lines
    on its stdout, stored per step) -> version dir renamed into place by the learner -> handed to Deployments, which
    registers it and, if the gate passed, deploys it or starts its canary (app/deployments.py).

A failed, cancelled or killed round leaves the registry as it was and the same version serving: the learner
writes `<out>.partial` and renames only a complete version, and the store records a version only after that.
Automatic rounds (every N new labels, every T minutes) start through `Scheduler.start` too: app/auto_train.py. How a
round shares a CPU with item sampling: app/cores.py.
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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from app.config import ServeConfig
from app.cores import CoreShare
from app.deployments import Deployments
from app.policy import PolicyService
from learner.config import RoundConfig
from learner.lifetime import die_with_parent
from storage.errors import Conflict
from storage.exports import write_snapshot
from storage.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundStart:
    """When the latest round was started (by hand or automatically): what automatic triggers count from."""

    labels: int  # labels stored by then
    monotonic: float  # time.monotonic() then


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
        self.last_start = RoundStart(store.labels.total(), time.monotonic())  # the server's start counts as one
        self._worker: threading.Thread | None = None
        self._algorithm: str | None = None
        self.cores = CoreShare(policy)  # AppContext gives it the buffer to top up before a round

    # -- rounds -------------------------------------------------------------------------------------------------
    def start(self, round_config: RoundConfig) -> int:
        """Queue a round now with a config the caller validated (`RoundConfig.from_dict`: 422 for unknown or invalid
        keys, before anything is queued); 409 (Conflict) when one is running."""
        with self._lock:
            active = self.store.runs.active()
            if active is not None or self._run_id is not None:
                raise Conflict(f"run {active.run_id if active else self._run_id} is already in progress")
            run_id = self.store.runs.create(round_config.algorithm, round_config.to_dict())
            self._run_id = run_id
            self._algorithm = round_config.algorithm
        self.last_start = RoundStart(self.store.labels.total(), time.monotonic())
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

    def stop(self) -> None:
        """A round in progress is cancelled and recorded as such before this returns (the server is stopping)."""
        run_id, worker = self._run_id, self._worker
        if run_id is not None:
            with contextlib.suppress(Conflict):  # it ended on its own meanwhile
                self.cancel(run_id, "cancelled: the server stopped")
        if worker is not None:
            worker.join(60)

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
            command = self._command(work, out_dir, parent)
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
            code, done = self._follow(run_id, self._process, stderr_tail)
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

    def _command(self, work: Path, out_dir: Path, parent) -> list[str]:
        """The round's command line: its snapshot, base, output, config, the reference cache and the parent."""
        command = [*round_launcher(self.config.round_processes), "--snapshot", str(work / "snapshot"),
                   "--base", str(self.policy.base_model_dir), "--out", str(out_dir),
                   "--config", str(work / "round.json"),
                   # The base model's log-probs of the human answers never change: kept across rounds.
                   "--ref-cache", str(self.config.models_dir / "ref-cache")]
        if parent.version != 0 and parent.path:
            command += ["--parent", parent.path]
        return command

    def _follow(self, run_id: int, process: subprocess.Popen, stderr_tail: deque[str]) -> tuple[int, dict | None]:
        """Store the round's progress, warnings and stderr as they come; its exit code and its last "done" or
        "error" event once it ends."""
        drain = threading.Thread(target=self._drain, args=(run_id, process.stderr, stderr_tail), daemon=True)
        drain.start()
        done = None
        for line in process.stdout:
            event = _event(line)
            if event and event.get("event") == "progress":
                self._progress(run_id, event)
            elif event and event.get("event") == "warning":
                self.store.runs.add_log(run_id, str(event.get("message", "")), kind="warning")
            elif event and event.get("event") in ("done", "error"):
                done = event
        code = process.wait()
        drain.join(5)
        return code, done

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

class _Cancelled(Exception):
    """The admin cancelled the run."""


class _RoundFailed(RuntimeError):
    """The round's process ended without a version and said why (its error event or stderr tail)."""


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
