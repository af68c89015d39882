"""The DuckDB file: one connection per process, one cursor per thread, one writer at a time.

DuckDB refuses concurrent calls on one connection object, so every thread gets its own cursor (a connection to the
same database instance). Writes go through `write()`, which serialises them with a lock: DuckDB's optimistic
concurrency would otherwise abort one of two transactions that touch the same rows, and label writes are small
enough that a queue costs nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from storage.errors import DataDirBusy, StorageError
from storage.migrations import migrate

Cursor = duckdb.DuckDBPyConnection


class Database:
    """An open DuckDB file with every migration applied. Open one per file per process: two in one process would
    share DuckDB's database instance but not the write lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._con = duckdb.connect(str(self.path))
        except duckdb.IOException as e:
            # DuckDB takes an exclusive OS lock on the file; a second process gets this IOException.
            if "Could not set lock" in str(e):
                raise DataDirBusy(self.path, str(e)) from e
            raise
        self._local = threading.local()
        self._cursor_lock = threading.Lock()  # con.cursor() is itself a call on the shared connection
        self._write_lock = threading.Lock()
        self._cursors: list[Cursor] = []
        self._closed = False
        try:
            migrate(self)
        except BaseException:
            self.close()  # release the file lock: a failed open must not keep the file busy
            raise

    def cursor(self) -> Cursor:
        """This thread's cursor (created on first use), for reads; writes go through `write()`."""
        if self._closed:
            raise StorageError(f"{self.path} is closed")
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self.new_cursor()
            self._local.cursor = cur
        return cur

    def new_cursor(self) -> Cursor:
        """A new cursor, closed by `close()` (prefer `reader()`, which closes it when done)."""
        with self._cursor_lock:
            if self._closed:
                raise StorageError(f"{self.path} is closed")
            cur = self._con.cursor()
            self._cursors.append(cur)
        # TimeZone is a per-connection setting that cursors do not inherit; UTC makes TIMESTAMPTZ values come back
        # in UTC whatever the machine's zone.
        cur.execute("SET TimeZone = 'UTC'")
        return cur

    @contextmanager
    def reader(self) -> Iterator[Cursor]:
        """A cursor of its own, closed on exit: for a long read (a streamed export, a snapshot's read transaction)
        that must not share this thread's cursor with the caller's other queries."""
        cur = self.new_cursor()
        try:
            yield cur
        finally:
            cur.close()
            with self._cursor_lock:
                if cur in self._cursors:  # close() may have run meanwhile and emptied the list
                    self._cursors.remove(cur)

    @contextmanager
    def write(self) -> Iterator[Cursor]:
        """A cursor inside BEGIN ... COMMIT, one writer at a time; any exception rolls back and is re-raised."""
        if getattr(self._local, "writing", False):
            raise StorageError("Database.write() does not nest: this thread is already inside a write")
        cur = self.cursor()
        with self._write_lock:
            self._local.writing = True
            try:
                cur.execute("BEGIN TRANSACTION")
                try:
                    yield cur
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
            finally:
                self._local.writing = False

    def close(self) -> None:
        """Close every cursor and the connection; later calls raise."""
        with self._cursor_lock:
            if self._closed:
                return
            self._closed = True
            for cur in self._cursors:
                cur.close()
            self._cursors.clear()
            self._con.close()
