"""The settings an admin changes while the server runs (Admin UI, PATCH /api/settings): every key, its type, default
and reason in one place, and one precedence rule for all of them:

    a value stored in the settings table  >  the serve flag or PREFLOOP_* variable (ServeConfig)  >  the default

Only `overlap` and `daily_goal` have a serve flag; their default is ServeConfig's (app/config.py holds its reason).
The canary's keys take their defaults and reasons from CanaryConfig (app/canary.py), which also checks them.
Values are stored as text (JSON for `auto_train_config`); `AppSettings` reads and writes them typed, and refuses a
bad value with a ConfigError that names the key before anything is stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from app.canary import CanaryConfig, parse_stored
from app.config import ServeConfig
from app.reasons import field_reasons
from learner.config import RoundConfig
from learner.errors import ConfigError
from storage.settings import Settings

MAX_GUIDELINES_CHARS = 20_000  # a long style guide fits; the Annotate tab shows them above every item

DEFAULT_GUIDELINES = """Rank the answers from best (1) to worst. Prefer answers that are correct, helpful and honest;
then clear and concise. An answer marked "cut off" hit the length limit: judge what it says, not where it stops.
Give answers you find equally good the same rank, and press "All equally good" when you have no preference at all:
a tie teaches the model nothing, an order made up to fill the form teaches it the wrong thing.
Thumbs are optional: up for an answer you would be glad to receive, down for one you would not.
Skip what you cannot judge; flag anything harmful or broken.

Keys: press the answers' numbers best first (when all but one are ranked, the last gets the last rank by itself);
Shift + a number ties that answer with the one you ranked last; N ranks them all equally good;
Backspace takes back the last rank you gave; U / D give thumbs up / down to the answer whose number you pressed last
(or the one you clicked); Enter submits; Escape clears; S skips. Undo (Z, or the Undo button) takes back the ranking
you just submitted, for a minute, and shows it again to change."""

SERVE = object()  # marks a default that ServeConfig supplies (its flag, its variable, or its own default)


def _at_least(low: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        return None if ok else f"an integer >= {low}"
    return check


def _guidelines(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "non-empty text"
    if len(value) > MAX_GUIDELINES_CHARS:
        return f"at most {MAX_GUIDELINES_CHARS} characters (got {len(value)})"
    return None


def _round_config(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "an object of RoundConfig fields"
    RoundConfig.from_dict(value)  # its own ConfigError names the field
    return None


def _canary(name: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        CanaryConfig().replace({name: value})  # CanaryConfig's ConfigError says what the key takes
        return None
    return check


@dataclass(frozen=True)
class Setting:
    key: str
    kind: type  # int, float, bool, str or dict: what `AppSettings.get` returns
    default: Any  # SERVE: ServeConfig's field of the same name
    reason: str
    check: Callable[[Any], str | None]  # None when the value is fine, else what the key takes


_CANARY_REASONS = field_reasons(CanaryConfig)
SETTINGS: dict[str, Setting] = {s.key: s for s in (
    Setting("overlap", int, SERVE, "distinct annotators who rank each item; >1 measures agreement", _at_least(1)),
    Setting("daily_goal", int, SERVE, "rankings a day the Annotate tab counts each annotator towards", _at_least(1)),
    Setting("guidelines", str, DEFAULT_GUIDELINES, "what annotators read above every item (Markdown, raw HTML off)",
            _guidelines),
    Setting("auto_train_every_labels", int, 0, "start a round every N new labels; 0 = off (rounds by hand only)",
            _at_least(0)),
    Setting("auto_train_every_minutes", int, 0, "start a round every T minutes; 0 = off", _at_least(0)),
    Setting("auto_train_config", dict, {}, "RoundConfig overrides automatic rounds use; {} = RoundConfig's defaults",
            _round_config),
    *(Setting(f.name, type(getattr(CanaryConfig(), f.name)), getattr(CanaryConfig(), f.name),
              _CANARY_REASONS.get(f.name, ""), _canary(f.name)) for f in fields(CanaryConfig)),
)}


@dataclass(frozen=True)
class AutoTrain:
    """The automatic round triggers."""

    every_labels: int  # 0 = off
    every_minutes: int  # 0 = off
    config: dict  # RoundConfig overrides automatic rounds use

    @property
    def enabled(self) -> bool:
        return bool(self.every_labels or self.every_minutes)


class AppSettings:
    """The settings table, typed. `serve` supplies the defaults of keys with a serve flag (None: ServeConfig's own)."""

    def __init__(self, table: Settings, serve: ServeConfig | None = None) -> None:
        self.table = table
        self.serve = serve or ServeConfig()

    def get(self, key: str) -> Any:
        setting = _setting(key)
        stored = self.table.get(key)
        if stored is not None:
            try:
                return json.loads(stored) if setting.kind is dict else parse_stored(setting.kind, stored)
            except ValueError:
                pass  # unreadable (written by hand?): fall through to the flag or default, as if unset
        if setting.default is SERVE:
            return getattr(self.serve, key)
        return dict(setting.default) if setting.kind is dict else setting.default

    def all(self) -> dict[str, Any]:
        return {key: self.get(key) for key in SETTINGS}

    def update(self, changes: Mapping[str, Any]) -> None:
        """Store `changes`: all are checked first (ConfigError naming the key), then written."""
        check_settings(changes)
        for key, value in changes.items():
            self.table.set(key, json.dumps(value) if _setting(key).kind is dict else str(value))

    def canary(self) -> CanaryConfig:
        return CanaryConfig(**{f.name: self.get(f.name) for f in fields(CanaryConfig)})

    def auto_train(self) -> AutoTrain:
        return AutoTrain(self.get("auto_train_every_labels"), self.get("auto_train_every_minutes"),
                         self.get("auto_train_config"))


def check_settings(changes: Mapping[str, Any]) -> None:
    """ConfigError naming the first key whose value it cannot take (or an unknown key); nothing is stored."""
    for key, value in changes.items():
        problem = _setting(key).check(value)
        if problem:
            raise ConfigError(f"{key} must be {problem}, got {_short(value)}")


def _setting(key: str) -> Setting:
    if key not in SETTINGS:
        raise ConfigError(f"unknown setting {key!r}; known: {', '.join(SETTINGS)}")
    return SETTINGS[key]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
