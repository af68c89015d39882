"""The policy worker: the transformers backend in its own process, so the web process never runs the model.

    web process (FastAPI, Gradio, DuckDB)  --pipe-->  worker process (model, merged serving copies)
        WorkerBackend.sample_items / stream / load_version        TransformersBackend

The app still owns the DuckDB file (one writer): the worker only hands answers back. Inside the worker three kinds
of work never wait for each other: item batches run one at a time on their own thread; on-demand answers (Demo,
/api/generate) each get a thread of their own, so a chat starts streaming while an item batch is in flight (both
share the cores; batches are sized to take a few seconds, see app/config.py `batch_items`); loading a version (a
merge takes ~1 s) runs on a third. A worker that dies is restarted on the next call, with the versions it held.
The worker dies with the web process (PR_SET_PDEATHSIG), even on kill -9.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import multiprocessing.util
import os
import queue
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app.generation.backend import ItemRequest
from learner.errors import ConfigError, ModelError
from learner.lifetime import die_with_parent
from learner.sampling import SampledAnswer, SamplingParams

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # the first start may convert nothing (the app converts the GGUF first) but loads a model
SIGTERM_GRACE_S = 10  # a worker sent SIGTERM lives this long for the server to close it (make run exits ~2 s
#   after a SIGTERM to its group); past it, a server that never closes it still exits (serve_worker says why)
ON_DEMAND_THREADS = 2  # matches the app's generation slots: more on-demand answers than this are refused upstream
_ERRORS = {"ModelError": ModelError, "ConfigError": ConfigError}


class WorkerError(RuntimeError):
    """The policy worker failed or died; the caller may retry (a dead worker restarts on the next call)."""


class WorkerBackend:
    """A `PolicyBackend` whose model lives in a child process."""

    def __init__(self, model_path: Path, device: str | None = None, merge: bool = True, threads: int | None = None,
                 precision: str | None = None):
        self.model_path = Path(model_path)
        self._device_name = device
        self._precision = precision
        self.merge = merge
        self._threads = threads
        self._adapters: dict[int, Path] = {}  # what to reload if the worker restarts
        self._send_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._pending: dict[int, tuple[object, queue.Queue]] = {}  # request id -> (the pipe it went down, replies)
        self._ids = itertools.count(1)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._closed = False  # after close() no call restarts the worker
        self.device = ""
        self._start()

    # -- PolicyBackend ----------------------------------------------------------------------------------------------
    def load_version(self, version: int, adapter_dir: Path | None) -> None:
        self._call("load_version", version, None if adapter_dir is None else str(adapter_dir))
        if version != 0 and adapter_dir is not None:
            self._adapters[version] = Path(adapter_dir)

    def drop_version(self, version: int) -> None:
        self._adapters.pop(version, None)
        self._call("drop_version", version)

    def loaded_versions(self) -> list[int]:
        return self._call("loaded_versions")

    def sample_items(self, requests: Sequence[ItemRequest], params: SamplingParams) -> list[list[SampledAnswer]]:
        return self._call("sample_items", list(requests), params)

    def stream(self, messages: list[dict], params: SamplingParams, version: int,
               seed: int | None = None) -> Iterator[str]:
        replies = self._request("stream", messages, params, version, seed)
        while True:
            kind, payload = replies.get()
            if kind == "piece":
                yield payload
            elif kind == "ok":
                return
            else:
                raise _error(payload)

    def set_threads(self, threads: int) -> None:
        """torch threads the worker uses (a round takes the other cores while it runs). A worker that is not running
        (it died, or the server is shutting down) is not started for this: the next call that needs one starts it
        with these threads. A round's start and end set them, and a restart there cost a model load in the middle
        of a shutdown."""
        self._threads = threads
        with self._start_lock:
            running = not self._closed and self._process is not None and self._process.is_alive()
        if running:
            self._call("set_threads", threads)

    def close(self) -> None:
        """Stop the worker now: it exits without finishing what it was sampling (an item batch can take ~20 s on a
        CPU, and nothing it holds needs saving: the app stores items). Calls in flight fail with WorkerError, and
        later calls fail too instead of starting a new worker."""
        with self._start_lock:
            self._closed = True
            process = self._process
            if process is None:
                return
            try:
                with self._send_lock:
                    self._conn.send((0, "exit", ()))
            except OSError:
                pass
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
            self._process = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # fork would copy the web process's threads and locks
        self._conn, child = context.Pipe()
        self._process = context.Process(target=serve_worker, name="prefloop-policy-worker", daemon=True,
                                        args=(child, str(self.model_path), self._device_name, self.merge,
                                              self._threads, self._precision))
        self._process.start()
        child.close()
        if not self._conn.poll(START_TIMEOUT_S):
            self._process.kill()
            raise WorkerError(f"the policy worker did not start within {START_TIMEOUT_S:.0f} s")
        try:
            _, kind, payload = self._conn.recv()
        except EOFError:
            raise WorkerError(f"the policy worker exited while starting (exit code {self._process.exitcode})") from None
        if kind != "ok":
            self._process.join(5)
            raise _error(payload)
        self.device = payload["device"]
        threading.Thread(target=self._read, args=(self._conn,), name="policy-worker-reader", daemon=True).start()
        for version, adapter_dir in list(self._adapters.items()):  # a restart serves what the last worker did
            self._wait(self._send("load_version", version, str(adapter_dir)))

    def _ensure_alive(self, dead_conn=None) -> None:
        """Restart the worker if it is gone; `dead_conn` is a pipe a send just found broken (the process may not
        have been reaped yet, or someone else reaped it, so `is_alive` alone cannot tell)."""
        with self._start_lock:
            if self._closed:
                raise WorkerError("the policy worker is closed (the server is shutting down)")
            process = self._process
            if dead_conn is not self._conn and process is not None and process.is_alive():
                return  # running, or another caller already restarted it after `dead_conn` broke
            log.warning("the policy worker is not running (exit code %s); restarting it",
                        None if process is None else process.exitcode)
            if process is not None:
                process.kill()  # a no-op for a process already reaped
                process.join(5)
            self._start()

    def _request(self, op: str, *args) -> queue.Queue:
        self._ensure_alive()
        conn = self._conn
        try:
            return self._send(op, *args)
        except WorkerError:  # died between the check and the send: restart once, then give up
            self._ensure_alive(dead_conn=conn)
            return self._send(op, *args)

    def _send(self, op: str, *args) -> queue.Queue:
        request_id = next(self._ids)
        replies: queue.Queue = queue.Queue()
        try:
            with self._send_lock:
                conn = self._conn
                self._pending[request_id] = (conn, replies)
                conn.send((request_id, op, args))
        except (OSError, ValueError) as exc:
            self._pending.pop(request_id, None)
            raise WorkerError(f"the policy worker cannot be reached: {exc}") from exc
        return replies

    def _call(self, op: str, *args):
        return self._wait(self._request(op, *args))

    @staticmethod
    def _wait(replies: queue.Queue):
        kind, payload = replies.get()
        if kind == "ok":
            return payload
        raise _error(payload)

    def _read(self, conn) -> None:
        """Route the worker's replies to the waiting callers; when it dies, fail every pending call at once."""
        while True:
            try:
                request_id, kind, payload = conn.recv()
            except (EOFError, OSError):
                break
            pending = self._pending.get(request_id)
            if pending is None:
                continue
            if kind != "piece":
                self._pending.pop(request_id, None)
            pending[1].put((kind, payload))
        died = ("error", ("WorkerError", "the policy worker died"))
        for request_id, (sent_on, replies) in list(self._pending.items()):
            if sent_on is conn:  # requests already sent to a restarted worker are not this reader's
                self._pending.pop(request_id, None)
                replies.put(died)


