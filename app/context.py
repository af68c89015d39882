"""Everything a request handler needs, in one object: the store, the policy service, the buffer, the config.

The REST API, the Gradio handlers and the CLI all act through this object, so there is one implementation of each
action and one place where roles are checked.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field, replace

from app.auto_train import AutoTrainer
from app.buffer import ItemBuffer
from app.config import ServeConfig
from app.deployments import Deployments
from app.login import Sessions
from app.policy import GenerationSlots, PolicyService
from app.scheduler import Scheduler
from app.settings import AppSettings
from learner.errors import ConfigError
from storage.store import Store
from storage.users import User

# The CLI's stand-in while a server holds the data dir: an admin with no account, who may not label.
LOCAL_CLI_USER = User(user_id=0, name="local-cli", role="admin", disabled=False)


@dataclass
class AppContext:
    config: ServeConfig
    store: Store
    policy: PolicyService
    buffer: ItemBuffer
    scheduler: Scheduler  # one round at a time, in a subprocess
    deployments: Deployments  # which version serves, the canary: the one home of both
    auto_trainer: AutoTrainer  # automatic rounds (every N labels, every T minutes) and why they pause
    local_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    generation_slots: GenerationSlots = field(default_factory=GenerationSlots)  # Demo tab + /api/generate
    sessions: Sessions = field(default_factory=Sessions)  # browser logins for /ui and /admin (app/web_guard.py)

    @classmethod
    def build(cls, config: ServeConfig, store: Store, policy: PolicyService) -> AppContext:
        # A stored overlap (Admin, PATCH /api/settings) outlives a restart and wins over --overlap (app/settings.py).
        config = replace(config, overlap=AppSettings(store.settings, config).get("overlap"))
        deployments = Deployments(store, policy)
        buffer = ItemBuffer(store, policy, config, deployments)
        # A new version makes older items stale, a canary wants items of its own: wake the sampler either way.
        deployments.on_change = buffer.wake
        scheduler = Scheduler(store, policy, config, deployments)
        scheduler.cores.buffer = buffer  # topped up before a round takes cores away from sampling
        return cls(config, store, policy, buffer, scheduler, deployments, AutoTrainer(store, deployments, scheduler))

    @property
    def settings(self) -> AppSettings:
        """The admin-editable settings, typed (app/settings.py: stored > serve flag/env > default)."""
        return AppSettings(self.store.settings, self.config)

    def stop(self) -> None:
        self.auto_trainer.stop()
        self.scheduler.stop()
        self.buffer.stop(join=False)  # no new batches; the one in flight is abandoned when the worker goes
        self.policy.close()  # the worker process, when there is one: at once, mid-batch if need be
        self.buffer.stop()

    def authenticate_token(self, token: str) -> User | None:
        if hmac.compare_digest(token.encode(), self.local_token.encode()):
            return LOCAL_CLI_USER
        return self.store.users.by_token(token)

    def authenticate_password(self, name: str, password: str) -> User | None:
        return self.store.users.verify_password(name, password)

    def on_label(self) -> None:
        """Called after every stored label: the canary's decision rule, then automatic rounds' "every N labels"."""
        self.deployments.evaluate()
        self.auto_trainer.on_label()

    def set_overlap(self, overlap: int) -> None:
        """Distinct annotators per item from now on; stored, so a restart keeps it. ConfigError below 1."""
        if not isinstance(overlap, int) or isinstance(overlap, bool):
            raise ConfigError(f"overlap must be an integer >= 1, got {overlap!r}")
        config = replace(self.config, overlap=overlap)  # ServeConfig validates
        self.settings.update({"overlap": config.overlap})
        # ServeConfig is frozen; the buffer reads `config.overlap` on every call, so swapping the object is enough.
        self.config = self.buffer.config = self.scheduler.config = config
        self.buffer.wake()

    def set_auto_train(self, every_labels: int, every_minutes: int, overrides: dict) -> None:
        """Automatic rounds every N new labels and/or T minutes (0 = off), with these RoundConfig overrides."""
        # All three are checked before any is stored; the config now rather than at the first automatic round.
        self.settings.update({"auto_train_config": overrides, "auto_train_every_labels": every_labels,
                              "auto_train_every_minutes": every_minutes})
