"""The DuckDB file: one connection per process, one cursor per thread, one writer at a time.

DuckDB refuses concurrent calls on one connection object, so every thread gets its own cursor (a connection to the
same database instance). Writes go through `write()`, which serialises them with a lock: DuckDB's optimistic
concurrency would otherwise abort one of two transactions that touch the same rows, and label writes are small
enough that a queue costs nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from storage.errors import DataDirBusy, StorageError, StorageFull
from storage.migrations import migrate

Cursor = duckdb.DuckDBPyConnection
log = logging.getLogger(__name__)

DISK_FULL = ("No space left on device", "Disk quota exceeded")  # ENOSPC and EDQUOT, as DuckDB's messages word them
FILE_MODE = 0o600  # labels, password hashes and token hashes: the owner's alone, whatever the umask


def is_disk_full(exc: BaseException) -> bool:
    """True for a DuckDB error caused by a full disk or quota (DuckDB raises them as several exception classes)."""
    return isinstance(exc, duckdb.Error) and any(marker in str(exc) for marker in DISK_FULL)


def disk_full_error(path: Path, exc: BaseException) -> StorageFull:
    return StorageFull(f"the disk holding {path} is full, so nothing was written: free some space and try again "
                       f"[{_first_line(exc)}]")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def unreadable_error(path: Path, exc: BaseException) -> StorageError:
    """A DuckDB file that cannot be opened, as one line naming the file and what to do."""
    detail = _first_line(exc)
    if "not a valid DuckDB database" in detail or isinstance(exc, (duckdb.SerializationException,
                                                                    duckdb.InternalException)):
        return StorageError(f"{path} is damaged or not a prefloop database: restore it from a backup, or move it "
                            f"aside to start with an empty store [{detail}]")
    return StorageError(f"cannot open the database {path} [{detail}]")


def restrict_mode(path: Path) -> None:
    """Take group and other access away from a file prefloop keeps private (best effort: not ours, or gone)."""
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, FILE_MODE)
    except OSError:
        pass


class Database:
    """An open DuckDB file with every migration applied. Open one per file per process: two in one process would
    share DuckDB's database instance but not the write lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._con = duckdb.connect(str(self.path))
        except duckdb.Error as e:
            # DuckDB takes an exclusive OS lock on the file; a second process gets this IOException.
            if isinstance(e, duckdb.IOException) and "Could not set lock" in str(e):
                raise DataDirBusy(self.path, str(e)) from e
            raise unreadable_error(self.path, e) from e
        # DuckDB creates the file (and later its .wal) with the umask's mode; the data dir is 0700 and the CLI sets
        # umask 077, and the file itself is made owner-only here, also when an older prefloop created it.
        for path in (self.path, self.path.with_name(self.path.name + ".wal")):
            restrict_mode(path)
        self._local = threading.local()
        self._cursor_lock = threading.Lock()  # con.cursor() is itself a call on the shared connection
        self._write_lock = threading.Lock()
        self._cursors: list[Cursor] = []
        self._closed = False
        try:
            migrate(self)
        except duckdb.Error as e:
            self.close()  # release the file lock: a failed open must not keep the file busy
            raise unreadable_error(self.path, e) from e
        except BaseException:
            self.close()
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
        """A cursor inside BEGIN ... COMMIT, one writer at a time; any exception rolls back and is re-raised (a full
        disk as StorageFull: DuckDB rolls the transaction back and stays usable once there is space again)."""
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
            except duckdb.Error as e:
                if is_disk_full(e):
                    raise disk_full_error(self.path, e) from e
                raise
            finally:
                self._local.writing = False

    def close(self) -> None:
        """Checkpoint (the WAL folded into the file), then close every cursor and the connection; later calls raise."""
        with self._cursor_lock:
            if self._closed:
                return
            self._closed = True
            for cur in self._cursors:
                cur.close()
            self._cursors.clear()
            try:
                self._con.execute("CHECKPOINT")
            except duckdb.Error as e:  # a full disk, say: the WAL stays and DuckDB replays it at the next open
                log.warning("checkpoint of %s failed: %s", self.path, _first_line(e))
            self._con.close()