def _error(payload) -> Exception:
    name, message = payload
    return _ERRORS.get(name, WorkerError)(message if name in _ERRORS else f"{name}: {message}")


# -- the child process ----------------------------------------------------------------------------------------------
def serve_worker(conn, model_path: str, device_name: str | None, merge: bool, threads: int | None,
                 precision: str | None = None) -> None:
    """The worker's main loop: load the model, then answer requests until the pipe closes or "exit" arrives."""
    die_with_parent()
    # Ctrl+C in a terminal, and SIGTERM to the process group (a supervisor, systemd's control group, make run's shell),
    # reach every process of the group at once. The server stops the worker itself, after the item sampler
    # (WorkerBackend.close); dying first fails the batch in flight with a traceback in a clean shutdown's log. So SIGINT
    # is ignored, and SIGTERM ends the worker only SIGTERM_GRACE_S later (SIGALRM's default action) unless the server
    # has closed it by then: multiprocessing's exit steps terminate() daemonic children and then wait for them, so a
    # worker that ignored SIGTERM could hold a server's exit forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: signal.alarm(SIGTERM_GRACE_S))
    import torch

    from app.generation.transformers_backend import TransformersBackend
    from learner.model import pick_device

    send_lock = threading.Lock()

    def send(request_id: int, kind: str, payload) -> None:
        with send_lock:
            conn.send((request_id, kind, payload))

    try:
        if threads:
            torch.set_num_threads(threads)
        device = pick_device(device_name, precision)
        backend = TransformersBackend(Path(model_path), device, merge=merge)
    except Exception as exc:
        send(0, "error", (type(exc).__name__, str(exc)))
        return
    send(0, "ok", {"device": str(device.torch_device)})
    lanes = {"items": ThreadPoolExecutor(1, "items"), "demand": ThreadPoolExecutor(ON_DEMAND_THREADS, "demand"),
             "control": ThreadPoolExecutor(1, "control")}
    while True:
        try:
            request_id, op, args = conn.recv()
        except (EOFError, OSError):
            break
        if op == "exit":
            break
        lane = {"sample_items": "items", "stream": "demand"}.get(op, "control")
        lanes[lane].submit(_handle, backend, send, request_id, op, args)
    # Nothing here needs saving, and a normal exit would wait for the lanes' threads (an item batch in flight):
    # leave at once, so the server's shutdown never waits for a batch. multiprocessing's own exit steps run first
    # (they release the semaphores the libraries made; skipped, the server's resource tracker warns of a leak).
    conn.close()
    multiprocessing.util._exit_function()
    os._exit(0)


def _handle(backend, send, request_id: int, op: str, args: tuple) -> None:
    import torch

    try:
        if op == "stream":
            for piece in backend.stream(*args):
                send(request_id, "piece", piece)
            result = None
        elif op == "set_threads":
            torch.set_num_threads(int(args[0]))
            result = None
        elif op == "load_version":
            version, adapter_dir = args
            result = backend.load_version(version, None if adapter_dir is None else Path(adapter_dir))
        elif op in ("drop_version", "loaded_versions", "sample_items"):
            result = getattr(backend, op)(*args)
        else:
            raise WorkerError(f"unknown request {op!r}")
        send(request_id, "ok", result)
    except Exception as exc:  # every failure goes back to the caller, who turns it into a message
        log.exception("policy worker: %s failed", op)
        send(request_id, "error", (type(exc).__name__, str(exc)))
