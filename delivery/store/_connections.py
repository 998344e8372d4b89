"""
The PostgreSQL store's connection pool, on txpostgres: a fixed set of connections that
keep themselves connected, and one more that listens for notifications.

- Each connection (a :class:`Link`) reconnects on its own when it dies (the server
  restarted, the backend was terminated, its owner dropped it as untrustworthy): the first
  time at once, then after the waits of :data:`RECONNECT` (one backoff policy, with the
  injected clock and random generator). Closed, it never reconnects.
- An operation takes a free connection that is up, or waits its turn while any is up;
  when none is, it is told at once (``None``) rather than wait for the database.
- A connection attempt the server does not answer within :data:`CONNECT_TIMEOUT` fails.
- The pool tells its owner what happens through the callbacks it is given, and nothing
  else: a connection lost (each time), an attempt to reconnect that failed, every
  connection up again, and a notification from another session. The listening connection
  reports a notification on its channel when it is back: those sent meanwhile are lost.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from txpostgres import txpostgres
from txpostgres.psycopg2_impl import psycopg2

from .._backoff import BackoffPolicy

#: seconds a connection attempt may take (libpq's ``connect_timeout`` does not apply to
#: asynchronous connections)
CONNECT_TIMEOUT = 10.0
#: waits between attempts to reconnect, after the first (at once): 0.2 s doubling to 5 s,
#: each moved by up to 20 % either way
RECONNECT = BackoffPolicy(initial_delay=0.2, max_delay=5.0, factor=2.0, jitter=0.2)


class Connection(txpostgres.Connection):  # type: ignore[misc]
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


class Link:
    """
    One connection to the database that keeps itself connected. When it dies it is down
    (``connection`` is None) and reconnects with backoff, the first time at once (a
    terminated backend leaves the server there).

    :param prepare: run on each new connection before it is used.
    :param on_down: called with the link and why, when its connection is lost.
    :param on_retry_failed: called with why, when an attempt to reconnect failed.
    :param on_up: called with the link, when it is connected again.
    """

    def __init__(
        self,
        url: str,
        reactor: Any,
        clock: IReactorTime,
        rng: random.Random,
        prepare: Callable[[Connection], Awaitable[None]] | None,
        on_down: Callable[[Link, object], None],
        on_retry_failed: Callable[[object], None],
        on_up: Callable[[Link], None],
    ) -> None:
        self._url = url
        self._reactor = reactor
        self._clock = clock
        self._rng = rng
        self._prepare = prepare
        self._on_down = on_down
        self._on_retry_failed = on_retry_failed
        self._on_up = on_up
        self.connection: Connection | None = None
        #: the server process of the connection (NOTIFY names the one that sent it)
        self.backend_pid = 0
        #: the connection being made
        self._attempt: Connection | None = None
        #: attempts to reconnect that failed since the connection was lost
        self._failures = 0
        self._retry: IDelayedCall | None = None
        self._closed = False

    async def connect(self) -> None:
        """Connect the first time; raise why not."""
        self._use(await self._new())

    async def _new(self) -> Connection:
        connection = Connection(self._reactor)
        self._attempt = connection
        deadline = Deadline(self._clock, CONNECT_TIMEOUT, connection)
        try:
            await connection.connect(self._url)
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

    def _use(self, connection: Connection) -> None:
        self.connection = connection
        self.backend_pid = connection._connection.get_backend_pid()
        connection.on_lost = lambda reason: self.lost(connection, reason.value)

    def lost(self, connection: Connection, error: object) -> None:
        """``connection`` died or cannot be trusted any more: drop it and reconnect."""
        if connection is not self.connection:
            return  # already dropped
        self.connection = None
        connection.close()
        if self._closed:
            return
        self._on_down(self, error)
        self._failures = 0
        self._retry = self._clock.callLater(0, self._reconnect)

    def _reconnect(self) -> None:
        self._retry = None
        Deferred.fromCoroutine(self._reconnecting())

    async def _reconnecting(self) -> None:
        try:
            connection = await self._new()
        except Exception as e:
            if self._closed:
                return
            self._on_retry_failed(e)
            self._failures += 1
            wait = RECONNECT.delay(self._failures, self._rng)
            self._retry = self._clock.callLater(wait, self._reconnect)
            return
        if self._closed:
            connection.close()
            return
        self._use(connection)
        self._on_up(self)

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


class Pool:
    """
    ``size`` links to the database at ``url``, each used by one transaction at a time, and
    a listening link once :meth:`listen` is called. An operation takes a free link that
    is up, or waits its turn while any link is up; when none is, it fails at once rather
    than wait for the database to come back.

    :param reactor: what txpostgres connections run on.
    :param clock: what the waits (reconnects, connection deadlines) are measured on; the
        reactor if None.
    :param rng: what jitters the waits between reconnects; a new generator if None.
    :param prepare: run on each new connection of the pool before it is used.
    :param on_lost: called with why, each time a connection is lost (it reconnects).
    :param on_retry_failed: called with why, each time an attempt to reconnect fails.
    :param on_back: called when every connection is up again after one was lost.
    :param on_notify: called with the channel and the payload, for a notification from a
        session other than the pool's; and with each channel and None when the listening
        link is back (notifications sent while it was away are lost).
    """

    def __init__(
        self,
        url: str,
        reactor: Any,
        size: int,
        *,
        on_lost: Callable[[object], None],
        on_retry_failed: Callable[[object], None],
        on_back: Callable[[], None],
        on_notify: Callable[[str, str | None], None],
        prepare: Callable[[Connection], Awaitable[None]] | None = None,
        clock: IReactorTime | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._url = url
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._rng = rng if rng is not None else random.Random()
        self._on_lost = on_lost
        self._on_retry_failed = on_retry_failed
        self._on_back = on_back
        self._on_notify = on_notify
        self.links = [self._link(prepare) for _ in range(size)]
        self._listener: Link | None = None
        #: the channels the listener listens on
        self._channels: tuple[str, ...] = ()
        #: the links that are down
        self._down: set[Link] = set()
        self._idle = list(self.links)
        self._waiting: deque[Deferred[Link | None]] = deque()

    def _link(self, prepare: Callable[[Connection], Awaitable[None]] | None) -> Link:
        return Link(
            self._url,
            self._reactor,
            self._clock,
            self._rng,
            prepare,
            on_down=self._link_down,
            on_retry_failed=self._on_retry_failed,
            on_up=self._link_up,
        )

    # -- connecting and closing --

    async def connect(self) -> None:
        """Connect every link of the pool; raise why not, closed."""
        try:
            for link in self.links:
                await link.connect()
        except Exception:
            self.close()
            raise

    async def listen(self, *channels: str) -> None:
        """Listen for notifications on ``channels`` (unless listening already); raise why not."""
        if self._listener is not None:
            return
        self._channels = channels
        listener = self._link(self._start_listening)
        try:
            await listener.connect()
        except Exception:
            listener.close()
            raise
        self._listener = listener

    async def _start_listening(self, connection: Connection) -> None:
        connection.addNotifyObserver(self._notified)
        await connection.cursor().execute("".join(f"LISTEN {c};" for c in self._channels))

    def _notified(self, notify: Any) -> None:
        if notify.pid not in self._backend_pids():
            self._on_notify(notify.channel, notify.payload)

    def _backend_pids(self) -> set[int]:
        return {link.backend_pid for link in self.links if link.connection is not None}

    def close(self) -> None:
        """Close every link for good."""
        for link in [*self.links, *([self._listener] if self._listener else [])]:
            link.close()
        self._listener = None
        self._down.clear()

    # -- links going down and coming back --

    def _link_down(self, link: Link, error: object) -> None:
        self._down.add(link)
        self._on_lost(error)
        self._changed()  # the operations waiting fail if no link is left

    def _link_up(self, link: Link) -> None:
        self._down.discard(link)
        if not self._down:
            self._on_back()
        self._changed()
        if link is self._listener:
            for channel in self._channels:
                self._on_notify(channel, None)

    # -- handing out links --

    def acquire(self) -> Deferred[Link | None]:
        """A free link that is up, or None if none is; give it back with release()."""
        waiter: Deferred[Link | None] = Deferred()
        self._waiting.append(waiter)
        self._changed()
        return waiter

    def release(self, link: Link) -> None:
        self._idle.append(link)
        self._changed()

    def _changed(self) -> None:
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


class Deadline:
    """Closes a connection that has not finished its work in time (no limit: None)."""

    def __init__(self, clock: IReactorTime, seconds: float | None, connection: Connection) -> None:
        self.expired = False
        self._call: IDelayedCall | None = (
            None if seconds is None else clock.callLater(seconds, self._expire, connection)
        )

    def _expire(self, connection: Connection) -> None:
        self.expired = True
        connection.close()

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
