"""Watching other processes from a test: a process's children, whether it still runs, and waiting for a condition."""

from __future__ import annotations

import time
from pathlib import Path


def children(pid: int) -> list[int]:
    """The pids of `pid`'s children (every thread's), none once it has gone."""
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    """Running: neither gone nor a zombie waiting for its parent."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def wait_for(condition, seconds: float, what: str = "the condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
