"""
Benchmarks: named scenarios, each against a receiver in a process of its own
(:mod:`benchmarks.bench_receiver`), every scenario run several times.

    python -m benchmarks [SCENARIO ...] [--quick] [--runs N] [--events N]
                         [--json out.json] [--plot out.png] [--postgres URL]

(from the repository's root; ``scripts/bench`` runs it in the project's virtualenv).

Prints one row per measure: the median of the runs (3, or 1 with ``--quick``), their
min-max, the unit and the ratio to ``raw`` (measured in the same invocation; ``raw`` is
always run first), and writes every run's figures, the machine and the series to
``--json`` (``bench.json`` unless told). ``--quick`` runs every scenario small, in well
under a minute (CI does).
Scenarios (full size):

- ``raw``: the baseline, no pipeline: a plain loop that runs, per batch of 100 events,
  the SQLite statements the pipeline runs (insert the events; the queue rows and the
  sorter position; store the transaction; delete it after the answer), written out here
  and run with :mod:`sqlite3` on a schema made by ``open_store(...).open()``, each
  operation one transaction, and sends the pre-encoded bodies with treq over one
  persistent connection; events/s end to end.
- ``throughput-sqlite``: 200,000 events through ``DeliveryService.submit`` in batches of
  100 on SQLite, one service; events/s from the first submit to the last event at the
  receiver. The producer keeps up to 4 batches submitted and not yet committed (as the
  load process of ``ingest-http`` keeps 4 requests in flight); so does every scenario
  that submits in batches of 100.
- ``throughput-postgres``: the same on PostgreSQL, in a scratch database.
- ``ingest-http``: the same through the daemon's ``POST /v1/events``, offered by a load
  process (:mod:`benchmarks.bench_load`, 4 requests in flight); end to end, and as accepted.
- ``fanout``: 20,000 events, each wanted by 10 of 100 services (each with a port of the
  receiver of its own); deliveries/s.
- ``latency``: 1,000 events/s offered in batches of 10 for 10 s on SQLite, poll interval
  1 s; p50 and p99 of the time from submit to the receiver, in ms.
- ``recovery``: the receiver answers 503 while 100,000 events queue, 30 s in all, then 200
  again: seconds until the first transaction arrives (probes come every 5 s), and how fast
  the backlog drains (events/s from the first arrival to the last).
- ``backlog-memory``: a process of its own queues 1,000,000 events for a DOWN service:
  its peak resident memory, and how much it grew from a tenth of them to all.
- ``many-services``: a ``DeliveryService`` with 1,000 registrations routes 200,000 stored
  events (each wanted by one of them) into their queues; nothing is sent (every service
  was DISABLED first by a sender answering 410), so what is measured is the sorter's
  routing: events/s from ``started()`` to ``routed()``.
- ``soak``: 2,000,000 events as ``throughput-sqlite`` submits them (but never more than
  10,000 ahead of delivery), with housekeeping deleting delivered events after 3 s
  (:mod:`benchmarks.bench_soak`): events/s, and the database's size and this process's
  memory after the first 10 % of the run and at its end.
- ``scale-out``: 100 services (each with a receiver port of its own, each event wanted by
  one of them), 1, 2 and 3 daemons (``twistd`` processes) on one PostgreSQL database, a
  load process per daemon offering it a share of 200,000 events
  (:mod:`benchmarks.bench_scale`): events/s end to end for each; CPU milliseconds per
  1,000 events of the daemons, of PostgreSQL and of the loads, and how busy the cores
  were; then the failover time (median and max of 10 SIGKILLs of a service's owner, ``lease_ttl``
  15 s) and of a clean stop (SIGTERM).

Only public API is used: ``delivery``'s names, ``delivery.store.open_store`` and the
``IStore`` it returns, and the daemon as ``twistd`` builds it (``delivery.daemon.Daemon``).
One internal, in one place: ``many-services`` stores its backlog through
``IStore.insert_events``, whose ``Event`` values only ``delivery.events.prepare`` makes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sqlite3
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import treq
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from delivery import DeliveryService, ISender, Registration, SendResult
from delivery.daemon import Daemon
from delivery.store import open_store

from ._core import (
    BATCH,
    DEFAULT_POSTGRES,
    HEADERS,
    INGEST_TOKEN,
    ROOT,
    SERVICE_ID,
    TXN_PATH,
    Config,
    Measure,
    Progress,
    Receiver,
    Result,
    Run,
    Series,
    batches,
    make_events,
    registration,
    registration_dict,
    running,
    scratch_postgres,
    sqlite_url,
    submit_all,
)

#: the repository: the processes a benchmark starts run ``-m benchmarks...`` from here
from .bench_scale import SERVICES as SCALE_SERVICES
from .bench_scale import scale_out
from .bench_soak import soak, versus_throughput

# -- scenarios --


#: the statements of the pipeline ``raw`` runs on SQLite, as the store writes them
RAW_PRAGMAS = ("journal_mode = WAL", "synchronous = FULL", "busy_timeout = 10000")
RAW_INSERT_EVENTS = (
    "INSERT INTO events (event_id, sender, room_id, type, state_key, json, received_ts)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING"
)
RAW_STREAM_IDS = "SELECT event_id, stream_id FROM events WHERE event_id IN ({marks})"
RAW_QUEUE = "INSERT INTO service_queue (service_id, stream_id) VALUES (?, ?)"
RAW_TXN = (
    "INSERT INTO transactions (service_id, txn_id, body, event_count, first_stream_id,"
    " last_stream_id, created_ts, received_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


@attrs.frozen
class RawEvent:
    """An event as ``raw`` stores it: its id, what routes it and its JSON, encoded first."""

    event_id: str
    sender: str
    room_id: str
    type: str
    state_key: str | None
    json: bytes

    @classmethod
    def of(cls, event: dict[str, Any]) -> RawEvent:
        data = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
        return cls(
            event["event_id"],
            event["sender"],
            event["room_id"],
            event["type"],
            event.get("state_key"),
            data,
        )


class RawStore:
    """
    The pipeline's SQLite statements for one batch, each operation one transaction, on
    this thread (the store runs them on its writer thread, one operation after another).
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, reactor: Any, path: Path) -> RawStore:
        """The schema made by the store itself, then the file opened as the store opens it."""
        store = open_store(f"sqlite:///{path}", reactor)
        await store.open()
        await store.ensure_services([SERVICE_ID])
        await store.close()
        conn = sqlite3.connect(path, isolation_level=None)
        for pragma in RAW_PRAGMAS:
            conn.execute(f"PRAGMA {pragma}")
        return cls(conn)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn.cursor()
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def insert_events(self, events: list[RawEvent], now: float) -> list[int]:
        with self.transaction() as cursor:
            cursor.execute("SELECT coalesce(max(stream_id), 0) FROM events").fetchone()
            cursor.executemany(
                RAW_INSERT_EVENTS,
                [
                    (e.event_id, e.sender, e.room_id, e.type, e.state_key, e.json, now)
                    for e in events
                ],
            )
            found: dict[str, int] = {}
            ids = [e.event_id for e in events]
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(cursor.execute(RAW_STREAM_IDS.format(marks=marks), chunk).fetchall())
        return [found[i] for i in ids]

    def commit_sorted(self, ids: list[int]) -> None:
        with self.transaction() as cursor:
            cursor.executemany(RAW_QUEUE, [(SERVICE_ID, i) for i in ids])
            cursor.execute("UPDATE sorter_position SET stream_id = ?", (ids[-1],))

    def store_transaction(self, ids: list[int], body: bytes, now: float) -> int:
        with self.transaction() as cursor:
            (txn_id,) = cursor.execute(
                "UPDATE services SET last_txn_id = last_txn_id + 1 WHERE service_id = ?"
                " RETURNING last_txn_id",
                (SERVICE_ID,),
            ).fetchone()
            cursor.execute(
                "DELETE FROM service_queue WHERE service_id = ? AND stream_id BETWEEN ? AND ?",
                (SERVICE_ID, ids[0], ids[-1]),
            )
            times = struct.pack(f"<{len(ids)}d", *([now] * len(ids)))
            cursor.execute(
                RAW_TXN, (SERVICE_ID, txn_id, body, len(ids), ids[0], ids[-1], now, times)
            )
        return int(txn_id)

    def complete_transaction(self, txn_id: int, now: float) -> None:
        with self.transaction() as cursor:
            cursor.execute(
                "DELETE FROM transactions WHERE service_id = ? AND txn_id = ?",
                (SERVICE_ID, txn_id),
            )
            cursor.execute(
                "UPDATE services SET last_success_ts = ?, failure_count = 0,"
                " next_retry_ts = NULL WHERE service_id = ?",
                (now, SERVICE_ID),
            )

    def close(self) -> None:
        self._conn.close()


