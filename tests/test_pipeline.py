"""
The delivery pipeline end to end, against a real HTTP receiver on 127.0.0.1: Synapse's
application-service sender scenarios, and what we promise beyond them.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from zope.interface import implementer

from delivery._interfaces import ISender
from delivery.events import prepare
from delivery.matrix import ConnectionPool, MatrixSender
from delivery.store import open_store

from .harness import event, make_service, registration, started, txn_id, txn_ids
from .receiver import start_receiver, stop_receiver
from .waiting import Conditions


@pytest_twisted.ensureDeferred
async def test_one_event_is_sent_at_once_with_matrix_headers(db_url, reactor, receiver):
    service, recorder, _ = started(
        db_url, reactor, [registration("a", receiver.url, users="@alice:.*")]
    )
    try:
        assert await service.submit([event(1)]) == [1]
        await recorder.wait_for_acks(1)
        (request,) = receiver.requests
        assert request.txn_id == str(txn_id(service.store, 1))
        assert request.event_ids == ["$e1"]
        assert request.events[0] == event(1)
        assert request.headers["authorization"] == ["Bearer hs-secret-token"]
        assert request.headers["content-type"] == ["application/json"]
        assert request.args == {}  # the token in the header only (no legacy_authorization)
        status = await service.status("a")
        assert status.state == "up"
        assert status.stored_transactions == 0
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_legacy_authorization_also_puts_the_token_in_the_query(db_url, reactor, receiver):
    # (off by default: the test above sees no query; on, the header still goes too)
    regs = [
        registration("a", receiver.url, users="@alice:.*", legacy_authorization=True),
        registration("b", receiver.url, users="@bob:.*"),
    ]
    service, recorder, _ = started(db_url, reactor, regs)
    try:
        await service.submit([event(1), event(2, sender="@bob:hs")])
        await recorder.wait_for(lambda: len(recorder.results) == 2)
        pinged = await service.ping("a", "p-1")
        by_service = {
            tuple(r.event_ids): r for r in receiver.requests
        }  # (the order of the two services' first sends is theirs)
        legacy, plain = by_service[("$e1",)], by_service[("$e2",)]
        assert legacy.args == {"access_token": ["hs-secret-token"]}
        assert legacy.headers["authorization"] == ["Bearer hs-secret-token"]
        assert plain.args == {}
        assert receiver.pings[-1].args == {"access_token": ["hs-secret-token"]}
        assert pinged.ok
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_events_arriving_during_a_send_go_into_the_next_transaction(
    db_url, reactor, receiver
):
    receiver.then(hang=True)
    service, _, _ = started(db_url, reactor, [registration("a", receiver.url, users=".*")])
    try:
        await service.submit([event(1)])
        await receiver.wait_for_requests(1)
        for n in range(2, 6):
            await service.submit([event(n)])
        await service.routed()
        receiver.finish_held(200)
        await receiver.wait_for_events(5)
        assert [r.event_ids for r in receiver.requests] == [
            ["$e1"],
            ["$e2", "$e3", "$e4", "$e5"],
        ]
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1, 2)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_250_events_go_as_100_100_50(db_url, reactor, receiver):
    service, _, _ = started(db_url, reactor, [registration("a", receiver.url, users=".*")])
    try:
        await service.submit([event(n) for n in range(250)])
        await receiver.wait_for_events(250)
        assert [len(r.event_ids) for r in receiver.requests] == [100, 100, 50]
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1, 2, 3)
        assert receiver.event_ids == [f"$e{n}" for n in range(250)]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_max_bytes_cuts_transactions_by_size(db_url, reactor, receiver):
    big = "x" * 1000
    service, _, _ = started(
        db_url, reactor, [registration("a", receiver.url, users=".*", max_bytes=3500)]
    )
    try:
        await service.submit([event(n, content={"body": big}) for n in range(7)])
        await receiver.wait_for_events(7)
        sizes = [len(r.body) for r in receiver.requests]
        assert all(size <= 3500 for size in sizes)
        assert [len(r.event_ids) for r in receiver.requests] == [3, 3, 1]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_event_larger_than_max_bytes_is_sent_alone(db_url, reactor, receiver):
    service, _, _ = started(
        db_url, reactor, [registration("a", receiver.url, users=".*", max_bytes=500)]
    )
    try:
        await service.submit([event(0), event(1, content={"body": "y" * 800}), event(2)])
        await receiver.wait_for_events(3)
        assert [r.event_ids for r in receiver.requests] == [["$e0"], ["$e1"], ["$e2"]]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_services_have_independent_queues(db_url, reactor, receiver):
    other = await start_receiver(reactor)
    other.answer(hang=True)
    service, _, _ = started(
        db_url,
        reactor,
        [registration("a", receiver.url, users=".*"), registration("b", other.url, users=".*")],
    )
    try:
        for n in range(3):
            await service.submit([event(n)])
            await receiver.wait_for_events(n + 1)
        assert receiver.event_ids == ["$e0", "$e1", "$e2"]
        assert len(other.requests) == 1  # b has its first transaction in flight, hanging
        assert (await service.status("b")).queued_events == 2
    finally:
        await service.stopService()
        await stop_receiver(other)


@pytest_twisted.ensureDeferred
async def test_events_go_only_where_they_are_wanted(db_url, reactor, receiver):
    other = await start_receiver(reactor)
    service, _, _ = started(
        db_url,
        reactor,
        [
            registration("a", receiver.url, users="@a_.*"),
            registration("b", other.url, rooms="!b:.*"),
        ],
    )
    try:
        await service.submit(
            [
                event(1, sender="@a_1:hs"),
                event(2, room="!b:hs"),
                event(3, sender="@a_1:hs", room="!b:hs"),
                event(4, sender="@nobody:hs"),
                event(5, sender="@x:hs", type="m.room.member", state_key="@a_2:hs"),
            ]
        )
        await receiver.wait_for_events(3)
        await other.wait_for_events(2)
        await service.routed()
        assert receiver.event_ids == ["$e1", "$e3", "$e5"]
        assert other.event_ids == ["$e2", "$e3"]
    finally:
        await service.stopService()
        await stop_receiver(other)


@pytest_twisted.ensureDeferred
async def test_a_failure_marks_the_service_down_and_recovery_resends_the_same_transaction(
    db_url, reactor, receiver
):
    receiver.answer(500, body=b'{"error":"boom"}')
    service, recorder, clock = started(
        db_url, reactor, [registration("a", receiver.url, users=".*")]
    )
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        status = await service.status("a")
        assert status.state == "down"
        assert status.stored_transactions == 1
        assert status.failure_count == 1
        assert "HTTP 500" in (status.last_error or "")
        assert status.next_retry is not None
        assert 0.8 <= status.next_retry - clock.seconds() <= 1.2
        (txn,) = await service.store.transactions("a", 0, 10)
        assert txn.attempts == 1
        assert "HTTP 500" in (txn.last_error or "")

        receiver.answer(200)
        up = recorder.wait_for_state("a", "up")
        clock.advance(status.next_retry - clock.seconds())
        await up
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1, 1)
        assert receiver.requests[0].body == receiver.requests[1].body
        assert receiver.event_ids == ["$e1"]
        status = await service.status("a")
        assert (status.state, status.stored_transactions, status.last_error) == ("up", 0, None)
        assert status.last_success is not None
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_while_down_no_transactions_are_cut_and_recovery_sends_oldest_first_then_full_batches(
    db_url, reactor, receiver
):
    receiver.answer(503)
    service, recorder, _ = started(
        db_url, reactor, [registration("a", receiver.url, users=".*", max_events=10)]
    )
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(0)])
        await down
        await service.submit([event(n) for n in range(1, 36)])
        await service.routed()
        status = await service.status("a")
        assert (status.stored_transactions, status.queued_events) == (1, 35)
        assert len(receiver.requests) == 1

        receiver.answer(200)
        up = recorder.wait_for_state("a", "up")
        await service.retry_now("a")
        await up
        await recorder.wait_for_acks(5)
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1, 1, 2, 3, 4, 5)
        assert [len(r.event_ids) for r in receiver.requests[1:]] == [1, 10, 10, 10, 5]
        assert receiver.event_ids == [f"$e{n}" for n in range(36)]
        # UP came once the stored transaction and the full batches were through
        transitions = [(old, new) for _, old, new, _ in recorder.states]
        assert transitions == [("up", "down"), ("down", "recovering"), ("recovering", "up")]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_backoff_doubles_to_the_maximum_with_jitter(db_url, reactor, receiver):
    receiver.answer(500)
    service, recorder, clock = started(
        db_url,
        reactor,
        [registration("a", receiver.url, users=".*", initial_delay=1, max_delay=40, probe=False)],
    )
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        waits = []
        for _ in range(9):
            status = await service.status("a")
            assert status.next_retry is not None
            wait = status.next_retry - clock.seconds()
            waits.append(wait)
            down = recorder.wait_for_state("a", "down")
            clock.advance(wait)
            await down
        bases = [1, 2, 4, 8, 16, 32, 40, 40, 40]
        for wait, base in zip(waits, bases, strict=True):
            assert base * 0.8 <= wait <= min(base * 1.2, 40), (waits, bases)
        assert len({round(w, 6) for w in waits}) == len(waits)  # jittered, not exact
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1) * 10
        status = await service.status("a")
        assert status.failure_count == 10
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_retry_after_is_honoured_up_to_the_maximum(db_url, reactor, receiver):
    receiver.then(429, headers={"Retry-After": "120"})
    receiver.then(503, headers={"Retry-After": "100000"})
    service, recorder, clock = started(
        db_url, reactor, [registration("a", receiver.url, users=".*", max_delay=600, probe=False)]
    )
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        status = await service.status("a")
        assert status.next_retry - clock.seconds() == 120
        down = recorder.wait_for_state("a", "down")
        clock.advance(120)
        await down
        status = await service.status("a")
        assert status.next_retry - clock.seconds() == 600
        up = recorder.wait_for_state("a", "up")
        clock.advance(600)
        await up
        assert receiver.event_ids == ["$e1"]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_retry_now_skips_the_wait(db_url, reactor, receiver):
    receiver.then(500)
    service, recorder, clock = started(
        db_url,
        reactor,
        [registration("a", receiver.url, users=".*", initial_delay=3600, max_delay=3600)],
    )
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        up = recorder.wait_for_state("a", "up")
        await service.retry_now("a")
        await up
        assert receiver.event_ids == ["$e1"]
        assert clock.seconds() == 0
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_probe_that_is_answered_ends_the_wait(db_url, reactor, receiver):
    receiver.then(502)  # the transaction fails ...
    receiver.then(502)  # ... and so does the first probe
    receiver.then(404)  # the second probe is answered (several SDKs answer 404 to ping)
    service, recorder, clock = started(
        db_url,
        reactor,
        [registration("a", receiver.url, users=".*", initial_delay=60, probe_interval=5)],
    )
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        probed = recorder.wait_for(lambda: len(recorder.probes) == 1)
        clock.advance(5)
        await probed
        assert recorder.probes[0][1].status == 502
        assert (await service.status("a")).state == "down"
        up = recorder.wait_for_state("a", "up")
        clock.advance(5)
        await up
        assert len(receiver.pings) == 2
        assert receiver.pings[0].headers["authorization"] == ["Bearer hs-secret-token"]
        assert receiver.event_ids == ["$e1"]
        assert clock.seconds() == 10
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_hangs_times_out(db_url, reactor, receiver):
    receiver.then(hang=True)
    service, recorder, clock = started(
        db_url, reactor, [registration("a", receiver.url, users=".*", request_timeout=30)]
    )
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await receiver.wait_for_requests(1)
        clock.advance(30)
        await down
        status = await service.status("a")
        assert status.last_error == "no complete answer within 30 s"
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_hangs_in_the_middle_of_its_answer_times_out(
    db_url, reactor, receiver
):
    # treq's own timeout stops at the headers; ours covers reading the body too
    receiver.then(200, hang_in_body=True)
    service, recorder, clock = started(
        db_url, reactor, [registration("a", receiver.url, users=".*", request_timeout=30)]
    )
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await receiver.wait_for_requests(1)
        clock.advance(29)
        assert (await service.status("a")).state == "up"
        clock.advance(1)
        await down
        status = await service.status("a")
        assert status.last_error == "no complete answer within 30 s"
        assert status.stored_transactions == 1
        up = recorder.wait_for_state("a", "up")
        await service.retry_now("a")
        await up
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1, 1)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_marks_down(db_url, reactor):
    closed = await start_receiver(reactor)
    url = closed.url
    await stop_receiver(closed)
    service, recorder, _ = started(db_url, reactor, [registration("a", url, users=".*")])
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        assert (await service.status("a")).last_error == "connection refused"
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_status_reports_the_oldest_pending_age(db_url, reactor, receiver):
    receiver.answer(500)
    service, recorder, clock = started(
        db_url, reactor, [registration("a", receiver.url, users=".*", initial_delay=100)]
    )
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        clock.advance(7)
        await service.submit([event(2)])
        await service.routed()
        status = await service.status("a")
        assert status.oldest_pending_age == 7
        assert (status.queued_events, status.stored_transactions) == (1, 1)
    finally:
        await service.stopService()


class CountingReads:
    """A real store whose reads of the event stream are counted."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def events_after(self, position: int, limit: int) -> Any:
        self.reads += 1
        return self._store.events_after(position, limit)


