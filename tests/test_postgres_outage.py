"""
PostgreSQL going away in the middle of delivery: nothing lost, nothing out of order, and
the daemon says so once, in plain words, rather than with tracebacks.
"""

from __future__ import annotations

import gc
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import task, threads
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from zope.interface import implementer

from delivery.daemon import Daemon
from delivery.errors import StoreUnavailableError
from delivery.store import PostgresStore, open_store
from delivery.store._connections import RECONNECT, Pool
from delivery.store._sql import EVENTS_CHANNEL

from .daemon_harness import INGEST, Running, start_daemon, write_config, write_registration
from .harness import event, make_service, registration
from .test_postgres import until


def _admin(postgres_url: str) -> Any:
    """A connection to the server's ``postgres`` database, to act on the test's."""
    connection = psycopg2.connect(postgres_url.rsplit("/", 1)[0] + "/postgres")
    connection.autocommit = True
    return connection


def _name(postgres_url: str) -> str:
    return postgres_url.rsplit("/", 1)[1]


async def make_read_only(postgres_url: str, on: bool = True) -> None:
    """
    Make every new session of the test's database read-only (as an operator, or a standby,
    does), or writable again, and end the sessions it has (in a thread: it waits for them).
    """

    def alter() -> None:
        admin = _admin(postgres_url)
        try:
            with admin.cursor() as cursor:
                setting = " SET default_transaction_read_only = on" if on else " RESET ALL"
                cursor.execute(f"ALTER DATABASE {_name(postgres_url)}{setting}")
        finally:
            admin.close()
        _terminate_backends(postgres_url)

    await threads.deferToThread(alter)


def _terminate_backends(postgres_url: str, keep_out: bool = False) -> int:
    """
    Kill every connection to the test's database, as a server restart does, and wait until
    they are gone. With ``keep_out`` the database refuses connections until :func:`_let_in`,
    as a server that takes a while to come back does.
    """
    admin = _admin(postgres_url)
    killed = 0
    try:
        with admin.cursor() as cursor:
            if keep_out:
                cursor.execute(f"ALTER DATABASE {_name(postgres_url)} ALLOW_CONNECTIONS false")
            # Twice: a connection the daemon was making as the door closed gets in late.
            for attempt in range(2 if keep_out else 1):
                if attempt:
                    time.sleep(0.05)
                cursor.execute(
                    "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (_name(postgres_url),),
                )
                done = [row[0] for row in cursor.fetchall()]
                assert all(done), "a backend outlived pg_terminate_backend"
                killed += len(done)
    finally:
        admin.close()
    return killed


def _let_in(postgres_url: str) -> None:
    admin = _admin(postgres_url)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"ALTER DATABASE {_name(postgres_url)} ALLOW_CONNECTIONS true")
    finally:
        admin.close()


def _notify(postgres_url: str) -> None:
    """Announce new events as another process's ingest does."""
    connection = psycopg2.connect(postgres_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"NOTIFY {EVENTS_CHANNEL}")
        connection.commit()
    finally:
        connection.close()


async def _answers(reactor: Any, store: Any, timeout: float = 15) -> None:
    """Wait until the store answers a ping."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await store.ping()
            return
        except StoreUnavailableError:
            if time.monotonic() > deadline:
                raise
        await task.deferLater(reactor, 0.02, lambda: None)


async def _settled(reactor: Any, service: Any, service_id: str, timeout: float = 15) -> Any:
    """Wait until the service is UP with nothing queued or stored; its status then."""
    deadline = time.monotonic() + timeout
    while True:
        status = await service.status(service_id)
        if (status.state, status.queued_events, status.stored_transactions) == ("up", 0, 0):
            return status
        assert time.monotonic() < deadline, f"never settled: {status}"
        await task.deferLater(reactor, 0.02, lambda: None)


@implementer(ILogObserver)
class Log:
    """Every event logged while a test runs."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def tracebacks(self) -> list[str]:
        """What was logged with a traceback: unhandled errors, failures."""
        gc.collect()  # a Deferred that failed with no one to tell logs it when collected
        return [
            f"{e.get('log_format')}: {e['log_failure'].getTraceback()}"
            for e in self.events
            if "log_failure" in e
        ]

    def count(self, level: LogLevel, start: str) -> int:
        """How many messages of this level began so."""
        return sum(
            1
            for e in self.events
            if e.get("log_level") == level and str(e.get("log_format", "")).startswith(start)
        )


@pytest.fixture
def logged() -> Iterator[Log]:
    log = Log()
    globalLogPublisher.addObserver(log)
    try:
        yield log
    finally:
        globalLogPublisher.removeObserver(log)


