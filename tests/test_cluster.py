"""
Several daemons on one PostgreSQL (``delivery.cluster``), as DeliveryServices sharing one
database and one ``task.Clock`` in this process: leases taken, renewed, shared fairly and
rebalanced, given back on a clean stop, not used past their time (self-fencing), and
writes under a stale epoch refused by the database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import threads
from twisted.internet.task import Clock

from delivery import DeliveryService, ISender, SendResult
from delivery.cluster import ROUTER, Cluster
from delivery.errors import FencedError
from delivery.metrics import Metrics
from delivery.records import Fence, StoredTransaction
from delivery.store import open_store
from delivery.testing import OK, RecordingObserver, ScriptedSender, failure

from .harness import event, registration

SERVICES = [f"s{n}" for n in range(6)]


@pytest.fixture
def pg_url(db_url: str) -> str:
    return db_url


#: several daemons share PostgreSQL (SQLite is single-process: test_store_lock.py)
on_postgres = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


def node(
    url: str,
    reactor: Any,
    clock: Clock,
    name: str,
    senders: Mapping[str, ScriptedSender] | None = None,
    **options: Any,
) -> tuple[DeliveryService, Any]:
    chosen: dict[str, ISender] = dict(senders or {s: ScriptedSender() for s in SERVICES})
    registrations = [
        registration(
            s,
            "http://127.0.0.1:1",
            users=f"@{s}_.*",
            exclusive=False,
            **{"request_timeout": 10.0, **options},
        )
        for s in SERVICES
    ]
    service = DeliveryService(
        open_store(url, reactor),
        registrations,
        reactor=reactor,
        clock=clock,
        senders=chosen,
        cluster=Cluster(node_id=name, lease_ttl=15.0),
    )
    recorder = RecordingObserver()
    service.observe(recorder)
    return service, recorder


def answering(modes: dict[str, str]) -> dict[str, ScriptedSender]:
    """
    A sender per service, shared by the nodes, that answers as ``modes`` says at the time:
    ``ok``, ``gone`` (410), ``down`` (503) or ``picky`` (400 to a transaction with $e12).
    """

    def answer(txn: StoredTransaction) -> SendResult:
        mode = modes[txn.service_id]
        if mode == "gone":
            return failure(410)
        if mode == "down":
            return failure(503)
        if mode == "picky" and b'"$e12"' in txn.body:
            return failure(400)
        return OK

    return {s: ScriptedSender(answer) for s in SERVICES}


def drop_listeners(url: str) -> int:
    """End the connections that LISTEN to the database (each store has one); how many."""
    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN %'"
            )
            return sum(1 for (done,) in cursor.fetchall() if done)
    finally:
        connection.close()


@asynccontextmanager
async def two_nodes(
    url: str, reactor: Any, senders: Mapping[str, ScriptedSender] | None = None, **options: Any
) -> AsyncIterator[tuple[DeliveryService, RecordingObserver, DeliveryService, RecordingObserver]]:
    """Nodes ``a`` and ``b`` on one clock, started, the services shared (3 each)."""
    clock = Clock()
    clock.advance(1000.0)
    a, a_seen = node(url, reactor, clock, "a", senders, **options)
    b, b_seen = node(url, reactor, clock, "b", senders, **options)
    a.startService()
    await a.started()
    b.startService()
    await b.started()
    try:
        await tick(a, b)
        yield a, a_seen, b, b_seen
    finally:
        await a.stopService()
        await b.stopService()


async def tick(*services: DeliveryService) -> None:
    for service in services:
        member = service._member
        assert member is not None
        if member._ticking is not None:
            await member._ticking
        await member.tick()


def services_of(service: DeliveryService) -> set[str]:
    return {name.split(":", 1)[1] for name in service.leases_held if name != ROUTER}


@on_postgres
@pytest_twisted.ensureDeferred
async def test_two_nodes_share_the_services_and_hand_over_on_stop(
    pg_url: str, reactor: Any
) -> None:
    clock = Clock()
    clock.advance(1000.0)
    a, a_seen = node(pg_url, reactor, clock, "a")
    b, b_seen = node(pg_url, reactor, clock, "b")
    a.startService()
    await a.started()
    try:
        assert a.leases_held == {ROUTER, *(f"service:{s}" for s in SERVICES)}
        b.startService()
        await b.started()
        assert services_of(b) == set()  # all held by a, none expired
        await tick(a)  # a sees two live nodes: gives back its share beyond 3
        await tick(b)
        assert len(services_of(a)) == 3
        assert len(services_of(b)) == 3
        assert services_of(a) | services_of(b) == set(SERVICES)
        assert ROUTER in a.leases_held
        assert ROUTER not in b.leases_held
        # nothing moves while the membership stays
        before = (services_of(a), services_of(b))
        await tick(a, b, a, b)
        assert (services_of(a), services_of(b)) == before
        status = await b.status(sorted(services_of(a))[0])
        assert status.owner == "a"
        view = await b.cluster()
        assert view is not None
        assert view.router == "a"
        assert {n.node_id for n in view.nodes if n.alive} == {"a", "b"}
        # a clean stop gives everything back: b takes it at its next tick
        await a.stopService()
        await tick(b)
        assert b.leases_held == {ROUTER, *(f"service:{s}" for s in SERVICES)}
        assert ("router", "released") in a_seen.leases
        assert ("router", "acquired") in b_seen.leases
    finally:
        if a.running:
            await a.stopService()
        await b.stopService()


@on_postgres
@pytest_twisted.ensureDeferred
async def test_a_node_that_cannot_renew_stops_before_expiry_and_its_writes_are_refused(
    pg_url: str, reactor: Any
) -> None:
    clock = Clock()
    clock.advance(1000.0)
    a, a_seen = node(pg_url, reactor, clock, "a")
    b, _ = node(pg_url, reactor, clock, "b")
    a.startService()
    await a.started()
    try:
        member = a._member
        assert member is not None
        old = dict(member.held)
        assert member.valid_until == pytest.approx(1000.0 + 15.0 - 5.0)
        # a is paused: no renewal runs (its timer is held back), the clock goes on
        assert member._timer is not None
        member._timer.cancel()
        clock.advance(9.9)
        assert member.held == old  # still in time
        clock.advance(0.2)  # past lease_ttl - margin since the last renewal was sent
        assert member.held == {}
        assert ("service:s0", "lost") in a_seen.leases
        # b takes over once the leases expire (not before: a might still be writing)
        b.startService()
        await b.started()
        assert b.leases_held == frozenset()
        clock.advance(5.0)  # 15 s since the last renewal
        await tick(b)
        assert ROUTER in b.leases_held
        assert len(services_of(b)) == len(SERVICES)
        new = dict(b._member.held)  # type: ignore[union-attr]
        assert all(new[name] == old[name] + 1 for name in old)
        # whatever a still tries to write under its old epochs is refused
        store = a.store
        with pytest.raises(FencedError, match="no longer held at epoch"):
            await store.set_state("s0", "down", fence=Fence("service:s0", old["service:s0"]))
        with pytest.raises(FencedError):
            await store.store_transaction(
                "s0", 1, 1, 1, b"{}", 0.0, [0.0], [1], fence=Fence("service:s0", old["service:s0"])
            )
        with pytest.raises(FencedError):
            await store.commit_sorted(0, [], (), (), fence=Fence(ROUTER, old[ROUTER]))
        # and the current holder's write goes through
        await b.store.set_state("s0", "up", fence=Fence("service:s0", new["service:s0"]))
    finally:
        member = a._member
        if member is not None:
            member._stopped = True
        await a.stopService()
        await b.stopService()


@on_postgres
@pytest_twisted.ensureDeferred
async def test_events_ingested_anywhere_reach_every_owner(pg_url: str, reactor: Any) -> None:
    async with two_nodes(pg_url, reactor) as (a, a_seen, b, b_seen):
        # ingest on b, which does not route: a routes, and each owner is told
        await b.submit([event(n, sender=f"@{s}_x:hs") for n, s in enumerate(SERVICES)])

        def delivered(recorder: RecordingObserver) -> set[str]:
            return {service_id for service_id, _, r in recorder.results if r.ok}

        await a_seen.wait_for(lambda: delivered(a_seen) == services_of(a))
        await b_seen.wait_for(lambda: delivered(b_seen) == services_of(b))
        assert delivered(a_seen) | delivered(b_seen) == set(SERVICES)


@on_postgres
@pytest_twisted.ensureDeferred
async def test_an_operator_may_ask_any_node_to_enable_retry_or_redrive(
    pg_url: str, reactor: Any
) -> None:
    modes = dict.fromkeys(SERVICES, "ok")
    senders = answering(modes)
    # (the clock stands still: no backoff ends, no probe comes, no heartbeat reads queues)
    async with two_nodes(pg_url, reactor, senders, reject_attempts=1) as (a, a_seen, b, _):
        gone, down, picky = sorted(services_of(a))
        modes.update({gone: "gone", down: "down", picky: "picky"})
        await b.submit(
            [
                event(10, sender=f"@{gone}_x:hs"),
                event(11, sender=f"@{down}_x:hs"),
                *(event(n, sender=f"@{picky}_x:hs") for n in (12, 13)),
            ]
        )
        await a_seen.wait_for(
            lambda: (
                a.state_of(gone) == "disabled"
                and a.state_of(down) == "down"
                and any(s == picky and r.ok for s, _, r in a_seen.results)
            )
        )
        (letter,) = await b.dead_letters(picky)
        assert letter.event_id == "$e12"
        modes.update(dict.fromkeys(SERVICES, "ok"))
        sent = {s: len(senders[s].transactions) for s in SERVICES}

        # b sends to none of them: it asks a, through the database
        await b.enable(gone)
        await b.retry_now(down)
        assert await b.redrive(picky) == 1
        await a_seen.wait_for(lambda: a.state_of(gone) == "up" and a.state_of(down) == "up")
        await a_seen.wait_for(lambda: len(senders[picky].transactions) > sent[picky])
        resent = [t.body for s in (gone, down) for t in senders[s].transactions[sent[s] :]]
        assert [b'"$e10"' in resent[0], b'"$e11"' in resent[1]] == [True, True]
        assert b'"$e12"' in senders[picky].transactions[-1].body
        assert await b.dead_letters(picky) == []
        assert all(len(senders[s].transactions) == sent[s] for s in services_of(b))


@on_postgres
@pytest_twisted.ensureDeferred
async def test_an_enable_missed_while_not_listening_is_found_when_listening_again(
    pg_url: str, reactor: Any
) -> None:
    modes = dict.fromkeys(SERVICES, "ok")
    senders = answering(modes)
    async with two_nodes(pg_url, reactor, senders) as (a, a_seen, b, _):
        gone = sorted(services_of(a))[0]
        modes[gone] = "gone"
        await b.submit([event(20, sender=f"@{gone}_x:hs")])
        await a_seen.wait_for(lambda: a.state_of(gone) == "disabled")
        modes[gone] = "ok"
        # enabled in the database with no word to a (as if a had not been listening)...
        admin = open_store(pg_url, reactor)
        await admin.open()
        try:
            await admin.set_state(gone, "recovering")
        finally:
            await admin.close()
        assert a.state_of(gone) == "disabled"
        # ... a listens again after its listening connection dropped: it looks, and sends
        assert await threads.deferToThread(drop_listeners, pg_url) == 2  # a's and b's
        await a_seen.wait_for(lambda: a.state_of(gone) == "up")
        assert b'"$e20"' in senders[gone].transactions[-1].body


def test_a_cluster_on_sqlite_is_refused(reactor: Any, tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="a cluster needs PostgreSQL"):
        DeliveryService(
            open_store(f"sqlite:///{tmp_path / 'x.db'}", reactor),
            [],
            reactor=reactor,
            cluster=Cluster(node_id="a"),
        )


def test_a_request_timeout_must_fit_in_a_lease(reactor: Any) -> None:
    # (the check comes before the store is opened: no database needed)
    store = open_store("postgresql://postgres@127.0.0.1:1/none", reactor)
    fits = registration("fits", "http://127.0.0.1:1", request_timeout=10.0)
    slow = registration("slow", "http://127.0.0.1:1", request_timeout=10.5)
    with pytest.raises(ValueError, match=r"request_timeout of 'slow' \(10.5 s\) is longer"):
        DeliveryService(store, [fits, slow], reactor=reactor)  # a cluster by default
    with pytest.raises(ValueError, match=r"with lease_ttl 9 s: at most 6 s"):
        DeliveryService(store, [fits], reactor=reactor, cluster=Cluster(lease_ttl=9))
    DeliveryService(store, [fits, slow], reactor=reactor, cluster=Cluster(lease_ttl=15.75))
    DeliveryService(store, [fits, slow], reactor=reactor, cluster=None)


@on_postgres
@pytest_twisted.ensureDeferred
async def test_a_reload_with_a_request_timeout_too_long_is_refused(
    pg_url: str, reactor: Any
) -> None:
    clock = Clock()
    clock.advance(1000.0)
    a, _ = node(pg_url, reactor, clock, "a")
    a.startService()
    await a.started()
    try:
        before = dict(a.registrations)
        slow = registration("s0", "http://127.0.0.1:1", request_timeout=11.0)
        with pytest.raises(ValueError, match="request_timeout of 's0' \\(11 s\\)"):
            a.reload([slow, *(r for r in before.values() if r.id != "s0")])
        assert a.registrations == before
    finally:
        await a.stopService()


def test_cluster_options_are_checked() -> None:
    with pytest.raises(ValueError, match="lease_ttl must be a number of seconds >= 3"):
        Cluster(lease_ttl=1)
    with pytest.raises(ValueError, match="node_id must be a non-empty string"):
        Cluster(node_id="")


def _reported(text: str) -> dict[str, set[str]]:
    """Metric name -> the services it has samples for ("" for a sample without one)."""
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, set()).add(sample.labels.get("service", ""))
    return found


@on_postgres
@pytest_twisted.ensureDeferred
async def test_each_node_reports_what_it_sends_and_the_router_the_database(
    pg_url: str, reactor: Any
) -> None:
    async with two_nodes(pg_url, reactor, max_pending_age=60) as (a, _, b, _):
        await b.submit([event(n, sender=f"@{s}_x:hs") for n, s in enumerate(SERVICES)])
        await a.routed()
        per_service = (
            "delivery_queued_events",
            "delivery_stored_transactions",
            "delivery_oldest_pending_age_seconds",
            "delivery_dead_letters",
            "delivery_service_state",
            "delivery_pending_age_exceeded",
        )
        shared = ("delivery_sorter_lag_events", "delivery_sorter_lag_seconds")
        metrics = {a: Metrics(a.clock), b: Metrics(b.clock)}
        for node_ in (a, b):
            await node_.housekeep()  # (its stats are the database's gauges)
        reported = {n: _reported((await m.render(n)).decode()) for n, m in metrics.items()}
        for name in per_service:
            assert reported[a][name] == services_of(a), name
            assert reported[b][name] == services_of(b), name
        for name in (*shared, "delivery_database_size_bytes", "delivery_database_rows"):
            assert name in reported[a], name  # the router
            assert name not in reported[b], name
        # a stops: b routes and sends to everything, and reports it all
        await a.stopService()
        await tick(b)
        assert b.routes_here
        await b.housekeep()
        again = _reported((await metrics[b].render(b)).decode())
        for name in per_service:
            assert again[name] == set(SERVICES), name
        for name in shared:
            assert name in again, name


@on_postgres
@pytest_twisted.ensureDeferred
async def test_only_the_router_keeps_the_database_bounded(pg_url: str, reactor: Any) -> None:
    async with two_nodes(pg_url, reactor) as (a, _, b, _):
        assert (a.routes_here, b.routes_here) == (True, False)
        assert a._housekeeper.active
        assert not b._housekeeper.active
        assert a.services_here == frozenset(services_of(a))
        await a.stopService()
        await tick(b)
        assert b.routes_here
        assert b._housekeeper.active
        assert b.services_here == frozenset(SERVICES)


@on_postgres
@pytest_twisted.ensureDeferred
async def test_routed_fires_on_a_node_that_does_not_route(pg_url: str, reactor: Any) -> None:
    async with two_nodes(pg_url, reactor) as (a, _, b, _):
        assert not b.routes_here
        await b.submit([event(n, sender=f"@{s}_x:hs") for n, s in enumerate(SERVICES)])
        await b.routed().addTimeout(10, reactor)  # the router's notification wakes it
        assert await b.store.sorter_position() >= await b.store.newest_stream_id() > 0
        # an event no service wants is not notified: b looks again every poll interval
        await b.submit([event(99, sender="@nobody:hs")])
        waiting = b.routed()
        await a.routed()
        b.clock.advance(1.0)  # type: ignore[attr-defined]
        await waiting.addTimeout(10, reactor)
        assert await b.store.sorter_position() >= await b.store.newest_stream_id()


@on_postgres
@pytest_twisted.ensureDeferred
async def test_leases_given_back_are_taken_at_once_not_at_the_next_renewal(
    pg_url: str, reactor: Any
) -> None:
    # (the clock stands still: only the notification of a's leaving can make b look)
    async with two_nodes(pg_url, reactor) as (a, _, b, b_seen):
        everything = {ROUTER, *(f"service:{s}" for s in SERVICES)}
        assert b.leases_held != everything
        await a.stopService()
        await b_seen.wait_for(lambda: b.leases_held == everything, timeout=10)
        view = await b.cluster()
        assert view is not None
        assert [n.node_id for n in view.nodes] == ["b"]  # a left in the same transaction


@on_postgres
@pytest_twisted.ensureDeferred
async def test_a_dead_nodes_leases_are_taken_when_they_expire_not_a_renewal_later(
    pg_url: str, reactor: Any
) -> None:
    clock = Clock()
    clock.advance(1000.0)
    a, _ = node(pg_url, reactor, clock, "a")
    b, _ = node(pg_url, reactor, clock, "b")
    everything = {ROUTER, *(f"service:{s}" for s in SERVICES)}

    async def step(seconds: float) -> None:
        """The clock moves on; b's tick, if one came, is done."""
        clock.advance(seconds)
        member = b._member
        assert member is not None
        if member._ticking is not None:
            await member._ticking

    a.startService()
    await a.started()
    try:
        assert a.leases_held == everything  # until 1015 unless renewed
        a_member = a._member
        assert a_member is not None
        assert a_member._timer is not None
        a_member._timer.cancel()  # a is paused (on another host: its pid looks alive)
        await step(2.0)
        b.startService()
        await b.started()  # b's first tick, at 1002: nothing free
        for _ in range(2):
            await step(5.0)  # its renewals, at 1007 and 1012
        assert b.leases_held == frozenset()
        await step(2.99)  # 1014.99: not expired yet
        assert b.leases_held == frozenset()
        await step(0.03)  # just past 1015, two seconds before b's next renewal
        assert b.leases_held == everything
    finally:
        if a_member is not None:
            a_member._stopped = True
        await a.stopService()
        await b.stopService()
