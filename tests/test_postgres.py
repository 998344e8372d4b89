"""
What only PostgreSQL has to get right: ingest from several connections committing out of
order, NOTIFY across processes, migrations racing, and the database going away.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import DeferredList

from delivery.errors import (
    InvalidStoreURLError,
    StoreConfigurationError,
    StoreUnavailableError,
)
from delivery.events import prepare
from delivery.store import PostgresStore, SchemaTooNewError, _sql, open_store
from delivery.store._schema import SCHEMA_VERSION
from delivery.store._sql import INGEST_LOCK

from .harness import event, make_service, registration


@pytest.fixture
def sql(postgres_url: str) -> Iterator[Any]:
    """A plain psycopg2 connection to the test's database, outside delivery."""
    connection = psycopg2.connect(postgres_url)
    yield connection
    connection.rollback()
    connection.close()


async def until(reactor: Any, condition: Any, what: str, timeout: float = 15) -> None:
    """Poll ``condition()`` every few milliseconds of real time until it holds."""
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await task.deferLater(reactor, 0.005, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


def test_open_store_reads_postgres_urls() -> None:
    store = open_store("postgresql://delivery:secret@db.example:6543/events?sslmode=require")
    assert isinstance(store, PostgresStore)
    assert "secret" not in repr(store)
    assert repr(store) == (
        "<PostgresStore postgresql://delivery:***@db.example:6543/events?sslmode=require>"
    )
    assert isinstance(open_store("postgres://u@h/d"), PostgresStore)
    with pytest.raises(InvalidStoreURLError, match="names no database") as info:
        open_store("postgresql://u:hunter2@h:5432/")
    assert "hunter2" not in str(info.value)


@pytest_twisted.ensureDeferred
async def test_an_unreachable_server_is_a_clear_error(reactor: Any) -> None:
    store = open_store("postgresql://nobody@127.0.0.1:1/nothing", reactor)
    with pytest.raises(
        StoreUnavailableError,
        match=r"cannot connect to PostgreSQL at postgresql://nobody@127\.0\.0\.1:1/nothing",
    ):
        await store.open()
    await store.close()


def _with(url: str, user: str | None = None, database: str | None = None) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{user}:hunter2@{host}" if user else parts.netloc
    return urlunsplit(
        parts._replace(netloc=netloc, path=f"/{database}" if database else parts.path)
    )


@pytest.mark.parametrize(
    ("user", "database", "message"),
    [
        ("nobody", None, 'role "nobody" does not exist; create it, or fix its name'),
        (None, "no_such_database", 'database "no_such_database" does not exist; create it'),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_connection_refused_for_good_fails_at_once_in_one_line(
    postgres_url: str, reactor: Any, user: str | None, database: str | None, message: str
) -> None:
    url = _with(postgres_url, user, database)
    store = open_store(url, reactor)
    with pytest.raises(StoreConfigurationError, match=message) as info:
        await store.open()
    await store.close()
    assert "\n" not in str(info.value)
    assert "hunter2" not in str(info.value)
    assert "FATAL" not in str(info.value)
    # the service does not wait for it to heal: its clock never moves here, and it has
    # given up all the same
    service, _, clock = make_service(
        open_store(url, reactor), [registration("a", "http://127.0.0.1:1")], reactor
    )
    service.startService()
    with pytest.raises(StoreConfigurationError, match=message):
        await service.started()
    assert clock.seconds() == 0
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_processes_starting_together_migrate_once(
    postgres_url: str, reactor: Any, sql: Any
) -> None:
    stores = [open_store(postgres_url, reactor) for _ in range(4)]
    try:
        results = await DeferredList([s.open() for s in stores], consumeErrors=True)
        assert all(ok for ok, _ in results), results
    finally:
        for s in stores:
            await s.close()
    with sql.cursor() as cursor:
        cursor.execute("SELECT version FROM schema_version")
        assert cursor.fetchall() == [(SCHEMA_VERSION,)]


@pytest_twisted.ensureDeferred
async def test_a_database_from_a_newer_version_is_refused(
    postgres_url: str, reactor: Any, sql: Any
) -> None:
    with sql.cursor() as cursor:
        cursor.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        cursor.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION + 1,))
    sql.commit()
    store = open_store(postgres_url, reactor)
    try:
        with pytest.raises(SchemaTooNewError, match="upgrade delivery"):
            await store.open()
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_lower_stream_id_committed_after_a_higher_one_is_never_skipped(
    postgres_url: str, reactor: Any, receiver: Any, sql: Any
) -> None:
    """
    Another process's ingest transaction takes its stream id and is slow to commit; ours
    comes after it. Stream ids must not be committed out of order: the sorter would route
    ours, move its position past the other one's id, and never see that event.
    """
    service, _, _ = make_service(
        open_store(postgres_url, reactor), [registration("a", receiver.url, users=".*")], reactor
    )
    service.startService()
    try:
        await service.started()
        slow = prepare([event(1)])[0]
        with sql.cursor() as cursor:
            # the other process: its ingest transaction, as the store writes it, not committed
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (INGEST_LOCK,))
            cursor.execute(
                "INSERT INTO events (event_id, sender, room_id, type, json, received_ts)"
                " VALUES (%s, %s, %s, %s, %s, 0) RETURNING stream_id",
                ("$e1", "@alice:hs", "!room:hs", "m.room.message", slow.json),
            )
            (slow_id,) = cursor.fetchone()
        ours = service.submit([event(2)])
        # ours must wait for the other transaction (or, without the lock, it would commit now)
        with psycopg2.connect(postgres_url) as watcher, watcher.cursor() as cursor:

            def waiting() -> bool:
                cursor.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
                return bool(ours.called or cursor.fetchone()[0])

            await until(reactor, waiting, "our ingest to wait or commit")
        await service.routed()
        sql.commit()  # the lower id commits last
        ids = await ours
        assert ids[0] > slow_id
        await service.routed()
        await receiver.wait_for_events(2)
        assert receiver.event_ids == ["$e1", "$e2"]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_notify_wakes_the_sorter_of_another_process(
    postgres_url: str, reactor: Any, receiver: Any
) -> None:
    # The service polls once an hour (on a clock nobody advances): only NOTIFY can wake it.
    service, _, clock = make_service(
        open_store(postgres_url, reactor),
        [registration("a", receiver.url, users=".*")],
        reactor,
        poll_interval=3600,
    )
    service.startService()
    other = open_store(postgres_url, reactor)  # another process's store
    try:
        await service.started()
        await other.open()
        await other.insert_events(prepare([event(1), event(2)]), 0.0)
        await receiver.wait_for_events(2)
        assert receiver.event_ids == ["$e1", "$e2"]
        assert clock.seconds() == 0
    finally:
        await other.close()
        await service.stopService()


