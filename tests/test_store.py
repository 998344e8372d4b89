"""The store on a real SQLite file: schema, atomic batches, idempotent ingest, invariants."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList

from delivery.errors import InvalidStoreURLError
from delivery.events import prepare
from delivery.records import Ingested
from delivery.store import SchemaTooNewError, SQLiteStore, _sql, open_store
from delivery.store._schema import SCHEMA_VERSION

from .harness import event, txn_id


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "names no file"),
        ("sqlite://host/x.db", "has no host"),
        ("mysql://localhost/x", "unknown kind 'mysql'"),
        ("delivery.db", "unknown kind ''"),
    ],
)
def test_open_store_rejects_urls_it_cannot_use(url: str, message: str) -> None:
    with pytest.raises(InvalidStoreURLError, match=message):
        open_store(url)


def test_open_store_reads_relative_and_absolute_sqlite_paths() -> None:
    relative = open_store("sqlite:///data/delivery.db")
    absolute = open_store("sqlite:////var/lib/delivery.db")
    assert isinstance(relative, SQLiteStore)
    assert isinstance(absolute, SQLiteStore)
    assert relative.path == "data/delivery.db"
    assert absolute.path == "/var/lib/delivery.db"


@pytest_twisted.ensureDeferred
async def test_migrations_run_once_and_the_file_is_in_wal_mode(
    sqlite_url: str, reactor: Any
) -> None:
    path = sqlite_url.removeprefix("sqlite:///")
    for _ in range(2):
        store = open_store(sqlite_url, reactor)
        await store.open()
        await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


@pytest_twisted.ensureDeferred
async def test_a_database_from_a_newer_version_is_refused(tmp_path: Path, reactor: Any) -> None:
    path = tmp_path / "new.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    store = open_store(f"sqlite:///{path}", reactor)
    with pytest.raises(SchemaTooNewError, match="upgrade delivery"):
        await store.open()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_insert_events_is_idempotent_on_event_id(store: Any) -> None:
    first = await store.insert_events(prepare([event(1), event(2)]), 10.0)
    again = await store.insert_events(prepare([event(3), event(2), event(3)]), 20.0)
    assert first == Ingested([1, 2], after=0)
    assert again == Ingested([3, 2, 3], after=2)
    stored = await store.events_after(0, 10)
    assert [(s.stream_id, s.event.event_id, s.received_ts) for s in stored] == [
        (1, "$e1", 10.0),
        (2, "$e2", 10.0),
        (3, "$e3", 20.0),
    ]


@pytest_twisted.ensureDeferred
async def test_sorting_and_cutting_keep_the_queue_consistent(store: Any) -> None:
    await store.ensure_services(["a"])
    ids = (await store.insert_events(prepare([event(n) for n in range(5)]), 0.0)).stream_ids
    await store.commit_sorted(ids[-1], [("a", i) for i in ids], ())
    assert await store.sorter_position() == 5
    queued = await store.queued("a", 0, 3)
    assert [q.stream_id for q in queued] == [1, 2, 3]
    assert await store.store_transaction("a", 1, 3, 3, b"body", 1.0, [0.0] * 3) == txn_id(store, 1)
    assert [q.stream_id for q in await store.queued("a", 0, 10)] == [4, 5]
    summary = await store.summary("a")
    assert (summary.queued_events, summary.stored_transactions) == (2, 1)
    # a cut that does not match the queue is refused, and changes nothing
    with pytest.raises(RuntimeError, match="expected 3"):
        await store.store_transaction("a", 4, 5, 3, b"body", 1.0, [0.0] * 3)
    assert [q.stream_id for q in await store.queued("a", 0, 10)] == [4, 5]
    assert (await store.services())["a"].last_txn_id == txn_id(store, 1)
    await store.complete_transaction("a", txn_id(store, 1), 2.0)
    assert await store.oldest_transaction("a") is None
    assert await store.store_transaction("a", 4, 5, 2, b"more", 3.0, [0.0] * 2) == txn_id(store, 2)


@pytest_twisted.ensureDeferred
async def test_failures_are_recorded_on_the_transaction_and_the_service(store: Any) -> None:
    await store.ensure_services(["a"])
    ids = (await store.insert_events(prepare([event(1)]), 0.0)).stream_ids
    await store.commit_sorted(ids[-1], [("a", ids[0])], ())
    first = await store.store_transaction("a", 1, 1, 1, b"body", 1.0, [0.0])
    await store.record_failure("a", first, 5.0, "HTTP 500", 1, 6.0)
    await store.record_failure("a", first, 7.0, "connection refused", 2, 9.0)
    txn = await store.oldest_transaction("a")
    assert (txn.attempts, txn.first_attempt_ts, txn.last_attempt_ts, txn.last_error) == (
        2,
        5.0,
        7.0,
        "connection refused",
    )
    assert txn.body == b"body"
    record = (await store.services())["a"]
    assert (record.failure_count, record.next_retry_ts, record.last_error) == (
        2,
        9.0,
        "connection refused",
    )


@pytest_twisted.ensureDeferred
async def test_one_service_record_is_read_alone(store: Any) -> None:
    await store.ensure_services(["a", "b", "c"])
    await store.set_state("b", "down")
    assert sorted(await store.services()) == ["a", "b", "c"]
    only = await store.services("b")
    assert list(only) == ["b"]
    assert only["b"].state == "down"
    assert await store.services("nobody") == {}


@pytest_twisted.ensureDeferred
async def test_asking_to_enable_records_a_disabled_service_enabled_and_nothing_else(
    store: Any,
) -> None:
    await store.ensure_services(["off", "down"])
    await store.set_state("off", "disabled")
    await store.set_state("down", "down")
    for service_id in ("off", "down", "nobody"):
        await store.ask(service_id, "enable")
    await store.ask("down", "retry")
    await store.ask("down", "rewind")
    states = {i: r.state for i, r in (await store.services()).items()}
    assert states == {"off": "recovering", "down": "down"}
    with pytest.raises(ValueError, match="cannot ask for 'purge': only enable, retry, rewind"):
        await store.ask("down", "purge")


@pytest_twisted.ensureDeferred
async def test_the_newest_stream_id_is_that_of_the_newest_event_kept(store: Any) -> None:
    assert await store.newest_stream_id() == 0
    ingested = await store.insert_events(prepare([event(1), event(2)]), 10.0)
    assert await store.newest_stream_id() == max(ingested.stream_ids) > 0


def test_what_is_asked_is_read_back_and_nonsense_is_anything() -> None:
    assert _sql.asked(_sql.asked_payload("svc", "enable")) == ("svc", "enable")
    assert _sql.asked_payload("x" * 8000, "retry") == ""  # too long for a NOTIFY
    for payload in (
        None,
        "",
        "[]",
        "{",
        '{"service": 1, "action": "retry"}',
        '{"service": "a", "action": "purge"}',
    ):
        assert _sql.asked(payload) is None


@pytest_twisted.ensureDeferred
async def test_sqlite_operations_asked_together_commit_together_and_fail_alone(
    tmp_path: Path, reactor: Any
) -> None:
    """Group commit: one transaction for what waits, a savepoint for each operation."""
    store = SQLiteStore(str(tmp_path / "group.db"), reactor)
    await store.open()

    def fails_halfway(service_id: str) -> Any:
        yield _sql.Query("INSERT INTO services (service_id, state) VALUES (?, 'up')", (service_id,))
        raise ValueError("halfway")

    try:
        # Asked for in one turn of the reactor: one group, one transaction.
        asked: list[Deferred[Any]] = [
            store.ensure_services(["a"]),
            store.insert_events(prepare([event(1)]), 0.0),
            store._run(fails_halfway, "b"),
            store.insert_events(prepare([event(2)]), 0.0),
            store.ensure_services(["c"]),
        ]
        outcomes: list[tuple[bool, Any]] = await DeferredList(asked, consumeErrors=True)
        assert [ok for ok, _ in outcomes] == [True, True, False, True, True]
        assert outcomes[2][1].check(ValueError)
        assert sorted(await store.services()) == ["a", "c"]
        assert [s.event.event_id for s in await store.events_after(0, 10)] == ["$e1", "$e2"]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_values_that_array_literals_must_escape_come_back_as_given(store: Any) -> None:
    awkward = ['a"b', "c\\d", "NULL", "x,y}{", "é\n'\t", " ", '\\"\\\\']
    events = [
        {"event_id": f"${text}", "sender": text, "room_id": text, "type": text, "state_key": ""}
        for text in awkward
    ]
    prepared = prepare(events)
    await store.insert_events(prepared, 1.5)
    stored = await store.events_after(0, 100)
    assert [s.event for s in stored] == prepared
    assert [s.received_ts for s in stored] == [1.5] * len(awkward)