@pytest_twisted.ensureDeferred
async def test_losing_the_database_mid_delivery_loses_nothing(
    postgres_url: str, reactor: Any, receiver: Any, logged: Log
) -> None:
    regs = [
        registration(
            "a",
            receiver.url,
            users=".*",
            max_events=10,
            initial_delay=0.05,
            max_delay=0.2,
            probe_interval=0.05,
        )
    ]
    service, _, _ = make_service(
        open_store(postgres_url, reactor), regs, reactor, clock=reactor, poll_interval=0.05
    )
    service.startService()
    await service.started()
    submitted = 0
    refused = 0
    outages = 0

    async def submit(batch: list[dict[str, Any]]) -> None:
        nonlocal refused
        while True:  # as a producer does: retry what was not acknowledged
            try:
                await service.submit(batch)
                return
            except StoreUnavailableError:
                refused += 1
                await task.deferLater(reactor, 0.02, lambda: None)

    started = time.monotonic()
    try:
        for round_ in range(6):
            for _ in range(5):
                await submit([event(n) for n in range(submitted, submitted + 7)])
                submitted += 7
            # Every other outage lasts a while: the server refuses connections meanwhile.
            lasting = round_ % 2 == 1
            outages += _terminate_backends(postgres_url, keep_out=lasting) > 0
            # The next operation finds out (and /health answers 503).
            with pytest.raises(StoreUnavailableError):
                await service.store.ping()
            if lasting:
                # Ingest is refused while the database is away: nothing is acknowledged.
                with pytest.raises(StoreUnavailableError):
                    await service.submit([event(submitted)])
                refused += 1
                with pytest.raises(StoreUnavailableError):
                    await service.store.ping()
                await task.deferLater(reactor, 0.3, lambda: None)
                _let_in(postgres_url)
        await until(
            reactor, lambda: len(receiver.event_ids) >= submitted, "every event", timeout=60
        )
        await _answers(reactor, service.store)
        # UP, with nothing left queued or stored (the last acknowledgement is recorded).
        status = await _settled(reactor, service, "a")
        # Every connection comes back (some wait out their backoff), and the log says so.
        await until(
            reactor,
            lambda: (
                logged.count(LogLevel.info, "reconnected to PostgreSQL")
                == logged.count(LogLevel.warn, "lost the connection to PostgreSQL")
            ),
            "the end of the last outage logged",
        )
    finally:
        _let_in(postgres_url)
        await service.stopService()
    assert time.monotonic() - started < 30
    assert outages == 6
    assert refused >= 3
    assert status.failure_count == 0
    # everything, once each, in order; a resend only ever repeats a transaction id
    assert receiver.event_ids == [f"$e{n}" for n in range(submitted)]
    bodies: dict[str, bytes] = {}
    for request in receiver.ok:
        assert bodies.setdefault(request.txn_id, request.body) == request.body
    txn_ids = [int(r.txn_id) for r in receiver.accepted]
    assert txn_ids == sorted(txn_ids)
    seen = [e for r in receiver.accepted for e in json.loads(r.body)["events"]]
    assert len(seen) == submitted
    # Said plainly: no tracebacks, and the store's warning once per outage.
    assert logged.tracebacks() == []
    # (An outage that begins before every connection is back from the last is the same.)
    warned = logged.count(LogLevel.warn, "lost the connection to PostgreSQL")
    assert 1 <= warned <= outages
    assert logged.count(LogLevel.info, "reconnected to PostgreSQL") == warned


@pytest_twisted.ensureDeferred
async def test_the_listener_listens_again_after_an_outage(
    postgres_url: str, reactor: Any, logged: Log
) -> None:
    store = open_store(postgres_url, reactor)
    await store.open()
    woken: list[None] = []
    store.on_new_events(lambda: woken.append(None))
    try:
        _notify(postgres_url)
        await until(reactor, lambda: len(woken) == 1, "a notification")
        _terminate_backends(postgres_url, keep_out=True)
        await task.deferLater(reactor, 0.3, lambda: None)
        assert len(woken) == 1
        _let_in(postgres_url)
        # Back, it looks for events at once: notifications sent meanwhile were lost ...
        await until(reactor, lambda: len(woken) == 2, "a wake-up on reconnecting")
        # ... and listens again.
        _notify(postgres_url)
        await until(reactor, lambda: len(woken) == 3, "a notification after the outage")
    finally:
        _let_in(postgres_url)
        await store.close()
    assert logged.tracebacks() == []


