"""The prefetch buffer: items sampled ahead of annotators, and who is working on which.

Ready items live in the store (an item is "waiting" until `overlap` annotators ranked or skipped it), so a restart
loses none of them. A background thread keeps `buffer_size` items waiting, plus one for every item currently
reserved, so fetching the next item is a database read and never waits for generation while the buffer holds one.
Items sampled more than `max_staleness` versions before the deployed one stop being served; the thread replaces them.

Reservations are in memory: an item handed to an annotator is kept from others for `reserve_seconds`. Losing them
in a crash only means an item may be shown to a second annotator, never that a label is lost.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass

from app.config import ServeConfig
from app.policy import PolicyService
from storage.items import Answer, AnswerRecord, Item
from storage.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reservation:
    user_id: int
    item_id: int
    since: float  # time.monotonic() when handed out: the label's "seconds taken" counts from here
    until: float


def shown_answers(item: Item, user_id: int) -> list[Answer]:
    """The item's answers in the order this annotator sees them: shuffled so position carries no signal of which
    sample came first, stable across reloads, different for each annotator (REST and UI show the same order)."""
    answers = list(item.answers)
    random.Random(item.item_id * 1_000_003 + user_id).shuffle(answers)
    return answers


class ItemBuffer:
    """Hands annotators their next item and keeps the buffer full in a background thread."""

    def __init__(self, store: Store, policy: PolicyService, config: ServeConfig):
        self.store = store
        self.policy = policy
        self.config = config
        self._lock = threading.Lock()
        self._reservations: dict[tuple[int, int], Reservation] = {}  # (item_id, user_id) -> reservation
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # -- annotators ---------------------------------------------------------------------------------------------
    @property
    def min_version(self) -> int:
        return max(0, self.policy.version - self.config.max_staleness)

    def next_for(self, user_id: int) -> Item | None:
        """The item this annotator should rank now, reserved for them; None when nothing waits."""
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            held = [r for r in self._reservations.values() if r.user_id == user_id]
            for reservation in sorted(held, key=lambda r: r.since):  # a reload shows the same item again
                if self.store.items.waiting(user_id, self.min_version, self.config.overlap,
                                            only=[reservation.item_id], limit=1):
                    return self.store.items.get(reservation.item_id)
                self._release(reservation.item_id, user_id)
            busy = self._busy_items(exclude_user=user_id)
            for item_id in self.store.items.waiting(user_id, self.min_version, self.config.overlap, exclude=busy,
                                                    limit=1):
                self._reservations[(item_id, user_id)] = Reservation(
                    user_id, item_id, now, now + self.config.reserve_seconds)
                self._wake.set()
                return self.store.items.get(item_id)
        self._wake.set()
        return None

    def seconds_taken(self, item_id: int, user_id: int) -> float | None:
        """Seconds since the item was handed to this annotator, or None if it was not (e.g. a script's guess)."""
        with self._lock:
            reservation = self._reservations.get((item_id, user_id))
        return None if reservation is None else round(time.monotonic() - reservation.since, 3)

    def done(self, item_id: int, user_id: int) -> None:
        """The annotator ranked or skipped the item: free it and let the thread top the buffer up."""
        with self._lock:
            self._release(item_id, user_id)
        self._wake.set()

    def reserved_count(self) -> int:
        with self._lock:
            self._expire(time.monotonic())
            return len(self._reservations)

    def waiting_count(self) -> int:
        return self.store.items.count_waiting(self.min_version, self.config.overlap)

    def _busy_items(self, exclude_user: int) -> set[int]:
        """Items reserved by `overlap` or more other annotators."""
        counts: dict[int, int] = {}
        for (item_id, user_id) in self._reservations:
            if user_id != exclude_user:
                counts[item_id] = counts.get(item_id, 0) + 1
        return {item_id for item_id, n in counts.items() if n >= self.config.overlap}

    def _release(self, item_id: int, user_id: int) -> None:
        self._reservations.pop((item_id, user_id), None)

    def _expire(self, now: float) -> None:
        for key in [k for k, r in self._reservations.items() if r.until <= now]:
            del self._reservations[key]

    # -- sampling -----------------------------------------------------------------------------------------------
    def fill_once(self) -> bool:
        """Sample one item if the buffer is short. Returns True if it sampled one."""
        target = self.config.buffer_size + self.reserved_count()
        if self.waiting_count() >= target:
            return False
        prompts = self.store.prompts.least_sampled(1)
        if not prompts:
            return False
        prompt = prompts[0]
        seed = random.randrange(2**31)
        version, answers = self.policy.sample(prompt.text, self.config.k, self.config.sampling, seed=seed)
        self.store.items.add(
            prompt.prompt_id,
            version,
            {**self.config.sampling.to_dict(), "k": self.config.k, "seed": seed},
            [AnswerRecord(a.text, a.token_count, a.finish_reason, a.logprob_sum) for a in answers],
        )
        return True

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sampled = self.fill_once()
                self.last_error = None
            except Exception as exc:  # keep the thread alive: log, show it in health/admin, retry after a pause
                log.exception("prefetch failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
                sampled = False
                self._stop.wait(5.0)
            if not sampled:
                self._wake.wait(2.0)
                self._wake.clear()
