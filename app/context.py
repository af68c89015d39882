"""Everything a request handler needs, in one object: the store, the policy service, the buffer, the config.

The REST API, the Gradio handlers and the CLI all act through this object, so there is one implementation of each
action and one place where roles are checked.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field

from app.buffer import ItemBuffer
from app.config import ServeConfig
from app.policy import PolicyService
from app.scheduler import Scheduler
from storage.errors import NotFound
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
    scheduler: Scheduler
    local_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @classmethod
    def build(cls, config: ServeConfig, store: Store, policy: PolicyService) -> AppContext:
        buffer = ItemBuffer(store, policy, config)
        # A new version makes older items stale: wake the sampler to replace them with the new version's answers.
        scheduler = Scheduler(store, policy, config, on_deploy=lambda version: buffer.wake())
        return cls(config, store, policy, buffer, scheduler)

    def stop(self) -> None:
        self.scheduler.stop()
        self.buffer.stop()

    def authenticate_token(self, token: str) -> User | None:
        if hmac.compare_digest(token.encode(), self.local_token.encode()):
            return LOCAL_CLI_USER
        return self.store.users.by_token(token)

    def authenticate_password(self, name: str, password: str) -> User | None:
        return self.store.users.verify_password(name, password)

    def on_label(self) -> None:
        """Called after every stored label: the scheduler's "every N labels" trigger."""
        self.scheduler.on_label()

    def ensure_version_loadable(self, version: int) -> None:
        """404 unless `version` is the base model or a version whose adapter the policy service can load."""
        if version == 0 or version in self.policy.loaded_versions:
            return
        record = self.store.versions.get(version)  # NotFound -> 404
        if not record.path:
            raise NotFound(f"version {version} has no adapter on disk")
        from pathlib import Path

        self.policy.register(version, Path(record.path) / "adapter")
