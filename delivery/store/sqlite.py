"""
The embedded default store: one SQLite file, WAL, ``synchronous=FULL``, one connection.

Every method is one atomic operation, run on the connection's own thread through
``twisted.enterprise.adbapi``; its Deferred fires once its commit is on disk. Operations
asked for in the same turn of the reactor, or while the thread is busy, run together in one
SQLite transaction, each inside a savepoint of its own (group commit): one that fails is
rolled back alone, and the group shares one commit, so one disk flush, instead of one each.
With one writer connection, stream ids are committed in the order they are given out.

- **One store per file.** SQLite is single-process: open() takes an exclusive ``flock``
  on ``<file>.lock`` beside the database and keeps it until close(); a second store, in
  this process or another, is refused with :class:`StoreLockedError`. The kernel drops
  the lock when the process dies, however it dies. (A sidecar file rather than the
  database itself: closing any descriptor of the database would drop SQLite's own locks.)
- **A database that cannot be written** (disk full, read-only, an I/O error, locked by
  another program) fails the whole group it happened in, rolled back, with
  :class:`StoreUnavailableError` in plain words; nothing of it was acknowledged. The
  store's :meth:`health` says so until a write commits again (see ``_base``).
- **Every operation is bounded**: one not answered within ``timeout`` seconds fails with
  :class:`StoreUnavailableError`. One still waiting for its group never runs; one whose
  group is on the thread (a frozen filesystem) cannot be stopped and may still commit, so
  a caller that retries relies on what every caller does anyway: writes are idempotent
  (an ingest, on ``event_id``) or checked (a cut, against the queue).
- **close()** fails the operations still waiting for their group, rather than leave their
  Deferreds unfired.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from zope.interface import implementer

from .._interfaces import IStore
from ..errors import (
    FencedError,
    StoreConfigurationError,
    StoreLockedError,
    StoreUnavailableError,
)
from . import _sql
from ._base import GeneratorStore
from ._schema import SQLITE

T = TypeVar("T")

#: SQLite's words for a database that cannot be written for now, and ours
_UNWRITABLE = {
    "database or disk is full": "disk full",
    "attempt to write a readonly database": "read-only",
    "disk I/O error": "I/O error",
    "database is locked": "locked by another program",
}


def _setup(conn: sqlite3.Connection) -> None:
    # takes effect only in a database with no tables yet: a new one gives the pages that
    # housekeeping frees back to the file system, step by step (an older one reuses them)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA busy_timeout = 10000")


def _unwritable(error: BaseException | None) -> str | None:
    """Why the database cannot be written, if that is what ``error`` says."""
    if isinstance(error, sqlite3.Error):
        for words, ours in _UNWRITABLE.items():
            if str(error).startswith(words):
                return ours
    return None


def _execute(cursor: Any, op: _sql.Op) -> Any:
    if isinstance(op, _sql.Query):
        cursor.execute(op.sql, op.params)
        if op.fetch == "all":
            return cursor.fetchall()
        if op.fetch == "one":
            return cursor.fetchone()
        return cursor.rowcount if op.fetch == "count" else None
    if isinstance(op, _sql.Insert):
        if op.rows:
            marks = ", ".join("?" * len(op.columns))
            cursor.executemany(
                f"INSERT INTO {op.table} ({', '.join(op.columns)}) VALUES ({marks}) {op.conflict}",
                op.rows,
            )
        return None
    if isinstance(op, _sql.Fenced):
        # (one connection writes: nothing can take the lease while this runs)
        cursor.execute(
            "SELECT 1 FROM leases WHERE name = ? AND epoch = ?", (op.fence.lease, op.fence.epoch)
        )
        if cursor.fetchone() is None:
            raise FencedError(
                f"the lease {op.fence.lease} is no longer held at epoch {op.fence.epoch}",
                op.fence.lease,
            )
        return None
    return None  # Lock, Notify: one connection writes, and the service wakes its sorter


@attrs.define(eq=False)
class _Job:
    """An operation asked for: what to run, and who waits for it (until its deadline)."""

    operation: Callable[..., _sql.Steps[Any]]
    args: tuple[Any, ...]
    result: Deferred[Any] = attrs.field(factory=Deferred)
    deadline: IDelayedCall | None = None

    def finish(self, outcome: Any) -> None:
        """Answer with ``outcome`` (a Failure fails), unless it was answered already."""
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        if self.result.called:
            return  # timed out: no one waits for it any more
        if isinstance(outcome, Failure):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)


def _run_group(connection: Any, group: list[_Job]) -> tuple[list[Failure | tuple[Any]], bool]:
    """
    Run every operation of ``group`` in one transaction, each in a savepoint (adbapi
    commits when this returns, or rolls back when it raises): each operation's value as a
    1-tuple, or its failure; and whether any row was written. An error that says the
    database cannot be written fails the whole group.
    """
    changes = connection.total_changes
    cursor = connection.cursor()
    try:
        cursor.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as e:
        if _unwritable(e) != "read-only":
            raise
        cursor.execute("BEGIN")  # a read-only database can still be read
    outcomes: list[Failure | tuple[Any]] = []
    for job in group:
        cursor.execute("SAVEPOINT operation")
        try:
            outcomes.append((drive(cursor, job.operation(*job.args)),))
        except Exception as e:
            if _unwritable(e) is not None:
                raise  # SQLite may have rolled back more than the savepoint already
            outcomes.append(Failure())
            cursor.execute("ROLLBACK TO operation")
        cursor.execute("RELEASE operation")
    return outcomes, connection.total_changes > changes


def drive(cursor: Any, steps: _sql.Steps[T]) -> T:
    """Run an operation's statements on a DB-API cursor, synchronously."""
    try:
        op = next(steps)
        while True:
            op = steps.send(_execute(cursor, op))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