def _explained(steps: Any) -> Any:
    """An operation that asks PostgreSQL how it would run ``steps``' first statement."""
    query = next(steps)
    plan = yield _sql.Query("EXPLAIN " + query.sql, query.params)
    return "\n".join(line for (line,) in plan)


@pytest_twisted.ensureDeferred
async def test_a_long_queue_is_read_in_index_order_before_statistics_are_gathered(
    postgres_url: str, sql: Any, reactor: Any
) -> None:
    """
    A young database has no statistics: the planner reckons any range small, and chose a
    bitmap scan that read a service's whole queue and sorted it for every window of
    1,000 events (40 ms with 40,000 queued, growing with the queue). The store's reads
    walk the index in order and stop at the limit.
    """
    store = PostgresStore(postgres_url, reactor)
    await store.open()
    try:
        with sql.cursor() as cursor:
            for table in ("events", "service_queue"):
                cursor.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
            cursor.execute(
                "INSERT INTO events (event_id, json, received_ts)"
                " SELECT 'e' || g, '{}', 0 FROM generate_series(1, 40000) g"
            )
            cursor.execute(
                "INSERT INTO service_queue SELECT 'a', g FROM generate_series(1, 40000) g"
            )
            cursor.execute("SELECT reltuples FROM pg_class WHERE relname = 'service_queue'")
            assert cursor.fetchone() == (-1,)  # never analyzed
        sql.commit()
        queue = await store._run(_explained, _sql.queued("a", 20000, 1000))
        events = await store._run(_explained, _sql.events_after(20000, 1000))
        for plan in (queue, events):
            assert not [word for word in ("Bitmap", "Sort") if word in plan], plan
            assert all(word in plan for word in ("Index", "Limit")), plan
    finally:
        await store.close()
