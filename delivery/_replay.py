"""
Replay: queue again, for one service, the retained events it wants in a range.

Each event chosen is copied into the events table (a new stream position, the same JSON,
``replay_for`` naming the service), so the copies come after everything queued for the
service already, in the originals' order, and the sorter routes each copy to that
service alone. The range is read :data:`REPLAY_CHUNK` events at a time and each chunk's
copies are stored in one database transaction.
"""

from __future__ import annotations

import math
import uuid

import attrs
from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime

from ._interfaces import IStore
from ._log import Logger
from .events import shorten
from .records import ReplayResult
from .registration import Registration
from .sorter import EventSorter

log = Logger()

#: events a replay reads at a time; each such chunk's copies are stored in one transaction
REPLAY_CHUNK = 1000
#: the highest stream position a replay's range may name
MAX_STREAM_ID = 2**62


@attrs.frozen
class ReplayRange:
    """A replay's range, checked: one start (a time or a position), at most one end."""

    from_ts: float | None
    from_stream_id: int | None
    to_ts: float | None
    to_stream_id: int | None

    @classmethod
    def of(
        cls,
        from_ts: object = None,
        from_stream_id: object = None,
        to_ts: object = None,
        to_stream_id: object = None,
    ) -> ReplayRange:
        """
        :raises ValueError: for a range that is not one (no start or two, two ends, a
            value of the wrong type or negative, an end before its start), saying so.
        """
        for name, position in (("from_stream_id", from_stream_id), ("to_stream_id", to_stream_id)):
            if position is not None and (
                type(position) is not int or not 0 <= position <= MAX_STREAM_ID
            ):
                raise ValueError(
                    f"{name} must be a whole number from 0 to {MAX_STREAM_ID},"
                    f" not {shorten(repr(position))}"
                )
        times: list[float | None] = []
        for name, ts in (("from_ts", from_ts), ("to_ts", to_ts)):
            seconds: float | None = None
            if isinstance(ts, (int, float)) and not isinstance(ts, bool):
                try:
                    seconds = float(ts)
                except OverflowError:  # an integer too large for a float
                    seconds = math.inf
            if ts is not None and (seconds is None or not 0 <= seconds < math.inf):
                raise ValueError(
                    f"{name} must be a time in seconds, 0 or more, not {shorten(repr(ts))}"
                )
            times.append(seconds)
        if (from_ts is None) == (from_stream_id is None):
            raise ValueError("give one start of the replay: from_ts or from_stream_id")
        if to_ts is not None and to_stream_id is not None:
            raise ValueError("give at most one end of the replay: to_ts or to_stream_id")
        start_ts, end_ts = times
        first = from_stream_id if isinstance(from_stream_id, int) else None
        last = to_stream_id if isinstance(to_stream_id, int) else None
        for start, end, names in (
            (start_ts, end_ts, ("from_ts", "to_ts")),
            (first, last, ("from_stream_id", "to_stream_id")),
        ):
            if start is not None and end is not None and end < start:
                shown = (to_ts, from_ts) if names[0] == "from_ts" else (last, first)
                raise ValueError(f"{names[1]} ({shown[0]}) is before {names[0]} ({shown[1]})")
        return cls(start_ts, first, end_ts, last)


class Replayer:
    """Replays ranges of retained events, one replay at a time in a process."""

    def __init__(self, store: IStore, sorter: EventSorter, clock: IReactorTime) -> None:
        self._store = store
        self._sorter = sorter
        self._clock = clock
        #: one replay at a time: each one's copies follow each other
        self._lock = DeferredLock()

    async def replay(self, registration: Registration, chosen: ReplayRange) -> ReplayResult:
        """Queue the range's events ``registration`` wants again, for it alone."""
        service_id = registration.id
        async with self._lock:
            up_to = await self._store.sorter_position()
            if chosen.to_stream_id is not None:
                up_to = min(up_to, chosen.to_stream_id)
            start = chosen.from_stream_id
            after = max(start - 1, 0) if start is not None else 0
            key = uuid.uuid4().hex
            queued, first, last = 0, None, None
            while after < up_to:
                chunk = await self._store.replay_originals(
                    after, up_to, chosen.from_ts, chosen.to_ts, REPLAY_CHUNK
                )
                if not chunk:
                    break
                after = chunk[-1].stream_id
                wanted = await self._sorter.wanted_by(
                    service_id, chunk, aliases=bool(registration.aliases)
                )
                if wanted:
                    await self._store.insert_replay(service_id, wanted, key, self._clock.seconds())
                    self._sorter.wake()
                    queued += len(wanted)
                    first = wanted[0].stream_id if first is None else first
                    last = wanted[-1].stream_id
                if len(chunk) < REPLAY_CHUNK:
                    break
            # (read after the scan: it counts what retention deleted meanwhile)
            deleted_stream_id, deleted_ts = await self._store.retention_mark()
        if chosen.from_ts is not None:
            partly_deleted = deleted_ts is not None and deleted_ts >= chosen.from_ts
        else:
            partly_deleted = deleted_stream_id > 0 and deleted_stream_id >= (start or 0)
        log.info(
            "{service}: {count} event(s) replayed, queued again{range}{deleted}",
            service=service_id,
            count=queued,
            range=f" (stream positions {first} to {last})" if queued else "",
            deleted="; part of the range may have been deleted by retention"
            if partly_deleted
            else "",
        )
        return ReplayResult(queued, first, last, partly_deleted)
