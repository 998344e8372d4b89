"""
The embedded default store: one SQLite file, WAL, ``synchronous=FULL``, one connection.

Every method is one SQLite transaction, run on the connection's own thread through
``twisted.enterprise.adbapi``; a commit is on disk before its Deferred fires. With one
writer connection, stream ids are committed in the order they are given out.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
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

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path!r}>"

    def _run(self, operation: Callable[..., _sql.Steps[T]], *args: Any) -> Deferred[T]:
        """Run ``operation(*args)`` in one transaction on the connection's thread."""
        if self._pool is None:
            raise RuntimeError(f"{self!r} is not open: call open() first")

        def interaction(cursor: Any) -> T:
            cursor.execute("BEGIN IMMEDIATE")
            return drive(cursor, operation(*args))

        d: Deferred[T] = self._pool.runInteraction(interaction)
        return d

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
