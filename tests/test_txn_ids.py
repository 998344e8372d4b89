"""
Transaction ids are unique per database instance and ordered within it: a new database
(a reset, a move from SQLite to PostgreSQL, a copy embedded next to the daemon) never
gives out an id a receiver may remember from another, and a service's ids keep growing
across restarts, splits and the migration of a database made before instance numbers.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted

from delivery.events import prepare, transaction_body
from delivery.store import open_store
from delivery.store._schema import (
    MAX_INSTANCE,
    POSTGRES,
    SCHEMA_VERSION,
    SQLITE,
    migrations,
    txn_id_base,
)

from .conftest import postgres_database
from .harness import event, make_service, registration, txn_id, txn_ids


@pytest.fixture(params=["sqlite", "postgres"])
def other_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A second fresh database, of either kind: the one a reset or a move makes."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'other.db'}"
    else:
        yield from postgres_database()


async def store_transactions(store: Any, count: int) -> list[int]:
    """Route ``count`` events to service ``a`` and cut one transaction of each; their ids."""
    await store.ensure_services(["a"])
    ids = (await store.insert_events(prepare([event(n) for n in range(count)]), 5.0)).stream_ids
    await store.commit_sorted(ids[-1], [("a", i) for i in ids], ())
    return [await store.store_transaction("a", i, i, 1, b"{}", 6.0, [5.0]) for i in ids]


@pytest_twisted.ensureDeferred
async def test_two_fresh_databases_give_disjoint_ids(
    db_url: str, other_url: str, reactor: Any
) -> None:
    stores = [open_store(url, reactor) for url in (db_url, other_url)]
    try:
        for store in stores:
            await store.open()
        first, second = [await store_transactions(store, 3) for store in stores]
    finally:
        for store in stores:
            await store.close()
    assert not set(first) & set(second)
    for store, ids in zip(stores, (first, second), strict=True):
        assert 1 <= store.instance < MAX_INSTANCE
        assert ids == [txn_id_base(store.instance) + n for n in (1, 2, 3)]
        assert ids[-1] < 2**53  # a JSON reader holds it exactly


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_remembers_ids_gets_every_event_from_a_new_database(
    db_url: str, other_url: str, reactor: Any, receiver: Any
) -> None:
    # ``receiver.accepted`` keeps the first transaction of each id, as a receiver that
    # persists completed ids (matrix-bot-sdk) does.
    for n, url in enumerate((db_url, other_url)):
        regs = [registration("a", receiver.url, users=".*")]
        service, recorder, _ = make_service(open_store(url, reactor), regs, reactor)
        service.startService()
        try:
            await service.submit([event(2 * n), event(2 * n + 1)])
            await recorder.wait_for_acks(1)
        finally:
            await service.stopService()
    assert len({r.txn_id for r in receiver.requests}) == 2
    assert receiver.event_ids == ["$e0", "$e1", "$e2", "$e3"]


@pytest_twisted.ensureDeferred
async def test_ids_grow_in_the_database_block_across_restart_and_split(
    db_url: str, reactor: Any, receiver: Any
) -> None:
    regs = [registration("a", receiver.url, users=".*")]
    service, recorder, _ = make_service(open_store(db_url, reactor), regs, reactor)
    service.startService()
    try:
        receiver.then(413)  # too large: its halves are sent, with new ids
        await service.submit([event(1), event(2)])
        await recorder.wait_for_acks(2)
    finally:
        await service.stopService()
    instance = service.store.instance

    service, recorder, _ = make_service(open_store(db_url, reactor), regs, reactor)
    service.startService()
    try:
        await service.submit([event(3)])
        await recorder.wait_for_acks(1)
        status = await service.status("a")
    finally:
        await service.stopService()
    assert service.store.instance == instance  # the database's number, made once
    assert [r.event_ids for r in receiver.requests] == [["$e1", "$e2"], ["$e1"], ["$e2"], ["$e3"]]
    assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1, 2, 3, 4)
    assert status.last_txn_id == txn_id(service.store, 4)


#: what delivery at schema version 2 left behind: a service DOWN with transaction 7
#: stored (event 1, to be resent with its id and body) and event 2 queued
OLD_EVENTS = prepare([event(1), event(2)])
OLD_BODY = transaction_body([OLD_EVENTS[0].json])
OLD_ROWS: list[tuple[str, Sequence[Any]]] = [
    *(
        (
            "INSERT INTO events (event_id, sender, room_id, type, state_key, json,"
            " received_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (e.event_id, r.sender, r.room_id, r.type, r.state_key, e.json, 0.0),
        )
        for e in OLD_EVENTS
        for r in (e.routing,)
    ),
    ("UPDATE sorter_position SET stream_id = 2", ()),
    ("INSERT INTO service_queue (service_id, stream_id) VALUES ('a', 2)", ()),
    (
        "INSERT INTO services (service_id, state, last_txn_id, failure_count)"
        " VALUES ('a', 'down', 7, 1)",
        (),
    ),
    (
        "INSERT INTO transactions (service_id, txn_id, body, event_count, first_stream_id,"
        " last_stream_id, created_ts, attempts) VALUES ('a', 7, ?, 1, 1, 1, 0.0, 1)",
        (OLD_BODY,),
    ),
]


def run_sql(url: str, statements: list[tuple[str, Sequence[Any]]]) -> list[Any]:
    """Run statements (``?`` placeholders) in one transaction, outside delivery: the last's rows."""
    sqlite = url.startswith("sqlite:")
    connection = (
        sqlite3.connect(url.removeprefix("sqlite:///")) if sqlite else psycopg2.connect(url)
    )
    try:
        cursor = connection.cursor()
        for sql, params in statements:
            cursor.execute(sql if sqlite else sql.replace("?", "%s"), params)
        rows = cursor.fetchall() if cursor.description else []
        connection.commit()
    finally:
        connection.close()
    return rows


