"""
The EventPool: a bounded in-memory window of each service's queue.

The durable queue is the database. The pool holds, per service, the oldest events of that
queue that have not been cut into a transaction yet, at most ``window`` of them. The sorter
hands it newly routed events after they are committed; when a window is full the events
stay in the database only, and the window is refilled from there as it empties. Memory
therefore does not grow with the backlog.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import attrs

from ._interfaces import IStore
from .events import BODY_OVERHEAD
from .records import QueuedEvent

DEFAULT_WINDOW = 1000


@attrs.define
class _Window:
    events: deque[QueuedEvent] = attrs.Factory(deque)
    #: the highest stream position ever placed in the window
    loaded_up_to: int = 0
    #: the database may hold queued events beyond ``loaded_up_to``
    backlog: bool = True
    #: events were routed while a refill was reading
    touched: bool = False
    #: older events were queued again: read the queue from its start
    rewind: bool = False


class EventPool:
    """
    Pending events per service, refilled from the store's queues.

    ``on_ready(service_id)`` is called when a service's window gains events.
    """

    def __init__(
        self,
        store: IStore,
        window: int = DEFAULT_WINDOW,
        on_ready: Callable[[str], None] = lambda service_id: None,
    ) -> None:
        if window < 1:
            raise ValueError(f"the pool window must hold at least one event, not {window}")
        self._store = store
        self._size = window
        self._windows: dict[str, _Window] = {}
        self.on_ready = on_ready

    def widen(self, window: int) -> None:
        """Hold at least ``window`` events per service from now on (a batch grew)."""
        self._size = max(self._size, window)

    def _window(self, service_id: str) -> _Window:
        window = self._windows.get(service_id)
        if window is None:
            window = self._windows[service_id] = _Window()
        return window

    def add(self, service_id: str, events: Sequence[QueuedEvent]) -> None:
        """Events just committed to the service's queue, in stream order."""
        window = self._window(service_id)
        # A refill on another connection (PostgreSQL) may have read some of them already,
        # between the commit and this hand-over: the window holds each event once.
        if events and events[0].stream_id <= window.loaded_up_to:
            events = [e for e in events if e.stream_id > window.loaded_up_to]
        if not events:
            return
        if window.backlog:
            window.touched = True
        else:
            room = self._size - len(window.events)
            if room > 0:
                fitting = events[:room]
                window.events.extend(fitting)
                window.loaded_up_to = fitting[-1].stream_id
            if len(events) > room:
                window.backlog = window.touched = True
        self.on_ready(service_id)

    def pending(self, service_id: str) -> int:
        """Events of the service held in memory (more may wait in the database)."""
        window = self._windows.get(service_id)
        return len(window.events) if window else 0

    async def batch(
        self, service_id: str, max_events: int, max_bytes: int, full_only: bool = False
    ) -> list[QueuedEvent]:
        """
        The oldest pending events that fit one transaction (left in the pool until
        :meth:`remove`): at most ``max_events``, and at most ``max_bytes`` of body unless a
        single event is larger on its own. With ``full_only``, nothing unless the batch is
        full, by count or by size.
        """
        window = self._window(service_id)
        if window.rewind:
            window = self._windows[service_id] = _Window()
        if len(window.events) < max_events and window.backlog:
            await self._refill(service_id, window)
        taken: list[QueuedEvent] = []
        size = BODY_OVERHEAD - 1
        full = False
        for event in window.events:
            size += len(event.json) + 1
            if taken and size > max_bytes:
                full = True
                break
            taken.append(event)
            if len(taken) == max_events:
                full = True
                break
        if full_only and not full:
            return []
        return taken

    def remove(self, service_id: str, count: int) -> None:
        """Forget the oldest ``count`` events: they are in a stored transaction now."""
        events = self._window(service_id).events
        for _ in range(count):
            events.popleft()

    def reread_all(self) -> None:
        """
        The sorter may have committed events it could not hand over: read every queue
        again past what the windows hold (what they hold stays valid), and tell every
        service to look (nothing else may come to wake it).
        """
        for window in self._windows.values():
            window.backlog = window.touched = True
        for service_id in list(self._windows):
            self.on_ready(service_id)

    def touch(self, service_id: str) -> None:
        """Events were queued for the service elsewhere (another process): read them."""
        window = self._window(service_id)
        window.backlog = window.touched = True
        self.on_ready(service_id)

    def rewind(self, service_id: str) -> None:
        """
        Events older than the window's were queued again (a redrive): the next batch reads
        the queue from its start. Safe while the service's loop runs: it takes effect when
        the loop next asks for a batch.
        """
        self._window(service_id).rewind = True

    def reset(self, service_id: str) -> None:
        """Forget what is in memory; the next batch reads the queue afresh."""
        self._windows[service_id] = _Window()

    async def _refill(self, service_id: str, window: _Window) -> None:
        want = self._size - len(window.events)
        window.touched = False
        rows = await self._store.queued(service_id, window.loaded_up_to, want)
        if rows:
            window.events.extend(rows)
            window.loaded_up_to = rows[-1].stream_id
        if len(rows) < want and not window.touched:
            window.backlog = False