@pytest_twisted.ensureDeferred
async def test_submitted_events_are_routed_without_reading_them_back(db_url, reactor, receiver):
    store = CountingReads(open_store(db_url, reactor))
    service, _, _ = make_service(store, [registration("a", receiver.url, users=".*")], reactor)
    service.startService()
    try:
        await service.routed()
        reads = store.reads
        for n in range(0, 30, 10):
            await service.submit([event(i) for i in range(n, n + 10)])
            await receiver.wait_for_events(n + 10)
        assert store.reads == reads
        assert receiver.event_ids == [f"$e{n}" for n in range(30)]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_other_writers_and_duplicates_between_submits_lose_and_repeat_nothing(
    postgres_url, reactor, receiver
):
    """
    Events routed from memory and events read back mix: another writer's events between
    this process's batches, repeated event ids, and more batches in flight than the sorter
    keeps in memory (MAX_FRESH). (PostgreSQL: a SQLite file has one store at a time.)
    """
    service, _, _ = started(postgres_url, reactor, [registration("a", receiver.url, users=".*")])
    other = open_store(postgres_url, reactor)
    try:
        await service.started()
        await other.open()
        pending = []
        for n in range(40):
            batch = [event(1000 * n + i) for i in range(5)]
            batch.append(batch[0])  # the same event twice in one batch
            if n:
                batch.append(event(1000 * (n - 1)))  # and again from the batch before
            pending.append(service.submit(batch))
            if n % 7 == 3:
                pending.append(other.insert_events(prepare([event(500 + 1000 * n)]), 0.0))
        await gatherResults(pending)
        await service.routed()
        stream = [s.event.event_id for s in await other.events_after(0, 1000)]
        assert len(stream) == 40 * 5 + 6
        await receiver.wait_for_events(len(stream))
        assert receiver.event_ids == stream
    finally:
        await other.close()
        await service.stopService()


