"""
The Recoverer alone (``delivery.recoverer``), with a real SQLite store, a Clock, a seeded
random generator and a ``resume`` that only records (no TransactionMaker): a DOWN
service's wait ends after the backoff's delay, or when a probe is answered 2xx (not on a
302 or a 500), or at once on retry-now; stopping cancels every timer; each state is
written to the store.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.task import Clock

from delivery._backoff import BackoffPolicy
from delivery._interfaces import IStore, SendResult
from delivery._observers import Observers
from delivery._state import ServiceHandle, State
from delivery.events import transaction_body
from delivery.records import StoredTransaction
from delivery.recoverer import Recoverer
from delivery.store import open_store
from delivery.testing import OK, RecordingObserver, ScriptedSender, failure

from .harness import registration
from .test_unit_maker import queue_events


@pytest_twisted.async_yield_fixture
async def store(tmp_path: Path, reactor: Any) -> AsyncIterator[IStore]:
    s = open_store(f"sqlite:///{tmp_path}/x.db", reactor)
    await s.open()
    await s.ensure_services(["a"])
    yield s
    await s.close()


async def stored_transaction(store: IStore) -> StoredTransaction:
    """A transaction of two events, stored for service "a" as the maker would."""
    await queue_events(store, 1, 2)
    events = await store.queued("a", 0, 10)
    body = transaction_body([e.json for e in events])
    await store.store_transaction(
        "a", events[0].stream_id, events[-1].stream_id, len(events), body, 0.0, (0.0, 0.0)
    )
    txn = await store.oldest_transaction("a")
    assert txn is not None
    return txn


class Parts:
    """One Recoverer and one service handle whose machine's effects it is."""

    def __init__(
        self,
        store: IStore,
        sender: ScriptedSender | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        self.clock = Clock()
        self.observer = RecordingObserver()
        observers = Observers()
        observers.add(self.observer)
        self.resumed: list[tuple[ServiceHandle, State]] = []
        self.recoverer = Recoverer(store, self.resume, self.clock, observers, random.Random(seed))
        self.sender = sender or ScriptedSender()
        self.handle = ServiceHandle(
            registration("a", "http://127.0.0.1:1", **options), self.sender, self.recoverer
        )

    def resume(self, handle: ServiceHandle) -> None:
        self.resumed.append((handle, handle.state))

    def fail(self, result: SendResult, txn: StoredTransaction | None) -> None:
        self.handle.machine.failed(result, txn)


@pytest_twisted.ensureDeferred
async def test_the_wait_ends_after_the_backoffs_delay_and_resumes(store: IStore) -> None:
    parts = Parts(store, probe=False, initial_delay=10.0)
    expected = BackoffPolicy.of(parts.handle.registration.options).delay(1, random.Random(0))
    assert 8.0 <= expected <= 12.0  # the seeded jitter, within ±20 %
    answer = failure(503)
    parts.fail(answer, None)
    assert parts.handle.state is State.DOWN
    assert parts.handle.failure_count == 1
    assert parts.handle.next_retry_ts == expected
    parts.clock.advance(expected - 0.01)
    assert parts.resumed == []
    parts.clock.advance(0.02)
    assert parts.resumed == [(parts.handle, State.RECOVERING)]
    assert parts.handle.next_retry_ts is None
    assert parts.observer.states == [
        ("a", "up", "down", "HTTP 503"),
        ("a", "down", "recovering", None),
    ]
    await parts.handle.recorded()
    assert (await store.services("a"))["a"].state == "recovering"


@pytest_twisted.ensureDeferred
async def test_failures_in_a_row_wait_longer_and_retry_after_is_honoured(store: IStore) -> None:
    parts = Parts(store, probe=False, initial_delay=10.0, jitter=0.0)
    parts.fail(failure(503), None)
    parts.clock.advance(10)
    assert len(parts.resumed) == 1
    parts.fail(failure(503), None)  # the retry failed: RECOVERING -> DOWN
    assert parts.handle.failure_count == 2
    parts.clock.advance(19.9)
    assert len(parts.resumed) == 1
    parts.clock.advance(0.1)
    assert len(parts.resumed) == 2
    parts.fail(failure(429, retry_after=100.0), None)  # 40 s by the backoff
    parts.clock.advance(99.9)
    assert len(parts.resumed) == 2
    parts.clock.advance(0.1)
    assert len(parts.resumed) == 3
    await parts.handle.recorded()


@pytest_twisted.ensureDeferred
async def test_probes_every_interval_and_a_2xx_ends_the_wait_at_once(store: IStore) -> None:
    txn = await stored_transaction(store)
    sender = ScriptedSender(ping_answers=[failure(500), failure(302), OK])
    parts = Parts(store, sender, initial_delay=60.0, jitter=0.0, probe_interval=5.0)
    parts.fail(failure(503), txn)
    parts.clock.advance(4.9)
    assert sender.pings == 0
    parts.clock.advance(0.1)
    assert sender.pings == 1  # a 500: the wait goes on
    assert parts.handle.state is State.DOWN
    assert parts.resumed == []
    parts.clock.advance(5)
    assert sender.pings == 2  # a 302: the wait goes on
    assert parts.handle.state is State.DOWN
    assert parts.resumed == []
    parts.clock.advance(5)
    assert sender.pings == 3  # a 200: retried at once, 45 s early
    assert parts.resumed == [(parts.handle, State.RECOVERING)]
    assert parts.handle.interrupted_until == 60.0
    assert [r.status for _, r in parts.observer.probes] == [500, 302, 200]
    # the wait's timer and the probes are over
    parts.clock.advance(1000)
    assert sender.pings == 3
    assert len(parts.resumed) == 1
    await parts.handle.recorded()


@pytest_twisted.ensureDeferred
async def test_probes_stop_before_the_retry_and_only_after_a_send_failed(store: IStore) -> None:
    txn = await stored_transaction(store)
    sender = ScriptedSender(ping_answers=[failure(500)])
    parts = Parts(store, sender, initial_delay=12.0, jitter=0.0, probe_interval=5.0)
    parts.fail(failure(503), txn)
    for step in (5, 5, 2):  # (one advance would run every call at its end's time)
        parts.clock.advance(step)
    assert sender.pings == 2  # at 5 and 10; none left before the retry at 12
    assert len(parts.resumed) == 1
    # the pipeline failed, no transaction was sent: no probe
    parts.fail(failure(503), None)
    parts.clock.advance(24)
    assert sender.pings == 2
    assert len(parts.resumed) == 2
    await parts.handle.recorded()


@pytest_twisted.ensureDeferred
async def test_retry_now_ends_the_wait_at_once(store: IStore) -> None:
    txn = await stored_transaction(store)
    parts = Parts(store, initial_delay=60.0, probe_interval=5.0)
    parts.fail(failure(503), txn)
    parts.recoverer.retry_now(parts.handle)
    assert parts.resumed == [(parts.handle, State.RECOVERING)]
    # leaving DOWN cancelled its wait: the retry timer and the probe timer
    assert parts.clock.getDelayedCalls() == []
    parts.clock.advance(1000)
    assert len(parts.resumed) == 1
    assert parts.sender.pings == 0
    await parts.handle.recorded()


@pytest_twisted.ensureDeferred
async def test_stop_cancels_every_timer(store: IStore) -> None:
    txn = await stored_transaction(store)
    parts = Parts(store, initial_delay=60.0, probe_interval=5.0)
    parts.fail(failure(503), txn)
    assert len(parts.clock.getDelayedCalls()) == 2  # the retry and the first probe
    parts.recoverer.stop_all([parts.handle])
    assert parts.clock.getDelayedCalls() == []
    parts.clock.advance(10_000)
    assert parts.resumed == []
    assert parts.sender.pings == 0
    assert parts.handle.state is State.DOWN
    await parts.handle.recorded()


@pytest_twisted.ensureDeferred
async def test_the_state_and_the_failure_are_written_to_the_store(store: IStore) -> None:
    txn = await stored_transaction(store)
    parts = Parts(store, initial_delay=10.0, jitter=0.0)
    parts.clock.advance(100)
    parts.fail(failure(503), txn)
    await parts.handle.recorded()
    record = (await store.services("a"))["a"]
    assert (record.state, record.failure_count, record.next_retry_ts) == ("down", 1, 110.0)
    assert record.last_error == "HTTP 503"
    again = await store.oldest_transaction("a")
    assert again is not None
    assert again.txn_id == txn.txn_id
    assert (again.attempts, again.last_attempt_ts, again.last_error) == (1, 100.0, "HTTP 503")
    parts.clock.advance(10)
    await parts.handle.recorded()
    assert (await store.services("a"))["a"].state == "recovering"
    parts.handle.machine.caught_up()
    assert parts.handle.failure_count == 0
    await parts.handle.recorded()
    assert (await store.services("a"))["a"].state == "up"
    assert [s[2] for s in parts.observer.states] == ["down", "recovering", "up"]