def old_database(url: str, version: int, rows: list[tuple[str, Sequence[Any]]]) -> None:
    """Make the database at ``url`` as delivery at schema ``version`` made it, plus rows."""
    dialect = SQLITE if url.startswith("sqlite:") else POSTGRES
    script: list[tuple[str, Sequence[Any]]] = [
        ("CREATE TABLE schema_version (version INTEGER NOT NULL)", ()),
        (f"INSERT INTO schema_version (version) VALUES ({version})", ()),
    ]
    for v, statements in migrations(dialect, 0, instance=1):
        if v <= version:
            script += [(statement, ()) for statement in statements]
    run_sql(url, [*script, *rows])


@pytest_twisted.ensureDeferred
async def test_a_database_of_schema_2_is_moved_into_a_block_and_keeps_its_stored_ids(
    db_url: str, reactor: Any, receiver: Any
) -> None:
    old_database(db_url, 2, OLD_ROWS)
    regs = [registration("a", receiver.url, users=".*")]
    service, recorder, _ = make_service(open_store(db_url, reactor), regs, reactor)
    service.startService()
    try:
        await recorder.wait_for_acks(2)  # the stored one first, then the queued event
        await service.submit([event(3)])
        await recorder.wait_for_acks(3)
        status = await service.status("a")
    finally:
        await service.stopService()
    assert run_sql(db_url, [("SELECT version FROM schema_version", ())]) == [(SCHEMA_VERSION,)]
    assert 1 <= service.store.instance < MAX_INSTANCE
    assert [r.txn_id for r in receiver.requests] == ["7", *txn_ids(service.store, 1, 2)]
    assert receiver.requests[0].body == OLD_BODY
    assert receiver.event_ids == ["$e1", "$e2", "$e3"]
    assert status.last_txn_id == txn_id(service.store, 2)


@pytest_twisted.ensureDeferred
async def test_a_service_purged_and_registered_again_never_repeats_an_id(
    db_url: str, reactor: Any
) -> None:
    store = open_store(db_url, reactor)
    await store.open()
    try:
        before = await store_transactions(store, 3)
        await store.purge_service("a")
        await store.ensure_services(["b"])  # registered later: above the purged ids too
        await store.ensure_services(["a"])
        ids = (await store.insert_events(prepare([event(n) for n in range(3, 5)]), 5.0)).stream_ids
        await store.commit_sorted(ids[-1], [("a", ids[0]), ("b", ids[1])], ())
        again = await store.store_transaction("a", ids[0], ids[0], 1, b"{}", 6.0, [5.0])
        other = await store.store_transaction("b", ids[1], ids[1], 1, b"{}", 6.0, [5.0])
    finally:
        await store.close()
    assert again > max(before)
    assert other > max(before)