class HeldDeletions:
    """A real store that holds the deletion of each transaction answered 2xx until told."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.changes = Conditions()
        self.held: list[Deferred[None]] = []
        self.stored: list[int] = []  # transaction ids, as their store committed
        self.forgotten: list[int] = []  # transaction ids, as their deletion committed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def store_transaction(self, *args: Any, **kwargs: Any) -> Any:
        return self._store.store_transaction(*args, **kwargs).addCallback(self._stored)

    def _stored(self, txn_id: int) -> int:
        self.stored.append(txn_id)
        self.changes.check()
        return txn_id

    def complete_transaction(
        self, service_id: str, txn_id: int, now: float, attempt: Any = None, fence: Any = None
    ) -> Any:
        gate: Deferred[None] = Deferred()
        self.held.append(gate)
        self.changes.check()
        gate.addCallback(
            lambda _: self._store.complete_transaction(
                service_id, txn_id, now, attempt=attempt, fence=fence
            )
        )
        gate.addCallback(lambda _: self.forgotten.append(txn_id))
        return gate


@implementer(ISender)
class Watched:
    """The Matrix sender, noting which deletions had committed as each send began."""

    def __init__(self, sender: MatrixSender, store: HeldDeletions) -> None:
        self._sender = sender
        self._store = store
        self.sends: list[tuple[int, list[int]]] = []

    def send(self, txn: Any) -> Any:
        self.sends.append((txn.txn_id, list(self._store.forgotten)))
        return self._sender.send(txn)

    def ping(self, transaction_id: str | None = None) -> Any:
        return self._sender.ping()


@pytest_twisted.ensureDeferred
async def test_the_next_transaction_is_sent_once_the_last_one_is_forgotten(
    db_url, reactor, receiver
):
    """
    The next transaction is cut and stored while the last one answered 2xx is deleted,
    but sent only after that deletion committed: a crash in between resends the older one
    first, never after the newer one reached the receiver.
    """
    store = HeldDeletions(open_store(db_url, reactor))
    reg = registration("a", receiver.url, users=".*")
    connections = ConnectionPool(reactor)
    sender = Watched(MatrixSender(reg, connections, reactor), store)
    service, _, _ = make_service(store, [reg], reactor, senders={"a": sender})
    service.startService()
    try:
        receiver.then(hang=True)
        await service.submit([event(1)])
        await receiver.wait_for_requests(1)
        await service.submit([event(2)])
        await service.routed()  # waiting in the pool as the answer to txn 1 comes
        receiver.finish_held()
        await store.changes.wait_for(lambda: len(store.stored) == 2 and len(store.held) == 1)
        store.held[0].callback(None)
        await receiver.wait_for_events(2)
        first, second = txn_id(store, 1), txn_id(store, 2)
        assert sender.sends == [(first, []), (second, [first])]
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1, 2)
    finally:
        for gate in store.held:
            if not gate.called:
                gate.callback(None)
        await service.stopService()
        await connections.close()


@pytest_twisted.ensureDeferred
async def test_services_at_one_address_keep_a_connection_each(db_url, reactor, receiver):
    """
    Ten services behind one host and port send at the same moments: each keeps its
    connection between transactions instead of connecting anew for every one.
    """
    regs = [registration(f"s{i}", receiver.url, users=".*", exclusive=False) for i in range(10)]
    service, _, _ = started(db_url, reactor, regs)
    try:
        for n in range(1, 6):
            await service.submit([event(n)])
            await receiver.wait_for(lambda n=n: len(receiver.ok) >= 10 * n)
        assert len(receiver.ok) == 50
        assert receiver.connections <= 10
    finally:
        await service.stopService()
