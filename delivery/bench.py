"""
Benchmarks: named scenarios, each against a receiver in a process of its own
(:mod:`delivery.bench_receiver`), every scenario run several times.

    python -m delivery.bench [SCENARIO ...] [--quick] [--runs 3] [--events N]
                             [--json out.json] [--postgres URL]

Prints one row per measure: the median of the runs, their min-max, the unit and the ratio
to ``raw`` (measured in the same invocation; ``raw`` is always run first). Scenarios:

- ``raw``: the baseline, no pipeline: a plain loop that runs, per batch of 100 events,
  the SQLite statements the pipeline runs (insert the events; the queue rows and the
  sorter position; store the transaction; delete it after the answer) and sends the
  pre-encoded bodies with treq over one persistent connection; events/s end to end.
- ``throughput-sqlite``: ``DeliveryService.submit`` in batches of 100 on SQLite, one
  service; events/s from the first submit to the last event at the receiver.
- ``throughput-postgres``: the same on PostgreSQL, in a scratch database.
- ``latency``: 1,000 events/s offered in batches of 10 on SQLite; p50 and p99 of the
  time from submit to the receiver, in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import attrs
import treq
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults

from .events import Event, prepare, transaction_body
from .matrix import ConnectionPool
from .registration import Registration
from .service import DeliveryService
from .store import _sql, open_store
from .store._schema import SQLITE
from .store.sqlite import _setup, drive

T = TypeVar("T")

SERVICE_ID = "bench"
HS_TOKEN = "bench-hs-token"
BATCH = 100
TXN_PATH = "/_matrix/app/v1/transactions/"
HEADERS: dict[bytes | str, bytes | str] = {
    "Authorization": f"Bearer {HS_TOKEN}",
    "Content-Type": "application/json",
}
DEFAULT_POSTGRES = os.environ.get(
    "DELIVERY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@attrs.frozen
class Config:
    """How big and how many: the same for every scenario of one invocation."""

    events: int
    runs: int
    latency_seconds: float
    latency_rate: int
    postgres: str
    workdir: Path


@attrs.frozen
class Measure:
    """One number a run of a scenario gives."""

    name: str
    value: float
    unit: str


# -- the receiver process --


class Receiver:
    """The benchmark receiver, in its own process, and how to ask it what arrived."""

    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self._process = process
        self.url = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls) -> Receiver:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("bench_receiver.py"))],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        return cls(process, int(json.loads(process.stdout.readline())["port"]))

    async def reset(self) -> None:
        await (await treq.post(f"{self.url}/reset")).content()

    async def wait_for(self, count: int) -> dict[str, Any]:
        """The receiver's statistics, once ``count`` events have arrived."""
        response = await treq.get(f"{self.url}/stats", params={"count": str(count)})
        stats: dict[str, Any] = json.loads(await response.content())
        return stats

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait()


# -- workload --


def registration(url: str) -> Registration:
    return Registration.from_dict(
        {
            "id": SERVICE_ID,
            "url": url,
            "as_token": "bench-as-token",
            "hs_token": HS_TOKEN,
            "sender_localpart": "benchbot",
            "namespaces": {"users": [{"regex": "@bench_.*", "exclusive": True}]},
        }
    )


def make_events(prefix: str, start: int, count: int) -> list[dict[str, Any]]:
    """``count`` message events, stamped with the time they are made (``content.ts``)."""
    now = time.time()
    return [
        {
            "event_id": f"${prefix}-{i}",
            "type": "m.room.message",
            "room_id": "!bench:example.org",
            "sender": "@bench_user:example.org",
            "content": {"msgtype": "m.text", "body": f"benchmark message {i}", "ts": now},
        }
        for i in range(start, start + count)
    ]


def batches(prefix: str, total: int, size: int) -> list[list[dict[str, Any]]]:
    return [make_events(prefix, i, min(size, total - i)) for i in range(0, total, size)]


