"""
``DeliveryService``: the whole pipeline as one Twisted service, for embedding or for the
daemon.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from ._backoff import BackoffPolicy
from ._interfaces import IDeliveryObserver, IEventSource, ISender, IStore, SendResult
from ._log import Logger
from ._observers import Observers
from ._replay import Replayer, ReplayRange
from ._services import Services
from ._state import ServiceHandle, State
from .cluster import ROUTER, SERVICE_PREFIX, Cluster, ClusterMember
from .errors import (
    DeliveryError,
    NotAcceptingEventsError,
    NoURLError,
    ServiceRegisteredError,
    StoreUnavailableError,
    UnknownServiceError,
)
from .events import DEFAULT_MAX_EVENT_BYTES, prepare
from .housekeeping import Housekeeper, Housekeeping, PassResult
from .interest import InterestIndex
from .matrix import ConnectionPool
from .pool import DEFAULT_WINDOW, EventPool
from .records import (
    OUTCOMES,
    Attempt,
    ClusterView,
    DeadLetter,
    Fence,
    PurgeResult,
    ReloadResult,
    ReplayResult,
    ServiceRecord,
    ServiceStatus,
    ServiceSummary,
    StoredTransaction,
)
from .recoverer import Recoverer
from .registration import Registration
from .sorter import AliasLookup, EventSorter
from .transactions import TransactionMaker

log = Logger()
T = TypeVar("T")


class _OnPostgres:
    """The default of ``cluster``: a cluster (of one, unless others join) on PostgreSQL."""


P = ParamSpec("P")


def deferred(f: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Deferred[T]]:
    """A coroutine function as one that returns a Deferred, as the public API does."""

    @functools.wraps(f)
    def run(*args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        return Deferred.fromCoroutine(f(*args, **kwargs))

    return run


#: seconds between checks of pending ages against ``max_pending_age``
AGE_CHECK_INTERVAL = 60.0

#: start-up waits for an unavailable store: 0.5 s doubling to 5 s, not jittered
START_BACKOFF = BackoffPolicy(initial_delay=0.5, max_delay=5.0, jitter=0.0)

#: the state reported for a service that is no longer registered but has data stored
ORPHANED = "orphaned"


def _by_id(registrations: Iterable[Registration]) -> dict[str, Registration]:
    found: dict[str, Registration] = {}
    for registration in registrations:
        if registration.id in found:
            raise ValueError(f"two registrations have the id {registration.id!r}")
        found[registration.id] = registration
    return found


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
    :param cluster: how this service takes part in the cluster of its PostgreSQL
        database (:class:`~delivery.Cluster`; ``Cluster()`` by default there); must be
        None on SQLite.
    :raises ValueError: for two registrations with one id, a cluster on SQLite, or a
        registration whose ``request_timeout`` does not fit in a lease
        (:meth:`~delivery.Cluster.check`).
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
        start_timeout: float = 60.0,
        housekeeping: Housekeeping | None = None,
        cluster: Cluster | type[_OnPostgres] | None = _OnPostgres,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.store = store
        #: how long start-up keeps trying while the store is unavailable, seconds
        self.start_timeout = start_timeout
        self.registrations = _by_id(registrations)
        self._server_name = server_name
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, not {poll_interval!r}")
        self.max_event_bytes = max_event_bytes
        self._external_source = event_source is not None
        self._observers = Observers()
        self._connections = ConnectionPool(reactor)
        # (each service widens it to its max_events as it starts: Services.start)
        self._pool = EventPool(store, pool_window)
        self._maker = TransactionMaker(store, self._pool, self.clock, self._observers)
        self._rng = rng if rng is not None else random.Random()
        self._recoverer = Recoverer(store, self._maker.kick, self.clock, self._observers, self._rng)
        self._sorter = EventSorter(
            store,
            InterestIndex(self.registrations.values(), server_name=server_name),
            self._pool,
            self.clock,
            source=event_source,
            poll_interval=poll_interval,
            alias_lookup=alias_lookup,
            observers=self._observers,
        )
        self._services = Services(
            store,
            self._pool,
            self._maker,
            self._recoverer,
            self._connections,
            self.clock,
            dict(senders or {}),
        )
        self._pool.on_ready = self._services.ready
        # keeps the database bounded: payloads, ids and the delivery log expire
        self._housekeeper = Housekeeper(
            store, housekeeping or Housekeeping(), self.clock, self._observers
        )
        self._age_check: IDelayedCall | None = None
        #: services whose oldest pending event is older than their max_pending_age
        self._too_old: set[str] = set()
        #: one reload at a time: each one's changes are worked out from the last one's
        self._reloading = DeferredLock()
        self._replayer = Replayer(store, self._sorter, self.clock)
        #: callers of routed() on a cluster, waiting to look at the routed position again
        self._routing_waiters: list[Deferred[None]] = []
        self._member = self._cluster_member(cluster)
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
        except DeliveryError as e:
            # The database refused us, is locked by another process, or never answered:
            # one line that says so, no traceback.
            self._start_failure = Failure()
            log.error("delivery could not start: {error}", error=str(e))
        except Exception:
            self._start_failure = Failure()
            log.failure("delivery could not start", self._start_failure)
        waiters, self._start_waiters = self._start_waiters or [], None
        for waiter in waiters:
            waiter.callback(None)

    def started(self) -> Deferred[None]:
        """Fires once the service has started (store open, recovery begun), or fails why not."""
        return Deferred.fromCoroutine(self._started())

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

    def _cluster_member(self, cluster: Cluster | type[_OnPostgres] | None) -> ClusterMember | None:
        # (a store of PostgreSQL's dialect is one several processes can share)
        shared = getattr(getattr(self.store, "dialect", None), "name", "") == "postgres"
        if cluster is _OnPostgres:
            cluster = Cluster() if shared else None
        if not isinstance(cluster, Cluster):
            return None
        if not shared:
            raise ValueError(
                "a cluster needs PostgreSQL: SQLite is single-process (one daemon per file)"
            )
        cluster.check(self.registrations.values())
        self._sorter.on_refused = self._on_refused
        self.store.on_queued(self._queued_elsewhere)
        self.store.on_asked(self._asked)
        return ClusterMember(self.store, cluster, self.clock, self, self._observers)

    # -- the cluster's node (delivery.cluster.Node) --

    def service_ids(self) -> list[str]:
        return sorted(r.id for r in self.registrations.values() if self._services.sends(r))

    async def start_sending(self, service_id: str, fence: Fence) -> None:
        registration = self.registrations[service_id]
        starts = await self._services.prepare([registration])
        self._pool.reset(service_id)
        self._services.start(registration, starts[service_id], fence, self._on_refused)

    async def stop_sending(self, service_id: str) -> None:
        if service_id in self._services:
            self._services.stop(service_id)
        await self._services.stopped(service_id)

    async def start_routing(self, fence: Fence) -> None:
        # The router also keeps the database bounded: one housekeeper for the cluster.
        position = await self.store.sorter_position()
        self._sorter.start(position, fence)
        self._housekeeper.start()

    async def stop_routing(self) -> None:
        await self._housekeeper.stop()
        await self._sorter.stop()

    def peers(self, live: list[str]) -> None:
        # Others may own services: the router tells them what it queued; and in case a
        # notification was missed (or came before this node took a service), every service
        # sending here reads its queue once a heartbeat.
        self._sorter.tell_others = len(live) > 1
        if len(live) > 1:
            self._queued_elsewhere(None)

    def _on_refused(self, lease: str) -> None:
        if self._member is not None:
            self._member.refused(lease)

    def _asked(self, asked: tuple[str, str] | None) -> None:
        """An operator asked another node for something a service's sender does."""
        if asked is not None:
            service_id, action = asked
            handle = self._services.get(service_id)
            if handle is not None:
                self._do(handle, action)
            return
        # Requests may have been missed: whatever they were, the services sending here
        # read their queues afresh, and a disabled one enabled meanwhile is sent to.
        for handle in list(self._services):
            self._do(handle, "rewind")
            if handle.state is State.DISABLED:
                d = Deferred.fromCoroutine(self._enabled_elsewhere(handle))
                d.addErrback(
                    lambda f: log.warn(
                        "reading the state of a disabled service failed: {e}",
                        e=f.getErrorMessage(),
                    )
                )

    async def _enabled_elsewhere(self, handle: ServiceHandle) -> None:
        """A service disabled here may have been enabled through another node: see."""
        await handle.recorded()  # (its own "disabled" written first)
        record = (await self.store.services(handle.id)).get(handle.id)
        if record is not None and record.state != str(State.DISABLED):
            self._do(handle, "enable")

    def _do(self, handle: ServiceHandle, action: str) -> None:
        """What an operator asked of a service sending here (see :meth:`IStore.ask`)."""
        if action == "retry":
            self._recoverer.retry_now(handle)
        elif action == "enable":
            self._recoverer.enable(handle)
        else:  # rewind
            self._pool.rewind(handle.id)
            self._services.ready(handle.id)

    async def _ask(self, service_id: str, action: str) -> None:
        """Have the node sending to the service do ``action``: this one, or another."""
        handle = self._services.get(service_id)
        if handle is not None:
            self._do(handle, action)
        elif self._member is not None:
            await self.store.ask(service_id, action)

    def _queued_elsewhere(self, service_ids: list[str] | None) -> None:
        """Another node routed events: the services sending here read their queues."""
        self._nudge_waiters()
        for service_id in service_ids if service_ids is not None else self.service_ids():
            if service_id in self._services:
                self._pool.touch(service_id)

    async def _start_pipeline(self) -> None:
        # Everything read first, retried while the database is away for a moment (a
        # restart of the server as we start); then everything started at once.
        registrations = list(self.registrations.values())
        await self._while_unavailable(self.store.open)
        if self._member is not None:
            # Several daemons: what runs here follows the leases this node takes.
            await self._while_unavailable(
                lambda: self.store.ensure_services([r.id for r in registrations])
            )
            await self._while_unavailable(self._member.start)
        else:
            starts = await self._while_unavailable(lambda: self._services.prepare(registrations))
            position = await self._while_unavailable(self.store.sorter_position)
            for registration in registrations:
                self._services.start(registration, starts[registration.id])
            self._sorter.start(position)
            self._housekeeper.start()
        if not self._external_source:
            self.store.on_new_events(self._sorter.wake)
        self._age_check = self.clock.callLater(AGE_CHECK_INTERVAL, self._check_ages)

    async def _while_unavailable(self, step: Callable[[], Awaitable[T]]) -> T:
        """``step()``, tried again with backoff while the store is unavailable, for a while."""
        deadline = self.clock.seconds() + self.start_timeout
        failures = 0
        while True:
            try:
                return await step()
            except StoreUnavailableError as e:
                failures += 1
                delay = START_BACKOFF.delay(failures, self._rng)
                if self.clock.seconds() + delay > deadline:
                    raise
                log.warn(
                    "starting: {error}; trying again in {delay:g} s", error=str(e), delay=delay
                )
                await deferLater(self.clock, delay, lambda: None)

    def _check_ages(self) -> None:
        d = Deferred.fromCoroutine(self.pending_too_long())
        d.addErrback(lambda f: log.warn("checking pending ages failed: {e}", e=f.getErrorMessage()))
        d.addBoth(lambda _: self._next_age_check())

    def _next_age_check(self) -> None:
        if self.running:
            self._age_check = self.clock.callLater(AGE_CHECK_INTERVAL, self._check_ages)

    async def pending_too_long(self) -> dict[str, float]:
        """
        The services whose oldest pending event is older than their ``max_pending_age``,
        with that age. Logs a warning when a service crosses the limit and a line when it
        is back under: nothing is ever dropped for it.
        """
        now = self.clock.seconds()
        here = self.services_here  # (on a cluster each node watches what it sends)
        limits = {
            r.id: r.options.max_pending_age
            for r in self.registrations.values()
            if r.options.max_pending_age is not None and (here is None or r.id in here)
        }
        if not limits:
            return {}
        summaries = await self.store.summaries()
        over = {}
        for service_id, limit in limits.items():
            oldest = summaries.get(service_id)
            ts = oldest.oldest_pending_ts if oldest else None
            age = now - ts if ts is not None else 0.0
            if age > limit:
                over[service_id] = age
                if service_id not in self._too_old:
                    log.warn(
                        "{service}: an event has been pending {age:.0f} s, longer than its"
                        " max_pending_age of {limit:g} s (state {state})",
                        service=service_id,
                        age=age,
                        limit=limit,
                        state=self.state_of(service_id),
                    )
            elif service_id in self._too_old:
                log.info(
                    "{service}: nothing pending longer than max_pending_age now", service=service_id
                )
        self._too_old = set(over)
        return over

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None:
            await self._starting
        if self._age_check is not None and self._age_check.active():
            self._age_check.cancel()
        self._services.halt()
        await self._housekeeper.stop()
        if self._member is not None:
            await self._member.stop()
        await self._sorter.stop()
        await self._services.close()
        await self._connections.close()
        await self.store.close()

    # -- the public API --

    @deferred
    async def submit(self, events: Sequence[Any]) -> list[int]:
        """
        Store a batch of events (JSON objects with a unique string ``event_id``) and fire
        with their stream positions once they are committed. Submitting an ``event_id``
        again changes nothing and gives its first position.

        :raises InvalidEventError: (through the Deferred) if any event is not acceptable;
            nothing of the batch is stored then.
        """
        if self._external_source:
            raise NotAcceptingEventsError(
                "this delivery service reads events from its event source; submit() is off"
            )
        prepared = prepare(events, self.max_event_bytes)
        if not prepared:
            return []
        await self._started()
        now = self.clock.seconds()
        ingested = await self.store.insert_events(prepared, now)
        self._sorter.ingested(ingested, prepared, now)
        self._observers.events_ingested(len(prepared))
        return ingested.stream_ids

    @deferred
    async def status(self, service_id: str) -> ServiceStatus:
        """What is happening with one service; see :class:`ServiceStatus`."""
        await self._known(service_id)
        summary = await self.store.summary(service_id)
        record = (await self.store.services(service_id))[service_id]
        return self._status_of(record, summary)

    @deferred
    async def statuses(self) -> list[ServiceStatus]:
        """Every service's status (orphaned ones included), read in one go."""
        await self._started()
        for handle in self._services:
            await handle.recorded()
        records = await self.store.services()
        summaries = await self.store.summaries()
        return [self._status_of(records[i], summaries[i]) for i in sorted(records)]

    def _status_of(self, record: ServiceRecord, summary: ServiceSummary) -> ServiceStatus:
        service_id = record.service_id
        handle = self._services.get(service_id)
        registered = service_id in self.registrations
        now = self.clock.seconds()
        return ServiceStatus(
            service_id=service_id,
            state=str(handle.state) if handle else record.state if registered else ORPHANED,
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
            next_retry=(
                handle.next_retry_ts
                if handle
                else record.next_retry_ts
                if registered
                else None  # an orphaned service is never retried
            ),
            last_txn_id=record.last_txn_id,
            owner=self._member.owner_of(service_id) if self._member is not None else None,
        )

    @deferred
    async def cluster(self) -> ClusterView | None:
        """The nodes sharing this database and what each holds; None without a cluster."""
        await self._started()
        member = self._member
        if member is None:
            return None
        now = self.clock.seconds()
        ttl = member.options.lease_ttl
        nodes, leases = await self.store.read_cluster(ttl, now)
        current = {
            lease.name: lease
            for lease in leases
            if lease.owner is not None and lease.expires_ts is not None and lease.expires_ts >= now
        }
        router = current.get("router")
        services = tuple(
            (service_id, lease)
            for lease in leases
            if lease.name.startswith("service:")
            for service_id in (lease.name[len("service:") :],)
        )
        return ClusterView(
            member.options.node_id,
            now,
            ttl,
            tuple(nodes),
            router.owner if router is not None else None,
            services,
        )

    @property
    def services_here(self) -> frozenset[str] | None:
        """
        On a cluster, the services this node sends to now (those whose lease it holds);
        None without one: this process sends to every service.
        """
        if self._member is None:
            return None
        return frozenset(
            name.removeprefix(SERVICE_PREFIX)
            for name in self._member.held
            if name.startswith(SERVICE_PREFIX)
        )

    @property
    def routes_here(self) -> bool:
        """Whether this node routes the events (and keeps the database bounded) now."""
        return self._member is None or ROUTER in self._member.held

    @property
    def leases_held(self) -> frozenset[str]:
        """The leases this node holds now (``router``, ``service:ID``)."""
        return frozenset(self._member.held) if self._member is not None else frozenset()

    @deferred
    async def retry_now(self, service_id: str) -> None:
        """
        End the backoff wait of a DOWN service and try it at once (on a cluster, the node
        that sends to it does, told through the database).
        """
        await self._started()
        if service_id not in self.registrations:
            raise UnknownServiceError(service_id)
        await self._ask(service_id, "retry")

    @deferred
    async def ping(self, service_id: str, transaction_id: str | None = None) -> SendResult:
        """
        Ping the service's receiver now (``POST /_matrix/app/v1/ping``, with
        ``transaction_id`` if given) and say how it answered: ``ok`` and the ``duration``,
        or the ``status`` and start of the ``body`` of another answer, or the ``error`` of
        none (``timed_out`` if it took longer than ``request_timeout``). Nothing changes:
        the service's state and backoff are the recoverer's. Any node of a cluster pings.

        :raises UnknownServiceError: if no registered service has this id.
        :raises NoURLError: if the service has no URL.
        """
        await self._started()
        registration = self.registrations.get(service_id)
        if registration is None:
            raise UnknownServiceError(service_id)
        sender = self._services.sender_for(registration)
        if sender is None:
            raise NoURLError(service_id)
        return await sender.ping(transaction_id)

    @deferred
    async def routed(self) -> None:
        """
        Fires once every event submitted (or offered by the event source) before the call
        is routed into the queues of the services that want it (on a cluster, by whichever
        node routes: this one watches the routed position in the database).
        """
        await self._started()
        if self._member is None or self._external_source:
            await self._sorter.caught_up()
            return
        target = await self.store.newest_stream_id()
        while await self.store.sorter_position() < target:
            # Looked at again after a poll interval, when the router says it queued
            # events, or when this node's own sorter (if it routes) caught up.
            nudge: Deferred[None] = Deferred()
            self._routing_waiters.append(nudge)
            timer = self.clock.callLater(self._sorter.poll_interval, self._nudge_waiters)
            if self.routes_here:
                self._sorter.caught_up().addBoth(lambda _: self._nudge_waiters())
            await nudge
            if timer.active():
                timer.cancel()

    def _nudge_waiters(self) -> None:
        waiters, self._routing_waiters = self._routing_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def reload(self, registrations: Iterable[Registration]) -> Deferred[ReloadResult]:
        """
        Change the set of services while running. A new service starts at once; a changed
        one keeps its state and queue and uses its new settings from its next request; a
        removed one stops being sent to but keeps its queue and stored transactions
        (reported as ``orphaned``) until :meth:`purge` removes them or it comes back.
        Reloads run one at a time, each against the registrations the last one left.
        """
        new = _by_id(registrations)
        if self._member is not None:
            self._member.options.check(new.values())
        return self._reloading.run(lambda: Deferred.fromCoroutine(self._reload(new)))

    async def _reload(self, new: dict[str, Registration]) -> ReloadResult:
        await self._started()
        old = self.registrations
        added = sorted(new.keys() - old.keys())
        removed = sorted(old.keys() - new.keys())
        changed = sorted(i for i in new.keys() & old.keys() if new[i] != old[i])
        # A changed service that keeps sending keeps its handle, loop and state: its new
        # settings apply from its next batch, and no second loop can start beside the
        # first. Only a service that starts or stops sending changes hands.
        services = self._services
        if self._member is not None:
            # Several daemons: the leases decide where a service starts and stops.
            self.registrations = new
            self._sorter.index = InterestIndex(new.values(), server_name=self._server_name)
            for service_id in changed:
                if service_id in services and services.sends(new[service_id]):
                    services.update(new[service_id])
            await self.store.ensure_services(added)
            await self._member.tick()
            return ReloadResult(tuple(added), tuple(changed), tuple(removed))
        kept = [i for i in changed if i in services and services.sends(new[i])]
        stopping = [i for i in removed + changed if i in services and i not in kept]
        starting = [new[i] for i in added + changed if i not in kept and i not in stopping]
        starts = await services.prepare(starting)
        # From here on nothing waits: the change is applied whole or not at all.
        self.registrations = new
        self._sorter.index = InterestIndex(new.values(), server_name=self._server_name)
        for service_id in kept:
            services.update(new[service_id])
        for service_id in stopping:
            services.stop(service_id)
        for registration in starting:
            services.start(registration, starts[registration.id])
        log.info(
            "registrations reloaded: {added} added, {changed} changed, {removed} removed",
            added=len(added),
            changed=len(changed),
            removed=len(removed),
        )
        return ReloadResult(tuple(added), tuple(changed), tuple(removed))

    @deferred
    async def purge(self, service_id: str) -> PurgeResult:
        """
        Delete the queue, stored transactions, dead letters and delivery log of an orphaned
        service (one removed from the registrations), and its record.

        :raises UnknownServiceError: if the database knows no such service.
        :raises ServiceRegisteredError: if it is still registered.
        """
        await self._started()
        if service_id in self.registrations:
            raise ServiceRegisteredError(service_id)
        if not await self.store.services(service_id):
            raise UnknownServiceError(service_id)
        events, transactions, dead = await self.store.purge_service(service_id)
        log.info(
            "purged orphaned service {service}: {events} queued events, {transactions}"
            " stored transactions and {dead} dead letters deleted",
            service=service_id,
            events=events,
            transactions=transactions,
            dead=dead,
        )
        return PurgeResult(events, transactions, dead)

    @deferred
    async def transactions(
        self, service_id: str, after: int = 0, limit: int = 100
    ) -> list[StoredTransaction]:
        """The stored (unacknowledged) transactions of a service, oldest first."""
        await self._known(service_id)
        return await self.store.transactions(service_id, after, limit)

    @deferred
    async def knows(self, service_id: str) -> bool:
        """Whether the service is registered, or orphaned with data still stored."""
        await self._started()
        return service_id in self.registrations or bool(await self.store.services(service_id))

    async def _known(self, service_id: str) -> None:
        """Raise if the service is unknown; else wait until what it recorded is written."""
        await self._started()
        if service_id not in self.registrations and not await self.store.services(service_id):
            raise UnknownServiceError(service_id)
        handle = self._services.get(service_id)
        if handle is not None:
            await handle.recorded()

    @deferred
    async def housekeep(self) -> PassResult:
        """
        Run one whole housekeeping pass now (they also run by themselves, every
        ``Housekeeping.interval``); what it deleted.
        """
        await self._started()
        return await self._housekeeper.run_pass()

    @property
    def database_stats(self) -> tuple[int, dict[str, int]] | None:
        """The database's size in bytes and rows by table, as housekeeping last found them."""
        return self._housekeeper.stats

    def state_of(self, service_id: str) -> str:
        """The state of a service as known in memory: ``orphaned`` if not registered."""
        handle = self._services.get(service_id)
        if handle is not None:
            return str(handle.state)
        return str(State.UP) if service_id in self.registrations else ORPHANED

    @deferred
    async def enable(self, service_id: str) -> None:
        """
        Send to a service disabled by its receiver (HTTP 410) again (on a cluster, the node
        that sends to it does, told through the database; the database records it enabled
        at once, for whichever node sends to it next).
        """
        await self._started()
        if service_id not in self.registrations:
            raise UnknownServiceError(service_id)
        await self._ask(service_id, "enable")

    @deferred
    async def dead_letters(
        self, service_id: str, after: int = 0, limit: int = 100
    ) -> list[DeadLetter]:
        """Events the service refused on their own, set aside, oldest first."""
        await self._known(service_id)
        return await self.store.dead_letters(service_id, after, limit)

    @deferred
    async def redrive(self, service_id: str, ids: Sequence[int] | None = None) -> int:
        """
        Send dead letters (all, or those with these ids) again: they go back in the queue
        and are delivered in their original order, before newer events. How many.
        """
        await self._known(service_id)
        count = await self.store.redrive(service_id, ids)
        if count:
            log.info("{service}: {count} dead letter(s) redriven", service=service_id, count=count)
            await self._ask(service_id, "rewind")
        return count

    @deferred
    async def discard(self, service_id: str, ids: Sequence[int] | None = None) -> int:
        """Delete dead letters (all, or those with these ids) for good. How many."""
        await self._known(service_id)
        count = await self.store.discard(service_id, ids)
        log.info("{service}: {count} dead letter(s) discarded", service=service_id, count=count)
        return count

    @deferred
    async def attempts(
        self,
        service_id: str,
        *,
        before: int | None = None,
        limit: int = 100,
        outcome: str | None = None,
    ) -> list[Attempt]:
        """
        The delivery log of a service: its attempts to send a transaction, newest first,
        at most ``limit``, with an id below ``before`` (for the next page: the last id of
        this one) and, if given, that ``outcome`` (one of ``ok``, ``failed``, ``split``,
        ``rejected``, ``gone``: see :class:`Attempt`). An unknown outcome raises a
        ValueError (through the Deferred) naming those; so does a ``limit`` below 1.

        :raises UnknownServiceError: if the service is neither registered nor orphaned.
        """
        if outcome is not None and outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        await self._known(service_id)
        return await self.store.attempts(service_id, before, limit, outcome)

    @deferred
    async def replay(
        self,
        service_id: str,
        *,
        from_ts: float | None = None,
        from_stream_id: int | None = None,
        to_ts: float | None = None,
        to_stream_id: int | None = None,
    ) -> ReplayResult:
        """
        Queue again, for one service, the retained events it wants in a range: they are
        delivered in stream order, in new transactions, after everything queued for it
        already; no other service gets anything. The range starts at ``from_ts`` (an
        ingest time, in the clock's seconds) or at ``from_stream_id`` (a stream position),
        exactly one, and ends at ``to_ts`` or ``to_stream_id`` (ends included), by default
        at the sorter's position now: later events are the sorter's to route. Who wants an
        event is worked out with the service's registration now, as the sorter does.

        Each event is copied (a new stream position, the same JSON) for this service alone.
        The range is read :data:`REPLAY_CHUNK` events at a time, each chunk's copies stored
        in one database transaction: a larger replay is not atomic, and one that fails
        part-way leaves its first chunks queued, which is safe (they are copies). Times are
        not indexed: a range by time is scanned from the oldest event kept. Replays run one
        at a time in a process. A range that is not one (no start or two, two ends, a value
        of the wrong type or negative, an end before its start) fails with ``ValueError``,
        saying so.

        :raises UnknownServiceError: if no registered service has this id.
        :raises NotAcceptingEventsError: when events come from an outside event source:
            this service keeps none to replay.
        """
        if self._external_source:
            raise NotAcceptingEventsError(
                "this delivery service reads events from its event source and keeps none of"
                " its own: replay is not possible"
            )
        chosen = ReplayRange.of(from_ts, from_stream_id, to_ts, to_stream_id)
        await self._started()
        registration = self.registrations.get(service_id)
        if registration is None:
            raise UnknownServiceError(service_id)
        return await self._replayer.replay(registration, chosen)

    def observe(self, observer: IDeliveryObserver) -> None:
        """Have ``observer`` told of state changes and transactions as they happen."""
        self._observers.add(observer)