@implementer(IStore)
class SQLiteStore(GeneratorStore):
    """
    The store in one SQLite file at ``path``.

    :param timeout: seconds an operation may go unanswered before it fails as unavailable
        (``None``: no limit).
    :param clock: what times operations (default: ``reactor``).
    """

    dialect = SQLITE

    def __init__(
        self,
        path: str,
        reactor: Any = None,
        timeout: float | None = 60.0,
        clock: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.path = path
        self.timeout = timeout
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._pool: adbapi.ConnectionPool | None = None
        #: the descriptor of the lock file, while open
        self._lock: int | None = None
        #: operations asked for while a group runs: they make up the next group
        self._waiting: list[_Job] = []
        self._running = False

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path!r}>"

    def _is_open(self) -> bool:
        return self._pool is not None

    def _run(self, operation: Callable[..., _sql.Steps[T]], *args: Any) -> Deferred[T]:
        """Run ``operation(*args)`` atomically, in the next group of operations."""
        if self._pool is None:
            raise RuntimeError(f"{self!r} is not open: call open() first")
        job = _Job(operation, args)
        if self.timeout is not None:
            job.deadline = self._clock.callLater(self.timeout, self._expire, job)
        self._waiting.append(job)
        if not self._running:
            # Not at once: what else is asked for before the reactor turns joins the group
            # (deleting a transaction just answered and storing the next, say).
            self._running = True
            self._reactor.callLater(0, self._start_group)
        d: Deferred[T] = job.result
        return d

    def _expire(self, job: _Job) -> None:
        if job in self._waiting:
            self._waiting.remove(job)  # it never runs
        job.finish(
            Failure(
                StoreUnavailableError(
                    f"the SQLite database {self.path} did not answer within {self.timeout:g} s"
                )
            )
        )

    def _start_group(self) -> None:
        if self._pool is None:  # closed meanwhile
            self._running = False
            return
        group, self._waiting = self._waiting, []
        self._running = True
        d = self._pool.runWithConnection(_run_group, group)
        d.addBoth(self._group_done, group)

    def _group_done(
        self, done: tuple[list[Failure | tuple[Any]], bool] | Failure, group: list[_Job]
    ) -> None:
        # Keep the thread busy: the next group starts before this one's callbacks run.
        self._running = False
        if self._waiting and self._pool is not None:
            self._start_group()
        if isinstance(done, Failure):
            problem = _unwritable(done.value)
            if problem is not None:
                done = Failure(self._cannot_write(f"{problem} ({self.path})"))
            outcomes: list[Failure | tuple[Any]] = [done] * len(group)
        else:
            outcomes, wrote = done
            if wrote:
                self._written()
        for job, outcome in zip(group, outcomes, strict=True):
            job.finish(outcome if isinstance(outcome, Failure) else outcome[0])
        if self._waiting and not self._running and self._pool is not None:
            self._start_group()

    def open(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._open())

    async def _open(self) -> None:
        if self._pool is None:
            self._lock = self._take_lock()
            self._pool = adbapi.ConnectionPool(
                "sqlite3",
                self.path,
                check_same_thread=False,
                isolation_level=None,
                cp_min=1,
                cp_max=1,
                cp_openfun=_setup,
                cp_reactor=self._reactor,
            )
        self._migrated(await self._run(_sql.migrate, self.dialect))

    def _take_lock(self) -> int | None:
        """Lock the database for this store (a database in memory is its alone)."""
        if self.path == ":memory:":
            return None
        lock_path = os.path.realpath(self.path) + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreConfigurationError(
                f"cannot open the SQLite database {self.path}: {lock_path}: {e.strerror};"
                " check that its directory exists and that delivery may write there"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 20, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = (
                "another store in this process"
                if holder == str(os.getpid())
                else f"another delivery process (pid {holder or 'unknown'})"
            )
            raise StoreLockedError(
                f"the SQLite database {self.path} is in use by {who}, which holds"
                f" {lock_path}: stop it first, or give each one a database of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def close(self) -> Deferred[None]:
        pool, self._pool = self._pool, None
        waiting, self._waiting = self._waiting, []
        for job in waiting:
            job.finish(
                Failure(StoreUnavailableError(f"{self!r} was closed before the operation ran"))
            )
        if pool is not None:
            pool.close()  # waits for the operations on the thread
        lock, self._lock = self._lock, None
        if lock is not None:
            os.close(lock)  # the database's connection is closed: let another store have it
        return succeed(None)
