"""
Several daemons on one PostgreSQL (``delivery.cluster``), as DeliveryServices sharing one
database and one ``task.Clock`` in this process: leases taken, renewed, shared fairly and
rebalanced, given back on a clean stop, not used past their time (self-fencing), and
writes under a stale epoch refused by the database.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from delivery import DeliveryService
from delivery.cluster import ROUTER, Cluster
from delivery.errors import FencedError
from delivery.records import Fence
from delivery.store import open_store
from delivery.testing import RecordingObserver, ScriptedSender

from .harness import event, registration

SERVICES = [f"s{n}" for n in range(6)]


@pytest.fixture
def pg_url(db_url: str) -> str:
    return db_url


#: several daemons share PostgreSQL (SQLite is single-process: test_store_lock.py)
on_postgres = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


def node(url: str, reactor: Any, clock: Clock, name: str) -> tuple[DeliveryService, Any]:
    registrations = [
        registration(s, "http://127.0.0.1:1", users=f"@{s}_.*", exclusive=False) for s in SERVICES
    ]
    service = DeliveryService(
        open_store(url, reactor),
        registrations,
        reactor=reactor,
        clock=clock,
        senders={s: ScriptedSender() for s in SERVICES},
        cluster=Cluster(node_id=name, lease_ttl=15.0),
    )
    recorder = RecordingObserver()
    service.observe(recorder)
    return service, recorder


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
    clock = Clock()
    clock.advance(1000.0)
    a, a_seen = node(pg_url, reactor, clock, "a")
    b, b_seen = node(pg_url, reactor, clock, "b")
    a.startService()
    await a.started()
    b.startService()
    await b.started()
    try:
        await tick(a, b)
        # ingest on b, which does not route: a routes, and each owner is told
        await b.submit([event(n, sender=f"@{s}_x:hs") for n, s in enumerate(SERVICES)])

        def delivered(recorder: RecordingObserver) -> set[str]:
            return {service_id for service_id, _, r in recorder.results if r.ok}

        await a_seen.wait_for(lambda: delivered(a_seen) == services_of(a))
        await b_seen.wait_for(lambda: delivered(b_seen) == services_of(b))
        assert delivered(a_seen) | delivered(b_seen) == set(SERVICES)
    finally:
        await a.stopService()
        await b.stopService()


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
