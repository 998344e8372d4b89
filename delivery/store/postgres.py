"""
The PostgreSQL store, on txpostgres: the same operations as SQLite, on a pool of
asynchronous connections, plus what several processes sharing one database need.

- Stream order is gap-safe: an ingest transaction takes an advisory lock before it is
  given stream ids and holds it until it commits, so ids commit in the order they are
  given out and the sorter never finds a lower id committed after a higher one it routed.
- Migrations run under another advisory lock: processes starting together migrate once.
- ``NOTIFY delivery_events`` on ingest wakes the sorter of every process at once, through
  a dedicated ``LISTEN`` connection.
- The connections are a pool of their own (``_connections``), each of which keeps itself
  connected: when one dies (the server restarted, the backend was terminated) it
  reconnects with backoff, and while none is up operations fail at once with
  :class:`StoreUnavailableError`. The pool tells the store through callbacks; an outage
  is logged once when it begins and once when it ends. The ``LISTEN`` connection listens
  again when it is back, and wakes the sorter then: notifications sent meanwhile were lost.
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

import json
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from txpostgres.psycopg2_impl import psycopg2
from zope.interface import implementer

from .._interfaces import IStore
from .._log import Logger
from ..errors import FencedError, StoreConfigurationError, StoreUnavailableError
from ..records import Fence
from . import _sql
from ._base import GeneratorStore
from ._connections import Connection, Deadline, Link, Pool
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
#: the error the database raises for a write under a stale lease (``delivery_fence``)
FENCED = "DL001"


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
    needed (``BEGIN``, locks, ``NOTIFY``, queries fetching ``none``, ``COMMIT``) travel
    with the next one: a round trip less each.
    """
    before = ["BEGIN"]
    wrote = False
    fence: Fence | None = None
    try:
        try:
            op = next(steps)
            while True:
                wrote = wrote or _writes(op)
                if isinstance(op, _sql.Query) and op.fetch == "none":
                    # (interpolated here, as psycopg2 does for every statement it sends)
                    sql = cursor.mogrify(op.sql.replace("?", "%s"), tuple(op.params))
                    before.append(sql.decode())
                    result = None
                elif isinstance(op, _sql.Lock):
                    before.append(f"SELECT pg_advisory_xact_lock({int(op.key)})")
                    result = None
                elif isinstance(op, _sql.Notify):
                    if op.payload:
                        notify = cursor.mogrify(
                            "SELECT pg_notify(%s, %s)", (op.channel, op.payload)
                        )
                        before.append(notify.decode())
                    else:
                        before.append(f"NOTIFY {op.channel}")
                    result = None
                elif isinstance(op, _sql.Fenced):
                    fence = op.fence
                    check = cursor.mogrify(
                        "SELECT delivery_fence(%s, %s)", (fence.lease, fence.epoch)
                    )
                    before.append(check.decode())
                    result = None
                else:
                    result = await _execute(cursor, op, before)
                op = steps.send(result)
        except StopIteration as done:
            value = done.value
        await cursor.execute(_take(before) + "COMMIT")
        return value, wrote
    except Exception as e:
        if fence is not None and getattr(e, "pgcode", None) == FENCED:
            raise FencedError(
                f"the lease {fence.lease} is no longer held at epoch {fence.epoch}", fence.lease
            ) from None
        raise