async def deliver_raw(
    store: RawStore, client: treq.client.HTTPClient, url: str, events: list[RawEvent]
) -> None:
    """One batch through the statements of the pipeline and over the wire."""
    body = b'{"events":[' + b",".join(e.json for e in events) + b"]}"
    now = time.time()
    ids = store.insert_events(events, now)
    store.commit_sorted(ids)
    txn_id = store.store_transaction(ids, body, now)
    response = await client.put(
        f"{url}{TXN_PATH}{txn_id}",
        data=body,
        headers=HEADERS,
    )
    await response.content()
    if response.code != 200:
        raise RuntimeError(f"the receiver answered {response.code}")
    store.complete_transaction(txn_id, time.time())


async def raw(reactor: Any, config: Config, receiver: Receiver, run: int) -> Run:
    prepared = [[RawEvent.of(e) for e in b] for b in batches(f"raw{run}", config.events, BATCH)]
    store = await RawStore.open(reactor, config.workdir / f"raw-{run}.db")
    connections = HTTPConnectionPool(reactor, persistent=True)
    connections.maxPersistentPerHost = 1
    connections.retryAutomatically = False
    client = treq.client.HTTPClient(Agent(reactor, connectTimeout=10.0, pool=connections))
    try:
        start = time.time()
        for n, events in enumerate(prepared):
            await deliver_raw(store, client, receiver.url, events)
            if config.progress is not None:
                config.progress.update(n + 1, len(prepared))
        stats = await receiver.wait_for(config.events)
    finally:
        store.close()
        await connections.closeCachedConnections()
    rate = config.events / (stats["last_arrival"] - start)
    return Run([Measure("events/s", rate, "events/s")], Series.of(stats, start))


