"""
The embedded default store: one SQLite file, WAL, ``synchronous=FULL``, one connection.

Every method is one atomic operation, run on the connection's own thread through
``twisted.enterprise.adbapi``; its Deferred fires once its commit is on disk. Operations
asked for in the same turn of the reactor, or while the thread is busy, run together in one
SQLite transaction, each inside a savepoint of its own (group commit): one that fails is
rolled back alone, and the group shares one commit, so one disk flush, instead of one each.
With one writer connection, stream ids are committed in the order they are given out.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from .._interfaces import IStore
from . import _sql
from ._base import GeneratorStore
from ._schema import SQLITE

T = TypeVar("T")


def _setup(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA busy_timeout = 10000")


def _execute(cursor: Any, op: _sql.Op) -> Any:
    if isinstance(op, _sql.Query):
        cursor.execute(op.sql, op.params)
        if op.fetch == "all":
            return cursor.fetchall()
        if op.fetch == "one":
            return cursor.fetchone()
        return cursor.rowcount
    if isinstance(op, _sql.Insert):
        if op.rows:
            marks = ", ".join("?" * len(op.columns))
            cursor.executemany(
                f"INSERT INTO {op.table} ({', '.join(op.columns)}) VALUES ({marks}) {op.conflict}",
                op.rows,
            )
        return None
    return None  # Lock, Notify: one connection writes, and the service wakes its sorter


#: an operation waiting for its group: the operation, its arguments, who waits for it
_Job = tuple[Callable[..., "_sql.Steps[Any]"], tuple[Any, ...], Deferred[Any]]


def _run_group(cursor: Any, group: list[_Job]) -> list[Failure | tuple[Any]]:
    """
    Run every operation of ``group`` in one transaction, each in a savepoint (adbapi
    commits when this returns): an operation's value as a 1-tuple, or its failure.
    """
    cursor.execute("BEGIN IMMEDIATE")
    outcomes: list[Failure | tuple[Any]] = []
    for operation, args, _ in group:
        cursor.execute("SAVEPOINT operation")
        try:
            outcomes.append((drive(cursor, operation(*args)),))
        except Exception:
            outcomes.append(Failure())
            cursor.execute("ROLLBACK TO operation")
        cursor.execute("RELEASE operation")
    return outcomes


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
    """The store in one SQLite file at ``path``."""

    dialect = SQLITE

    def __init__(self, path: str, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.path = path
        self._reactor = reactor
        self._pool: adbapi.ConnectionPool | None = None
        #: operations asked for while a group runs: they make up the next group
        self._waiting: list[_Job] = []
        self._running = False

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path!r}>"

    def _run(self, operation: Callable[..., _sql.Steps[T]], *args: Any) -> Deferred[T]:
        """Run ``operation(*args)`` atomically, in the next group of operations."""
        if self._pool is None:
            raise RuntimeError(f"{self!r} is not open: call open() first")
        d: Deferred[T] = Deferred()
        self._waiting.append((operation, args, d))
        if not self._running:
            # Not at once: what else is asked for before the reactor turns joins the group
            # (deleting a transaction just answered and storing the next, say).
            self._running = True
            self._reactor.callLater(0, self._start_group)
        return d

    def _start_group(self) -> None:
        if self._pool is None:  # closed meanwhile
            self._running = False
            return
        group, self._waiting = self._waiting, []
        self._running = True
        d = self._pool.runInteraction(_run_group, group)
        d.addBoth(self._group_done, group)

    def _group_done(
        self, outcomes: list[Failure | tuple[Any]] | Failure, group: list[_Job]
    ) -> None:
        # Keep the thread busy: the next group starts before this one's callbacks run.
        self._running = False
        if self._waiting and self._pool is not None:
            self._start_group()
        for i, (_, _, d) in enumerate(group):
            outcome = outcomes if isinstance(outcomes, Failure) else outcomes[i]
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome[0])
        if self._waiting and not self._running and self._pool is not None:
            self._start_group()

    def open(self) -> Deferred[None]:
        if self._pool is None:
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
        return self._run(_sql.migrate, self.dialect)

    def close(self) -> Deferred[None]:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        return succeed(None)
