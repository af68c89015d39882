"""`prefloop serve`'s flags: one per field of ServeConfig (app/config.py) and SamplingParams (learner/sampling.py),
made from the dataclasses so that none is missed.

A flag's help is its default, its PREFLOOP_* variable and the field's reason comment in the source: the comment
beside each default stays the one home of its reason. Flags win over the variables, the variables over the defaults
(`build_config`).
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from app.config import BACKENDS, ServeConfig
from app.reasons import field_reasons
from learner.params import PRECISIONS, SamplingParams

# data_dir is every command's --data-dir (app/cli.py); sampling is a group whose own fields are flags.
NOT_FLAGS = {"data_dir", "sampling"}
CHOICES = {"backend": BACKENDS, "device": ("cpu", "cuda"), "precision": PRECISIONS}
RENAMED = {"--max-staleness": "--max-item-staleness"}  # PREFLOOP_MAX_STALENESS is refused likewise (build_config)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(value) -> str:
    """A default as the help shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    return str(value) if value != "" else '""'


class Renamed(argparse.Action):
    """A flag that was renamed: a usage error naming the new one (exit 2)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was renamed {RENAMED[option_string]} (items sampled more than N deployed "
                     "versions back are not served; a round's own knob is max_label_staleness)")


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """A flag for every setting, with default None: a flag not given leaves the variable or the default."""
    for cls in (ServeConfig, SamplingParams):
        defaults, reasons = cls(), field_reasons(cls)
        for f in fields(cls):
            if f.name in NOT_FLAGS:
                continue
            default = getattr(defaults, f.name)
            reason = reasons.get(f.name) or f.name.replace("_", " ")
            help = f"default {shown(default)} (env PREFLOOP_{f.name.upper()}): {reason}".replace("%", "%%")
            kwargs: dict = {"dest": f.name, "default": None, "help": help}
            if isinstance(default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif f.name in CHOICES:
                kwargs["choices"] = CHOICES[f.name]
            elif default is not None:
                kwargs.update(type=type(default), metavar={int: "N", float: "X"}.get(type(default), "TEXT"))
            serve.add_argument(flag(f.name), **kwargs)
    for old in RENAMED:
        serve.add_argument(old, action=Renamed, help=argparse.SUPPRESS)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig that `serve` runs with: defaults, PREFLOOP_* variables, then the flags given."""
    from app.cli import configured  # build_config, a bad value (`--k 1`, `PREFLOOP_PORT=abc`) a usage error

    names = [f.name for cls in (ServeConfig, SamplingParams) for f in fields(cls) if f.name not in NOT_FLAGS]
    return configured({"data_dir": args.data_dir, **{name: getattr(args, name) for name in names}})

