"""
The ``soak`` benchmark (``benchmarks.bench``): the database stays flat under retention.

Millions of events (2,000,000 at full size) are submitted through the library, on SQLite,
to one service whose receiver answers at once, while housekeeping deletes every delivered
event older than a few seconds (``retention`` 3 s, ``dedupe_window`` the same,
``interval`` 1 s; ``pace`` and ``batch_size`` as :class:`delivery.Housekeeping` has them).
Without housekeeping the database would grow by every event; with it the file should stop
growing once retention is reached, since SQLite reuses the pages that deletion frees.

The producer is that of ``throughput-sqlite`` (batches of 100, up to 4 submitted and not
yet committed), as fast as it goes, but never more than ``Soak.backlog`` (10,000) events
ahead of delivery. Unbounded, it outruns delivery about 4 to 1 while it submits (see
"What limits it now" in docs/performance.md): the backlog, which no retention may delete,
would grow through the run, and so would the database, whatever housekeeping does.
``Soak(backlog=None)`` runs it unbounded all the same.

Every second (a ``task.LoopingCall`` on the reactor), and once more when the last event
has been delivered, it notes the database's size on disk (the file and its ``-wal``), this
process's resident memory (``/proc/self/statm``), and how many events were ingested,
delivered and deleted so far (an observer of the service counts them). Measures:

- events/s delivered, from the first submit to the last arrival (as ``throughput-sqlite``
  measures it; :func:`versus_throughput` is the ratio of the two when both ran);
- the database's size (file and WAL) once the first 10 % of the run's time has passed,
  at the end, and how much it grew in between, in %;
- the resident memory at the same two points, and its growth;
- how many events housekeeping deleted by the end.

The targets: growth <= 10 %, memory flat, and >= 0.9 x ``throughput-sqlite``. The samples
are in the JSON (``series.soak.samples``, with ``series.soak.settings``); ``--plot``
draws them into a figure of their own (:func:`benchmarks.bench_plot.plot_soak`).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults
from zope.interface import implementer

from delivery import (
    DeliveryService,
    Housekeeping,
    IDeliveryObserver,
    SendResult,
    StoredTransaction,
)

from ._core import (
    BATCH,
    IN_FLIGHT,
    Config,
    Measure,
    Receiver,
    Result,
    Run,
    Series,
    batches,
    registration,
    running,
    sqlite_url,
    submit_all,
)

MB = 2**20

#: the share of the run's time after which the first reading of size and memory is taken
WARM_UP = 0.1


@attrs.frozen
class Soak:
    """How the soak's service keeps its database, and how often it is looked at (seconds)."""

    retention: float = 3.0
    interval: float = 1.0
    #: how often the database's size, the memory and the counts are sampled
    every: float = 1.0
    #: events submitted and not yet delivered, at most (None: no bound)
    backlog: int | None = 10_000
    #: housekeeping's rows per transaction and pause between them (None: its defaults)
    batch_size: int | None = None
    pace: float | None = None

    def housekeeping(self) -> Housekeeping:
        options = Housekeeping(
            retention=self.retention, dedupe_window=self.retention, interval=self.interval
        )
        if self.batch_size is not None:
            options = attrs.evolve(options, batch_size=self.batch_size)
        if self.pace is not None:
            options = attrs.evolve(options, pace=self.pace)
        return options


@attrs.frozen
class Sample:
    """One look at the run: sizes in bytes, counts since the run's start."""

    #: seconds since the first submit
    t: float
    db_bytes: int
    wal_bytes: int
    rss_bytes: int
    ingested: int
    delivered: int
    deleted: int

    @property
    def disk_bytes(self) -> int:
        return self.db_bytes + self.wal_bytes


@attrs.define
class SoakSeries(Series):
    """What a soak run saw: the arrivals at the receiver, and a sample a second."""

    samples: list[Sample] = attrs.Factory(list)
    settings: Soak | None = None


