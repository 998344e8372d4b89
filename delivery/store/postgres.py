"""
The PostgreSQL store, on txpostgres: the same operations as SQLite, on a pool of
asynchronous connections, plus what several processes sharing one database need.

- Stream order is gap-safe: an ingest transaction takes an advisory lock before it is
  given stream ids and holds it until it commits, so ids commit in the order they are
  given out and the sorter never finds a lower id committed after a higher one it routed.
- Migrations run under another advisory lock: processes starting together migrate once.
- ``NOTIFY delivery_events`` on ingest wakes the sorter of every process at once, through
  a dedicated ``LISTEN`` connection.
- Each connection keeps itself connected: when it dies (the server restarted, the backend
  was terminated) it reconnects with backoff, and meanwhile operations fail at once with
  :class:`StoreUnavailableError`. An outage is logged once when it begins and once when it
  ends. The ``LISTEN`` connection listens again when it is back, and wakes the sorter then:
  notifications sent meanwhile were lost.
- Every operation is bounded: one the server does not answer within ``timeout`` seconds is
  abandoned with its connection (which reconnects) and fails with
  :class:`StoreUnavailableError`, so that a dead network never hangs the pool.
- At open, a connection the server refuses for good (no such role or database, a wrong
  password, pg_hba.conf) fails at once with :class:`StoreConfigurationError`, which names
  what to fix; only what can heal (refused, timed out, starting up or shutting down, too
  many connections, the network) is :class:`StoreUnavailableError`, retried by the service.
- A write refused because the server's disk is full (SQLSTATE 53100) or the transaction
  is read-only (25006: a standby) is :class:`StoreUnavailableError` in plain words, and
  the store's health until a write commits again (see ``_base``).
- The URL is shown only through ``redact_url``, and the client library's errors only with
  the URL's passwords hidden.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from txpostgres import txpostgres
from txpostgres.psycopg2_impl import psycopg2
from zope.interface import implementer

from .._interfaces import IStore
from .._log import Logger
from ..errors import StoreConfigurationError, StoreUnavailableError
from . import _sql
from ._base import GeneratorStore
from ._schema import POSTGRES
from ._url import hide_secrets, redact_url

T = TypeVar("T")

log = Logger()

#: errors that mean the database is not there (or not for now), rather than that a
#: statement was wrong
UNAVAILABLE = (psycopg2.OperationalError, psycopg2.InterfaceError)

#: what the server or libpq says when a connection fails for a while only (all else, such
#: as 'role "x" does not exist', fails for good)
HEALS = (
    "connection refused",
    "no answer within",
    "timeout expired",
    "timed out",
    "starting up",
    "shutting down",
    "in recovery mode",
    "not yet accepting connections",
    "not currently accepting connections",
    "too many clients",
    "too many connections",
    "connection slots are reserved",
    "no route to host",
    "network is unreachable",
    "host is down",
    "connection reset",
    "closed the connection unexpectedly",
    "could not receive data",
    "could not send data",
    "temporary failure in name resolution",
    "terminating connection",
    "eof detected",
    "broken pipe",
)
#: what to fix, for the failures that do not heal
FIXES = (
    ("does not exist", "create it, or fix its name in the database URL"),
    ("password", "fix the password in the database URL"),
    ("pg_hba.conf", "allow this host and user in the server's pg_hba.conf"),
    ("invalid dsn", "fix the database URL"),
)
#: SQLSTATEs of a write the database cannot take for now, in plain words
UNWRITABLE = {"53100": "disk full", "25006": "read-only"}

#: seconds a connection attempt may take (libpq's ``connect_timeout`` does not apply to
#: asynchronous connections)
CONNECT_TIMEOUT = 10.0
#: waits between attempts to reconnect: the first at once, then from the initial wait
#: doubling to the longest, each moved by up to 20 % either way
RECONNECT_INITIAL_DELAY = 0.2
RECONNECT_MAX_DELAY = 5.0


async def _execute(cursor: Any, op: _sql.Query | _sql.Insert, before: list[str]) -> Any:
    """Run ``op``, preceded in the same round trip by the statements ``before``."""
    prefix = _take(before)
    if isinstance(op, _sql.Query):
        await cursor.execute(prefix + op.sql.replace("?", "%s"), tuple(op.params))
        if op.fetch == "all":
            return cursor.fetchall()
        if op.fetch == "one":
            return cursor.fetchone()
        return cursor.rowcount
    if op.rows:
        # One statement, however many rows: a column of values is one array, passed as
        # the text of an array literal (one parameter, where psycopg2 would adapt every
        # value on its own: most of an ingest's time in this process).
        arrays = ", ".join(f"%s::{t}[]" for t in op.types)
        columns = zip(*op.rows, strict=True)
        await cursor.execute(
            f"{prefix}INSERT INTO {op.table} ({', '.join(op.columns)})"
            f" SELECT * FROM unnest({arrays}) {op.conflict}",
            [_array_literal(t, c) for t, c in zip(op.types, columns, strict=True)],
        )
    elif prefix:
        await cursor.execute(prefix)
    return None


def _take(before: list[str]) -> str:
    """The statements waiting to travel with the next one, as its prefix; none wait after."""
    prefix = "".join(f"{statement}; " for statement in before)
    before.clear()
    return prefix


def _array_literal(kind: str, values: Sequence[Any]) -> str:
    """The text of a PostgreSQL array of ``kind`` (text, bytea, or a number) holding values."""
    if kind == "text":
        items = [
            "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            for v in values
        ]
    elif kind == "bytea":
        items = ["NULL" if v is None else '"\\\\x' + bytes(v).hex() + '"' for v in values]
    else:
        items = ["NULL" if v is None else str(v) for v in values]
    return "{" + ",".join(items) + "}"


async def drive(cursor: Any, steps: _sql.Steps[T]) -> tuple[T, bool]:
    """
    Run an operation's statements on a txpostgres cursor, in one transaction that this
    begins and commits: its value, and whether it wrote. Statements whose results are not
    needed (``BEGIN``, locks, ``NOTIFY``, ``COMMIT``) travel with the next one: a round
    trip less each.
    """
    before = ["BEGIN"]
    wrote = False
    try:
        op = next(steps)
        while True:
            wrote = wrote or _writes(op)
            if isinstance(op, _sql.Lock):
                before.append(f"SELECT pg_advisory_xact_lock({int(op.key)})")
                result = None
            elif isinstance(op, _sql.Notify):
                before.append(f"NOTIFY {op.channel}")
                result = None
            else:
                result = await _execute(cursor, op, before)
            op = steps.send(result)
    except StopIteration as done:
        await cursor.execute(_take(before) + "COMMIT")
        return done.value, wrote


def _writes(op: _sql.Op) -> bool:
    return isinstance(op, _sql.Insert) or (
        isinstance(op, _sql.Query) and not op.sql.lstrip().upper().startswith("SELECT")
    )


def _fix(error: object) -> str | None:
    """What to fix, if a failure to connect will not heal by waiting; None if it may."""
    text = str(error).lower()
    if any(words in text for words in HEALS):
        return None
    return next((fix for words, fix in FIXES if words in text), "fix the database URL")


@implementer(IStore)
class PostgresStore(GeneratorStore):
    """
    The store in the PostgreSQL database at ``url`` (``postgresql://user@host/db``).

    :param connections: the size of the pool (one more connection listens for NOTIFY).
    :param timeout: seconds an operation may wait for the server's answers before it is
        abandoned as unavailable (``None``: no limit).
    """

    dialect = POSTGRES

    def __init__(
        self,
        url: str,
        reactor: Any = None,
        connections: int = 4,
        timeout: float | None = 60.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.url = url
        self.timeout = timeout
        self._reactor = reactor
        self._size = connections
        self._pool: _Pool | None = None
        self._listener: _Link | None = None
        self._observers: list[Callable[[], None]] = []
        #: the connections that are down, and since when and why
        self._down: set[_Link] = set()
        self._outage: _Outage | None = None

    def __repr__(self) -> str:
        return f"<PostgresStore {redact_url(self.url)}>"

    def _say(self, error: object) -> str:
        """The first line of an error, with the URL's passwords hidden."""
        return hide_secrets(_first_line(error), self.url)

    # -- opening and closing --

    async def _open(self) -> None:
        if self._pool is None:
            links = [_Link(self, prepare=_set_up) for _ in range(self._size)]
            await self._connect(links)
            self._pool = _Pool(links)
        # A migration may take long on a big database: it is not bounded.
        self._migrated(await self._operation(_sql.migrate(self.dialect), None))
        if self._listener is None:
            listener = _Link(self, prepare=self._start_listening)
            await self._connect([listener])
            self._listener = listener

    async def _connect(self, links: list[_Link]) -> None:
        try:
            for link in links:
                await link.connect()
        except Exception as e:
            for link in links:
                link.close()
            fix = _fix(e)
            if fix is not None:
                raise StoreConfigurationError(
                    f"PostgreSQL at {redact_url(self.url)} refused the connection:"
                    f" {self._say(e)}; {fix}"
                ) from None
            raise StoreUnavailableError(
                f"cannot connect to PostgreSQL at {redact_url(self.url)}: {self._say(e)}"
            ) from None

    def open(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._open())

    def close(self) -> Deferred[None]:
        pool, self._pool = self._pool, None
        listener, self._listener = self._listener, None
        for link in ([*pool.links] if pool else []) + ([listener] if listener else []):
            link.close()
        self._down.clear()
        self._outage = None
        return succeed(None)

    # -- NOTIFY --

    async def _start_listening(self, connection: _Connection) -> None:
        connection.addNotifyObserver(self._notified)
        await connection.cursor().execute(_LISTEN)

    def _notified(self, notify: Any) -> None:
        # Events this store inserted itself are its service's to route (submit() hands
        # them to the sorter); other processes' wake it.
        if notify.channel == _sql.EVENTS_CHANNEL and notify.pid not in self._backend_pids():
            self._wake()

    def _backend_pids(self) -> set[int]:
        links = self._pool.links if self._pool is not None else []
        return {link.backend_pid for link in links if link.connection is not None}

    def _wake(self) -> None:
        for observer in list(self._observers):
            observer()

    def on_new_events(self, callback: Callable[[], None]) -> None:
        self._observers.append(callback)

    # -- running operations --

    def _run(self, operation: Callable[..., _sql.Steps[T]], *args: Any) -> Deferred[T]:
        if self._pool is None:
            raise RuntimeError(f"{self!r} is not open: call open() first")
        return _detached(Deferred.fromCoroutine(self._operation(operation(*args), self.timeout)))

    async def _operation(self, steps: _sql.Steps[T], timeout: float | None) -> T:
        """Run an operation in one transaction, on the first connection free."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailableError(f"{self!r} is closed")
        link = await pool.acquire()
        if link is None:
            raise self._unavailable()
        try:
            assert link.connection is not None  # the pool hands out links that are up
            return await self._transaction(link, link.connection, steps, timeout)
        finally:
            pool.release(link)

    async def _transaction(
        self, link: _Link, connection: _Connection, steps: _sql.Steps[T], timeout: float | None
    ) -> T:
        deadline = _Deadline(self._reactor, timeout, connection)
        try:
            value, wrote = await drive(connection.cursor(), steps)
        except Exception as e:
            # The server ends a transaction whose COMMIT failed; any other failure leaves
            # it open. A connection that cannot even roll back is of no more use.
            usable = not (deadline.expired or connection.closed) and await _rolled_back(connection)
            why = TimeoutError(f"no answer within {timeout} s") if deadline.expired else e
            if not usable:
                link.lost(connection, why)
            problem = UNWRITABLE.get(getattr(e, "pgcode", None) or "")
            if problem is not None:
                raise self._cannot_write(f"{problem} ({redact_url(self.url)})") from None
            if not usable or isinstance(e, UNAVAILABLE):
                raise StoreUnavailableError(
                    f"PostgreSQL at {redact_url(self.url)} is unavailable: {self._say(why)}"
                ) from None
            raise
        finally:
            deadline.cancel()
        if wrote:
            self._written()
        return value

    def _unavailable(self) -> StoreUnavailableError:
        why = f"{self._outage.error}; reconnecting" if self._outage else "reconnecting"
        return StoreUnavailableError(f"PostgreSQL at {redact_url(self.url)} is unavailable: {why}")

    # -- outages, as the links tell of them: logged once each --

    def _link_down(self, link: _Link, error: object) -> None:
        if self._outage is None:
            self._outage = _Outage(self._reactor.seconds(), self._say(error))
            log.warn(
                "lost the connection to PostgreSQL at {db}: {error}; reconnecting with"
                " backoff, and until then every operation fails at once",
                db=redact_url(self.url),
                error=self._outage.error,
            )
        self._down.add(link)
        if self._pool is not None:
            self._pool.changed()  # the operations waiting fail if no link is left

    def _reconnect_failed(self, error: object) -> None:
        if self._outage is not None and not self._outage.retrying:
            self._outage.retrying = True
            log.info(
                "cannot reconnect to PostgreSQL at {db} yet: {error}; still trying",
                db=redact_url(self.url),
                error=self._say(error),
            )

    def _link_up(self, link: _Link) -> None:
        self._down.discard(link)
        if not self._down and self._outage is not None:
            began, self._outage = self._outage.began, None
            log.info(
                "reconnected to PostgreSQL at {db} after {seconds:.1f} s",
                db=redact_url(self.url),
                seconds=self._reactor.seconds() - began,
            )
        if self._pool is not None:
            self._pool.changed()
        if link is self._listener:
            # Notifications sent while it was away are lost: look for new events now.
            self._wake()


@attrs.define
class _Outage:
    """Connections of the store are down since ``began``, the first because of ``error``."""

    began: float
    error: str
    #: a reconnection attempt failed, and that was logged
    retrying: bool = False


_LISTEN = f"LISTEN {_sql.EVENTS_CHANNEL}"

# Every read of ours walks a primary key in order and stops at a LIMIT. While a table's
# statistics are missing or stale (a young database, a burst), the planner reckons a range
# small and chooses a bitmap scan, which reads all of it and sorts it: a service's queue
# read 1,000 events at a time took 40 ms with 40,000 queued, and more as the queue grew,
# instead of 1 ms. Without bitmap scans the index is read in order, up to the LIMIT.
_SESSION = "SET enable_bitmapscan = off"


class _Connection(txpostgres.Connection):  # type: ignore[misc]
    """A txpostgres connection that tells its owner when it dies, rather than the log."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        #: called with the reason when the connection is lost
        self.on_lost: Callable[[Failure], None] | None = None

    def doRead(self) -> object:
        try:
            super().doRead()
        except psycopg2.Error as e:
            # An idle connection whose server went away: txpostgres has no one to report
            # the error to and lets it escape to the reactor, which would log it as an
            # unhandled error before disconnecting. Return it instead: the reactor then
            # disconnects with it as the reason (connectionLost), quietly.
            return e
        return None

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if self.on_lost is not None:
            self.on_lost(reason)

    def close(self) -> None:
        self.on_lost = None
        if self._connection is not None:  # else it never got as far as connecting
            super().close()


class _Link:
    """
    One connection to the database that keeps itself connected. When it dies it is down
    (``connection`` is None) and reconnects with backoff, the first time at once (a
    terminated backend leaves the server there).
    """

    def __init__(
        self,
        store: PostgresStore,
        prepare: Callable[[_Connection], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._reactor = store._reactor
        #: run on each new connection before it is used
        self._prepare = prepare
        self.connection: _Connection | None = None
        #: the server process of the connection (NOTIFY names the one that sent it)
        self.backend_pid = 0
        #: the connection being made
        self._attempt: _Connection | None = None
        self._delay = 0.0
        self._retry: IDelayedCall | None = None
        self._closed = False

    async def connect(self) -> None:
        """Connect the first time; raise why not."""
        self._use(await self._new())

    async def _new(self) -> _Connection:
        connection = _Connection(self._reactor)
        self._attempt = connection
        deadline = _Deadline(self._reactor, CONNECT_TIMEOUT, connection)
        try:
            await connection.connect(self._store.url)
            if self._prepare is not None:
                await self._prepare(connection)
        except Exception:
            connection.close()
            if deadline.expired:
                raise TimeoutError(f"no answer within {CONNECT_TIMEOUT} s") from None
            raise
        finally:
            deadline.cancel()
            self._attempt = None
        return connection

    def _use(self, connection: _Connection) -> None:
        self.connection = connection
        self.backend_pid = connection._connection.get_backend_pid()
        connection.on_lost = lambda reason: self.lost(connection, reason.value)

    def lost(self, connection: _Connection, error: object) -> None:
        """``connection`` died or cannot be trusted any more: drop it and reconnect."""
        if connection is not self.connection:
            return  # already dropped
        self.connection = None
        connection.close()
        if self._closed:
            return
        self._store._link_down(self, error)
        self._delay = 0.0
        self._retry = self._reactor.callLater(0, self._reconnect)

    def _reconnect(self) -> None:
        self._retry = None
        Deferred.fromCoroutine(self._reconnecting())

    async def _reconnecting(self) -> None:
        try:
            connection = await self._new()
        except Exception as e:
            if self._closed:
                return
            self._store._reconnect_failed(e)
            self._delay = min(RECONNECT_MAX_DELAY, max(RECONNECT_INITIAL_DELAY, self._delay * 2))
            self._retry = self._reactor.callLater(
                self._delay * random.uniform(0.8, 1.2), self._reconnect
            )
            return
        if self._closed:
            connection.close()
            return
        self._use(connection)
        self._store._link_up(self)

    def close(self) -> None:
        """Close for good: no reconnecting."""
        self._closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        for connection in (self.connection, self._attempt):
            if connection is not None:
                connection.close()
        self.connection = None


class _Pool:
    """
    A fixed set of links, each used by one transaction at a time. An operation takes a free
    link that is up, or waits its turn while any link is up; when none is, it fails at once
    rather than wait for the database to come back.
    """

    def __init__(self, links: list[_Link]) -> None:
        self.links = links
        self._idle = list(links)
        self._waiting: deque[Deferred[_Link | None]] = deque()

    def acquire(self) -> Deferred[_Link | None]:
        """A free link that is up, or None if none is; give it back with release()."""
        waiter: Deferred[_Link | None] = Deferred()
        self._waiting.append(waiter)
        self.changed()
        return waiter

    def release(self, link: _Link) -> None:
        self._idle.append(link)
        self.changed()

    def changed(self) -> None:
        """Hand free links to the operations waiting, in turn (or None: all are down)."""
        while self._waiting:
            if all(link.connection is None for link in self.links):
                self._waiting.popleft().callback(None)
                continue
            link = next((link for link in self._idle if link.connection is not None), None)
            if link is None:
                return
            self._idle.remove(link)
            self._waiting.popleft().callback(link)


class _Deadline:
    """Closes a connection that has not finished its work in time (no limit: None)."""

    def __init__(self, reactor: Any, seconds: float | None, connection: _Connection) -> None:
        self.expired = False
        self._call: IDelayedCall | None = (
            None if seconds is None else reactor.callLater(seconds, self._expire, connection)
        )

    def _expire(self, connection: _Connection) -> None:
        self.expired = True
        connection.close()

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()


async def _set_up(connection: _Connection) -> None:
    """Make a new connection of the pool ready for the store's operations."""
    await connection.cursor().execute(_SESSION)


async def _rolled_back(connection: _Connection) -> bool:
    """Roll back the connection's transaction; whether it could."""
    try:
        await connection.cursor().execute("ROLLBACK")
    except Exception:
        return False
    return True


def _detached(d: Deferred[T]) -> Deferred[T]:
    """
    ``d``'s result, in a Deferred whose cancellation only stops the caller waiting: an
    operation is never cut off between the statements of the PostgreSQL protocol (which
    txpostgres cannot do), it finishes on its connection and its result is dropped.
    """
    result: Deferred[T] = Deferred(lambda _: None)

    def deliver(outcome: T | Failure) -> None:
        if result.called:
            return  # cancelled: no one is waiting any more
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    d.addBoth(deliver)
    return result


def _first_line(error: object) -> str:
    text = str(error).strip()
    # the server's own prefix ("FATAL:  role ... does not exist") says nothing more
    return text.splitlines()[0].removeprefix("FATAL:").strip() if text else type(error).__name__
