"""The prefetch buffer: items sampled ahead of annotators, and who is working on which.

Ready items live in the store (an item is "waiting" until `overlap` annotators ranked or skipped it), so a restart
loses none of them. A background thread keeps `buffer_size` items waiting, plus one for every item currently
reserved, so fetching the next item is a database read and never waits for generation while the buffer holds one.
Items sampled by a version more than `max_item_staleness` deployed versions back along the serving version's lineage
(or off it: a rolled-back version) stop being served; the thread replaces them. While a canary runs, a share of new
items mix its answers with the serving version's (app/deployments.py decides which, app/canary.py how many), and
annotators get those items before the serving version's older ones, so its decision does not wait for the buffer.

Reservations are in memory: an item handed to an annotator is kept from others for `reserve_seconds`. They are also
the proof of what was handed to whom: a ranking, thumbs or skip is accepted only on an item `next_for` handed to that
annotator (`check_handed`). Once a reservation expires the item may go to someone else; until then, or if nobody
took its slot, the first annotator can still submit it. Losing reservations in a restart only means an annotator
fetches their item again (GET /api/items/next hands it back while it still waits), never that a label is lost.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from app.config import ServeConfig
from app.deployments import Deployments
from app.generation.backend import ItemRequest
from app.policy import PolicyService
from learner.data import hash_fraction
from storage.errors import NotHanded
from storage.items import Answer, AnswerRecord, Item
from storage.prompts import Prompt
from storage.store import Store

log = logging.getLogger(__name__)

# How long an expired reservation is remembered, so its annotator can still submit the item when nobody else took
# its slot (a long lunch, a night): one record per annotator and item handed, dropped when they rank or skip it.
HANDED_MEMORY_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class Reservation:
    user_id: int
    item_id: int
    since: float  # time.monotonic() when handed out: the label's "seconds taken" counts from here
    until: float  # kept from others until then; remembered as handed until HANDED_MEMORY_SECONDS later

    def live(self, now: float) -> bool:
        return now < self.until


class BufferSizer:
    """How many ready items the buffer should hold: the items handed out per second over the last RATE_WINDOW_S
    seconds, times twice the seconds one batch takes to sample (so the next batch is ready before this one is
    ranked), within the floor and ceiling the config sets. With no label traffic that is the floor."""

    RATE_WINDOW_S = 120.0  # long enough to smooth one annotator's pauses, short enough to follow a shift change
    SMOOTHING = 0.3  # weight of the newest batch in the moving average of seconds per batch

    def __init__(self) -> None:
        self._handed: deque[float] = deque()
        self.batch_seconds: float | None = None  # moving average, None until the first batch
        self._lock = threading.Lock()

    def handed(self, now: float) -> None:
        with self._lock:
            self._handed.append(now)
            self._trim(now)

    def sampled(self, items: int, seconds: float) -> None:
        with self._lock:
            previous = self.batch_seconds
            self.batch_seconds = seconds if previous is None else (1 - self.SMOOTHING) * previous + \
                self.SMOOTHING * seconds

    def rate(self, now: float) -> float:
        """Items handed out per second, recently."""
        with self._lock:
            self._trim(now)
            return len(self._handed) / self.RATE_WINDOW_S

    def target(self, floor: int, ceiling: int, now: float) -> int:
        lead = 2 * (self.batch_seconds or 0.0)
        return int(min(ceiling, max(floor, math.ceil(self.rate(now) * lead))))

    def _trim(self, now: float) -> None:
        while self._handed and self._handed[0] < now - self.RATE_WINDOW_S:
            self._handed.popleft()


def shown_answers(item: Item, user_id: int) -> list[Answer]:
    """The item's answers in the order this annotator sees them: shuffled so position carries no signal of which
    sample came first, stable across reloads, different for each annotator (REST and UI show the same order)."""
    answers = list(item.answers)
    random.Random(item.item_id * 1_000_003 + user_id).shuffle(answers)
    return answers


class ItemBuffer:
    """Hands annotators their next item and keeps the buffer full in a background thread."""

    def __init__(self, store: Store, policy: PolicyService, config: ServeConfig, deployments: Deployments):
        self.store = store
        self.policy = policy
        self.config = config
        self.deployments = deployments
        self._lock = threading.Lock()
        self._reservations: dict[tuple[int, int], Reservation] = {}  # (item_id, user_id) -> live or expired one
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.sizer = BufferSizer()

    # -- annotators ---------------------------------------------------------------------------------------------
    @property
    def served_versions(self) -> list[int]:
        """Versions whose items annotators still get (see Deployments.served_versions)."""
        return self.deployments.served_versions(self.config.max_item_staleness)

    def next_for(self, user_id: int) -> Item | None:
        """The item this annotator should rank now, reserved for them; None when nothing waits."""
        with self._lock:
            now = time.monotonic()
            self._forget(now)
            held = [r for r in self._reservations.values() if r.user_id == user_id and r.live(now)]
            for reservation in sorted(held, key=lambda r: r.since):  # a reload shows the same item again
                if self.store.items.waiting(user_id, self.served_versions, self.config.overlap,
                                            only=[reservation.item_id], limit=1):
                    return self.store.items.get(reservation.item_id)
                self._release(reservation.item_id, user_id)
            busy = self._busy_items(exclude_user=user_id, now=now)
            # a canary's items go before the serving version's older ones: its decision does not wait for them
            canary = self.deployments.pending_canary
            first = [canary.version] if canary is not None else []
            for item_id in self.store.items.waiting(user_id, self.served_versions, self.config.overlap, exclude=busy,
                                                    limit=1, first=first):
                self._reservations[(item_id, user_id)] = Reservation(
                    user_id, item_id, now, now + self.config.reserve_seconds)
                self.sizer.handed(now)
                self._wake.set()
                return self.store.items.get(item_id)
        self._wake.set()
        return None

    def check_handed(self, item_id: int, user_id: int) -> None:
        """NotHanded unless `next_for` handed item `item_id` to this annotator and it is still theirs: the reservation
        is live, or it expired and the item still has a free slot (annotators done plus other annotators' live
        reservations below `overlap`). The store checks the overlap again inside the label's own transaction."""
        with self._lock:
            now = time.monotonic()
            self._forget(now)
            reservation = self._reservations.get((item_id, user_id))
            if reservation is None:
                raise NotHanded(f"item {item_id} was not handed to you; fetch your next item with GET /api/items/next"
                                " (Next item in the Annotate tab)")
            if reservation.live(now):
                return
            others = sum(1 for (i, u), r in self._reservations.items() if i == item_id and u != user_id and r.live(now))
            if self.store.items.annotators_done(item_id) + others >= self.config.overlap:
                raise NotHanded(f"your reservation of item {item_id} expired and another annotator took its slot; "
                                "fetch your next item with GET /api/items/next (Next item in the Annotate tab)")

    def hand_back(self, item_id: int, user_id: int) -> bool:
        """Reserve item `item_id` for this annotator again after they retracted their ranking of it (Undo), so they
        can rank it again; False (nothing reserved) when it is no longer served to them (stale, or full)."""
        with self._lock:
            if not self.store.items.waiting(user_id, self.served_versions, self.config.overlap, only=[item_id],
                                            limit=1):
                return False
            now = time.monotonic()
            self._reservations[(item_id, user_id)] = Reservation(user_id, item_id, now,
                                                                 now + self.config.reserve_seconds)
            return True

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
        """Live reservations: items someone is working on now."""
        with self._lock:
            now = time.monotonic()
            return sum(1 for r in self._reservations.values() if r.live(now))

    def waiting_count(self) -> int:
        return self.store.items.count_waiting(self.served_versions, self.config.overlap)

    def _busy_items(self, exclude_user: int, now: float) -> set[int]:
        """Items with live reservations of `overlap` or more other annotators."""
        counts: dict[int, int] = {}
        for (item_id, user_id), reservation in self._reservations.items():
            if user_id != exclude_user and reservation.live(now):
                counts[item_id] = counts.get(item_id, 0) + 1
        return {item_id for item_id, n in counts.items() if n >= self.config.overlap}

    def _release(self, item_id: int, user_id: int) -> None:
        self._reservations.pop((item_id, user_id), None)

    def _forget(self, now: float) -> None:
        """Drop reservations expired for longer than HANDED_MEMORY_SECONDS."""
        for key in [k for k, r in self._reservations.items() if r.until + HANDED_MEMORY_SECONDS <= now]:
            del self._reservations[key]

    # -- sampling -----------------------------------------------------------------------------------------------
    def target(self) -> int:
        """Ready items to keep waiting: the recent hand-out rate times the time a batch takes (twice, so the next
        batch is sampled while the last one is being ranked), within [buffer_size, buffer_max]; plus the items
        reserved right now, which are waiting too."""
        return self.sizer.target(self.config.buffer_size, self.config.buffer_ceiling, time.monotonic()) + \
            self.reserved_count()

    def fill_once(self, up_to: int | None = None) -> int:
        """Sample one batch (up to `batch_items` items in one sampling batch per version) if fewer than `up_to`
        (default: the target) items wait. Returns how many items it added."""
        short = (self.target() if up_to is None else up_to) - self.waiting_count()
        n = min(short, self.config.batch_items)
        if n <= 0:
            return 0
        serving = self.deployments.serving
        bound = self.deployments.untrained_below()
        prompts, plan = self._prompts(self.deployments.mix_next_items(n), bound)
        if not prompts:
            return 0
        seeds = [random.randrange(2**31) for _ in prompts]
        started = time.monotonic()
        requests, halves = [], []
        for prompt, canary, seed in zip(prompts, plan, seeds):
            halves.append(self._halves(prompt.text, serving, canary, seed))
            requests += halves[-1]
        answers = iter(self.policy.sample_items(requests, self.config.sampling))
        for prompt, canary, seed, item_halves in zip(prompts, plan, seeds, halves):
            params = {**self.config.sampling.to_dict(), "k": self.config.k, "seed": seed}
            if canary is not None:
                params["canary"] = canary
                params["canary_prompt_untrained"] = bound is not None and hash_fraction(prompt.text) < bound
            records = [AnswerRecord(a.text, a.token_count, a.finish_reason, a.logprob_sum, request.version)
                       for request in item_halves for a in next(answers)]
            if canary is not None:  # neither positions nor answer ids may tell the versions apart
                random.Random(seed).shuffle(records)
            self.store.items.add(prompt.prompt_id, serving, params, records)
        self.sizer.sampled(len(prompts), time.monotonic() - started)
        return len(prompts)

    def top_up(self, seconds: float, stop: Callable[[], bool] = lambda: False) -> int:
        """Fill towards `buffer_max` for about `seconds` at most (before a round takes cores away on a CPU), or until
        `stop()` says so between batches (the round was cancelled); returns the items added. Runs in the caller's
        thread, beside the prefetch thread: both only add items."""
        deadline, added = time.monotonic() + seconds, 0
        while time.monotonic() < deadline and not stop():
            batch = self.fill_once(up_to=self.config.buffer_ceiling)
            if not batch:
                break
            added += batch
        return added

    def _prompts(self, plan: list[int | None], bound: float | None) -> tuple[list[Prompt], list[int | None]]:
        """The least-sampled prompts for one batch, and the plan cut to as many: a canary slot takes a prompt hashed
        below `bound` (one no version in its line trained on) while any is left, any prompt after that."""
        wanted = sum(canary is not None for canary in plan)
        untrained = (self.store.prompts.least_sampled(wanted, keep=lambda text: hash_fraction(text) < bound)
                     if wanted and bound is not None else [])
        others = iter(self.store.prompts.least_sampled(len(plan) - len(untrained),
                                                       exclude={p.prompt_id for p in untrained}))
        canary_prompts = iter(untrained)
        pairs = [(next(canary_prompts, None) if canary is not None else None, canary) for canary in plan]
        pairs = [(prompt or next(others, None), canary) for prompt, canary in pairs]
        kept = [(prompt, canary) for prompt, canary in pairs if prompt is not None]
        return [prompt for prompt, _ in kept], [canary for _, canary in kept]

    def _halves(self, prompt: str, serving: int, canary: int | None, seed: int) -> list[ItemRequest]:
        """K answers from the serving version; for a canary item K/2 from the canary and the rest from the serving
        version. The item keeps the serving version as its own (staleness, labels); each answer records its own."""
        k = self.config.k
        if canary is None:
            return [ItemRequest(prompt, k, serving, seed)]
        return [ItemRequest(prompt, k // 2, canary, seed), ItemRequest(prompt, k - k // 2, serving, seed + 1)]

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0, join: bool = True) -> None:
        """Stop sampling; with `join`, wait (up to `timeout`) for the batch in flight to end or fail."""
        self._stop.set()
        self._wake.set()
        if join and self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sampled = self.fill_once()
                self.last_error = None
            except Exception as exc:  # keep the thread alive: log, show it in health/admin, retry after a pause
                if self._stop.is_set():
                    break  # stopping: the batch failed because the worker was closed under it
                log.exception("prefetch failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
                sampled = False
                self._stop.wait(5.0)
            if not sampled:
                self._wake.wait(2.0)
                self._wake.clear()
