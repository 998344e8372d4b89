"""What the benchmark scenarios share: their configuration, results, receiver and helpers."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs
import treq
from twisted.internet.defer import Deferred, gatherResults

from delivery import DeliveryService, Registration
from delivery.store import open_store

ROOT = Path(__file__).resolve().parent.parent

SERVICE_ID = "bench"
HS_TOKEN = "bench-hs-token"
INGEST_TOKEN = "bench-ingest-token"
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

    #: events of raw, the throughput scenarios and ingest-http
    events: int
    runs: int
    latency_seconds: float
    latency_rate: int
    postgres: str
    workdir: Path
    #: events of fanout (each goes to 10 services)
    fanout_events: int = 20_000
    #: how long the receiver of recovery is down, and how many events queue meanwhile
    down_seconds: float = 30.0
    recovery_events: int = 100_000
    #: events queued for a DOWN service in backlog-memory
    backlog_events: int = 1_000_000
    #: events routed by the sorter alone in many-services
    routed_events: int = 200_000
    #: events of soak (``--events`` sets them too)
    soak_events: int = 2_000_000
    #: events of scale-out, for each number of daemons; the owners SIGKILLed and the
    #: SIGTERMs it times; the daemons' ``cluster.lease_ttl``
    scale_events: int = 200_000
    failover_kills: int = 10
    scale_handovers: int = 2
    scale_lease_ttl: float = 15.0
    progress: Progress | None = None

    @classmethod
    def sized(cls, quick: bool, **given: Any) -> Config:
        """Full size, or every scenario small (``quick``); ``given`` sizes win."""
        sizes: dict[str, Any] = (
            {
                "events": 5_000,
                "latency_seconds": 2.0,
                "fanout_events": 1_000,
                "down_seconds": 2.0,
                "recovery_events": 5_000,
                "backlog_events": 20_000,
                "routed_events": 10_000,
                "soak_events": 60_000,
                "scale_events": 6_000,
                "failover_kills": 2,
                "scale_handovers": 1,
                "scale_lease_ttl": 3.0,
            }
            if quick
            else {"events": 200_000, "latency_seconds": 10.0}
        )
        sizes.update({k: v for k, v in given.items() if v is not None})
        return cls(latency_rate=1000, **sizes)


@attrs.frozen
class Measure:
    """One number a run of a scenario gives."""

    name: str
    value: float
    unit: str


@attrs.define
class Series:
    """What a run saw over time, for ``--plot``: arrivals at the receiver and latencies."""

    #: (seconds since the run's start, events in that transaction)
    arrivals: list[tuple[float, int]] = attrs.Factory(list)
    latencies_ms: list[float] = attrs.Factory(list)

    @classmethod
    def of(cls, stats: dict[str, Any], start: float, latencies: bool = False) -> Series:
        return cls(
            [(t - start, n) for t, n in stats["arrivals"]],
            [1000 * s for s in stats["latencies"]] if latencies else [],
        )


@attrs.define
class Run:
    """The measures of one run of a scenario, and its series."""

    measures: list[Measure]
    series: Series = attrs.Factory(Series)


class Progress:
    """
    One line on standard error, redrawn in place when it is a terminal (a progress bar);
    otherwise only what is finished is printed.
    """

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._live = self._stream.isatty()
        self._label = ""
        self._drawn = 0.0

    def begin(self, label: str) -> None:
        self._label = label
        self._drawn = 0.0
        self.update(0, 1)

    def update(self, done: float, total: float) -> None:
        now = time.monotonic()
        if not self._live or (now - self._drawn < 0.2 and done < total):
            return
        self._drawn = now
        share = min(1.0, done / total) if total else 1.0
        bar = "#" * int(30 * share)
        self._stream.write(f"\r  {self._label} [{bar:<30}] {100 * share:3.0f}%")
        self._stream.flush()

    def end(self, line: str) -> None:
        if self._live:
            self._stream.write("\r\033[K")
        self._stream.write(f"  {line}\n")
        self._stream.flush()


# -- the receiver process --


class Receiver:
    """The benchmark receiver, in its own process, and how to ask it what arrived."""

    def __init__(self, process: subprocess.Popen[str], ports: list[int]) -> None:
        self._process = process
        self.urls = [f"http://127.0.0.1:{port}" for port in ports]
        self.url = self.urls[0]

    @classmethod
    def start(cls, ports: int = 1) -> Receiver:
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_receiver", "--ports", str(ports)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert process.stdout is not None
        return cls(process, json.loads(process.stdout.readline())["ports"])

    async def _post(self, path: str) -> None:
        await (await treq.post(f"{self.url}{path}")).content()

    async def reset(self) -> None:
        await self._post("/reset")

    async def down(self) -> None:
        """Answer 503 to everything from now on."""
        await self._post("/down")

    async def up(self) -> None:
        await self._post("/up")

    async def stats(self) -> dict[str, Any]:
        return await self.wait_for(0)

    async def wait_for(self, count: int) -> dict[str, Any]:
        """The receiver's statistics, once ``count`` events have arrived."""
        response = await treq.get(f"{self.url}/stats", params={"count": str(count)})
        stats: dict[str, Any] = json.loads(await response.content())
        return stats

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait()


