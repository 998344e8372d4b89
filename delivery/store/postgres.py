"""
The PostgreSQL store, on txpostgres: the same operations as SQLite, on a pool of
asynchronous connections, plus what several processes sharing one database need.

- Stream order is gap-safe: an ingest transaction takes an advisory lock before it is
  given stream ids and holds it until it commits, so ids commit in the order they are
  given out and the sorter never finds a lower id committed after a higher one it routed.
- Migrations run under another advisory lock: processes starting together migrate once.
- ``NOTIFY delivery_events`` on ingest wakes the sorter of every process at once, through
  a dedicated ``LISTEN`` connection.
- A connection that dies (the server restarted, the backend was terminated) reconnects
  with backoff on its own; meanwhile operations fail at once with
  :class:`StoreUnavailableError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, DeferredSemaphore, maybeDeferred, succeed
from twisted.python.failure import Failure
from txpostgres import reconnection, retrying, txpostgres
from txpostgres.psycopg2_impl import psycopg2
from zope.interface import implementer

from .._interfaces import IStore
from .._log import Logger
from ..errors import StoreUnavailableError
from . import _sql
from ._base import GeneratorStore
from ._schema import POSTGRES

T = TypeVar("T")

log = Logger()

#: errors that mean the database is not there, rather than that a statement was wrong
UNAVAILABLE = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    reconnection.ConnectionDead,
    txpostgres.RollbackFailed,
)


async def _execute(cursor: Any, op: _sql.Op) -> Any:
    if isinstance(op, _sql.Query):
        await cursor.execute(op.sql.replace("?", "%s"), tuple(op.params))
        if op.fetch == "all":
            return cursor.fetchall()
        if op.fetch == "one":
            return cursor.fetchone()
        return cursor.rowcount
    if isinstance(op, _sql.Insert):
        if op.rows:
            # One statement, however many rows: a column of values is one array.
            arrays = ", ".join(f"%s::{t}[]" for t in op.types)
            await cursor.execute(
                f"INSERT INTO {op.table} ({', '.join(op.columns)})"
                f" SELECT * FROM unnest({arrays}) {op.conflict}",
                [list(column) for column in zip(*op.rows, strict=True)],
            )
        return None
    if isinstance(op, _sql.Lock):
        await cursor.execute("SELECT pg_advisory_xact_lock(%s)", (op.key,))
        return None
    await cursor.execute(f"NOTIFY {op.channel}")
    return None


async def drive(cursor: Any, steps: _sql.Steps[T]) -> T:
    """Run an operation's statements on a txpostgres cursor."""
    try:
        op = next(steps)
        while True:
            op = steps.send(await _execute(cursor, op))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def describe(url: str) -> str:
    """The database a URL names, without its password."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return f"{user}{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


@implementer(IStore)
class PostgresStore(GeneratorStore):
    """The store in the PostgreSQL database at ``url`` (``postgresql://user@host/db``)."""

    dialect = POSTGRES

    def __init__(self, url: str, reactor: Any = None, connections: int = 4) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.url = url
        self._reactor = reactor
        self._size = connections
        self._pool: _Pool | None = None
        self._listener: txpostgres.Connection | None = None
        self._observers: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<PostgresStore {describe(self.url)}>"

    def _connection(self, *args: Any) -> txpostgres.Connection:
        detector = reconnection.DeadConnectionDetector(
            reconnectionIterator=lambda: retrying.simpleBackoffIterator(
                initialDelay=0.2, maxDelay=5.0, maxRetries=0, now=True
            ),
            reactor=self._reactor,
        )
        detector.addRecoveryHandler(lambda: log.info("reconnected to {db}", db=describe(self.url)))
        return txpostgres.Connection(self._reactor, detector=detector)

    async def _open(self) -> None:
        if self._pool is None:
            connections = [self._connection() for _ in range(self._size)]
            try:
                for connection in connections:
                    await connection.connect(self.url)
            except Exception as e:
                for connection in connections:
                    _forget(connection)
                raise StoreUnavailableError(
                    f"cannot connect to PostgreSQL at {describe(self.url)}: {_first_line(e)}"
                ) from None
            self._pool = _Pool(connections)
        await self._run(_sql.migrate, self.dialect)
        await self._listen()

    def open(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._open())

    async def _listen(self) -> None:
        if self._listener is not None:
            return
        listener = self._connection()
        self._listener = listener
        listener.addNotifyObserver(self._notified)
        assert listener.detector is not None
        listener.detector.addRecoveryHandler(lambda: listener.runOperation(_LISTEN))
        await listener.connect(self.url)
        await listener.runOperation(_LISTEN)

    def _notified(self, notify: Any) -> None:
        if notify.channel == _sql.EVENTS_CHANNEL:
            for observer in list(self._observers):
                observer()

    def on_new_events(self, callback: Callable[[], None]) -> None:
        self._observers.append(callback)

    def close(self) -> Deferred[None]:
        pool, self._pool = self._pool, None
        listener, self._listener = self._listener, None
        for connection in ([*pool.connections] if pool else []) + ([listener] if listener else []):
            _forget(connection)
        return succeed(None)

    def _run(self, operation: Callable[..., _sql.Steps[T]], *args: Any) -> Deferred[T]:
        if self._pool is None:
            raise RuntimeError(f"{self!r} is not open: call open() first")

        def interaction(cursor: Any) -> Deferred[T]:
            return Deferred.fromCoroutine(drive(cursor, operation(*args)))

        d: Deferred[T] = self._pool.run(interaction)
        d.addErrback(self._unavailable)
        return d

    def _unavailable(self, failure: Failure) -> Failure:
        if failure.check(*UNAVAILABLE):
            raise StoreUnavailableError(
                f"PostgreSQL at {describe(self.url)} is unavailable: {_first_line(failure.value)}"
            )
        return failure


_LISTEN = f"LISTEN {_sql.EVENTS_CHANNEL}"


class _Pool:
    """
    A fixed set of connections, each used by one transaction at a time. A connection that
    dies stays in the set: its detector reconnects it, and meanwhile it fails at once.
    """

    def __init__(self, connections: list[txpostgres.Connection]) -> None:
        self.connections = connections
        self._idle = list(connections)
        self._free = DeferredSemaphore(len(connections))

    async def _run(self, interaction: Callable[[Any], Deferred[T]]) -> T:
        await self._free.acquire()
        connection = self._idle.pop()
        try:
            result: T = await maybeDeferred(connection.runInteraction, interaction)
            return result
        finally:
            self._idle.append(connection)
            self._free.release()

    def run(self, interaction: Callable[[Any], Deferred[T]]) -> Deferred[T]:
        return Deferred.fromCoroutine(self._run(interaction))


def _forget(connection: txpostgres.Connection) -> None:
    """Close a connection for good: no reconnecting."""
    if connection.detector is not None:
        connection.detector.connectionIsDead = True
        connection.detector.reconnect = lambda: succeed(None)
    with contextlib.suppress(Exception):  # already closed, or never opened
        connection.close()


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