@implementer(IDeliveryObserver)
class Counts:
    """Counts what the service ingests, delivers and deletes (housekeeping's events)."""

    def __init__(self) -> None:
        self.ingested = 0
        self.delivered = 0
        self.deleted = 0
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def delivered_at_least(self, count: int) -> Deferred[None]:
        """Fires once ``count`` events have been delivered."""
        waiting: Deferred[None] = Deferred()
        self._waiting.append((count, waiting))
        self._wake()
        return waiting

    def _wake(self) -> None:
        ready = [d for count, d in self._waiting if self.delivered >= count]
        self._waiting = [(c, d) for c, d in self._waiting if self.delivered < c]
        for waiting in ready:
            waiting.callback(None)

    def state_changed(self, service_id: str, old: str, new: str, reason: str | None) -> None:
        pass

    def transaction_done(self, service_id: str, txn: StoredTransaction, result: SendResult) -> None:
        if result.ok:
            self.delivered += txn.event_count
            self._wake()

    def probe_done(self, service_id: str, result: SendResult) -> None:
        pass

    def events_ingested(self, count: int) -> None:
        self.ingested += count

    def events_routed(self, counts: Mapping[str, int]) -> None:
        pass

    def dead_lettered(self, service_id: str, count: int, status: int | None) -> None:
        pass

    def housekept(self, table: str, count: int) -> None:
        if table == "events":
            self.deleted += count

    def lease_changed(self, lease: str, change: str) -> None:
        pass

    def write_refused(self, lease: str) -> None:
        pass


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def rss_bytes() -> int:
    """This process's resident memory now (the second field of ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


class Sampler:
    """Takes the samples of one run: the database at ``path``, the counts of ``counts``."""

    def __init__(self, path: Path, counts: Counts, start: float) -> None:
        self._path = path
        self._wal = path.with_name(f"{path.name}-wal")
        self._counts = counts
        self._start = start
        self.samples: list[Sample] = []

    def sample(self) -> None:
        counts = self._counts
        self.samples.append(
            Sample(
                t=time.time() - self._start,
                db_bytes=file_size(self._path),
                wal_bytes=file_size(self._wal),
                rss_bytes=rss_bytes(),
                ingested=counts.ingested,
                delivered=counts.delivered,
                deleted=counts.deleted,
            )
        )


def warmed_up(samples: Sequence[Sample]) -> Sample:
    """The first sample once WARM_UP of the run's time (to the last sample) has passed."""
    end = samples[-1].t
    return next(s for s in samples if s.t >= WARM_UP * end)


def measures(rate: float, samples: Sequence[Sample]) -> list[Measure]:
    """The soak's measures, from its delivered rate and its samples."""
    first, last = warmed_up(samples), samples[-1]
    growth = 100 * (last.disk_bytes - first.disk_bytes) / first.disk_bytes
    return [
        Measure("events/s", rate, "events/s"),
        Measure("db at 10%", first.disk_bytes / MB, "MB"),
        Measure("db at end", last.disk_bytes / MB, "MB"),
        Measure("db growth", growth, "%"),
        Measure("RSS at 10%", first.rss_bytes / MB, "MB"),
        Measure("RSS at end", last.rss_bytes / MB, "MB"),
        Measure("RSS growth", (last.rss_bytes - first.rss_bytes) / MB, "MB"),
        Measure("deleted", last.deleted, "events"),
    ]


async def submit_bounded(
    service: DeliveryService,
    work: Iterable[list[dict[str, Any]]],
    total: int,
    config: Config,
    counts: Counts,
    backlog: int,
) -> None:
    """
    As :func:`benchmarks.bench.submit_all` (at most IN_FLIGHT batches not committed), and
    never more than ``backlog`` events submitted and not yet delivered.
    """
    done = 0
    pending: deque[Deferred[list[int]]] = deque()
    for batch in work:
        if len(pending) == IN_FLIGHT:
            await pending.popleft()
        if done + len(batch) - backlog > counts.delivered:
            await counts.delivered_at_least(done + len(batch) - backlog)
        pending.append(service.submit(batch))
        done += len(batch)
        if config.progress is not None:
            config.progress.update(done, total)
    await gatherResults(pending)


async def run_soak(
    reactor: Any, config: Config, receiver: Receiver, run: int, settings: Soak
) -> Run:
    """One soak run of ``config.soak_events`` events, housekept as ``settings`` says."""
    total = config.soak_events
    name = f"soak-{run}"
    counts = Counts()
    housekeeping = settings.housekeeping()
    registrations = [registration(receiver.url)]
    url = sqlite_url(config, name)
    async with running(reactor, url, registrations, housekeeping=housekeeping) as service:
        service.observe(counts)
        start = time.time()
        sampler = Sampler(config.workdir / f"{name}.db", counts, start)
        loop = task.LoopingCall(sampler.sample)
        loop.clock = reactor
        looping = loop.start(settings.every, now=True)
        try:
            work = batches(f"soak{run}", total, BATCH)
            if settings.backlog is None:
                await submit_all(service, work, total, config)
            else:
                await submit_bounded(service, work, total, config, counts, settings.backlog)
            await counts.delivered_at_least(total)
        finally:
            if loop.running:
                loop.stop()
            await looping
        sampler.sample()  # the end: every event delivered
    # asked only now: the receiver's answer carries every event's latency, which would
    # weigh on this process's memory during the run
    stats = await receiver.wait_for(total)
    arrivals = Series.of(stats, start).arrivals
    series = SoakSeries(arrivals, samples=sampler.samples, settings=settings)
    rate = total / (stats["last_arrival"] - start)
    return Run(measures(rate, sampler.samples), series)


async def soak(reactor: Any, config: Config, receiver: Receiver, run: int) -> Run:
    return await run_soak(reactor, config, receiver, run, Soak())


def versus_throughput(results: Sequence[Result]) -> float | None:
    """soak's delivered events/s over throughput-sqlite's, when both ran."""
    rates = {r.scenario: r.median for r in results if r.measure == "events/s"}
    if "soak" in rates and "throughput-sqlite" in rates:
        return rates["soak"] / rates["throughput-sqlite"]
    return None
