"""
Housekeeping: the database stays bounded however long the daemon runs.

The :class:`Housekeeper` runs passes in the background. Each pass walks the events the
sorter is past, oldest first, in small batches (``batch_size`` rows, one database
transaction each, ``pace`` seconds apart), and deletes the payload of every event that no
service still needs (no queue row, no stored transaction whose range holds it, no dead
letter) once it is older than ``retention``; each deleted event's id is kept in
``seen_events`` for ``dedupe_window``, so that a producer resubmitting it within the window
still gets its first stream position instead of a second delivery. Ids older than the
window, and delivery-log rows older than ``attempt_retention`` or beyond
``attempts_per_service`` for a service, are deleted in the same paced way. Events no service
wanted are deleted by the sorter as it routes them (their ids kept the same way).

On SQLite the pages deletion frees are reused by what is written next; those that stayed
free for a whole interval (the database holds less than it did) are given back to the file
system at the end of the next pass, in steps of :data:`RECLAIM_STEP` pages, so that the
file follows what is kept and shrinks after a peak. PostgreSQL leaves that to autovacuum.

When a pass finds nothing more to delete it waits ``interval`` seconds. A batch holds the
ingest lock only for its own short transaction, so ingest and delivery go on between
batches; a crash in the middle of a pass loses nothing (each batch commits whole) and the
next pass carries on.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater

from ._interfaces import IStore
from ._log import Logger
from ._observers import Observers
from .errors import StoreUnavailableError

log = Logger()

#: pages given back to the file system per database transaction (SQLite's are 4 KiB)
RECLAIM_STEP = 256

HOUR = 3600.0
DAY = 24 * HOUR


def _positive(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{attribute.name} must be a positive number, not {value!r}")


def _positive_int(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive integer, not {value!r}")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{attribute.name} must be a number of seconds >= 0, not {value!r}")


@attrs.frozen
class Housekeeping:
    """How long what is stored is kept, and how the deletion is paced. Seconds."""

    #: how long an event's payload is kept once no service needs it (for inspection and
    #: replay)
    retention: float = attrs.field(default=HOUR, validator=_positive)
    #: how long a resubmitted ``event_id`` is still recognised (at least ``retention``)
    dedupe_window: float = attrs.field(default=DAY, validator=_positive)
    #: how long the delivery log keeps an attempt
    attempt_retention: float = attrs.field(default=7 * DAY, validator=_positive)
    #: the most attempts the delivery log keeps for one service
    attempts_per_service: int = attrs.field(default=10_000, validator=_positive_int)
    #: rows deleted in one database transaction
    batch_size: int = attrs.field(default=1000, validator=_positive_int)
    #: the pause between two batches
    pace: float = attrs.field(default=0.01, validator=_not_negative)
    #: the pause after a pass that found nothing more to delete
    interval: float = attrs.field(default=60.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.dedupe_window < self.retention:
            raise ValueError(
                f"dedupe_window ({self.dedupe_window:g} s) must be at least retention"
                f" ({self.retention:g} s): an id must be recognised while its event is kept"
            )


@attrs.frozen
class PassResult:
    """What one housekeeping pass deleted, by table, and the pages it gave back."""

    events: int = 0
    seen_events: int = 0
    attempts: int = 0
    #: pages of the database file given back to the file system
    pages: int = 0

    def __add__(self, other: PassResult) -> PassResult:
        return PassResult(
            self.events + other.events,
            self.seen_events + other.seen_events,
            self.attempts + other.attempts,
            self.pages + other.pages,
        )


class Housekeeper:
    """Runs housekeeping passes on a store, one at a time, on a clock."""

    def __init__(
        self,
        store: IStore,
        options: Housekeeping,
        clock: IReactorTime,
        observers: Observers,
    ) -> None:
        self._store = store
        self.options = options
        self._clock = clock
        self._observers = observers
        #: stop() was called: no pass starts, and one running ends after its batch (a
        #: pass asked for before start() runs whole)
        self._stopped = False
        self._running: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        #: passes run by themselves: between start() and stop()
        self.active = False
        #: one pass at a time (the loop's, or one asked for)
        self._lock = DeferredLock()
        #: rows deleted since start, by table
        self.deleted: dict[str, int] = dict.fromkeys(("events", "seen_events", "attempts"), 0)
        #: the database's size in bytes and rows by table, as the last pass found them
        self.stats: tuple[int, dict[str, int]] | None = None

    def start(self) -> None:
        """Run a pass now, and one every ``interval`` after each ends."""
        if self.active:
            return
        self.active = True
        self._stopped = False
        self._schedule(0.0)

    def _schedule(self, delay: float) -> None:
        if not self._stopped:
            self._timer = self._clock.callLater(delay, self._begin)

    def _begin(self) -> None:
        self._timer = None
        running = Deferred.fromCoroutine(self._loop())
        if not running.called:
            self._running = running

    async def _loop(self) -> None:
        try:
            await self.run_pass()
        except StoreUnavailableError as e:
            log.info("housekeeping paused: {error}", error=str(e))
        except Exception:
            log.failure(
                "housekeeping failed; trying again in {interval} s",
                interval=self.options.interval,
            )
        finally:
            self._running = None
        self._schedule(self.options.interval)

    async def run_pass(self) -> PassResult:
        """
        One whole pass, batch by batch: events, then expired ids, then the delivery log,
        then the pages that stayed free since the last pass; then the database's size and
        rows. What it deleted. A pass running already is
        waited for first. A stop ends a pass between two batches.
        """
        await self._lock.acquire()
        try:
            return await self._pass()
        finally:
            self._lock.release()

    async def _pass(self) -> PassResult:
        options = self.options
        total = PassResult()
        # free since the last pass, the writes of a whole interval did not need them
        spare = await self._store.free_pages()
        cursor: int | None = 0
        while cursor is not None and not self._stopped:
            now = self._clock.seconds()
            deleted, cursor = await self._store.delete_events(
                cursor, options.batch_size, now - options.retention, now - options.dedupe_window
            )
            total += PassResult(events=self._count("events", deleted))
            if cursor is not None:
                await self._pause()
        pruned = options.batch_size
        while pruned >= options.batch_size and not self._stopped:
            now = self._clock.seconds()
            pruned = await self._store.prune_seen(now - options.dedupe_window, options.batch_size)
            total += PassResult(seen_events=self._count("seen_events", pruned))
            if pruned >= options.batch_size:
                await self._pause()
        pruned = options.batch_size
        while pruned >= options.batch_size and not self._stopped:
            now = self._clock.seconds()
            pruned = await self._store.prune_attempts(
                now - options.attempt_retention, options.attempts_per_service, options.batch_size
            )
            total += PassResult(attempts=self._count("attempts", pruned))
            if pruned >= options.batch_size:
                await self._pause()
        while spare > 0 and not self._stopped:
            reclaimed = await self._store.reclaim_pages(min(spare, RECLAIM_STEP))
            total += PassResult(pages=reclaimed)
            spare = spare - reclaimed if reclaimed else 0
            if spare > 0:
                await self._pause()
        if not self._stopped:
            self.stats = await self._store.database_stats()
        if total != PassResult():
            log.debug(
                "housekeeping deleted {events} events, {ids} ids and {attempts} attempts,"
                " and gave {pages} pages back",
                events=total.events,
                ids=total.seen_events,
                attempts=total.attempts,
                pages=total.pages,
            )
        return total

    def _count(self, table: str, deleted: int) -> int:
        if deleted:
            self.deleted[table] += deleted
            self._observers.housekept(table, deleted)
        return deleted

    async def _pause(self) -> None:
        if self.options.pace > 0:
            await deferLater(self._clock, self.options.pace)

    async def stop(self) -> None:
        """Stop: no pass starts any more, and the one running ends after its batch."""
        self.active = False
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._running is not None:
            await self._running