# -- workload --


def registration(url: str, service_id: str = SERVICE_ID, **kinds: Any) -> Registration:
    return Registration.from_dict(registration_dict(url, service_id, **kinds))


def registration_dict(
    url: str,
    service_id: str = SERVICE_ID,
    users: str | None = "@bench_.*",
    rooms: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """A registration as its YAML file holds it; ``options`` are ours (``delivery:``)."""
    namespaces: dict[str, Any] = {}
    if users is not None:
        namespaces["users"] = [{"regex": users, "exclusive": True}]
    if rooms is not None:
        namespaces["rooms"] = [{"regex": rooms, "exclusive": False}]
    data: dict[str, Any] = {
        "id": service_id,
        "url": url,
        "as_token": "bench-as-token",
        "hs_token": HS_TOKEN,
        "sender_localpart": "benchbot",
        "namespaces": namespaces,
    }
    if options:
        data["delivery"] = options
    return data


def make_events(
    prefix: str, start: int, count: int, rooms: int = 0, senders: int = 0
) -> list[dict[str, Any]]:
    """
    ``count`` message events, stamped with the time they are made (``content.ts``); in
    ``rooms`` rooms (``!room<i % rooms>``) or one, from ``senders`` bridged users
    (``@bridge<i % senders>_<i>``) or one.
    """
    now = time.time()
    return [
        {
            "event_id": f"${prefix}-{i}",
            "type": "m.room.message",
            "room_id": f"!room{i % rooms}:example.org" if rooms else "!bench:example.org",
            "sender": (
                f"@bridge{i % senders}_{i}:example.org" if senders else "@bench_user:example.org"
            ),
            "content": {"msgtype": "m.text", "body": f"benchmark message {i}", "ts": now},
        }
        for i in range(start, start + count)
    ]


def batches(prefix: str, total: int, size: int, **kinds: int) -> Iterator[list[dict[str, Any]]]:
    """The events, made a batch at a time (a million at once would weigh on memory)."""
    for i in range(0, total, size):
        yield make_events(prefix, i, min(size, total - i), **kinds)


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


@asynccontextmanager
async def running(
    reactor: Any, store_url: str, registrations: list[Registration], **kwargs: Any
) -> AsyncIterator[DeliveryService]:
    service = DeliveryService(
        open_store(store_url, reactor), registrations, reactor=reactor, **kwargs
    )
    service.startService()
    try:
        await service.started()
        yield service
    finally:
        await service.stopService()


#: batches a producer has submitted and not yet seen committed, at most (as the load
#: process of ingest-http keeps requests in flight)
IN_FLIGHT = 4


async def submit_all(
    service: DeliveryService, work: Iterable[list[dict[str, Any]]], total: int, config: Config
) -> None:
    """Submit batch after batch, with at most IN_FLIGHT of them not committed yet."""
    done = 0
    pending: deque[Deferred[list[int]]] = deque()
    for batch in work:
        if len(pending) == IN_FLIGHT:
            await pending.popleft()
        pending.append(service.submit(batch))
        done += len(batch)
        if config.progress is not None:
            config.progress.update(done, total)
    await gatherResults(pending)


def sqlite_url(config: Config, name: str) -> str:
    return f"sqlite:///{config.workdir / name}.db"


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
