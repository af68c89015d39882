"""The server: FastAPI with the REST API under /api and the Gradio UI mounted at /ui, run by uvicorn.

While it runs it holds the DuckDB file (one process per file) and writes `server.json` into the data dir: its URL
and a local admin token (file mode 0600), through which CLI commands reach the store while the server holds it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse

from app import api_docs
from app.api import router
from app.api_admin import router as admin_router
from app.api_train import router as train_router
from app.config import ServeConfig
from app.context import AppContext
from app.errors import install_handlers
from app.listen import bind_socket, free_port  # noqa: F401 - free_port: tests import it from here
from app.login import LoginThrottle
from app.policy import PolicyService
from app.web_guard import ADMIN_DOOR, ANNOTATOR_DOOR, DOORS, WebGuard, mount_door
from learner.model import needs_conversion
from storage.store import Store, make_data_dir

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 2 * 1024 * 1024  # /api bodies: a batch of prompts fits; a runaway upload never reaches the parser


class DeclaredBodyLimit:
    """ASGI middleware: a JSON 413 for /api requests that declare a body over the limit.

    FastAPI's `max_body_size` (on the routers below) stops streamed bodies with a JSON error through our handlers,
    but a declared Content-Length over the limit is answered by Starlette in plain text before any handler runs.
    """

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/api"):
            declared = dict(scope.get("headers") or []).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.limit:
                response = JSONResponse({"error": f"request body of {int(declared)} bytes; the limit is {self.limit}"},
                                        status_code=413)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(ctx: AppContext, with_ui: bool = True, throttle: LoginThrottle | None = None) -> FastAPI:
    """The REST API under /api; the annotator UI at /ui and the Admin UI at /admin, two Gradio apps behind
    `WebGuard` (app/web_guard.py), which also counts failed logins and API tokens in `throttle` (tests pass their
    own, with a clock they drive)."""
    app = FastAPI(title="prefloop", docs_url=None, openapi_url=api_docs.OPENAPI_URL, redoc_url=None,
                  description="Rank a language model's answers; the model learns from them.")
    app.state.ctx = ctx
    install_handlers(app)
    app.include_router(router, max_body_size=MAX_BODY_BYTES)
    app.include_router(train_router, max_body_size=MAX_BODY_BYTES)
    app.include_router(admin_router, max_body_size=MAX_BODY_BYTES)
    api_docs.install(app)  # /api/docs with Swagger UI's files served from here (offline), every error documented
    app.add_middleware(DeclaredBodyLimit)

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/ui/")

    if with_ui:
        from app.ui.admin_tab import build_admin_ui
        from app.ui.blocks import HEAD, build_ui

        mount_door(app, build_ui(ctx), ANNOTATOR_DOOR, ctx, head=HEAD, footer_links=["api"])
        mount_door(app, build_admin_ui(ctx), ADMIN_DOOR, ctx, footer_links=["api"])
    # Gradio answers any Origin with credentials allowed when the Host is not localhost, unless the parent app
    # configures CORSMiddleware itself (gradio/route_utils.py CustomCORSMiddleware): this one allows no other origin.
    app.add_middleware(CORSMiddleware, allow_origins=())
    app.add_middleware(WebGuard, ctx=ctx, throttle=throttle or LoginThrottle(), doors=DOORS if with_ui else ())
    return app


def first_run(store: Store) -> tuple[str, str, str] | None:
    """On an empty data dir: create the admin account. Returns (name, password, token) to print once."""
    if store.users.count() > 0:
        return None
    user, password, token = store.users.add("admin", "admin")
    return user.name, password, token


def open_context(config: ServeConfig, announce: Callable[[str], None] = log.warning) -> AppContext:
    """Open the store, load the deployed policy version (or its newest loadable ancestor) and build the context (no
    threads started)."""
    store = Store.open(config.data_dir)
    try:
        store.seed_starter_prompts()
        store.runs.fail_unfinished("the server stopped while the run was in progress")
        policy = load_policy(config, store, announce)
        return AppContext.build(config, store, policy)
    except BaseException:
        store.close()
        raise


def load_policy(config: ServeConfig, store: Store, announce: Callable[[str], None]) -> PolicyService:
    """The base model with the deployed version's adapter loaded. When it cannot be loaded (damaged, missing),
    the newest loadable ancestor along the parent links serves instead (else the base model): it is deployed in the
    store, each version passed over is marked rolled_back with the reason, and `announce` gets one line."""
    policy = PolicyService.from_config(config)
    record = store.versions.deployed()
    broken: list[tuple[int, str]] = []
    while record.version != 0:
        adapter = Path(record.path) / "adapter" if record.path else None
        problem = adapter_problem(adapter)
        if problem is None:
            try:
                policy.load_adapter(record.version, adapter)
                break
            except Exception as exc:  # noqa: BLE001 - any failure to load means: fall back, with the reason
                problem = _one_line(exc)  # the backend builds a serving copy per version: nothing half-loaded
        broken.append((record.version, problem))
        record = store.versions.get(record.parent if record.parent is not None else 0)
    if broken:
        why = {version: f"adapter could not be loaded at start-up: {problem}" for version, problem in broken}
        # What serves is what the store says is deployed (Deployments reads it next); the one taken down and any
        # broken ancestor passed over are marked rolled_back with the reason.
        store.versions.deploy(record.version, taken_down="rolled_back", reason=why[broken[0][0]])
        for version, _ in broken[1:]:
            store.versions.set_status(version, "rolled_back", why[version])
        names = ", ".join(str(v) for v, _ in broken)
        announce(f"prefloop: version {names} could not be loaded ({broken[0][1]}); serving version {record.version} "
                 f"instead (marked rolled_back; deploy it again once its adapter is restored)")
    return policy


def adapter_problem(adapter_dir: Path | None) -> str | None:
    """Why a version's LoRA adapter cannot be loaded (its config and weights are read, not applied), or None."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    if adapter_dir is None:
        return "no adapter directory is recorded for it"
    if not adapter_dir.is_dir():
        return f"{adapter_dir} does not exist"
    try:
        PeftConfig.from_pretrained(str(adapter_dir))
        load_peft_weights(str(adapter_dir), device="cpu")
    except Exception as exc:  # noqa: BLE001 - peft, safetensors, json and OS errors all mean "not loadable"
        return f"{adapter_dir}: {_one_line(exc)}"
    return None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl+C's KeyboardInterrupt, so the same cleanup runs (systemd and
    docker stop a service with SIGTERM). A KeyboardInterrupt, so no `except Exception` swallows it."""


class RunningServer:
    """uvicorn in a background thread (tests, benchmarks) or the foreground (`prefloop serve`), on a socket bound
    before uvicorn starts (given, or bound here), so there is no window in which another process takes the port."""

    def __init__(self, app: FastAPI, host: str, port: int, sock: socket.socket | None = None):
        self.sock = sock or bind_socket(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def run(self) -> None:
        """In the foreground until the server stops (uvicorn handles SIGINT/SIGTERM while it runs)."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def start(self, timeout: float = 30.0) -> RunningServer:
        self.thread = threading.Thread(target=self.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(15)
        self.sock.close()


def write_server_file(config: ServeConfig, url: str, token: str) -> None:
    """server.json (URL, local admin token, pid), mode 0600 whatever the umask, replaced atomically."""
    path = config.server_file
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a leftover .tmp
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token, "pid": os.getpid()}, f)
    os.replace(tmp, path)