async def throughput(
    reactor: Any, config: Config, receiver: Receiver, store_url: str, run: int
) -> Run:
    async with running(reactor, store_url, [registration(receiver.url)]) as service:
        start = time.time()
        await submit_all(service, batches(f"tp{run}", config.events, BATCH), config.events, config)
        stats = await receiver.wait_for(config.events)
    rate = config.events / (stats["last_arrival"] - start)
    return Run([Measure("events/s", rate, "events/s")], Series.of(stats, start))


async def throughput_sqlite(reactor: Any, config: Config, receiver: Receiver, run: int) -> Run:
    return await throughput(reactor, config, receiver, sqlite_url(config, f"tp-{run}"), run)


async def throughput_postgres(reactor: Any, config: Config, receiver: Receiver, run: int) -> Run:
    with scratch_postgres(config.postgres, f"delivery_bench_{os.getpid()}_{run}") as url:
        return await throughput(reactor, config, receiver, url, run)


async def ingest_http(reactor: Any, config: Config, receiver: Receiver, run: int) -> Run:
    """The daemon in this process, offered events by a load process over its HTTP API."""
    folder = config.workdir / f"http-{run}"
    folder.mkdir()
    (folder / "registration.yaml").write_text(json.dumps(registration_dict(receiver.url)))
    (folder / "delivery.yaml").write_text(
        json.dumps(
            {
                "database": "sqlite:///delivery.db",
                "listen": "tcp:0:interface=127.0.0.1",
                "ingest_token": INGEST_TOKEN,
                "admin_token": "bench-admin-token",
                "app_service_config_files": ["registration.yaml"],
                "log": {"level": "warn"},
            }
        )
    )
    daemon = Daemon(folder / "delivery.yaml", reactor=reactor)
    daemon.startService()
    try:
        assert daemon.web.listening is not None
        port = (await daemon.web.listening).getHost().port  # type: ignore[attr-defined]
        await daemon.delivery.started()
        load = await load_process(
            reactor, f"http://127.0.0.1:{port}", config.events, f"http{run}", config
        )
        stats = await receiver.wait_for(config.events)
    finally:
        await daemon.stopService()  # type: ignore[no-untyped-call]
    start = load["started"]
    return Run(
        [
            Measure("events/s", config.events / (stats["last_arrival"] - start), "events/s"),
            Measure("accepted", config.events / (load["finished"] - start), "events/s"),
        ],
        Series.of(stats, start),
    )


