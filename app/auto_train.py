"""Automatic rounds: every N new labels and every T minutes, through the scheduler, unless paused.

The triggers are off by default and set from Admin or the API (app/settings.py: auto_train_every_labels,
_every_minutes, _config). They pause by themselves after AUTO_PAUSE_AFTER refused rounds in a row from the version
rounds start from now with the same settings (`AutoTrainer.pause_reason`): the next round would most likely be
refused the same way, and each costs minutes of cores that item sampling needs. They also wait while a canary is
being judged: a round finished meanwhile would become the next canary and end this one undecided, so with the
canary's defaults (16 rankings at least) and rounds every 16 labels nearly every canary would be cut short and
nothing new would serve. Under `canary_chain` a round started meanwhile trains from the canary instead
(`Deployments.round_parent`) and its version waits for the decision; they pause only while such a version waits.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from app.deployments import Deployments
from app.scheduler import Scheduler
from app.settings import AppSettings, AutoTrain
from learner.config import RoundConfig
from learner.errors import ConfigError
from storage import to_json
from storage.errors import Conflict
from storage.runs import ACTIVE
from storage.store import Store

log = logging.getLogger(__name__)

# Refused rounds in a row (same serving version, same automatic settings) after which automatic rounds pause. One
# refusal can be the round's own sample; a second one from the same parent with the same settings is a pattern. Seen
# in bench.loop's 128-label runs (structured, seeds 1-2): once a lineage passed max_kl from its serving version, every
# later round from it was refused (16.2, then more), and nothing else changes while the serving version does not.
AUTO_PAUSE_AFTER = 2

TICK_SECONDS = 10.0  # how often the timer looks at the clock: an "every T minutes" round starts up to this late


class AutoTrainer:
    """Starts rounds through `scheduler` when a trigger fires and nothing pauses them; counts from the scheduler's
    latest start, by hand or automatic."""

    def __init__(self, store: Store, deployments: Deployments, scheduler: Scheduler):
        self.store = store
        self.deployments = deployments
        self.scheduler = scheduler
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._pause_said: str | None = None  # the pause last logged, so that each is logged once

    def settings(self) -> AutoTrain:
        """The triggers as stored (app/settings.py: auto_train_every_labels, _every_minutes, _config)."""
        return AppSettings(self.store.settings, self.scheduler.config).auto_train()

    def on_label(self) -> None:
        every = self.settings().every_labels
        if every and self.store.labels.total() - self.scheduler.last_start.labels >= every:
            self.trigger("labels")

    def start_timer(self) -> None:
        if self._timer is None:
            self._timer = threading.Thread(target=self._tick, name="auto-train", daemon=True)
            self._timer.start()

    def stop(self) -> None:
        self._stop.set()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            minutes = self.settings().every_minutes
            if minutes and time.monotonic() - self.scheduler.last_start.monotonic >= minutes * 60:
                self.trigger("timer")

    def trigger(self, why: str) -> None:
        """A trigger fired (`why`: "labels" or "timer"): start a round with the automatic settings unless paused (the
        reason logged once) or one is running (the next trigger tries again)."""
        auto = self.settings()
        paused = self.pause_reason(auto)
        if paused is not None:
            if paused != self._pause_said:
                log.warning("automatic round not started (%s): %s", why, paused)
                self._pause_said = paused
            return
        try:
            run_id = self.scheduler.start(RoundConfig.from_dict(auto.config))
            log.info("automatic round %s started (%s)", run_id, why)
        except Conflict:
            pass  # a round is already running; the next trigger tries again

    def pause_reason(self, auto: AutoTrain | None = None) -> str | None:
        """Why automatic rounds are paused, or None when they are not (or are off): a canary is still being judged
        (its decision pending; under canary_chain, only while a version trained from it waits), their stored
        settings are no longer a valid RoundConfig, or the newest AUTO_PAUSE_AFTER finished rounds (cancelled ones
        aside) were all refused by the gate, each from the version rounds start from now and with the automatic
        rounds' settings. Read from the store each time, so it holds across restarts and ends by itself when the
        canary is decided, another version serves, the automatic settings change, or a round (one started by hand
        too) ends otherwise. The message stays the same while the reason does, so the log says it once."""
        auto = auto or self.settings()
        if not auto.enabled:
            return None
        return self._canary_pause() or self._refusal_pause(auto)

    def _canary_pause(self) -> str | None:
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
        return None

    def _refusal_pause(self, auto: AutoTrain) -> str | None:
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
