"""
The services this process delivers to, each a :class:`ServiceHandle`, and the two
operations that change the set: **start delivering a service here** (from what the
database says of it: stored transactions are resent first) and **stop delivering it
here, leaving everything stored** (its queue and transactions stay in the database for
whoever delivers it next). Giving a running service new settings is a third, which keeps
its loop and state.

Invariants: at most one handle per service, so at most one loop sends for it; a service
stopped here is known to have stopped (its loop ended, its state written, its window of
the pool forgotten) before it can be started here again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from ._interfaces import ISender, IStore
from ._state import ServiceHandle, State
from .matrix import ConnectionPool, MatrixSender
from .pool import EventPool
from .records import Fence, ServiceRecord
from .recoverer import Recoverer
from .registration import Registration
from .transactions import TransactionMaker


@attrs.frozen
class Start:
    """What starting a service needs from the database."""

    record: ServiceRecord
    #: it has transactions stored: it recovers first
    stored: bool


class Services:
    def __init__(
        self,
        store: IStore,
        pool: EventPool,
        maker: TransactionMaker,
        recoverer: Recoverer,
        connections: ConnectionPool,
        clock: IReactorTime,
        senders: dict[str, ISender],
    ) -> None:
        self._store = store
        self._pool = pool
        self._maker = maker
        self._recoverer = recoverer
        self._connections = connections
        self._clock = clock
        self._senders = senders
        self._handles: dict[str, ServiceHandle] = {}
        #: services stopped here whose loops may still be ending: done once they have
        self._stopping: dict[str, Deferred[None]] = {}

    def get(self, service_id: str) -> ServiceHandle | None:
        return self._handles.get(service_id)

    def __contains__(self, service_id: object) -> bool:
        return service_id in self._handles

    def __iter__(self) -> Iterator[ServiceHandle]:
        return iter(list(self._handles.values()))

    def sends(self, registration: Registration) -> bool:
        """Whether anything is sent to this service (it has a URL or a sender of its own)."""
        return registration.url is not None or registration.id in self._senders

    async def prepare(self, registrations: Sequence[Registration]) -> dict[str, Start]:
        """
        What starting these services needs, read once any of them stopped here has
        finished stopping (so that what its loop stored is read too).
        """
        for registration in registrations:
            stopping = self._stopping.get(registration.id)
            if stopping is not None:
                await stopping
        await self._store.ensure_services([r.id for r in registrations])
        records = await self._store.services()
        starts = {}
        for registration in registrations:
            stored = await self._store.oldest_transaction(registration.id)
            starts[registration.id] = Start(records[registration.id], stored is not None)
        return starts

    def start(
        self,
        registration: Registration,
        start: Start,
        fence: Fence | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        """
        Start delivering a service here, from what :meth:`prepare` read; every write for
        it under ``fence`` (several daemons), ``on_refused`` told if one is refused.
        """
        if not self.sends(registration):
            return
        self._pool.widen(registration.options.max_events)
        record = start.record
        if record.state == str(State.DISABLED):
            # The receiver said it is gone: only an operator sends to it again.
            handle = self._handle(registration, State.DISABLED, fence, on_refused)
            handle.last_error = record.last_error
            return
        handle = self._handle(
            registration, State.DOWN if start.stored else State.UP, fence, on_refused
        )
        handle.failure_count = record.failure_count
        handle.last_error = record.last_error
        if start.stored:
            self._recoverer.resume(handle)
        else:
            if record.state != str(State.UP):
                self._recoverer.record_state(handle, State.UP)
            self._maker.kick(handle)

    def update(self, registration: Registration) -> None:
        """New settings for a running service: they apply from its next batch."""
        handle = self._handles[registration.id]
        handle.registration = registration
        handle.sender = self._sender(registration)
        self._pool.widen(registration.options.max_events)

    def stop(self, service_id: str) -> None:
        """
        Stop delivering a service here; what it has stored stays in the database. Its loop
        may be storing a transaction still: the service is known to have stopped (and its
        window of the pool is forgotten) only once that loop has ended.
        """
        handle = self._handles.pop(service_id)
        handle.retired = True
        self._recoverer.stop([handle])
        if handle.in_flight is not None:
            handle.in_flight.cancel()
        stopping = Deferred.fromCoroutine(self._wind_down(handle))
        if not stopping.called:
            self._stopping[service_id] = stopping

    async def stopped(self, service_id: str) -> None:
        """Wait until a service stopped here has stopped (its loop ended, its state written)."""
        stopping = self._stopping.get(service_id)
        if stopping is not None:
            await stopping

    async def _wind_down(self, handle: ServiceHandle) -> None:
        try:
            if handle.loop is not None:
                await handle.loop
            await handle.recorded()
            self._pool.reset(handle.id)
        finally:
            self._stopping.pop(handle.id, None)

    def ready(self, service_id: str) -> None:
        """Events arrived for a service: its loop looks for them."""
        handle = self._handles.get(service_id)
        if handle is not None:
            self._maker.kick(handle)

    def halt(self) -> None:
        """The process is stopping: no more waits, probes or retries."""
        self._recoverer.stop_all(list(self._handles.values()))

    async def close(self) -> None:
        """Stop every loop (a request in flight is abandoned, its transaction stored) and
        wait for the state writes, before the store closes."""
        handles = list(self._handles.values())
        await self._maker.stop(handles)
        for handle in handles:
            await handle.recorded()
        for stopping in list(self._stopping.values()):
            await stopping

    def sender_for(self, registration: Registration) -> ISender | None:
        """The service's sender (here, or a new one if another node sends to it), if any."""
        handle = self._handles.get(registration.id)
        if handle is not None:
            return handle.sender
        return self._sender(registration) if self.sends(registration) else None

    def _sender(self, registration: Registration) -> ISender:
        sender = self._senders.get(registration.id)
        if sender is None:
            sender = MatrixSender(registration, self._connections, self._clock)
        return sender

    def _handle(
        self,
        registration: Registration,
        state: State,
        fence: Fence | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> ServiceHandle:
        handle = ServiceHandle(
            registration,
            self._sender(registration),
            self._recoverer,
            state,
            fence=fence,
            on_refused=on_refused,
        )
        self._handles[registration.id] = handle
        return handle