async def load_process(
    reactor: Any, url: str, events: int, prefix: str, config: Config
) -> dict[str, Any]:
    """Run :mod:`benchmarks.bench_load` against ``url`` to its end; what it reports."""
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        [
            *("-m", "benchmarks.bench_load"),
            *("--url", url, "--token", INGEST_TOKEN, "--events", str(events)),
            *("--batch", str(BATCH), "--prefix", prefix),
        ],
        env=os.environ,
        path=str(ROOT),
        reactor=reactor,
    )
    if code != 0:
        raise RuntimeError(f"the load process failed: {err.decode(errors='replace').strip()}")
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


#: services of fanout, and how many of them want each event
FANOUT_SERVICES = 100
FANOUT_WIDTH = 10


async def fanout(reactor: Any, config: Config, receiver: Receiver, run: int) -> Run:
    """Each event is wanted by 10 of 100 services (each with a receiver port of its own)."""
    rooms = FANOUT_SERVICES // FANOUT_WIDTH
    registrations = [
        registration(url, f"fan{i}", users=None, rooms=rf"!room{i % rooms}:example\.org")
        for i, url in enumerate(receiver.urls)
    ]
    total = config.fanout_events * FANOUT_WIDTH
    async with running(reactor, sqlite_url(config, f"fan-{run}"), registrations) as service:
        start = time.time()
        work = batches(f"fan{run}", config.fanout_events, BATCH, rooms=rooms)
        await submit_all(service, work, config.fanout_events, config)
        stats = await receiver.wait_for(total)
    rate = total / (stats["last_arrival"] - start)
    return Run([Measure("deliveries/s", rate, "deliveries/s")], Series.of(stats, start))


async def offer(reactor: Any, service: DeliveryService, total: int, rate: int) -> None:
    """Submit ``total`` events at ``rate`` a second, in batches of 10, on a schedule."""
    size = 10
    start = time.time()
    pending = []
    for n, i in enumerate(range(0, total, size)):
        delay = start + n * size / rate - time.time()
        if delay > 0:
            await task.deferLater(reactor, delay)
        pending.append(service.submit(make_events("lat", i, min(size, total - i))))
    await gatherResults(pending)


