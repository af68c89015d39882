"""What every UI event handler shares: ordinary refusals shown as a toast, and the concurrency rules of events."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr

from app.policy import PolicyBusy
from app.ui.annotate import UiError
from learner.errors import LearnerError
from storage.errors import StorageError

HANDLED = (UiError, StorageError, LearnerError, PolicyBusy)  # shown as a toast; anything else is a bug: a 500
FREE = {"concurrency_limit": None}  # handlers of a few DuckDB reads or one write: nobody queues behind another
ONE_SWAP = {"concurrency_limit": 1, "concurrency_id": "admin_deploy"}  # one hot swap at a time, whichever button


@contextmanager
def as_toast() -> Iterator[None]:
    """Refusals and bad input become gr.Error (a toast in the browser, an exception in gradio_client)."""
    try:
        yield
    except HANDLED as exc:
        raise gr.Error(str(exc)) from exc
