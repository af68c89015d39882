"""The server's listening socket, bound before anything slow (imports, the model): a taken port fails in a second.

Standard library only, so `prefloop serve` binds before it imports torch, transformers and gradio.
"""

from __future__ import annotations

import errno
import socket

LISTEN_BACKLOG = 2048  # uvicorn's default backlog


class StartupError(Exception):
    """`prefloop serve` cannot start (a taken port, say): one line for the user, no traceback."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0 picks a free port). Bound and listening at once, so a taken port fails
    here and no other process can take it while the model loads (connections wait in the backlog meanwhile)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on host {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} is in use on {host}; pick another with --port") from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (tests that start a server in another process; it may be taken before they use it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
