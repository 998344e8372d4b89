"""The EventPool keeps a bounded window per service and refills it from the queue."""

from __future__ import annotations

from typing import Any

import pytest_twisted

from delivery.events import prepare
from delivery.pool import EventPool
from delivery.records import QueuedEvent

from .harness import event


async def queue_events(store: Any, count: int) -> list[QueuedEvent]:
    await store.ensure_services(["a"])
    prepared = prepare([event(n) for n in range(count)])
    ids = (await store.insert_events(prepared, 0.0)).stream_ids
    await store.commit_sorted(ids[-1], [("a", i) for i in ids], ())
    return [QueuedEvent(i, e.json) for i, e in zip(ids, prepared, strict=True)]


@pytest_twisted.ensureDeferred
async def test_the_window_is_bounded_and_refilled_in_order(store: Any) -> None:
    queued = await queue_events(store, 95)
    pool = EventPool(store, window=20)
    pool.add("a", queued)  # as the sorter would: the window takes what fits
    assert pool.pending("a") == 0  # nothing known yet: the queue is read first
    seen: list[int] = []
    while True:
        batch = await pool.batch("a", 7, 10**6)
        assert pool.pending("a") <= 20
        if not batch:
            break
        await store.store_transaction(
            "a",
            batch[0].stream_id,
            batch[-1].stream_id,
            len(batch),
            b"{}",
            0.0,
            [q.received_ts for q in batch],
        )
        pool.remove("a", len(batch))
        seen.extend(q.stream_id for q in batch)
    assert seen == list(range(1, 96))


@pytest_twisted.ensureDeferred
async def test_events_routed_while_the_window_is_full_are_read_back_later(store: Any) -> None:
    queued = await queue_events(store, 30)
    pool = EventPool(store, window=10)
    first = await pool.batch("a", 100, 10**6)
    assert [q.stream_id for q in first] == list(range(1, 11))
    pool.add("a", queued[10:])  # the window is full: these stay in the database only
    assert pool.pending("a") == 10
    await store.store_transaction("a", 1, 10, 10, b"{}", 0.0, [q.received_ts for q in first])
    pool.remove("a", 10)
    second = await pool.batch("a", 100, 10**6)
    assert [q.stream_id for q in second] == list(range(11, 21))


@pytest_twisted.ensureDeferred
async def test_full_only_waits_for_a_full_batch(store: Any) -> None:
    await queue_events(store, 5)
    pool = EventPool(store, window=100)
    assert await pool.batch("a", 10, 10**6, full_only=True) == []
    assert len(await pool.batch("a", 5, 10**6, full_only=True)) == 5
    one_event = len((await pool.batch("a", 1, 10**6))[0].json)
    assert len(await pool.batch("a", 10, 12 + 2 * one_event, full_only=True)) == 1


@pytest_twisted.ensureDeferred
async def test_events_a_refill_read_already_are_not_added_twice(store: Any) -> None:
    # On PostgreSQL a refill on another connection may read events the sorter committed
    # before the sorter hands them over: the hand-over must not add them again.
    queued = await queue_events(store, 5)
    pool = EventPool(store, window=100)
    pool.touch("a")  # (another node queued events: read the queue)
    batch = await pool.batch("a", 100, 10**6)
    assert [q.stream_id for q in batch] == [1, 2, 3, 4, 5]
    pool.add("a", queued[3:])  # the sorter's hand-over of its last commit, late
    assert pool.pending("a") == 5
    assert [q.stream_id for q in await pool.batch("a", 100, 10**6)] == [1, 2, 3, 4, 5]
