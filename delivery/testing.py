"""
What an embedder needs to test code that uses ``delivery``, as ``treq.testing`` is for
treq's users: a :class:`RecordingObserver` that keeps what the pipeline did and lets a test
wait for it, a :class:`ScriptedSender` that answers what the test chose, and
:func:`service_on_clock`, a started :class:`~delivery.DeliveryService` on a
:class:`~twisted.internet.task.Clock` against a temporary SQLite file.

Time is the test's: every wait of the pipeline (backoff, probes, polling) is on the clock
and happens only when the test advances it. The database is real (SQLite in threads), so
a test still runs on a reactor and awaits what it waits for; each wait of the observer
fails after ``timeout`` seconds of that real reactor, never of the test's clock (advancing
the clock past a timeout must not fail a wait), so that a broken pipeline fails a test
instead of hanging it. Nothing here imports the global reactor unless it is given None.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

from ._interfaces import IDeliveryObserver, ISender, SendResult
from .records import StoredTransaction
from .registration import Registration
from .service import DeliveryService
from .store import open_store

__all__ = [
    "OK",
    "RecordingObserver",
    "ScriptedSender",
    "ServiceOnClock",
    "failure",
    "service_on_clock",
]

#: the answer of a receiver that took the transaction (or answered the probe)
OK = SendResult(ok=True, status=200)


def failure(status: int | None = None, retry_after: float | None = None) -> SendResult:
    """
    The answer of a receiver that did not take the transaction: HTTP ``status``, or no
    answer at all (None: the connection was refused), with the error a real sender gives.
    """
    error = f"HTTP {status}" if status is not None else "connection refused"
    return SendResult(ok=False, status=status, error=error, retry_after=retry_after)


def _reactor_time(reactor: IReactorTime | None) -> IReactorTime:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor


@implementer(IDeliveryObserver)
class RecordingObserver:
    """
    An :class:`~delivery.IDeliveryObserver` that keeps everything it is told, in order,
    and lets a test wait until a condition on it holds.

    :param reactor: what the safety timeout of each wait counts on: the global reactor
        when None (when a wait starts). Not the test's clock.
    """

    def __init__(self, reactor: IReactorTime | None = None) -> None:
        self._reactor = reactor
        #: ``(service_id, old, new, reason)`` for every state change
        self.states: list[tuple[str, str, str, str | None]] = []
        #: ``(service_id, transaction, result)`` for every attempt to send
        self.results: list[tuple[str, StoredTransaction, SendResult]] = []
        #: ``(service_id, result)`` for every probe of a DOWN service
        self.probes: list[tuple[str, SendResult]] = []
        #: ``(service_id, count, status)`` for every batch of events set aside
        self.dead_letters: list[tuple[str, int, int | None]] = []
        #: events committed by ``submit()``, in all
        self.ingested = 0
        #: events routed into each service's queue, in all
        self.routed: dict[str, int] = {}
        #: rows housekeeping deleted, by table, in all
        self.deleted: dict[str, int] = {}
        #: ``(lease, change)`` for every change of this node's leases (several daemons)
        self.leases: list[tuple[str, str]] = []
        #: the lease of every write the database refused as stale
        self.refused: list[str] = []
        self._waiting: list[tuple[Callable[[], bool], Deferred[None]]] = []

    # -- IDeliveryObserver --

    def state_changed(self, service_id: str, old: str, new: str, reason: str | None) -> None:
        self.states.append((service_id, old, new, reason))
        self._check()

    def transaction_done(self, service_id: str, txn: StoredTransaction, result: SendResult) -> None:
        self.results.append((service_id, txn, result))
        self._check()

    def probe_done(self, service_id: str, result: SendResult) -> None:
        self.probes.append((service_id, result))
        self._check()

    def dead_lettered(self, service_id: str, count: int, status: int | None) -> None:
        self.dead_letters.append((service_id, count, status))
        self._check()

    def events_ingested(self, count: int) -> None:
        self.ingested += count
        self._check()

    def events_routed(self, counts: Mapping[str, int]) -> None:
        for service_id, count in counts.items():
            self.routed[service_id] = self.routed.get(service_id, 0) + count
        self._check()

    def housekept(self, table: str, count: int) -> None:
        self.deleted[table] = self.deleted.get(table, 0) + count
        self._check()

    def lease_changed(self, lease: str, change: str) -> None:
        self.leases.append((lease, change))
        self._check()

    def write_refused(self, lease: str) -> None:
        self.refused.append(lease)
        self._check()

    # -- waiting --

    def wait_for(self, condition: Callable[[], bool], timeout: float = 15) -> Deferred[None]:
        """
        Fires once ``condition()`` holds (at once if it does already; else it is asked
        again after everything the observer is told); fails with a TimeoutError after
        ``timeout`` seconds of the reactor.
        """
        d: Deferred[None] = Deferred(self._forget)
        if condition():
            d.callback(None)
        else:
            self._waiting.append((condition, d))
            d.addTimeout(timeout, _reactor_time(self._reactor))
        return d

    def wait_for_acks(self, count: int) -> Deferred[None]:
        """Fires once ``count`` attempts in all have been acknowledged (2xx)."""
        return self.wait_for(lambda: sum(1 for _, _, r in self.results if r.ok) >= count)

    def wait_for_state(self, service_id: str, state: str) -> Deferred[None]:
        """Fires the next time the service enters ``state``, after this call."""

        def entered() -> int:
            return sum(1 for s in self.states if s[0] == service_id and s[2] == state)

        before = entered()
        return self.wait_for(lambda: entered() > before)

    def _forget(self, d: Deferred[None]) -> None:
        self._waiting = [item for item in self._waiting if item[1] is not d]

    def _check(self) -> None:
        for item in list(self._waiting):
            condition, d = item
            if condition():
                self._waiting.remove(item)
                d.callback(None)


#: a script of answers: a list (one per call, the last one repeated once it is reached)
#: or a function that chooses each answer
SendScript = Sequence[SendResult] | Callable[[StoredTransaction], SendResult]
PingScript = Sequence[SendResult] | Callable[[], SendResult]


@implementer(ISender)
class ScriptedSender:
    """
    An :class:`~delivery.ISender` that gives the answers it is told to and keeps the
    transactions it was given (:attr:`transactions`, in order, resends included) and how
    many probes it answered (:attr:`pings`).

    :param answers: the answers to :meth:`send`: a list, one per call, whose last answer
        repeats once it is reached ( ``[failure(503), OK]``: down once, then up for good),
        or a function of the transaction.
    :param ping_answers: the answers to :meth:`ping`, likewise (a function of nothing).
    :param clock: with ``latency``: each answer comes ``latency`` seconds later on this
        clock (a request in flight, abandoned if the service cancels it). Without, every
        answer is given at once: the returned Deferred has fired.
    """

    def __init__(
        self,
        answers: SendScript = (OK,),
        ping_answers: PingScript = (OK,),
        *,
        clock: IReactorTime | None = None,
        latency: float = 0.0,
    ) -> None:
        if isinstance(answers, Sequence) and not answers:
            raise ValueError("a ScriptedSender needs at least one answer")
        if isinstance(ping_answers, Sequence) and not ping_answers:
            raise ValueError("a ScriptedSender needs at least one ping answer")
        if latency and clock is None:
            raise ValueError("a ScriptedSender with a latency needs the clock it counts on")
        self._answers = answers
        self._ping_answers = ping_answers
        self._clock = clock
        self._latency = latency
        #: every transaction given to :meth:`send`, in order
        self.transactions: list[StoredTransaction] = []
        #: how many times :meth:`ping` was called
        self.pings = 0
        #: the ``transaction_id`` of each ping, in order (None for a probe)
        self.ping_ids: list[str | None] = []

    def send(self, txn: StoredTransaction) -> Deferred[SendResult]:
        self.transactions.append(txn)
        if callable(self._answers):
            return self._answer(self._answers(txn))
        return self._answer(self._answers[min(len(self.transactions), len(self._answers)) - 1])

    def ping(self, transaction_id: str | None = None) -> Deferred[SendResult]:
        self.pings += 1
        self.ping_ids.append(transaction_id)
        if callable(self._ping_answers):
            return self._answer(self._ping_answers())
        return self._answer(self._ping_answers[min(self.pings, len(self._ping_answers)) - 1])

    def _answer(self, result: SendResult) -> Deferred[SendResult]:
        if self._clock is None:
            return succeed(result)
        d = deferLater(self._clock, self._latency, lambda: result)

        def abandoned(f: Failure) -> SendResult:
            f.trap(CancelledError)
            return SendResult(ok=False, error="the request was abandoned")

        return d.addErrback(abandoned)


@attrs.frozen
class ServiceOnClock:
    """What :func:`service_on_clock` gives: the running service and what drives it."""

    service: DeliveryService
    #: every wait of the service is on it: advance it to make time pass
    clock: Clock
    #: observes the service from the start
    observer: RecordingObserver
    #: the sender of each registration, by id
    senders: dict[str, ScriptedSender]
    #: the SQLite file (deleted, with its folder, at the end)
    path: Path


@asynccontextmanager
async def service_on_clock(
    registrations: Iterable[Registration],
    senders: Mapping[str, ScriptedSender] | None = None,
    *,
    reactor: Any = None,
    **options: Any,
) -> AsyncIterator[ServiceOnClock]:
    """
    A :class:`~delivery.DeliveryService` for the registrations, started, on a fresh
    :class:`~twisted.internet.task.Clock` and a new SQLite file in a temporary folder;
    stopped and the folder deleted when the block ends::

        async with service_on_clock([bridge], {"bridge": ScriptedSender([failure(503), OK])}) as s:
            await s.service.submit([event])
            ...

    :param senders: a sender per registration id; a registration without one gets a
        :class:`ScriptedSender` that takes everything.
    :param reactor: for the database's threads and the observer's timeouts: the global
        reactor when None.
    :param options: passed on to :class:`~delivery.DeliveryService` (``poll_interval``,
        ``server_name``, ...); ``rng`` is seeded (``random.Random(0)``) unless given, so
        that the waits of a run repeat.
    """
    registrations = list(registrations)
    chosen = {r.id: ScriptedSender() for r in registrations}
    chosen.update(senders or {})
    folder = Path(tempfile.mkdtemp(prefix="delivery-test-"))
    try:
        path = folder / "delivery.db"
        clock = Clock()
        options.setdefault("rng", random.Random(0))
        given: dict[str, ISender] = dict(chosen)
        service = DeliveryService(
            open_store(f"sqlite:///{path}", reactor),
            registrations,
            reactor=reactor,
            clock=clock,
            senders=given,
            **options,
        )
        observer = RecordingObserver(reactor)
        service.observe(observer)
        service.startService()
        try:
            await service.started()
            yield ServiceOnClock(service, clock, observer, chosen, path)
        finally:
            await service.stopService()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