@contextmanager
def scratch_postgres(base_url: str, name: str) -> Iterator[str]:
    """A PostgreSQL database of its own, dropped afterwards; its URL."""
    import psycopg2

    def admin(statement: str) -> None:
        conn = psycopg2.connect(base_url)
        conn.autocommit = True
        try:
            conn.cursor().execute(statement)
        finally:
            conn.close()

    admin(f"DROP DATABASE IF EXISTS {name}")
    admin(f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(urlsplit(base_url)._replace(path=f"/{name}"))
    finally:
        admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# -- scenarios --


class RawStore:
    """The pipeline's SQLite statements, each operation one transaction, on this thread."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None)
        _setup(self._conn)
        self.run(_sql.migrate, SQLITE)
        self.run(_sql.ensure_services, [SERVICE_ID])

    def run(self, operation: Callable[..., _sql.Steps[T]], *args: Any) -> T:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            result = drive(self._conn.cursor(), operation(*args))
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return result

    def close(self) -> None:
        self._conn.close()


async def deliver_raw(
    store: RawStore, client: treq.client.HTTPClient, url: str, events: list[Event]
) -> None:
    """One batch through the statements of the pipeline and over the wire."""
    body = transaction_body([e.json for e in events])
    now = time.time()
    ids = store.run(_sql.insert_events, events, now)
    store.run(_sql.commit_sorted, ids[-1], [(SERVICE_ID, i) for i in ids], ())
    txn_id = store.run(_sql.store_transaction, SERVICE_ID, ids[0], ids[-1], len(ids), body, now)
    response = await client.put(
        f"{url}{TXN_PATH}{txn_id}",
        data=body,
        headers=HEADERS,
    )
    await response.content()
    if response.code != 200:
        raise RuntimeError(f"the receiver answered {response.code}")
    store.run(_sql.complete_transaction, SERVICE_ID, txn_id, time.time())


async def raw(reactor: Any, config: Config, receiver: Receiver, run: int) -> list[Measure]:
    prepared = [prepare(b) for b in batches(f"raw{run}", config.events, BATCH)]
    store = RawStore(config.workdir / f"raw-{run}.db")
    connections = ConnectionPool(reactor, max_per_host=1)
    client = connections.client(connect_timeout=10.0)
    try:
        start = time.time()
        for events in prepared:
            await deliver_raw(store, client, receiver.url, events)
        stats = await receiver.wait_for(config.events)
    finally:
        store.close()
        await connections.close()
    return [Measure("events/s", config.events / (stats["last_arrival"] - start), "events/s")]


async def throughput(
    reactor: Any, config: Config, receiver: Receiver, store_url: str, run: int
) -> list[Measure]:
    work = batches(f"tp{run}", config.events, BATCH)
    service = DeliveryService(
        open_store(store_url, reactor), [registration(receiver.url)], reactor=reactor
    )
    service.startService()
    try:
        await service.started()
        start = time.time()
        for batch in work:
            await service.submit(batch)
        stats = await receiver.wait_for(config.events)
    finally:
        await service.stopService()
    return [Measure("events/s", config.events / (stats["last_arrival"] - start), "events/s")]


async def throughput_sqlite(
    reactor: Any, config: Config, receiver: Receiver, run: int
) -> list[Measure]:
    url = f"sqlite:///{config.workdir / f'tp-{run}.db'}"
    return await throughput(reactor, config, receiver, url, run)


async def throughput_postgres(
    reactor: Any, config: Config, receiver: Receiver, run: int
) -> list[Measure]:
    with scratch_postgres(config.postgres, f"delivery_bench_{os.getpid()}_{run}") as url:
        return await throughput(reactor, config, receiver, url, run)


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


async def latency(reactor: Any, config: Config, receiver: Receiver, run: int) -> list[Measure]:
    total = int(config.latency_rate * config.latency_seconds)
    url = f"sqlite:///{config.workdir / f'lat-{run}.db'}"
    service = DeliveryService(
        open_store(url, reactor), [registration(receiver.url)], reactor=reactor, poll_interval=1.0
    )
    service.startService()
    try:
        await service.started()
        await offer(reactor, service, total, config.latency_rate)
        stats = await receiver.wait_for(total)
    finally:
        await service.stopService()
    ms = [1000 * s for s in stats["latencies"]]
    return [Measure("p50", percentile(ms, 50), "ms"), Measure("p99", percentile(ms, 99), "ms")]


Scenario = Callable[[Any, Config, Receiver, int], Awaitable[list[Measure]]]

SCENARIOS: dict[str, Scenario] = {
    "raw": raw,
    "throughput-sqlite": throughput_sqlite,
    "throughput-postgres": throughput_postgres,
    "latency": latency,
}


# -- running and reporting --


@attrs.frozen
class Result:
    """Every run's value of one measure of one scenario."""

    scenario: str
    measure: str
    unit: str
    values: tuple[float, ...]

    @property
    def label(self) -> str:
        return self.scenario if self.measure == self.unit else f"{self.scenario} {self.measure}"

    @property
    def median(self) -> float:
        return statistics.median(self.values)


async def run_scenario(reactor: Any, name: str, config: Config) -> list[Result]:
    receiver = Receiver.start()
    runs: list[list[Measure]] = []
    try:
        for run in range(config.runs):
            await receiver.reset()
            runs.append(await SCENARIOS[name](reactor, config, receiver, run))
            print(f"  {name} run {run + 1}: {format_measures(runs[-1])}", file=sys.stderr)
    finally:
        receiver.stop()
    return [
        Result(name, first.name, first.unit, tuple(r[i].value for r in runs))
        for i, first in enumerate(runs[0])
    ]


def format_measures(measures: list[Measure]) -> str:
    return ", ".join(
        f"{m.name}={m.value:,.1f} {m.unit}" if m.name != m.unit else f"{m.value:,.0f} {m.unit}"
        for m in measures
    )


def ratio(result: Result, baseline: Result | None) -> float | None:
    if baseline is None or result.unit != baseline.unit:
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


def report(results: list[Result], baseline: Result | None, config: Config) -> dict[str, Any]:
    return {
        "config": {
            "events": config.events,
            "runs": config.runs,
            "latency_seconds": config.latency_seconds,
            "latency_rate": config.latency_rate,
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
    }


async def bench(reactor: Any, options: argparse.Namespace) -> None:
    names = list(dict.fromkeys(["raw", *(options.scenarios or SCENARIOS)]))
    with tempfile.TemporaryDirectory(prefix="delivery-bench-") as workdir:
        config = Config(
            events=options.events or (5_000 if options.quick else 200_000),
            runs=options.runs,
            latency_seconds=options.latency_seconds or (2.0 if options.quick else 10.0),
            latency_rate=1000,
            postgres=options.postgres,
            workdir=Path(workdir),
        )
        results = [r for name in names for r in await run_scenario(reactor, name, config)]
    baseline = results[0]
    print(table(results, baseline))
    if options.json:
        Path(options.json).write_text(json.dumps(report(results, baseline, config), indent=2))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n\n")[0])
    parser.add_argument(
        "scenarios", nargs="*", metavar="SCENARIO", help=f"of {', '.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="every scenario small")
    parser.add_argument("--runs", type=int, default=3, help="runs of each scenario")
    parser.add_argument("--events", type=int, help="events of raw and throughput scenarios")
    parser.add_argument("--latency-seconds", type=float, help="how long latency offers load")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="server for scratch DBs")
    options = parser.parse_args(argv)
    unknown = set(options.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return options


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    task.react(lambda reactor: Deferred.fromCoroutine(bench(reactor, options)))


if __name__ == "__main__":
    main()