@pytest_twisted.ensureDeferred
async def test_reconnects_wait_as_the_backoff_policy_says(postgres_url: str, reactor: Any) -> None:
    """
    A connection that cannot get back tries at once, then waits as the one backoff policy
    says (0.2 s doubling to 5 s, jittered, never past 5 s), measured on the clock and
    jittered by the generator it is given: the same generator, the same waits.
    """
    clock = task.Clock()
    lost: list[object] = []
    failed: list[object] = []
    pool = Pool(
        postgres_url,
        reactor,
        1,
        on_lost=lost.append,
        on_retry_failed=failed.append,
        on_back=lambda: None,
        on_notify=lambda channel, payload: None,
        clock=clock,
        rng=random.Random(7),
    )
    await pool.connect()

    def wait() -> float:
        """The wait before the next attempt, which is all the clock holds."""
        (call,) = clock.getDelayedCalls()
        return call.getTime() - clock.seconds()

    def attempt() -> None:
        """Let the clock reach the next attempt."""
        (call,) = clock.getDelayedCalls()
        clock.rightNow = call.getTime()
        clock.advance(0)

    waits: list[float] = []
    try:
        _terminate_backends(postgres_url, keep_out=True)
        await until(reactor, lambda: bool(lost), "the connection lost")
        assert wait() == 0  # the first attempt at once
        for n in range(1, 9):
            attempt()
            await until(reactor, lambda: len(failed) > len(waits), f"attempt {n} refused")
            waits.append(wait())
    finally:
        _let_in(postgres_url)
        pool.close()
    same = random.Random(7)
    assert waits == pytest.approx([RECONNECT.delay(n, same) for n in range(1, 9)])
    bases = [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    for got, base in zip(waits, bases, strict=True):
        assert base * 0.8 <= got <= min(base * 1.2, 5.0)
    assert len(set(waits[-3:])) == 3  # jittered at the cap too


@pytest_twisted.ensureDeferred
async def test_an_operation_left_unanswered_is_abandoned(postgres_url: str, reactor: Any) -> None:
    store = PostgresStore(postgres_url, reactor, timeout=0.5)
    await store.open()
    blocker = psycopg2.connect(postgres_url)
    try:
        with blocker.cursor() as cursor:
            cursor.execute("LOCK TABLE sorter_position IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreUnavailableError, match=r"unavailable: no answer within 0\.5 s"):
            await store.sorter_position()
        blocker.rollback()
        # Its connection was dropped and made again; the pool carries on.
        await _answers(reactor, store)
        assert await store.sorter_position() == 0
    finally:
        blocker.close()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_the_daemons_database_timeout_bounds_an_unanswered_ingest(
    tmp_path: Path, postgres_url: str, reactor: Any, receiver: Any
) -> None:
    config = write_config(
        tmp_path,
        [write_registration(tmp_path, "a", receiver.url)],
        database=postgres_url,
        database_timeout=0.5,
    )
    running = await start_daemon(config, reactor)
    blocker = psycopg2.connect(postgres_url)
    try:
        # In a thread: the lock waits for the daemon's reads in flight, which need the reactor.
        await threads.deferToThread(
            blocker.cursor().execute, "LOCK TABLE events IN ACCESS EXCLUSIVE MODE"
        )
        status, body = await running.request(
            "POST", "/v1/events", {"events": [event(1)]}, token=INGEST
        )
        assert (status, body["errcode"]) == (503, "M_UNAVAILABLE"), body
        assert "no answer within 0.5 s" in body["error"], body
        blocker.rollback()
        assert await running.ingest([event(1)]) == [1]
    finally:
        blocker.close()
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_the_daemon_answers_503_while_the_database_is_away(
    tmp_path: Path, postgres_url: str, reactor: Any, receiver: Any
) -> None:
    config = write_config(
        tmp_path, [write_registration(tmp_path, "a", receiver.url)], database=postgres_url
    )
    running = await start_daemon(config, reactor)
    try:
        await running.ingest([event(1)])
        _terminate_backends(postgres_url, keep_out=True)
        try:
            status, body = await running.request(
                "POST", "/v1/events", {"events": [event(2)]}, token=INGEST
            )
            assert (status, body["errcode"]) == (503, "M_UNAVAILABLE"), body
            assert (await running.request("GET", "/health", token=None))[0] == 503
        finally:
            _let_in(postgres_url)
        await _answers(reactor, running.daemon.delivery.store)
        assert (await running.request("GET", "/health", token=None))[0] == 200
        await running.ingest([event(2)])  # the producer retries what was refused
        await receiver.wait_for_events(2)
        assert receiver.event_ids == ["$e1", "$e2"]
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_health_answers_503_while_the_daemon_cannot_reach_the_database_to_start(
    tmp_path: Path, postgres_url: str, reactor: Any, receiver: Any, logged: Log
) -> None:
    config = write_config(
        tmp_path, [write_registration(tmp_path, "a", receiver.url)], database=postgres_url
    )
    _terminate_backends(postgres_url, keep_out=True)  # the database refuses us at first
    daemon = Daemon(config, reactor=reactor)
    try:
        daemon.startService()
        assert daemon.web.listening is not None
        port = (await daemon.web.listening).getHost().port  # type: ignore[attr-defined]
        running = Running(daemon, f"http://127.0.0.1:{port}")
        status, body = await running.request("GET", "/health", token=None)
        assert (status, body["errcode"]) == (503, "M_UNAVAILABLE"), body
        assert body["error"] == "the database is not open (the service is starting, or stopped)"
        assert logged.tracebacks() == []
    finally:
        _let_in(postgres_url)
    await daemon.delivery.started()
    try:
        assert (await running.request("GET", "/health", token=None))[0] == 200
    finally:
        await daemon.stopService()