def _queued(payload: str | None) -> list[str] | None:
    """The services a router says it queued events for (None: maybe any)."""
    try:
        ids = json.loads(payload) if payload else None
    except ValueError:
        return None
    return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else None


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
    :param clock: what timeouts and the waits between reconnects are measured on; the
        reactor if None.
    :param rng: what jitters the waits between reconnects; a new generator if None.
    """

    dialect = POSTGRES

    def __init__(
        self,
        url: str,
        reactor: Any = None,
        connections: int = 4,
        timeout: float | None = 60.0,
        *,
        clock: IReactorTime | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.url = url
        self.timeout = timeout
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._rng = rng if rng is not None else random.Random()
        self._size = connections
        self._pool: Pool | None = None
        self._observers: list[Callable[[], None]] = []
        self._queued_observers: list[Callable[[list[str] | None], None]] = []
        self._asked_observers: list[Callable[[tuple[str, str] | None], None]] = []
        self._released_observers: list[Callable[[], None]] = []
        #: since when and why connections are down
        self._outage: _Outage | None = None

    def __repr__(self) -> str:
        return f"<PostgresStore {redact_url(self.url)}>"

    def _say(self, error: object) -> str:
        """The first line of an error, with the URL's passwords hidden."""
        return hide_secrets(_first_line(error), self.url)

    # -- opening and closing --

    async def _open(self) -> None:
        pool = self._pool
        if pool is None:
            pool = Pool(
                self.url,
                self._reactor,
                self._size,
                on_lost=self._connection_lost,
                on_retry_failed=self._reconnect_failed,
                on_back=self._reconnected,
                on_notify=self._notified,
                prepare=_set_up,
                clock=self._clock,
                rng=self._rng,
            )
            await self._connect(pool.connect())
            self._pool = pool
        # A migration may take long on a big database: it is not bounded.
        self._migrated(await self._operation(_sql.migrate(self.dialect), None))
        await self._connect(
            pool.listen(
                _sql.EVENTS_CHANNEL,
                _sql.QUEUED_CHANNEL,
                _sql.ASKED_CHANNEL,
                _sql.RELEASED_CHANNEL,
            )
        )

    async def _connect(self, connecting: Awaitable[None]) -> None:
        """Wait for ``connecting``; a failure as what to fix, or as unavailable."""
        try:
            await connecting
        except Exception as e:
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
        if pool is not None:
            pool.close()
        self._outage = None
        return succeed(None)

    # -- NOTIFY --

    def _notified(self, channel: str, payload: str | None) -> None:
        # Events this store inserted itself are its service's to route (submit() hands
        # them to the sorter), and the pool does not report its own notifications; other
        # processes' wake it, and so does the listener coming back (it may have missed some).
        if channel == _sql.EVENTS_CHANNEL:
            self._wake()
        elif channel == _sql.QUEUED_CHANNEL:
            service_ids = _queued(payload)
            for callback in list(self._queued_observers):
                callback(service_ids)
        elif channel == _sql.ASKED_CHANNEL:
            asked = _sql.asked(payload)
            for told in list(self._asked_observers):
                told(asked)
        elif channel == _sql.RELEASED_CHANNEL:
            for look in list(self._released_observers):
                look()

    def _wake(self) -> None:
        for observer in list(self._observers):
            observer()

    def on_new_events(self, callback: Callable[[], None]) -> None:
        self._observers.append(callback)

    def on_queued(self, callback: Callable[[list[str] | None], None]) -> None:
        self._queued_observers.append(callback)

    def on_asked(self, callback: Callable[[tuple[str, str] | None], None]) -> None:
        self._asked_observers.append(callback)

    def on_released(self, callback: Callable[[], None]) -> None:
        self._released_observers.append(callback)

    # -- running operations --

    def _is_open(self) -> bool:
        return self._pool is not None

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
        self, link: Link, connection: Connection, steps: _sql.Steps[T], timeout: float | None
    ) -> T:
        deadline = Deadline(self._clock, timeout, connection)
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

    # -- outages, as the pool tells of them: logged once each --

    def _connection_lost(self, error: object) -> None:
        if self._outage is None:
            self._outage = _Outage(self._clock.seconds(), self._say(error))
            log.warn(
                "lost the connection to PostgreSQL at {db}: {error}; reconnecting with"
                " backoff, and until then every operation fails at once",
                db=redact_url(self.url),
                error=self._outage.error,
            )

    def _reconnect_failed(self, error: object) -> None:
        if self._outage is not None and not self._outage.retrying:
            self._outage.retrying = True
            log.info(
                "cannot reconnect to PostgreSQL at {db} yet: {error}; still trying",
                db=redact_url(self.url),
                error=self._say(error),
            )

    def _reconnected(self) -> None:
        if self._outage is not None:
            began, self._outage = self._outage.began, None
            log.info(
                "reconnected to PostgreSQL at {db} after {seconds:.1f} s",
                db=redact_url(self.url),
                seconds=self._clock.seconds() - began,
            )


@attrs.define
class _Outage:
    """Connections of the store are down since ``began``, the first because of ``error``."""

    began: float
    error: str
    #: a reconnection attempt failed, and that was logged
    retrying: bool = False


# Every read of ours walks a primary key in order and stops at a LIMIT. While a table's
# statistics are missing or stale (a young database, a burst), the planner reckons a range
# small and chooses a bitmap scan, which reads all of it and sorts it: a service's queue
# read 1,000 events at a time took 40 ms with 40,000 queued, and more as the queue grew,
# instead of 1 ms. Without bitmap scans the index is read in order, up to the LIMIT.
_SESSION = "SET enable_bitmapscan = off"


async def _set_up(connection: Connection) -> None:
    """Make a new connection of the pool ready for the store's operations."""
    await connection.cursor().execute(_SESSION)


async def _rolled_back(connection: Connection) -> bool:
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
