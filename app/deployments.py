"""Deployments: the one place that says which policy version serves everyone, and the only code that changes it.

    a round's version -> register() -> gate failed: "rejected"
                                    -> deploy_policy "immediate": deploy()  (hot swap)
                                    -> deploy_policy "canary": start_canary() -> share of new items mix its answers
                                       -> evaluate() after every label: promoted (hot swap) | rolled_back | undecided
                                    -> canary_chain, trained from the canary: waits as a candidate; the canary
                                       promoted: the newest waiting one becomes the canary; rolled back: they go too;
                                       still pending after canary_supersede_items: the newest waiting one supersedes it
    admin: deploy(v, force) / roll_back() / promote(v) / reject_canary(v)

A crash between a promotion and the start of the waiting version's canary leaves that version a candidate; the next
start hands over to it (`_resume_hand_over`): the promotion stands either way.

The store's versions table is the record (each change one transaction: a crash leaves the state before or after it,
never half of one); `serving` is its in-memory copy, set only here, after the adapter is loaded and the store
written. The policy service holds no notion of a deployed version: callers name the version they want, so a swap is
Deployments naming another one, and the generation in flight finishes on the old one. Who may deploy what is
decided here once: a version the gate rejected needs `force`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from app.canary import CanaryConfig, WinRate, decide, should_mix, win_rate
from app.policy import PolicyService
from app.settings import AppSettings
from storage import is_number
from storage.errors import Conflict, NotFound
from storage.store import Store
from storage.versions import Canary, PolicyVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CanaryStatus:
    """A canary's evidence as Admin and GET /api/versions show it."""

    version: int
    serving: int  # the version it is compared with
    stats: WinRate  # live while it is the canary; as recorded at the decision afterwards
    items_ranked: int  # canary items with at least one ranking (what canary_max_items counts)
    decision: str  # pending | promoted | rolled_back | undecided
    reason: str | None
    items: int  # canary items sampled (ranked or not)
    untrained_items: int  # of them, on a prompt no version in the canary's or serving version's line trained on

    def to_json(self) -> dict:
        return {"comparisons": self.stats.comparisons, "win_rate": self.stats.win_rate,
                "ci95": None if self.stats.ci95 is None else list(self.stats.ci95), "decision": self.decision,
                "items": self.items, "untrained_items": self.untrained_items}


