"""Child processes that must not outlive their parent: the training round and the policy worker (children of the
server), and the processes of a round on several (children of its launcher, torchrun)."""

from __future__ import annotations

import signal
import sys


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL("libc.so.6", use_errno=True).prctl


_PRCTL = _prctl()  # resolved at import: between fork and exec the child should run as little Python as possible
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child process: be killed when its parent dies (Linux), even by kill -9, so a crashed server (or round
    launcher) leaves no orphan training on or holding a model in memory. Elsewhere a no-op."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)
