"""
The TransactionMaker alone (``delivery.transactions``), with an EventPool over a real
SQLite store, a ScriptedSender and a Clock; the machine's effects only record (the
Recoverer is not there): events queued in the store are cut into transactions of at most
``max_events``, each stored before it is sent and deleted after a 2xx; a failure turns
the service DOWN; a RECOVERING service sends what is stored first, oldest first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.task import Clock

from delivery._interfaces import IStore
from delivery._observers import Observers
from delivery._state import ServiceHandle, State
from delivery.events import prepare
from delivery.pool import EventPool
from delivery.store import open_store
from delivery.testing import OK, RecordingObserver, ScriptedSender, failure
from delivery.transactions import TransactionMaker

from .harness import event, registration
from .test_unit_machine import RecordingEffects


@pytest_twisted.async_yield_fixture
async def store(tmp_path: Path, reactor: Any) -> AsyncIterator[IStore]:
    s = open_store(f"sqlite:///{tmp_path}/x.db", reactor)
    await s.open()
    await s.ensure_services(["a"])
    yield s
    await s.close()


async def queue_events(store: IStore, first: int, count: int, now: float = 0.0) -> list[int]:
    """Store events ``first`` .. ``first + count - 1`` and route them all to service "a"."""
    ingested = await store.insert_events(
        prepare([event(n) for n in range(first, first + count)]), now
    )
    await store.commit_sorted(max(ingested.stream_ids), [("a", s) for s in ingested.stream_ids], [])
    return ingested.stream_ids


class Parts:
    """One maker and one service handle, as the service would build them."""

    def __init__(
        self, store: IStore, sender: ScriptedSender, state: State = State.UP, **options: Any
    ) -> None:
        self.clock = Clock()
        self.observer = RecordingObserver()
        observers = Observers()
        observers.add(self.observer)
        self.maker = TransactionMaker(store, EventPool(store), self.clock, observers)
        self.effects = RecordingEffects()
        self.sender = sender
        self.handle = ServiceHandle(
            registration("a", "http://127.0.0.1:1", **options), sender, self.effects, state=state
        )

    async def run(self) -> None:
        """Kick the service's loop and wait until it ends."""
        self.maker.kick(self.handle)
        if self.handle.loop is not None:
            await self.handle.loop


@pytest_twisted.ensureDeferred
async def test_queued_events_go_in_transactions_of_at_most_max_events(store: IStore) -> None:
    stream_ids = await queue_events(store, 1, 5)
    parts = Parts(store, ScriptedSender(), max_events=2)
    await parts.run()
    sent = parts.sender.transactions
    assert [t.event_count for t in sent] == [2, 2, 1]
    assert [(t.first_stream_id, t.last_stream_id) for t in sent] == [
        (stream_ids[0], stream_ids[1]),
        (stream_ids[2], stream_ids[3]),
        (stream_ids[4], stream_ids[4]),
    ]
    ids = [t.txn_id for t in sent]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    assert [r.ok for _, _, r in parts.observer.results] == [True, True, True]
    # every one answered 2xx is forgotten
    assert await store.oldest_transaction("a") is None
    assert (await store.summary("a")).queued_events == 0
    assert parts.handle.state is State.UP
    assert parts.effects.calls == []


@pytest_twisted.ensureDeferred
async def test_a_transaction_is_stored_before_it_is_sent_and_deleted_after_a_2xx(
    store: IStore,
) -> None:
    await queue_events(store, 1, 3)
    parts = Parts(store, ScriptedSender())
    txn = await parts.maker.cut(parts.handle)
    assert txn is not None
    assert txn.event_count == 3
    assert parts.sender.transactions == []
    stored = await store.oldest_transaction("a")
    assert stored is not None
    assert (stored.txn_id, stored.body) == (txn.txn_id, txn.body)
    assert (await store.summary("a")).queued_events == 0
    assert await parts.maker.deliver(parts.handle, txn)
    assert parts.sender.transactions == [txn]
    assert parts.handle.completing is not None
    await parts.handle.completing
    assert await store.oldest_transaction("a") is None
    assert parts.observer.results == [("a", txn, OK)]


@pytest_twisted.ensureDeferred
async def test_a_failed_send_keeps_the_transaction_and_turns_the_service_down(
    store: IStore,
) -> None:
    await queue_events(store, 1, 3)
    answer = failure(503)
    parts = Parts(store, ScriptedSender([answer]), max_events=2)
    await parts.run()
    (sent,) = parts.sender.transactions  # the loop ends at the failure
    assert parts.handle.state is State.DOWN
    assert parts.effects.calls == [("down", parts.handle, State.UP, answer, sent, State.DOWN)]
    assert parts.observer.results == [("a", sent, answer)]
    stored = await store.oldest_transaction("a")
    assert stored is not None
    assert stored.txn_id == sent.txn_id
    # a DOWN service's loop does not start
    parts.maker.kick(parts.handle)
    assert parts.handle.loop is None
    assert len(parts.sender.transactions) == 1


@pytest_twisted.ensureDeferred
async def test_recovering_gives_the_oldest_stored_transaction_first(store: IStore) -> None:
    await queue_events(store, 1, 4)
    parts = Parts(store, ScriptedSender(), state=State.RECOVERING, max_events=2)
    first = await parts.maker.cut(parts.handle)
    second = await parts.maker.cut(parts.handle)
    assert first is not None
    assert second is not None
    assert first.txn_id < second.txn_id
    txn = await parts.maker.next_transaction(parts.handle)
    assert txn is not None
    assert (txn.txn_id, txn.body) == (first.txn_id, first.body)
    assert not parts.handle.replayed


@pytest_twisted.ensureDeferred
async def test_recovering_resends_the_stored_then_full_batches_then_is_up(store: IStore) -> None:
    await queue_events(store, 1, 7)
    parts = Parts(store, ScriptedSender(), state=State.RECOVERING, max_events=2)
    stored = [await parts.maker.cut(parts.handle) for _ in range(2)]
    assert all(t is not None for t in stored)
    await parts.run()
    sent = parts.sender.transactions
    # the two stored, with their ids; a full batch cut while recovering; the rest once UP
    assert [t.txn_id for t in sent[:2]] == [t.txn_id for t in stored if t is not None]
    assert [t.event_count for t in sent] == [2, 2, 2, 1]
    ids = [t.txn_id for t in sent]
    assert ids == sorted(ids)
    assert len(set(ids)) == 4
    assert parts.effects.calls == [("up", parts.handle, State.UP)]
    assert parts.handle.state is State.UP
    assert await store.oldest_transaction("a") is None
