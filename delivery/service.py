"""
``DeliveryService``: the whole pipeline as one Twisted service, for embedding or for the
daemon.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._interfaces import IDeliveryObserver, IEventSource, ISender, IStore
from ._observers import Observers
from ._state import ServiceCore, ServiceHandle, State, service_machine
from .errors import DeliveryError, UnknownServiceError
from .events import DEFAULT_MAX_EVENT_BYTES, prepare
from .interest import InterestIndex
from .matrix import ConnectionPool, MatrixSender
from .pool import DEFAULT_WINDOW, EventPool
from .recoverer import Recoverer
from .registration import Registration
from .sorter import AliasLookup, EventSorter
from .transactions import TransactionMaker

log = Logger()


@attrs.frozen
class ServiceStatus:
    """What :meth:`DeliveryService.status` reports about one application service."""

    service_id: str
    #: ``up``, ``down`` or ``recovering``
    state: str
    #: events routed to the service and not yet in a transaction
    queued_events: int
    #: transactions stored and not yet acknowledged by the receiver
    stored_transactions: int
    #: seconds since the oldest event still pending for the service arrived
    oldest_pending_age: float | None
    #: clock time of the last acknowledged transaction
    last_success: float | None
    #: why the last attempt failed (None once the service is UP again)
    last_error: str | None
    #: failed attempts in a row
    failure_count: int
    #: clock time of the next attempt, while DOWN
    next_retry: float | None
    #: the highest transaction id given out so far
    last_txn_id: int


class NotAcceptingEventsError(DeliveryError):
    """``submit()`` on a service that reads its events from an outside source."""


class DeliveryService(Service):
    """
    Delivers events to application services, reliably.

    :param store: from :func:`delivery.store.open_store`; opened when the service starts.
    :param registrations: the application services.
    :param reactor: for network I/O; the global reactor when None.
    :param clock: for every wait (polling, backoff, probes, timeouts); ``reactor`` when None.
    :param event_source: read events from here instead of ``submit()``.
    :param alias_lookup: ``room_id -> aliases``, for ``aliases`` namespaces.
    :param server_name: the homeserver's name; each service then also receives the
        events of its own ``sender_localpart`` user.
    :param senders: a sender per service id, replacing the Matrix sender (for other
        protocols and for tests).
    """

    name = "delivery"

    def __init__(
        self,
        store: IStore,
        registrations: Iterable[Registration],
        *,
        reactor: Any = None,
        clock: IReactorTime | None = None,
        poll_interval: float = 1.0,
        pool_window: int = DEFAULT_WINDOW,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        event_source: IEventSource | None = None,
        alias_lookup: AliasLookup | None = None,
        server_name: str | None = None,
        senders: dict[str, ISender] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.store = store
        self.registrations: dict[str, Registration] = {}
        for registration in registrations:
            if registration.id in self.registrations:
                raise ValueError(f"two registrations have the id {registration.id!r}")
            self.registrations[registration.id] = registration
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, not {poll_interval!r}")
        self.max_event_bytes = max_event_bytes
        self._external_source = event_source is not None
        self._observers = Observers()
        self._connections = ConnectionPool(reactor)
        self._senders = dict(senders or {})
        window = max([pool_window, *(r.options.max_events for r in self.registrations.values())])
        self._pool = EventPool(store, window, self._ready)
        self._maker = TransactionMaker(store, self._pool, self.clock, self._observers)
        self._recoverer = Recoverer(store, self._maker, self.clock, self._observers, rng)
        self._sorter = EventSorter(
            store,
            InterestIndex(self.registrations.values(), server_name=server_name),
            self._pool,
            self.clock,
            source=event_source,
            poll_interval=poll_interval,
            alias_lookup=alias_lookup,
        )
        self._handles: dict[str, ServiceHandle] = {}
        self._starting: Deferred[None] | None = None
        self._start_failure: Failure | None = None
        self._start_waiters: list[Deferred[None]] | None = None

    # -- IService --

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._start_waiters = []
        self._starting = Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            await self._start_pipeline()
        except Exception:
            self._start_failure = Failure()
            log.failure("delivery could not start", self._start_failure)
        waiters, self._start_waiters = self._start_waiters or [], None
        for waiter in waiters:
            waiter.callback(None)

    async def _started(self) -> None:
        """Wait until the service has started; raise why it could not."""
        if self._starting is None:
            raise DeliveryError("the delivery service is not running: call startService()")
        if self._start_waiters is not None:
            waiter: Deferred[None] = Deferred()
            self._start_waiters.append(waiter)
            await waiter
        if self._start_failure is not None:
            self._start_failure.raiseException()

    async def _start_pipeline(self) -> None:
        await self.store.open()
        await self.store.ensure_services(list(self.registrations))
        records = await self.store.services()
        for registration in self.registrations.values():
            if registration.url is None and registration.id not in self._senders:
                continue
            record = records[registration.id]
            stored = await self.store.oldest_transaction(registration.id)
            handle = self._handle(registration, State.DOWN if stored else State.UP)
            handle.failure_count = record.failure_count
            handle.last_error = record.last_error
            if stored is not None:
                self._recoverer.resume(handle)
            else:
                if record.state != str(State.UP):
                    await self.store.set_state(registration.id, str(State.UP))
                self._maker.kick(handle)
        await self._sorter.start()

    def _handle(self, registration: Registration, state: State) -> ServiceHandle:
        sender = self._senders.get(registration.id)
        if sender is None:
            sender = MatrixSender(registration, self._connections, self.clock)
        recoverer = self._recoverer
        holder: list[ServiceHandle] = []
        core = ServiceCore(
            registration.id,
            enter_down=lambda old, result, txn: recoverer.enter_down(holder[0], old, result, txn),
            enter_recovering=lambda: recoverer.enter_recovering(holder[0]),
            enter_up=lambda: recoverer.enter_up(holder[0]),
            state=state,
        )
        handle = ServiceHandle(registration, sender, core, service_machine(core))
        holder.append(handle)
        self._handles[registration.id] = handle
        return handle

    def _ready(self, service_id: str) -> None:
        handle = self._handles.get(service_id)
        if handle is not None:
            self._maker.kick(handle)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None:
            await self._starting
        handles = list(self._handles.values())
        self._recoverer.stop(handles)
        await self._sorter.stop()
        await self._maker.stop(handles)
        await self._connections.close()
        await self.store.close()

    # -- the public API --

    def submit(self, events: Sequence[Any]) -> Deferred[list[int]]:
        """
        Store a batch of events (JSON objects with a unique string ``event_id``) and fire
        with their stream positions once they are committed. Submitting an ``event_id``
        again changes nothing and gives its first position.

        :raises InvalidEventError: (through the Deferred) if any event is not acceptable;
            nothing of the batch is stored then.
        """
        return Deferred.fromCoroutine(self._submit(events))

    async def _submit(self, events: Sequence[Any]) -> list[int]:
        if self._external_source:
            raise NotAcceptingEventsError(
                "this delivery service reads events from its event source; submit() is off"
            )
        prepared = prepare(events, self.max_event_bytes)
        if not prepared:
            return []
        await self._started()
        ids = await self.store.insert_events(prepared, self.clock.seconds())
        self._sorter.wake()
        return ids

    def status(self, service_id: str) -> Deferred[ServiceStatus]:
        """What is happening with one service; see :class:`ServiceStatus`."""
        return Deferred.fromCoroutine(self._status(service_id))

    async def _status(self, service_id: str) -> ServiceStatus:
        if service_id not in self.registrations:
            raise UnknownServiceError(service_id)
        await self._started()
        summary = await self.store.summary(service_id)
        record = (await self.store.services())[service_id]
        handle = self._handles.get(service_id)
        now = self.clock.seconds()
        return ServiceStatus(
            service_id=service_id,
            state=str(handle.state) if handle else record.state,
            queued_events=summary.queued_events,
            stored_transactions=summary.stored_transactions,
            oldest_pending_age=(
                max(0.0, now - summary.oldest_pending_ts)
                if summary.oldest_pending_ts is not None
                else None
            ),
            last_success=record.last_success_ts,
            last_error=handle.last_error if handle else record.last_error,
            failure_count=handle.failure_count if handle else record.failure_count,
            next_retry=handle.next_retry_ts if handle else record.next_retry_ts,
            last_txn_id=record.last_txn_id,
        )

    def retry_now(self, service_id: str) -> Deferred[None]:
        """End the backoff wait of a DOWN service and try it at once."""
        return Deferred.fromCoroutine(self._retry_now(service_id))

    async def _retry_now(self, service_id: str) -> None:
        if service_id not in self.registrations:
            raise UnknownServiceError(service_id)
        await self._started()
        handle = self._handles.get(service_id)
        if handle is not None:
            self._recoverer.retry_now(handle)

    def routed(self) -> Deferred[None]:
        """
        Fires once every event submitted (or offered by the event source) before the call
        is routed into the queues of the services that want it.
        """
        return Deferred.fromCoroutine(self._routed())

    async def _routed(self) -> None:
        await self._started()
        await self._sorter.caught_up()

    def observe(self, observer: IDeliveryObserver) -> None:
        """Have ``observer`` told of state changes and transactions as they happen."""
        self._observers.add(observer)
