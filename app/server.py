"""The server: FastAPI with the REST API under /api and the Gradio UI mounted at /ui, run by uvicorn.

While it runs it holds the DuckDB file (one process per file) and writes `server.json` into the data dir: its URL
and a local admin token (file mode 0600), through which CLI commands reach the store while the server holds it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse

from app.api import router
from app.api_admin import router as admin_router
from app.api_train import router as train_router
from app.config import ServeConfig
from app.context import AppContext
from app.errors import install_handlers
from app.policy import PolicyService
from storage.store import Store

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


def create_app(ctx: AppContext, with_ui: bool = True) -> FastAPI:
    app = FastAPI(title="prefloop", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None,
                  description="Rank a language model's answers; the model learns from them.")
    app.state.ctx = ctx
    install_handlers(app)
    app.include_router(router, max_body_size=MAX_BODY_BYTES)
    app.include_router(train_router, max_body_size=MAX_BODY_BYTES)
    app.include_router(admin_router, max_body_size=MAX_BODY_BYTES)
    app.add_middleware(DeclaredBodyLimit)

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/ui/")

    if with_ui:
        import gradio as gr

        from app.ui.blocks import HEAD, build_ui

        app = gr.mount_gradio_app(
            app, build_ui(ctx), path="/ui",
            auth=lambda name, password: ctx.authenticate_password(name, password) is not None,
            auth_message="prefloop: log in with the name and password your admin gave you.",
            head=HEAD, footer_links=["api"],
        )
    return app


def first_run(store: Store) -> tuple[str, str, str] | None:
    """On an empty data dir: create the admin account. Returns (name, password, token) to print once."""
    if store.users.count() > 0:
        return None
    user, password, token = store.users.add("admin", "admin")
    return user.name, password, token


def open_context(config: ServeConfig) -> AppContext:
    """Open the store, load the deployed policy version and build the context (no threads started)."""
    store = Store.open(config.data_dir)
    try:
        store.seed_starter_prompts()
        store.runs.fail_unfinished("the server stopped while the run was in progress")
        policy = PolicyService.load(config.model, config.models_dir, config.device)
        deployed = store.versions.deployed()
        if deployed.version != 0 and deployed.path:
            policy.deploy(deployed.version, Path(deployed.path) / "adapter")
        return AppContext.build(config, store, policy)
    except BaseException:
        store.close()
        raise


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RunningServer:
    """uvicorn in a background thread (tests, benchmarks) or the foreground (`prefloop serve`)."""

    def __init__(self, app: FastAPI, host: str, port: int):
        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> RunningServer:
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
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


def write_server_file(config: ServeConfig, url: str, token: str) -> None:
    path = config.server_file
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token, "pid": os.getpid()}, f)
    os.replace(tmp, path)


def serve(config: ServeConfig, announce=print) -> None:
    """`prefloop serve`: runs until interrupted."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    announce(f"prefloop: data dir {config.data_dir.resolve()}")
    announce(f"prefloop: loading model {config.model!r} (the first start converts the shipped GGUF, ~15 s)")
    ctx = open_context(config)
    created = first_run(ctx.store)
    server = RunningServer(create_app(ctx), config.host, config.port)
    if config.prefetch:
        ctx.buffer.start()
    ctx.scheduler.start_timer()
    try:
        if created:
            name, password, token = created
            announce("prefloop: created the admin account (shown once; add users with `prefloop users add`):")
            announce(f"    user: {name}\n    password: {password}\n    API token: {token}")
        write_server_file(config, server.url, ctx.local_token)
        announce(f"prefloop: serving policy version {ctx.policy.version} on {ctx.policy.device.torch_device}")
        announce(f"prefloop: open {server.url}/ui/   (API docs: {server.url}/api/docs)")
        server.server.run()
    finally:
        config.server_file.unlink(missing_ok=True)
        ctx.stop()
        ctx.store.close()