def percentile(values: Sequence[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def latency(reactor: Any, config: Config, receiver: Receiver, run: int) -> Run:
    total = int(config.latency_rate * config.latency_seconds)
    url = sqlite_url(config, f"lat-{run}")
    async with running(reactor, url, [registration(receiver.url)], poll_interval=1.0) as service:
        start = time.time()
        await offer(reactor, service, total, config.latency_rate)
        stats = await receiver.wait_for(total)
    series = Series.of(stats, start, latencies=True)
    ms = series.latencies_ms
    return Run(
        [Measure("p50", percentile(ms, 50), "ms"), Measure("p99", percentile(ms, 99), "ms")], series
    )


async def recovery(reactor: Any, config: Config, receiver: Receiver, run: int) -> Run:
    """
    The receiver answers 503 while events queue for ``down_seconds``, then 200: how soon
    the first transaction arrives after that (probes every 5 s), and how fast the backlog
    drains.
    """
    await receiver.down()
    url = sqlite_url(config, f"rec-{run}")
    async with running(reactor, url, [registration(receiver.url)]) as service:
        down = time.time()
        work = batches(f"rec{run}", config.recovery_events, BATCH)
        await submit_all(service, work, config.recovery_events, config)
        await service.routed()
        status = await service.status(SERVICE_ID)
        if status.state != "down":
            raise RuntimeError(f"the service should be down by now, not {status.state}")
        await task.deferLater(reactor, max(0.0, down + config.down_seconds - time.time()))
        back = time.time()
        await receiver.up()
        stats = await receiver.wait_for(config.recovery_events)
    first = stats["first_arrival"]
    drain = config.recovery_events / (stats["last_arrival"] - first)
    return Run(
        [
            Measure("first txn after return", first - back, "s"),
            Measure("drain", drain, "events/s"),
        ],
        Series.of(stats, back),
    )


async def backlog_memory(reactor: Any, config: Config, receiver: Receiver, run: int) -> Run:
    """
    A process of its own queues ``backlog_events`` for a service that is down, and reports
    its resident memory after a tenth of them and after all, and at its peak.
    """
    await receiver.down()
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        [
            "-c",
            "import sys; from benchmarks.bench import backlog_child; backlog_child(sys.argv[1:])",
            sqlite_url(config, f"backlog-{run}"),
            receiver.url,
            str(config.backlog_events),
        ],
        env=os.environ,
        path=str(ROOT),
        reactor=reactor,
    )
    if code != 0:
        raise RuntimeError(f"the backlog process failed: {err.decode(errors='replace')}")
    rss = json.loads(out.decode().strip().splitlines()[-1])
    return Run(
        [
            Measure("peak RSS", rss["peak"] / 2**20, "MB"),
            Measure("RSS growth 10%->100%", (rss["all"] - rss["tenth"]) / 2**20, "MB"),
        ]
    )


def _memory(field: str) -> int:
    """This process's ``VmRSS`` or ``VmHWM`` (its peak), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def backlog_child(argv: Sequence[str]) -> None:
    """The process of ``backlog-memory``: prints its memory as one JSON line."""
    store_url, url, total = argv[0], argv[1], int(argv[2])

    async def queue(reactor: Any) -> None:
        size = 1000
        readings: dict[str, int] = {}
        async with running(reactor, store_url, [registration(url)]) as service:
            for i in range(0, total, size):
                await service.submit(make_events("backlog", i, min(size, total - i)))
                if i + size in (total // 10, total):
                    await service.routed()
                    gc.collect()
                    readings["tenth" if i + size < total else "all"] = _memory("VmRSS")
            status = await service.status(SERVICE_ID)
            held = status.queued_events + BATCH * status.stored_transactions
            if status.state != "down" or held < total:
                raise RuntimeError(f"expected {total} events queued for a DOWN service: {status}")
        print(json.dumps({**readings, "peak": _memory("VmHWM")}))

    task.react(lambda reactor: Deferred.fromCoroutine(queue(reactor)))


#: registrations of many-services
MANY_SERVICES = 1000


@implementer(ISender)
class Gone:
    """A sender whose receiver is gone for good (410): its service becomes DISABLED."""

    def send(self, txn: Any) -> Deferred[SendResult]:
        return succeed(SendResult(ok=False, status=410, error="gone (benchmark)"))

    def ping(self, transaction_id: str | None = None) -> Deferred[SendResult]:
        return succeed(SendResult(ok=False, status=410, error="gone (benchmark)"))


async def disable_all(reactor: Any, store_url: str, registrations: list[Registration]) -> None:
    """Every service DISABLED (one event each, answered 410): nothing is sent to them after."""
    senders: dict[str, ISender] = {r.id: Gone() for r in registrations}
    async with running(reactor, store_url, registrations, senders=senders) as service:
        await service.submit(make_events("gone", 0, len(registrations), senders=MANY_SERVICES))
        await service.routed()
        while any(s.state != "disabled" for s in await service.statuses()):
            await task.deferLater(reactor, 0.05)


async def many_services(reactor: Any, config: Config, receiver: Receiver, run: int) -> Run:
    """
    A DeliveryService with 1,000 registrations (each event wanted by one of them, from a
    user no other event has) routes stored events into their queues. Its services are
    DISABLED first, so that nothing is sent: only the sorter works from ``started()`` to
    ``routed()``.
    """
    from delivery.events import prepare  # the one internal: see the module's docstring

    registrations = [
        registration(receiver.url, f"svc{i}", users=rf"@bridge{i}_.*:example\.org")
        for i in range(MANY_SERVICES)
    ]
    url = sqlite_url(config, f"many-{run}")
    await disable_all(reactor, url, registrations)
    store = open_store(url, reactor)
    await store.open()
    try:
        for batch in batches(f"many{run}", config.routed_events, 1000, senders=MANY_SERVICES):
            await store.insert_events(prepare(batch), time.time())
    finally:
        await store.close()
    async with running(reactor, url, registrations, poll_interval=3600) as service:
        start = time.time()
        await service.routed()
        elapsed = time.time() - start
        queued = sum(s.queued_events for s in await service.statuses())
    if queued < config.routed_events:
        raise RuntimeError(f"{queued} events queued, not {config.routed_events}")
    return Run([Measure("events/s", config.routed_events / elapsed, "events/s")])


Scenario = Callable[[Any, Config, Receiver, int], Awaitable[Run]]

SCENARIOS: dict[str, Scenario] = {
    "raw": raw,
    "throughput-sqlite": throughput_sqlite,
    "throughput-postgres": throughput_postgres,
    "ingest-http": ingest_http,
    "fanout": fanout,
    "latency": latency,
    "recovery": recovery,
    "backlog-memory": backlog_memory,
    "many-services": many_services,
    "soak": soak,
    "scale-out": scale_out,
}

#: receiver ports a scenario needs (one unless said)
PORTS = {"fanout": FANOUT_SERVICES, "scale-out": SCALE_SERVICES}


# -- running and reporting --


async def run_scenario(
    reactor: Any, name: str, config: Config, series: dict[str, Series]
) -> list[Result]:
    """Every run of one scenario; keeps the series of its last run in ``series``."""
    receiver = Receiver.start(PORTS.get(name, 1))
    runs: list[Run] = []
    try:
        for n in range(config.runs):
            await receiver.reset()
            if config.progress is not None:
                config.progress.begin(f"{name} run {n + 1}/{config.runs}")
            runs.append(await SCENARIOS[name](reactor, config, receiver, n))
            line = f"{name} run {n + 1}: {format_measures(runs[-1].measures)}"
            if config.progress is not None:
                config.progress.end(line)
    finally:
        receiver.stop()
    series[name] = runs[-1].series
    return [
        Result(name, first.name, first.unit, tuple(r.measures[i].value for r in runs))
        for i, first in enumerate(runs[0].measures)
    ]


def format_measures(measures: list[Measure]) -> str:
    return ", ".join(
        f"{m.name}={m.value:,.1f} {m.unit}" if m.name != m.unit else f"{m.value:,.0f} {m.unit}"
        for m in measures
    )


#: units of rate; ``raw`` delivers each event once, so its events/s are deliveries/s too
RATES = ("events/s", "deliveries/s")


def ratio(result: Result, baseline: Result | None) -> float | None:
    """A rate's ratio to ``raw``'s, measured in the same invocation."""
    if baseline is None or result.unit not in RATES or baseline.unit not in RATES:
        return None
    return result.median / baseline.median


def table(results: list[Result], baseline: Result | None) -> str:
    rows = [("scenario", "median", "min-max", "unit", "x raw")]
    for r in results:
        factor = ratio(r, baseline)
        rows.append(
            (
                r.label,
                f"{r.median:,.1f}",
                f"{min(r.values):,.1f}-{max(r.values):,.1f}",
                r.unit,
                "" if factor is None else f"{factor:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i in (0, 3) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def report(
    results: list[Result], baseline: Result | None, config: Config, series: dict[str, Series]
) -> dict[str, Any]:
    return {
        "machine": machine(),
        "config": {
            "events": config.events,
            "runs": config.runs,
            "latency_seconds": config.latency_seconds,
            "latency_rate": config.latency_rate,
            "fanout_events": config.fanout_events,
            "down_seconds": config.down_seconds,
            "recovery_events": config.recovery_events,
            "backlog_events": config.backlog_events,
            "routed_events": config.routed_events,
            "soak_events": config.soak_events,
            "scale_events": config.scale_events,
            "failover_kills": config.failover_kills,
            "scale_handovers": config.scale_handovers,
            "scale_lease_ttl": config.scale_lease_ttl,
        },
        "results": [
            {
                "scenario": r.scenario,
                "measure": r.measure,
                "unit": r.unit,
                "values": list(r.values),
                "median": r.median,
                "min": min(r.values),
                "max": max(r.values),
                "ratio_to_raw": ratio(r, baseline),
            }
            for r in results
        ],
        "series": {name: attrs.asdict(s) for name, s in series.items()},
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import platform

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "sqlite": sqlite3.sqlite_version,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


async def bench(reactor: Any, options: argparse.Namespace) -> None:
    names = list(dict.fromkeys(["raw", *(options.scenarios or SCENARIOS)]))
    series: dict[str, Series] = {}
    with tempfile.TemporaryDirectory(prefix="delivery-bench-") as workdir:
        config = Config.sized(
            options.quick,
            events=options.events,
            soak_events=options.events,
            runs=options.runs or (1 if options.quick else 3),
            latency_seconds=options.latency_seconds,
            postgres=options.postgres,
            workdir=Path(workdir),
            progress=Progress(),
        )
        results = [r for name in names for r in await run_scenario(reactor, name, config, series)]
    baseline = results[0]
    print(table(results, baseline))
    data = report(results, baseline, config, series)
    versus = versus_throughput(results)
    if versus is not None:
        print(f"soak events/s: {versus:.2f} x throughput-sqlite's (target >= 0.90)")
        data["soak_to_throughput_sqlite"] = versus
    Path(options.json).write_text(json.dumps(data, indent=2))
    print(f"every run's figures, the machine and the series: {options.json}")
    if options.plot:
        from .bench_plot import plot

        for path in plot(data, options.plot):
            print(f"plotted: {path}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n\n")[0])
    parser.add_argument(
        "scenarios", nargs="*", metavar="SCENARIO", help=f"of {', '.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="every scenario small")
    parser.add_argument("--runs", type=int, help="runs of each scenario (3; 1 with --quick)")
    parser.add_argument(
        "--events", type=int, help="events of raw, the throughput scenarios and soak"
    )
    parser.add_argument("--latency-seconds", type=float, help="how long latency offers load")
    parser.add_argument(
        "--json", default="bench.json", help="write the results here (default: bench.json)"
    )
    parser.add_argument(
        "--plot", help="draw throughput over time and latencies into this PNG (matplotlib)"
    )
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="server for scratch DBs")
    options = parser.parse_args(argv)
    unknown = set(options.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    for flag, path in (("--json", options.json), ("--plot", options.plot)):
        # found out now, not after minutes of benchmarks
        folder = Path(path or ".").resolve().parent
        if not (folder.is_dir() and os.access(folder, os.W_OK)):
            parser.error(f"{flag} {path}: cannot write into {folder}")
    return options


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    task.react(lambda reactor: Deferred.fromCoroutine(bench(reactor, options)))


if __name__ == "__main__":
    main()
