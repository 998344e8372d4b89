"""
Reloading registrations while events stream in: a changed registration takes its new
settings without breaking order, losing an event or sending a transaction twice under
different ids, on both stores and against a real receiver.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg2
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList, gatherResults

from delivery.store import open_store

from .harness import event, make_service, registration
from .receiver import Receiver
from .test_postgres import until


def check_delivery(receiver: Receiver, expected: list[str]) -> None:
    """
    Every event reached the receiver in stream order; transaction ids grew; a transaction
    seen twice was the same id with the same body.
    """
    bodies: dict[str, bytes] = {}
    order: list[str] = []
    for request in receiver.ok:
        if request.txn_id in bodies:
            assert bodies[request.txn_id] == request.body, f"txn {request.txn_id} changed body"
            continue
        bodies[request.txn_id] = request.body
        order.append(request.txn_id)
    assert [int(t) for t in order] == sorted(int(t) for t in order), "transactions out of order"
    delivered = [e["event_id"] for t in order for e in json.loads(bodies[t])["events"]]
    assert delivered == expected


@pytest_twisted.ensureDeferred
async def test_reloads_under_load_keep_order_and_ids(db_url: str, reactor: Any, receiver):
    batches, size = 60, 100
    regs = [registration("a", receiver.url, users="@alice:.*", max_events=n) for n in (100, 99)]
    store = open_store(db_url, reactor)
    service, recorder, _ = make_service(store, [regs[0]], reactor)
    service.startService()
    try:
        reloads: list[Deferred[Any]] = []
        submits: list[Deferred[Any]] = []
        positions: dict[int, str] = {}

        def note(stream_ids: list[int], b: int) -> None:
            positions.update((p, f"$e{b * size + i}") for i, p in enumerate(stream_ids))

        for b in range(batches):
            submits.append(
                service.submit([event(b * size + i) for i in range(size)]).addCallback(note, b)
            )
            # Reloads overlap each other and the loop's own cuts and sends.
            reloads.append(service.reload([regs[(b + 1) % 2]]))
            if b % 4 == 3:
                await gatherResults(submits)
                submits.clear()
        await gatherResults(submits)
        results = await DeferredList(reloads, consumeErrors=True)
        assert all(ok for ok, _ in results), [r for ok, r in results if not ok]
        await receiver.wait_for(lambda: _count(receiver) >= batches * size)
        check_delivery(receiver, [positions[p] for p in sorted(positions)])
        # Each acknowledged once its deletion committed.
        await recorder.wait_for_acks(len({r.txn_id for r in receiver.ok}))
        assert [s for s in recorder.states if s[2] == "down"] == []
        status = await service.status("a")
        assert (status.state, status.queued_events, status.stored_transactions) == ("up", 0, 0)
    finally:
        await service.stopService()


def _count(receiver: Receiver) -> int:
    seen: dict[str, int] = {}
    for request in receiver.ok:
        seen[request.txn_id] = len(request.event_ids)
    return sum(seen.values())


@pytest_twisted.ensureDeferred
async def test_a_service_readded_while_its_old_loop_stores_starts_from_what_it_stored(
    postgres_url: str, reactor: Any, receiver
):
    # The old loop is held inside cut(): its transaction waits for the transactions
    # table, which another connection holds. The service is removed and added again meanwhile;
    # the new one must start once the old loop has ended, from the transaction it stored.
    reg = registration("a", receiver.url, users=".*")
    store = open_store(postgres_url, reactor)
    service, recorder, _ = make_service(store, [reg], reactor)
    service.startService()
    holder = psycopg2.connect(postgres_url)
    try:
        await service.started()
        with holder.cursor() as cursor:
            cursor.execute("LOCK TABLE transactions IN EXCLUSIVE MODE")
        await service.submit([event(n) for n in range(3)])
        with psycopg2.connect(postgres_url) as watcher, watcher.cursor() as cursor:

            def storing() -> bool:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
                return bool(cursor.fetchone()[0])

            await until(reactor, storing, "the loop to wait for the table")
        await service.reload([])
        readded = service.reload([reg])
        up = recorder.wait_for_state("a", "up")  # after recovering what the old loop stored
        holder.rollback()  # the old loop's transaction commits now
        await readded
        await up
        (request,) = receiver.ok
        assert request.event_ids == ["$e0", "$e1", "$e2"]
        assert [s for s in recorder.states if s[2] == "down"] == []
        status = await service.status("a")
        assert (status.state, status.queued_events, status.stored_transactions) == ("up", 0, 0)
    finally:
        holder.close()
        await service.stopService()
