"""
The EventSorter: routes new events to the queues of the services that want them.

It reads the event source after its position, every ``poll_interval`` or at once when
woken (by ``submit()``), works out who wants each event, and in one database transaction
writes the queue rows and advances its position; then it hands the events to the pool.
A crash at any point either keeps both or neither.

Events submitted in this process are handed over as they are committed (:meth:`ingested`),
with the position stored before them: while they follow on from the sorter's position,
it routes them from memory instead of reading them back.

A replay's copy of an event (``StoredEvent.replay_for`` set) goes to that service alone,
whatever the namespaces say, if it still receives events; else to no one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ._interfaces import IEventSource, IStore
from ._log import Logger
from ._observers import Observers
from .errors import FencedError, StoreUnavailableError
from .events import Event, StoredEvent
from .interest import InterestIndex
from .pool import EventPool
from .records import Fence, Ingested, QueuedEvent

log = Logger()

#: at most this many batches of submitted events wait in memory for the sorter (older
#: ones are read back from the store instead)
MAX_FRESH = 16

#: Looks up the aliases of a room, for ``aliases`` namespaces (supplied by the embedder).
AliasLookup = Callable[[str], Awaitable[Sequence[str]]]


class EventSorter:
    def __init__(
        self,
        store: IStore,
        index: InterestIndex,
        pool: EventPool,
        clock: IReactorTime,
        *,
        source: IEventSource | None = None,
        poll_interval: float = 1.0,
        batch_size: int = 1000,
        alias_lookup: AliasLookup | None = None,
        observers: Observers | None = None,
    ) -> None:
        self._store = store
        self._source: IEventSource = source if source is not None else store
        #: events from an outside source are copied into the store as they are routed
        self._copy_events = source is not None
        self.index = index
        self._pool = pool
        self._clock = clock
        self.poll_interval = poll_interval
        self._batch_size = batch_size
        self._alias_lookup = alias_lookup
        self._observers = observers
        self.position = 0
        self._running: Deferred[None] | None = None
        self._again = False
        self._timer: IDelayedCall | None = None
        self._stopped = True
        #: a pass failed: the position in memory may be behind the database's
        self._unsure = False
        self._idle_waiters: list[Deferred[None]] = []
        #: batches just committed, each with the position stored before it
        self._fresh: deque[tuple[int, list[StoredEvent]]] = deque(maxlen=MAX_FRESH)
        #: the router's lease every commit is made under (several daemons), or None
        self.fence: Fence | None = None
        #: told when the database refused a commit under ``fence`` (another node routes)
        self.on_refused: Callable[[str], None] | None = None
        #: other processes may send to services: tell them what was queued
        self.tell_others = False

    def start(self, position: int, fence: Fence | None = None) -> None:
        """Route events from stream ``position`` on (the store's sorter position)."""
        self.position = position
        self.fence = fence
        self._unsure = False
        self._stopped = False
        self.wake()

    def wake(self) -> None:
        """Look for new events now (or as soon as the current pass ends)."""
        if self._stopped:
            return
        if self._running is not None:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        running = Deferred.fromCoroutine(self._run())
        if not running.called:  # a pass may end before it returns (a synchronous source)
            self._running = running

    def ingested(self, ingested: Ingested, events: Sequence[Event], received_ts: float) -> None:
        """
        ``events`` were just committed as ``ingested`` says: route them without reading
        them back if they follow on from the sorter's position. Wakes the sorter.
        """
        new: dict[int, StoredEvent] = {}
        for stream_id, event in zip(ingested.stream_ids, events, strict=True):
            if stream_id > ingested.after and stream_id not in new:
                new[stream_id] = StoredEvent(stream_id, event, received_ts)
        if new and len(new) <= self._batch_size:
            self._fresh.append((ingested.after, sorted(new.values(), key=_stream_id)))
        self.wake()

    def _take_fresh(self) -> list[StoredEvent]:
        """
        The events right after the sorter's position held in memory, at most a batch;
        nothing if the next events have to be read.
        """
        taken: list[StoredEvent] = []
        fresh = self._fresh
        while fresh and len(taken) < self._batch_size:
            after, events = fresh[0]
            if events[-1].stream_id <= self.position:  # routed already, read back
                fresh.popleft()
                continue
            if after < self.position:  # partly routed: what is left follows on from it
                after = self.position
                events = [e for e in events if e.stream_id > after]
            position = taken[-1].stream_id if taken else self.position
            if after != position:
                break  # something else lies in between: read it
            room = self._batch_size - len(taken)
            taken.extend(events[:room])
            if len(events) > room:
                fresh[0] = (events[room - 1].stream_id, events[room:])
            else:
                fresh.popleft()
        return taken

    def caught_up(self) -> Deferred[None]:
        """Fires after a pass that began after this call found no more events."""
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        self.wake()
        return d

    async def _run(self) -> None:
        caught_up = False
        try:
            if self._unsure:
                await self._resync()
            while not self._stopped:
                self._again = False
                routed = await self.sort_once()
                if routed < self._batch_size and not self._again:
                    caught_up = True
                    break
        except Exception as e:
            # A commit may have happened even though its answer was lost: start the next
            # pass from what the database says.
            paused, self._unsure = self._unsure, True
            if isinstance(e, FencedError):
                log.info("routing stopped: {error}", error=str(e))
                self._stopped = True
                if self.on_refused is not None:
                    self.on_refused(e.lease)
            elif isinstance(e, StoreUnavailableError):
                if not paused:  # once, not at every pass while the database is away
                    log.warn("routing events paused: {error}", error=str(e))
            else:
                log.failure(
                    "routing events failed; trying again in {interval} s",
                    interval=self.poll_interval,
                )
        finally:
            self._running = None
        if caught_up:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        if not self._stopped:
            self._timer = self._clock.callLater(self.poll_interval, self.wake)

    async def _resync(self) -> None:
        self.position = await self._store.sorter_position()
        self._pool.reread_all()
        self._unsure = False
        log.info("routing events resumed from stream position {position}", position=self.position)

    async def sort_once(self) -> int:
        """Route one batch of events; how many were read."""
        events = self._take_fresh() or await self._source.events_after(
            self.position, self._batch_size
        )
        if not events:
            return 0
        aliases = await self._aliases(events)
        queue: list[tuple[str, int]] = []
        by_service: dict[str, list[QueuedEvent]] = {}
        wanted: list[StoredEvent] = []
        #: stored events no service wants (deleted as they are routed)
        unwanted: list[int] = []
        route = self.index.route
        for stored in events:
            if stored.replay_for is not None:  # a replay's copy, for that service alone
                services = self._replay_target(stored.replay_for)
            else:
                room = stored.event.routing.room_id
                services = route(stored.event.routing, aliases.get(room, ()) if room else ())
            if services:
                wanted.append(stored)
                queued = QueuedEvent(stored.stream_id, stored.event.json, stored.received_ts)
                for service_id in services:
                    queue.append((service_id, stored.stream_id))
                    by_service.setdefault(service_id, []).append(queued)
            elif not self._copy_events:
                unwanted.append(stored.stream_id)
        position = events[-1].stream_id
        await self._store.commit_sorted(
            position,
            queue,
            wanted if self._copy_events else (),
            unwanted,
            fence=self.fence,
            notify=self.tell_others,
        )
        self.position = position
        for service_id, queued_events in by_service.items():
            self._pool.add(service_id, queued_events)
        if self._observers is not None and by_service:
            self._observers.events_routed({s: len(q) for s, q in by_service.items()})
        return len(events)

    def _replay_target(self, service_id: str) -> frozenset[str]:
        """Where a replay's copy for ``service_id`` goes: there, if it still receives events."""
        return frozenset((service_id,)) if service_id in self.index.service_ids else frozenset()

    async def wanted_by(
        self, service_id: str, events: Sequence[StoredEvent], aliases: bool
    ) -> list[StoredEvent]:
        """
        Those of ``events`` the service wants by the registrations now, worked out as
        :meth:`sort_once` does (``InterestIndex.route``, with the rooms' aliases looked up
        when ``aliases``: its registration has an ``aliases`` namespace): what a replay
        copies.
        """
        found = await self._aliases(events) if aliases else {}
        route = self.index.route
        return [
            e
            for e in events
            for room in (e.event.routing.room_id,)
            if service_id in route(e.event.routing, found.get(room, ()) if room else ())
        ]

    async def _aliases(self, events: Sequence[StoredEvent]) -> dict[str, Sequence[str]]:
        if self._alias_lookup is None or not self.index.wants_aliases:
            return {}
        # (a replay's copy is routed without them)
        rooms = {e.event.routing.room_id for e in events if e.replay_for is None} - {None}
        found: dict[str, Sequence[str]] = {}
        for room in sorted(r for r in rooms if r is not None):
            found[room] = await self._alias_lookup(room)
        return found

    async def stop(self) -> None:
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._running is not None:
            await self._running


def _stream_id(event: StoredEvent) -> int:
    return event.stream_id
