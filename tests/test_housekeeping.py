"""
Housekeeping (``delivery.housekeeping`` and ``store._retention``), on both stores: every
condition that keeps an event's row keeps it, what may go goes at the next pass, ids are
remembered for the dedupe window and forgotten after it, and what later reads an event
(splitting, dead letters, redrive) still works when the rows around it are gone.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from delivery import DeliveryService, Housekeeping, PassResult
from delivery._interfaces import IStore
from delivery._observers import Observers
from delivery.events import prepare
from delivery.housekeeping import Housekeeper
from delivery.store import open_store
from delivery.testing import OK, ScriptedSender, failure

from .harness import event, make_service, registration


async def ingest(store: IStore, numbers: list[int], now: float) -> list[int]:
    ingested = await store.insert_events(prepare([event(n) for n in numbers]), now)
    return ingested.stream_ids


async def event_rows(store: Any) -> list[str]:
    """The ids of the events whose rows are kept, in stream order."""
    found: list[str] = []
    after = 0
    while batch := await store.events_after(after, 1000):
        found += [e.event.event_id for e in batch]
        after = batch[-1].stream_id
    return found


async def sweep(store: IStore, cutoff: float, dedupe_cutoff: float, limit: int = 1000) -> int:
    """A whole pass of deleting events, as the housekeeper runs it; how many went."""
    deleted = 0
    cursor: int | None = 0
    while cursor is not None:
        n, cursor = await store.delete_events(cursor, limit, cutoff, dedupe_cutoff)
        deleted += n
    return deleted


@pytest_twisted.ensureDeferred
async def test_each_condition_keeps_an_event_and_the_rest_goes(store: Any) -> None:
    await store.ensure_services(["a", "b", "c"])
    s = await ingest(store, [1, 2, 3, 4, 5], now=10.0)
    young = await ingest(store, [6], now=100.0)
    unrouted = await ingest(store, [7], now=10.0)
    # e1 queued for a; e2 in a transaction stored for b; e3 a dead letter of c; e4 and e5
    # were delivered (no row needs them); e6 is young; e7 the sorter is not past yet
    queue = [("a", s[0]), ("b", s[1]), ("c", s[2]), ("a", s[3]), ("a", s[4])]
    await store.commit_sorted(young[0], queue, ())
    await store.store_transaction("b", s[1], s[1], 1, b"{}", 20.0, [10.0], [s[1]])
    rejected = await store.store_transaction("c", s[2], s[2], 1, b"{}", 20.0, [10.0], [s[2]])
    body = [(f"$e{3}", json.dumps(event(3)).encode())]
    await store.dead_letter("c", rejected, body, 400, "no", 21.0)
    done = await store.store_transaction("a", s[3], s[4], 2, b"{}", 20.0, [10.0] * 2, s[3:5])
    await store.complete_transaction("a", done, 22.0)
    assert unrouted[0] > young[0]

    assert await sweep(store, cutoff=50.0, dedupe_cutoff=0.0) == 2
    assert await event_rows(store) == ["$e1", "$e2", "$e3", "$e6", "$e7"]
    # nothing more goes while the rest is needed, young, or not routed
    assert await sweep(store, cutoff=50.0, dedupe_cutoff=0.0) == 0

    # once nothing needs them any more, they go too (the young one once it is old)
    await store.complete_transaction("b", txn_id_of(await store.transactions("b", 0, 10)), 30.0)
    await store.discard("c", None)
    queued = await store.store_transaction("a", s[0], s[0], 1, b"{}", 30.0, [10.0], [s[0]])
    await store.complete_transaction("a", queued, 31.0)
    assert await sweep(store, cutoff=50.0, dedupe_cutoff=0.0) == 3
    assert await event_rows(store) == ["$e6", "$e7"]
    assert await sweep(store, cutoff=101.0, dedupe_cutoff=0.0) == 1
    assert await event_rows(store) == ["$e7"]


def txn_id_of(transactions: list[Any]) -> int:
    (only,) = transactions
    return int(only.txn_id)


@pytest_twisted.ensureDeferred
async def test_an_event_in_a_stored_transactions_range_is_kept(store: Any) -> None:
    # A transaction stored before positions were kept with it (schema < 5) is split by
    # looking its events up by id: every event in its range stays while it is stored.
    await store.ensure_services(["a", "b"])
    s = await ingest(store, [1, 2, 3], now=10.0)
    await store.commit_sorted(s[2], [("a", s[0]), ("b", s[1]), ("a", s[2])], ())
    await store.store_transaction("a", s[0], s[2], 2, b"{}", 20.0, [10.0] * 2)
    done = await store.store_transaction("b", s[1], s[1], 1, b"{}", 20.0, [10.0], [s[1]])
    await store.complete_transaction("b", done, 21.0)
    assert await sweep(store, cutoff=50.0, dedupe_cutoff=0.0) == 0
    assert await event_rows(store) == ["$e1", "$e2", "$e3"]


@pytest_twisted.ensureDeferred
async def test_ids_are_remembered_for_the_window_and_forgotten_after(store: Any) -> None:
    await store.ensure_services(["a"])
    (first,) = await ingest(store, [1], now=10.0)
    await store.commit_sorted(first, [], ())
    assert await sweep(store, cutoff=50.0, dedupe_cutoff=0.0) == 1
    assert await event_rows(store) == []
    # a resubmit within the window: its first position, nothing stored
    again = await store.insert_events(prepare([event(1), event(2)]), 60.0)
    assert again.stream_ids[0] == first
    assert again.stream_ids[1] > first
    assert await event_rows(store) == ["$e2"]
    # the window ends: the id is forgotten, and a resubmit is a new event
    assert await store.prune_seen(10.5, 100) == 1
    later = await store.insert_events(prepare([event(1)]), 70.0)
    assert later.stream_ids[0] > again.stream_ids[1]


@pytest_twisted.ensureDeferred
async def test_an_id_older_than_the_window_is_not_kept(store: Any) -> None:
    await store.ensure_services(["a"])
    (first,) = await ingest(store, [1], now=10.0)
    await store.commit_sorted(first, [], ())
    assert await sweep(store, cutoff=50.0, dedupe_cutoff=20.0) == 1
    assert await store.prune_seen(1000.0, 100) == 0  # nothing was kept
    (again,) = (await store.insert_events(prepare([event(1)]), 60.0)).stream_ids
    assert again > first


@pytest_twisted.ensureDeferred
async def test_events_no_service_wants_go_as_they_are_routed(db_url: str, reactor: Any) -> None:
    store = open_store(db_url, reactor)
    wanted = registration("a", "http://127.0.0.1:1", users="@bridge_.*")
    service, _, _ = make_service(store, [wanted], reactor, senders={"a": ScriptedSender()})
    service.startService()
    try:
        await service.started()
        ids = await service.submit([event(1), event(2, sender="@bridge_x:hs"), event(3)])
        await service.routed()
        assert await event_rows(store) == ["$e2"]
        # their ids are kept: a resubmit is still recognised
        assert await service.submit([event(1), event(3)]) == [ids[0], ids[2]]
        await service.routed()
        assert await event_rows(store) == ["$e2"]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_pass_on_the_clock_deletes_what_is_old_and_keeps_the_rest(
    db_url: str, reactor: Any
) -> None:
    options = Housekeeping(retention=60.0, dedupe_window=120.0, interval=30.0, pace=0.0)
    down = ScriptedSender([failure(503)])
    service, recorder, clock = make_service(
        open_store(db_url, reactor),
        [
            registration("up", "http://127.0.0.1:1", users="@.*", exclusive=False),
            registration("down", "http://127.0.0.1:1", users="@bob.*", exclusive=False),
        ],
        reactor,
        senders={"up": ScriptedSender(), "down": down},
        housekeeping=options,
    )
    store = service.store
    service.startService()
    try:
        await service.started()
        await service.submit([event(1), event(2, sender="@bob:hs"), event(3)])
        await recorder.wait_for(
            lambda: (
                any(s[:3] == ("down", "up", "down") for s in recorder.states)
                and sum(r.ok for _, _, r in recorder.results) >= 1
            )
        )
        assert await service.housekeep() == PassResult()  # all younger than 60 s
        clock.advance(61)  # (a pass this starts runs before the one asked for below)
        await service.housekeep()
        assert await event_rows(store) == ["$e2"]  # in down's stored transaction
        assert recorder.deleted == {"events": 2}
        # the ids are forgotten once the window is over
        clock.advance(121)
        await service.housekeep()
        assert recorder.deleted == {"events": 2, "seen_events": 2}
        size, rows = service.database_stats or (0, {})
        assert size > 0
        assert set(rows) >= {"events", "seen_events", "service_queue", "attempts"}
        if db_url.startswith("sqlite"):  # (PostgreSQL's are estimates, updated later)
            assert (rows["events"], rows["seen_events"], rows["transactions"]) == (1, 0, 1)
    finally:
        await service.stopService()


def test_dedupe_window_below_retention_is_refused() -> None:
    with pytest.raises(ValueError, match=r"dedupe_window .* must be at least retention"):
        Housekeeping(retention=3600.0, dedupe_window=60.0)
    with pytest.raises(ValueError, match="retention must be a positive number"):
        Housekeeping(retention=0)
    with pytest.raises(ValueError, match="pace must be a number of seconds >= 0"):
        Housekeeping(pace=-1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Housekeeping(batch_size=1.5)  # type: ignore[arg-type]


def test_the_service_takes_its_housekeeping(reactor: Any, tmp_path: Any) -> None:
    options = Housekeeping(retention=5.0, dedupe_window=5.0)
    service = DeliveryService(
        open_store(f"sqlite:///{tmp_path / 'x.db'}", reactor), [], housekeeping=options
    )
    assert service._housekeeper.options is options


@pytest_twisted.ensureDeferred
async def test_bisect_and_redrive_work_after_the_events_around_them_went(
    db_url: str, reactor: Any
) -> None:
    mode = ["down"]

    def answer(txn: Any) -> Any:
        if mode[0] == "down":
            return failure(503)
        if mode[0] == "reject" and b"$e3" in txn.body:
            return failure(400)
        return OK

    sender = ScriptedSender(answer)
    service, recorder, clock = make_service(
        open_store(db_url, reactor),
        [
            registration("a", "http://127.0.0.1:1", users="@alice.*", reject_attempts=1),
            registration("b", "http://127.0.0.1:1", users="@.*", exclusive=False),
        ],
        reactor,
        senders={"a": sender, "b": ScriptedSender()},
        housekeeping=Housekeeping(retention=60.0, dedupe_window=60.0, pace=0.0),
    )
    store = service.store
    service.startService()
    try:
        await service.started()
        # alice's events (a and b want them) between carol's (b alone wants them)
        carol = [event(n, sender="@carol:hs") for n in (0, 2, 4, 6, 8, 9)]
        alice = [event(n, sender="@alice:hs") for n in (1, 3, 5, 7)]
        await service.submit(sorted(carol + alice, key=lambda e: int(e["event_id"][2:])))
        await recorder.wait_for(
            lambda: (
                ("a", "up", "down", "HTTP 503") in recorder.states
                and sum(1 for s, _, r in recorder.results if s == "b" and r.ok) >= 1
            )
        )
        clock.advance(61)
        await service.housekeep()
        # a's stored transaction holds e1 to e7: what lies in its range is kept
        assert await event_rows(store) == [f"$e{n}" for n in range(1, 8)]

        mode[0] = "reject"
        await service.retry_now("a")
        await recorder.wait_for(lambda: service.state_of("a") == "up")
        (letter,) = await service.dead_letters("a")
        assert letter.event_id == "$e3"
        delivered = [json.loads(t.body)["events"] for t in sender.transactions]
        ok = [
            e["event_id"]
            for t, r in zip(sender.transactions, delivered, strict=True)
            for e in r
            if b"$e3" not in t.body
        ]
        assert ok == ["$e1", "$e5", "$e7"]

        clock.advance(61)
        await service.housekeep()
        assert await event_rows(store) == ["$e3"]  # a dead letter's event stays

        mode[0] = "ok"
        assert await service.redrive("a") == 1
        await recorder.wait_for(
            lambda: any(b'"$e3"' in t.body and t.event_count == 1 for t in sender.transactions[-1:])
        )
        last = sender.transactions[-1]
        assert json.loads(last.body)["events"] == [event(3, sender="@alice:hs")]
        await recorder.wait_for(lambda: recorder.results[-1][2].ok)
        clock.advance(61)
        await service.housekeep()
        assert await event_rows(store) == []
    finally:
        await service.stopService()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # (SQLite: one connection)
@pytest_twisted.ensureDeferred
async def test_a_move_committed_while_a_batch_reads_keeps_the_event(
    store: Any, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    An event moves from a dead letter back to a queue (a redrive) in a transaction of its
    own, on another connection, which commits just after the batch has read the queues:
    what holds the event is read in one snapshot, so the batch still sees it held.
    """
    import psycopg2

    from delivery.store import postgres

    await store.ensure_services(["a"])
    (s,) = await ingest(store, [1], now=10.0)
    await store.commit_sorted(s, [("a", s)], ())
    txn = await store.store_transaction("a", s, s, 1, b"{}", 20.0, [10.0], [s])
    await store.dead_letter("a", txn, [("$e1", b"{}")], 400, "no", 21.0)

    mover = psycopg2.connect(db_url)
    cursor = mover.cursor()
    cursor.execute("INSERT INTO service_queue (service_id, stream_id) VALUES ('a', %s)", (s,))
    cursor.execute("DELETE FROM dead_letters WHERE service_id = 'a'")
    execute = postgres._execute

    async def then_commit(cur: Any, op: Any, before: list[str]) -> Any:
        result = await execute(cur, op, before)
        if "FROM service_queue" in getattr(op, "sql", "") and not mover.closed:
            mover.commit()  # the redrive lands between this statement and the next
            mover.close()
        return result

    monkeypatch.setattr(postgres, "_execute", then_commit)
    try:
        assert await sweep(store, cutoff=50.0, dedupe_cutoff=0.0) == 0
    finally:
        if not mover.closed:
            mover.close()
    assert await event_rows(store) == ["$e1"]
    assert [q.stream_id for q in await store.queued("a", 0, 10)] == [s]


