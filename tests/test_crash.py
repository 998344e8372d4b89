"""
Crash safety, stage by stage: a new DeliveryService on the same database file picks up
whatever a crashed one left, loses nothing, resends with the same transaction id and body,
and keeps transaction ids strictly increasing per service.

Each stage of the pipeline is one database transaction, so a crash leaves the database as
it is after one of them. The first stages are produced through the store exactly as the
pipeline writes them; the last one (the receiver has the transaction, the ack was never
stored) with a real service stopped while the receiver holds its answer.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from delivery.events import prepare
from delivery.store import open_store

from .harness import event, make_service, registration, txn_id, txn_ids
from .receiver import start_receiver, stop_receiver

STAGES = ["submitted", "sorted", "stored"]


#: what a crash "after stored" left: a body spaced unlike any the pipeline would cut now,
#: so that the test can tell the stored bytes from a fresh cut of the same events
STORED_BODY = (
    b'{"events": ['
    + b", ".join(
        e.json for n, e in enumerate(prepare([event(n, sender=f"@a_{n}:hs") for n in (1, 3)]))
    )
    + b"]}"
)


async def leave_state(db_url: str, reactor: Any, stage: str) -> None:
    """Write what the pipeline has written when it crashes after ``stage``."""
    store = open_store(db_url, reactor)
    await store.open()
    try:
        await store.ensure_services(["a", "b"])
        events = prepare([event(n, sender=f"@{'a' if n % 2 else 'b'}_{n}:hs") for n in range(5)])
        ids = (await store.insert_events(events, 0.0)).stream_ids
        if stage == "submitted":
            return
        queue = [("a" if n % 2 else "b", ids[n]) for n in range(5)]
        await store.commit_sorted(ids[-1], queue, ())
        if stage == "sorted":
            return
        a_ids = [i for s, i in queue if s == "a"]
        stored = await store.store_transaction(
            "a", a_ids[0], a_ids[-1], len(a_ids), STORED_BODY, 0.0, [0.0] * len(a_ids)
        )
        assert stored == txn_id(store, 1)
    finally:
        await store.close()


def services(receiver: Any, other: Any = None) -> list[Any]:
    return [
        registration("a", receiver.url, users="@a_.*"),
        registration("b", (other or receiver).url, users="@b_.*"),
    ]


@pytest.mark.parametrize("stage", STAGES)
@pytest_twisted.ensureDeferred
async def test_a_restart_after_each_stage_delivers_everything(stage, db_url, reactor, receiver):
    other = await start_receiver(reactor)
    await leave_state(db_url, reactor, stage)
    service, recorder, _ = make_service(
        open_store(db_url, reactor), services(receiver, other), reactor
    )
    service.startService()
    try:
        await recorder.wait_for_acks(2)
        assert receiver.event_ids == ["$e1", "$e3"]
        assert other.event_ids == ["$e0", "$e2", "$e4"]
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1)
        assert [r.txn_id for r in other.requests] == txn_ids(service.store, 1)
        if stage == "stored":
            assert receiver.requests[0].body == STORED_BODY  # the exact stored bytes
        # new events after the restart get new, higher ids
        await service.submit([event(10, sender="@a_10:hs")])
        await recorder.wait_for_acks(3)
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1, 2)
    finally:
        await service.stopService()
        await stop_receiver(other)


@pytest_twisted.ensureDeferred
async def test_a_transaction_the_receiver_got_but_whose_ack_was_lost_is_resent_with_its_id(
    db_url, reactor, receiver
):
    regs = services(receiver)
    service, recorder, _ = make_service(open_store(db_url, reactor), regs, reactor)
    service.startService()
    await service.submit([event(1, sender="@a_1:hs")])
    await recorder.wait_for_acks(1)
    receiver.then(hang=True)
    await service.submit([event(2, sender="@a_2:hs"), event(3, sender="@a_3:hs")])
    await receiver.wait_for_requests(2)
    # the receiver has transaction 2; the service dies before it hears back
    await service.stopService()
    receiver.release()

    service, recorder, _ = make_service(open_store(db_url, reactor), regs, reactor)
    service.startService()
    try:
        await recorder.wait_for_acks(1)
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1, 2, 2)
        assert receiver.requests[1].body == receiver.requests[2].body
        assert receiver.event_ids == ["$e1", "$e2", "$e3"]
        await service.submit([event(4, sender="@a_4:hs")])
        await recorder.wait_for_acks(2)
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1, 2, 2, 3)
        status = await service.status("a")
        assert (status.state, status.last_txn_id, status.stored_transactions) == (
            "up",
            txn_id(service.store, 3),
            0,
        )
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_service_down_when_stopped_is_recovered_first_at_start(db_url, reactor, receiver):
    regs = [registration("a", receiver.url, users=".*", initial_delay=3600, max_delay=3600)]
    receiver.answer(500)
    service, recorder, _ = make_service(open_store(db_url, reactor), regs, reactor)
    service.startService()
    down = recorder.wait_for_state("a", "down")
    await service.submit([event(1)])
    await down
    await service.submit([event(2)])
    await service.routed()
    await service.stopService()

    receiver.answer(200)
    service, recorder, clock = make_service(open_store(db_url, reactor), regs, reactor)
    service.startService()
    try:
        up = recorder.wait_for_state("a", "up")
        await up  # at once: no waiting for the backoff or for a new event
        await recorder.wait_for_acks(2)
        assert clock.seconds() == 0
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1, 1, 2)
        assert receiver.event_ids == ["$e1", "$e2"]
    finally:
        await service.stopService()