@contextmanager
def sigterm_raises():
    """While inside: SIGTERM raises Terminated in the main thread. uvicorn swaps in its own handler while it runs
    and, after its graceful shutdown, raises the signal again with this handler restored, so `finally` blocks run
    (Python's default for SIGTERM would end the process on the spot)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(config: ServeConfig, announce=print, sock: socket.socket | None = None) -> None:
    """`prefloop serve`: runs until Ctrl+C (KeyboardInterrupt) or SIGTERM (returns), each cleaned up alike: a round in
    progress cancelled, server.json removed, the DuckDB file checkpointed and closed. On `sock` when given (the CLI
    binds it before importing this module); else bound here first, so a taken port (StartupError) fails before any
    slow work."""
    sock = sock or bind_socket(config.host, config.port)
    try:
        with sigterm_raises():
            _serve(config, sock, announce)
    except Terminated:
        announce("prefloop: stopped (SIGTERM)")
    finally:
        sock.close()


def _serve(config: ServeConfig, sock: socket.socket, announce) -> None:
    # Everything this process writes into the data dir (the DuckDB file and its WAL, snapshots of labels, versions)
    # is the owner's alone, whatever umask the shell or service manager gave it.
    umask = os.umask(0o077)
    try:
        make_data_dir(config.data_dir)
        # Gradio's upload and export cache: inside the private data dir rather than the world-shared /tmp/gradio,
        # where another local user could read a file whose name they guessed. Read when gradio is imported (later).
        os.environ.setdefault("GRADIO_TEMP_DIR", str(config.data_dir / "gradio-cache"))
        announce(f"prefloop: data dir {config.data_dir.resolve()}")
        converts = needs_conversion(config.model, config.models_dir)
        note = " (the first start converts the shipped GGUF, ~15 s)" if converts else ""
        announce(f"prefloop: loading model {config.model!r}{note}")
        _run(config, sock, open_context(config, announce), announce)
    finally:
        os.umask(umask)


def _run(config: ServeConfig, sock: socket.socket, ctx: AppContext, announce) -> None:
    """Serve `ctx` on `sock` until uvicorn stops; then stop the threads and the round, remove server.json, close."""
    try:
        created = first_run(ctx.store)
        server = RunningServer(create_app(ctx), config.host, config.port, sock=sock)
        if config.prefetch:
            ctx.buffer.start()
        ctx.auto_trainer.start_timer()
        if created:
            name, password, token = created
            announce("prefloop: created the admin account (shown once; add users with `prefloop users add`):")
            announce(f"    user: {name}\n    password: {password}\n    API token: {token}")
        write_server_file(config, server.url, ctx.local_token)
        announce(f"prefloop: serving policy version {ctx.deployments.serving} on {ctx.policy.device}")
        announce(f"prefloop: open {server.url}/ui/   (admins: {server.url}/admin/, API docs: {server.url}/api/docs)")
        server.run()
    finally:
        config.server_file.unlink(missing_ok=True)
        ctx.stop()
        ctx.store.close()