@pytest_twisted.ensureDeferred
async def test_purging_a_service_frees_its_dead_letters_events(store: Any) -> None:
    await store.ensure_services(["a", "gone"])
    s = await ingest(store, [1, 2], now=10.0)
    await store.commit_sorted(s[1], [("gone", s[0]), ("gone", s[1])], ())
    txn = await store.store_transaction("gone", s[0], s[0], 1, b"{}", 20.0, [10.0], [s[0]])
    await store.dead_letter("gone", txn, [("$e1", b"{}")], 400, "no", 21.0)
    assert await sweep(store, cutoff=50.0, dedupe_cutoff=0.0) == 0  # both held
    assert await store.purge_service("gone") == (1, 0, 1)
    assert await store.dead_letters("gone", 0, 10) == []
    assert await sweep(store, cutoff=50.0, dedupe_cutoff=0.0) == 2
    assert await event_rows(store) == []


@pytest_twisted.ensureDeferred
async def test_pages_free_for_a_whole_interval_go_back_to_the_file_system(store: Any) -> None:
    # What a pass frees is reused by the writes that follow; what the next pass finds still
    # free (the database holds less than it did) it gives back, and the file shrinks.
    clock = Clock()
    options = Housekeeping(retention=60.0, dedupe_window=60.0, interval=30.0, pace=0.0)
    keeper = Housekeeper(store, options, clock, Observers())
    big = {"body": "x" * 2000}
    peak = await store.insert_events(prepare([event(n, content=big) for n in range(1, 2001)]), 10.0)
    await store.commit_sorted(peak.stream_ids[-1], [], ())
    size_at_peak, _ = await store.database_stats()
    clock.advance(100.0)
    first = await keeper.run_pass()
    assert (first.events, first.pages) == (2000, 0)  # nothing was free before it
    free = await store.free_pages()
    if store.dialect.name == "postgres":  # autovacuum's business
        assert free == 0
        assert await store.reclaim_pages(100) == 0
        return
    assert free > 1000  # 2,000 events of 2 kB
    assert (await store.database_stats())[0] == size_at_peak
    # writes between the passes take some of the free pages back
    later = await store.insert_events(
        prepare([event(n, content=big) for n in range(3001, 3201)]), 100.0
    )
    await store.commit_sorted(later.stream_ids[-1], [], ())
    leftover = await store.free_pages()
    assert 0 < leftover < free
    second = await keeper.run_pass()
    assert (second.events, second.pages) == (0, leftover)  # the 200 are younger than 60 s
    assert await store.free_pages() == 0
    size, rows = await store.database_stats()
    assert size <= size_at_peak - leftover * 4096
    assert rows["events"] == 200
    assert len(await event_rows(store)) == 200  # what is kept is intact


@pytest_twisted.ensureDeferred
async def test_an_sqlite_database_made_without_incremental_vacuum_reuses_its_pages(
    tmp_path: Any, reactor: Any
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as older:  # as a database created before schema 5 is
        older.execute("CREATE TABLE made_before (x)")
    store = open_store(f"sqlite:///{path}", reactor)
    await store.open()
    try:
        ids = await ingest(store, list(range(1, 501)), now=10.0)
        await store.commit_sorted(ids[-1], [], ())
        assert await sweep(store, cutoff=50.0, dedupe_cutoff=50.0) == 500
        assert await store.free_pages() == 0  # none can be given back: SQLite reuses them
        assert await store.reclaim_pages(100) == 0
    finally:
        await store.close()
