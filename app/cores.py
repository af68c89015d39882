"""How a round and generation share a CPU: the buffer topped up before a round, the policy worker's threads and the
round's share while it runs (the round reads it from a small file at each step), every core back afterwards."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from app.policy import PolicyService

log = logging.getLogger(__name__)


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