class Deployments:
    def __init__(self, store: Store, policy: PolicyService, on_change: Callable[[], None] | None = None):
        self.store = store
        self.policy = policy
        self.on_change = on_change or (lambda: None)  # the buffer's wake-up: new items for the new state
        self._lock = threading.RLock()  # one change of what serves at a time
        self.canary_config = AppSettings(store.settings).canary()  # stored values over CanaryConfig's defaults
        deployed = store.versions.deployed()
        self._load(deployed)
        self._serving = deployed.version
        self._lineage = store.versions.lineage(deployed.version)
        self._canary = store.versions.active_canary()
        self._bounds: dict[tuple[int, int], float | None] = {}  # (canary, serving) -> untrained_below
        if self._canary is not None:
            self._restore_canary(self._canary)
        else:
            self._resume_hand_over()
        self._pin()

    # -- what serves ----------------------------------------------------------------------------------------------
    @property
    def serving(self) -> int:
        """The version serving everyone: annotators' items (but canary answers), the Demo, /api/generate."""
        return self._serving

    @property
    def canary(self) -> Canary | None:
        """The version under test (pending, or undecided waiting for an admin), or None."""
        return self._canary

    @property
    def pending_canary(self) -> Canary | None:
        """The canary while the annotators still judge it (new items carry its answers), else None."""
        canary = self._canary
        return canary if canary is not None and canary.mixing else None

    def untrained_below(self) -> float | None:
        """For the pending canary under canary_prompts "untrained": no prompt whose hash_fraction is below this
        trained the canary, the serving version or a version before either (each round records its bound,
        learner/data.py's PromptSplit). None: canary items take any prompt (no canary, "any", or a version in the
        line that recorded no bound)."""
        canary = self.pending_canary
        if canary is None or self.canary_config.canary_prompts != "untrained":
            return None
        key = (canary.version, self._serving)
        if key not in self._bounds:
            line = {v for version in key for v in self.store.versions.lineage(version)} - {0}
            bounds = [self.store.versions.get(v).metrics.get("heldout", {}).get("untrained_below") for v in line]
            known = bounds and all(is_number(b) for b in bounds)
            self._bounds[key] = min(bounds) if known else None
        return self._bounds[key]

    def round_parent(self) -> int:
        """The version a round trains from: the serving one, or, under canary_chain, the canary being judged (the
        round's version then waits for its decision: `register`, `_decide`)."""
        with self._lock:  # not between a promotion and its hand-over: the round would train from the old canary
            canary = self.pending_canary
            return canary.version if canary is not None and self.canary_config.canary_chain else self._serving

    def served_versions(self, max_item_staleness: int) -> list[int]:
        """Versions whose items are still served: the serving one and the `max_item_staleness` versions that served
        before it along its lineage (parent chain). Rejected or rolled-back versions off the line never count."""
        return self._lineage[: max_item_staleness + 1]

    def ensure_loadable(self, version: int) -> None:
        """NotFound unless `version` is the base model or a version whose adapter the policy service can load."""
        if version == 0 or version in self.policy.loaded_versions:
            return
        record = self.store.versions.get(version)  # NotFound -> 404
        if not record.path:
            raise NotFound(f"version {version} has no adapter on disk")
        self.policy.register(version, Path(record.path) / "adapter")

    # -- changes ------------------------------------------------------------------------------------------------
    def register(self, version: int, parent: int, algorithm: str, path: Path, config: dict, metrics: dict,
                 gate_passed: bool, reason: str | None) -> str:
        """Record a round's version and act on it by the deploy policy; returns its status afterwards."""
        with self._lock:  # the canary's decision cannot fall between reading what the version waits for and adding it
            held = self._held(parent) if gate_passed and self.canary_config.deploy_policy == "canary" else None
            status, why = held or ("candidate" if gate_passed else "rejected", reason)
            self.store.versions.add(version, parent, algorithm, status, str(path), config, metrics,
                                    int(metrics.get("labels_used", 0)), reason=why)
            if held is not None:
                log.info("v%s %s", version, why)
        if not gate_passed or held is not None:
            return status
        if self.canary_config.deploy_policy == "immediate":
            self.deploy(version)
        else:
            self.start_canary(version)
        return self.store.versions.get(version).status

    def _held(self, parent: int) -> tuple[str, str] | None:
        """(status, reason) for a version trained from a canary (canary_chain) that does not become the canary now:
        a candidate waiting for the decision while its parent is the canary; rolled_back when the parent was rolled
        back as a canary. None otherwise (a parent promoted meanwhile serves: the version is tested against it)."""
        if self._canary is not None and self._canary.version == parent:
            return "candidate", _waits_for(parent)
        was_canary = self.store.versions.canaries().get(parent)
        if was_canary is not None and was_canary.decision == "rolled_back":
            return "rolled_back", _child_of_rolled_back(parent)
        return None

    def deploy(self, version: int, force: bool = False, by: str = "an admin") -> PolicyVersion:
        """Roll forward or back to `version` (hot swap). The canary itself is promoted; a version the gate rejected
        needs `force` (Conflict otherwise); a canary running against the old version ends undecided."""
        with self._lock:
            if self._canary is not None and self._canary.version == version:
                self.promote(version, by=by)
                return self.store.versions.get(version)
            record = self.store.versions.get(version)  # NotFound -> 404
            if record.status == "rejected" and not force:
                raise Conflict(f"version {version} was rejected by the gate ({record.reason or 'no reason given'}); "
                               "deploy it with force")
            return self._switch(record)

    def roll_back(self, reason: str) -> int:
        """Deploy the serving version's parent and mark the one taken down rolled_back; returns the parent."""
        with self._lock:
            current = self.store.versions.get(self._serving)
            if current.parent is None:
                raise Conflict("the base model (version 0) is deployed; there is nothing to roll back to")
            self._switch(self.store.versions.get(current.parent), taken_down="rolled_back", reason=reason)
            return current.parent

    def start_canary(self, version: int) -> Canary:
        """Make candidate `version` the canary: from the next item on, a share of new items mix its answers."""
        with self._lock:
            record = self.store.versions.get(version)  # NotFound -> 404
            if record.status != "candidate":
                raise Conflict(f"only a candidate can become the canary; version {version} is {record.status}")
            self._load(record)
            self._canary = self.store.versions.start_canary(version)
            self._pin()
        self.on_change()
        return self._canary

    def promote(self, version: int, by: str = "an admin") -> CanaryStatus:
        """Promote the canary by hand (pending or undecided): it serves everyone from now on."""
        return self._decide(version, "promoted", f"promoted by {by}")

    def reject_canary(self, version: int, by: str = "an admin") -> CanaryStatus:
        """Roll the canary back by hand: the serving version stays, the canary is marked rolled_back."""
        return self._decide(version, "rolled_back", f"rolled back by {by}")

    def evaluate(self) -> str | None:
        """After every stored label: decide the pending canary if its evidence allows; returns the decision."""
        canary = self.pending_canary
        if canary is None:
            return None
        with self._lock:
            stats, items_ranked = self._evidence(canary)
            decision = decide(stats, items_ranked, self.canary_config)
            if self._canary is None or self._canary.version != canary.version:
                return decision
            if decision == "pending":
                waiting = self._superseding(canary.version, items_ranked)
                if waiting:  # marginal: the version trained from it on more labels is judged instead
                    self._hand_over(canary.version, waiting, superseded=True)
                return decision
            low, high = stats.ci95 or (None, None)
            why = {"promoted": f"promoted: win-rate 95% interval above {self.canary_config.canary_threshold}",
                   "rolled_back": f"rolled back: win-rate 95% interval below {self.canary_config.canary_threshold}",
                   "undecided": f"undecided after {items_ranked} ranked canary items: an admin decides"}
            self._decide(canary.version, decision, f"{why[decision]} (n={stats.comparisons} comparisons, "
                                                   f"[{_fmt(low)}, {_fmt(high)}])")
            return decision

    def set_canary_config(self, changes: Mapping[str, object]) -> CanaryConfig:
        """Change any canary setting; all validated before any is stored (ConfigError names the bad one)."""
        with self._lock:
            config = self.canary_config.replace(changes)
            AppSettings(self.store.settings).update(asdict(config))
            self.canary_config = config
        return config

    # -- the canary's evidence ----------------------------------------------------------------------------------
    def canary_status(self, canary: Canary) -> CanaryStatus:
        """Live evidence while `canary` is the canary (or has no recorded one); the recorded evidence once decided;
        with its item counts (for Admin and GET /api/versions: the decisions read `_evidence` alone)."""
        stats, items_ranked = self._evidence(canary)
        untrained, items = self.store.versions.canary_prompts(canary)
        return CanaryStatus(canary.version, canary.serving, stats, items_ranked, canary.decision, canary.reason,
                            items, untrained)

    def _evidence(self, canary: Canary) -> tuple[WinRate, int]:
        """(the win-rate with its interval, ranked canary items): what a decision reads, after every label."""
        rows = self.store.versions.canary_comparisons(canary)
        items_ranked = len({item_id for item_id, _, _ in rows})
        if canary.comparisons is not None and canary.decision != "undecided":
            return WinRate(len(rows), canary.comparisons, canary.win_rate, canary.ci95), items_ranked
        return win_rate([(wins, n) for _, wins, n in rows]), items_ranked

    def canary_statuses(self) -> dict[int, CanaryStatus]:
        """version -> its canary status, for every version that was ever a canary."""
        return {v: self.canary_status(c) for v, c in self.store.versions.canaries().items()}

    def mix_next_item(self) -> int | None:
        """The canary version when the next sampled item should mix its answers, else None (see should_mix)."""
        return self.mix_next_items(1)[0]

    def mix_next_items(self, n: int) -> list[int | None]:
        """For each of the next `n` sampled items (one batch), the canary version to mix in, or None."""
        canary = self.pending_canary
        if canary is None:
            return [None] * n
        mixed, total = self.store.versions.canary_items(canary)
        plan: list[int | None] = []
        for _ in range(n):
            mix = should_mix(mixed, total, self.canary_config.canary_share)
            plan.append(canary.version if mix else None)
            mixed, total = mixed + mix, total + 1
        return plan

    # -- internals ----------------------------------------------------------------------------------------------
    def _decide(self, version: int, decision: str, reason: str) -> CanaryStatus:
        with self._lock:
            if self._canary is None or self._canary.version != version:
                running = f" (v{self._canary.version} is)" if self._canary else " (no canary is running)"
                raise Conflict(f"version {version} is not the canary{running}")
            stats, _ = self._evidence(self._canary)
            decided = self.store.versions.decide_canary(version, decision, stats.comparisons, stats.win_rate,
                                                        stats.ci95, reason)
            log.info("canary v%s: %s", version, reason)
            if decision == "promoted":
                self._set_serving(version)
            self._canary = decided if decision == "undecided" else None
            self._pin()
            waiting = self.store.versions.waiting(version) if decision != "undecided" else []
            if decision == "rolled_back":  # trained from what the annotators turned down: they go with it
                for child in waiting:
                    self.store.versions.set_status(child.version, "rolled_back", _child_of_rolled_back(version))
            elif waiting:  # promoted: the newest round trained from it is the next canary (older ones stay candidates)
                self._hand_over(version, waiting)
        self.on_change()
        return self.canary_status(decided)

    def _superseding(self, canary: int, items_ranked: int) -> list[PolicyVersion]:
        """Under canary_chain, the versions waiting for a canary still pending after canary_supersede_items ranked
        items (newest first; none before, or with 0): a canary that marginal would hold them, and the automatic
        rounds, to canary_max_items."""
        config = self.canary_config
        if not config.canary_chain or not config.canary_supersede_items or \
                items_ranked < config.canary_supersede_items:
            return []
        return self._waiting_for(canary)

    def _waiting_for(self, canary: int) -> list[PolicyVersion]:
        """Versions registered to wait for `canary`'s decision (`_held`), newest first; siblings already passed over
        are candidates of the same parent but say so, not this."""
        return [v for v in self.store.versions.waiting(canary) if v.reason == _waits_for(canary)]

    def _hand_over(self, parent: int, waiting: list[PolicyVersion], superseded: bool = False) -> None:
        """The newest of the versions trained from the canary `parent` that loads becomes the canary, judged against
        the version serving: after `parent` was promoted, or, `superseded`, instead of `parent` (still pending after
        canary_supersede_items: it ends undecided, a candidate again). One that cannot load stays a candidate saying
        why (not tried again at every label: it would fail alike) and the next newest is tried; once one has started,
        the older ones stay candidates, saying which did."""
        for i, record in enumerate(waiting):
            try:
                self.start_canary(record.version)
            except Exception as exc:  # noqa: BLE001 - the canary's state stands; it stays a candidate an admin can test
                log.warning("canary v%s could not start after v%s: %s", record.version, parent, exc)
                self.store.versions.set_status(record.version, "candidate", f"trained from v{parent}; could not "
                                               f"become the canary: {str(exc)[:300]}")
                continue
            log.info("canary v%s: trained from v%s while it was judged, now judged against v%s%s", record.version,
                     parent, self._serving, " instead of it (still pending after canary_supersede_items)"
                     if superseded else "")
            for older in waiting[i + 1:]:
                self.store.versions.set_status(older.version, "candidate", f"trained from v{parent}; "
                                               f"v{record.version}, trained later, became the next canary")
            return

    def _resume_hand_over(self) -> None:
        """After a restart with no canary: if the serving version was promoted as a canary and no canary has started
        against it since, the process stopped between that promotion and the hand-over; the versions still waiting
        for it (their reason says so) are handed over now."""
        canaries = self.store.versions.canaries()
        promoted = canaries.get(self._serving)
        if promoted is None or promoted.decision != "promoted" or any(c.serving == self._serving
                                                                       for c in canaries.values()):
            return
        waiting = self._waiting_for(self._serving)
        if waiting:
            log.info("canary v%s was promoted before the last stop; handing over to v%s", self._serving,
                     waiting[0].version)
            self._hand_over(self._serving, waiting)

    def _switch(self, record: PolicyVersion, taken_down: str | None = None, reason: str | None = None):
        """Load `record`'s adapter (waiting for the generation in flight), record the deploy, then serve it."""
        self._load(record)
        deployed = self.store.versions.deploy(record.version, taken_down=taken_down, reason=reason)
        self._set_serving(record.version)
        self._canary = self.store.versions.active_canary()  # a canary against the old version has ended
        self._pin()
        self.on_change()
        return deployed

    def _set_serving(self, version: int) -> None:
        self._lineage = self.store.versions.lineage(version)
        self._serving = version

    def _load(self, record: PolicyVersion) -> None:
        if record.version == 0:
            return
        if not record.path:
            raise NotFound(f"version {record.version} has no adapter on disk")
        self.policy.load_adapter(record.version, Path(record.path) / "adapter")

    def _restore_canary(self, canary: Canary) -> None:
        """After a restart: load the canary's adapter; if it is gone, stop mixing and leave the call to an admin."""
        try:
            self._load(self.store.versions.get(canary.version))
        except Exception as exc:  # noqa: BLE001 - recorded on the canary, shown in Admin; serving is unaffected
            if canary.mixing:
                stats, _ = self._evidence(canary)
                self._canary = self.store.versions.decide_canary(
                    canary.version, "undecided", stats.comparisons, stats.win_rate, stats.ci95,
                    f"undecided: its adapter could not be loaded at start ({exc})")

    def _pin(self) -> None:
        self.policy.pin({self._serving} | ({self._canary.version} if self._canary else set()))


def _waits_for(parent: int) -> str:
    return f"waits for the decision on the canary v{parent}, which it was trained from (canary_chain)"


def _child_of_rolled_back(parent: int) -> str:
    return f"trained from the canary v{parent}, which the annotators rolled back"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
