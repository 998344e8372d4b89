"""/metrics: Prometheus text format, and figures that move as events flow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from delivery.metrics import Metrics
from delivery.store import open_store

from .daemon_harness import ADMIN, start_daemon, write_config, write_registration
from .harness import event, make_service, registration
from .receiver import HS_TOKEN, start_receiver, stop_receiver

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(running: Any, token: str = ADMIN) -> Samples:
    status, body = await running.request("GET", "/metrics", token=token)
    assert status == 200, body
    assert isinstance(body, bytes)
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest_twisted.ensureDeferred
async def test_metrics_move_as_events_flow(tmp_path: Path, reactor: Any, receiver: Any) -> None:
    down = await start_receiver(reactor)
    down.answer(503)
    config = write_config(
        tmp_path,
        [
            write_registration(tmp_path, "up", receiver.url, users="@u.*"),
            write_registration(
                tmp_path,
                "down",
                down.url,
                users="@d.*",
                initial_delay=3600,
                max_delay=3600,
                probe_interval=0.05,
            ),
        ],
        metrics_token="metrics-secret-token",
    )
    running = await start_daemon(config, reactor)
    try:
        before = await scrape(running, "metrics-secret-token")
        assert value(before, "delivery_events_ingested_total") == 0
        await running.ingest([event(n, sender="@u:hs") for n in range(5)])
        await running.ingest([event(n, sender="@d:hs") for n in range(5, 8)])
        await receiver.wait_for_events(5)
        await down.wait_for_pings(1)  # down is DOWN and being probed
        after = await scrape(running, "metrics-secret-token")
        assert value(after, "delivery_events_ingested_total") == 8
        assert value(after, "delivery_events_routed_total", service="up") == 5
        assert value(after, "delivery_events_routed_total", service="down") == 3
        assert value(after, "delivery_events_delivered_total", service="up") == 5
        assert value(after, "delivery_transactions_total", service="up", outcome="success") >= 1
        assert value(after, "delivery_transactions_total", service="down", outcome="http_503") == 1
        assert value(after, "delivery_service_state", service="down", state="down") == 1
        assert value(after, "delivery_service_state", service="up", state="up") == 1
        assert value(after, "delivery_stored_transactions", service="down") == 1
        assert value(after, "delivery_oldest_pending_age_seconds", service="down") > 0
        assert value(after, "delivery_probes_total", service="down", outcome="http_503") >= 1
        assert value(after, "delivery_end_to_end_latency_seconds_count", service="up") == 5
        assert value(after, "delivery_send_duration_seconds_count", service="up") >= 1
        assert value(after, "delivery_sorter_lag_events") == 0
        assert (await running.request("GET", "/metrics", token="wrong"))[0] == 401
        text = (await running.request("GET", "/metrics", token="metrics-secret-token"))[1]
        for secret in (HS_TOKEN, ADMIN, "metrics-secret-token", "as-up-secret"):
            assert secret.encode() not in text
    finally:
        await running.daemon.stopService()
        await stop_receiver(down)


def latencies(metrics: Metrics, service_id: str) -> tuple[float, float]:
    """How many events the end-to-end latency histogram holds for a service, and their sum."""
    name, labels = "delivery_end_to_end_latency_seconds", {"service": service_id}
    count = metrics.registry.get_sample_value(f"{name}_count", labels) or 0.0
    return count, metrics.registry.get_sample_value(f"{name}_sum", labels) or 0.0


@pytest_twisted.ensureDeferred
async def test_latency_counts_the_events_resent_after_an_outage(
    db_url: str, reactor: Any, receiver: Any
) -> None:
    clock = Clock()
    clock.advance(1000)
    regs = [
        registration("a", receiver.url, users=".*", initial_delay=10, max_delay=10, probe=False)
    ]
    service, recorder, _ = make_service(open_store(db_url, reactor), regs, reactor, clock=clock)
    metrics = Metrics(clock)
    service.observe(metrics)
    receiver.answer(503)
    service.startService()
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1), event(2)])  # at 1000, sent and refused: stored
        await down
        clock.advance(5)
        await service.submit([event(3)])  # at 1005, queued while DOWN
        await service.routed()
        receiver.answer(200)
        up = recorder.wait_for_state("a", "up")
        clock.advance(20)  # past the retry (10 s, +-20 %): everything is sent at 1025
        await up
        await recorder.wait_for_acks(2)
    finally:
        await service.stopService()
    assert receiver.event_ids == ["$e1", "$e2", "$e3"]
    assert latencies(metrics, "a") == pytest.approx((3, 25 + 25 + 20))


@pytest_twisted.ensureDeferred
async def test_latency_counts_the_events_resent_after_a_restart_and_a_split(
    db_url: str, reactor: Any, receiver: Any
) -> None:
    clock = Clock()
    clock.advance(1000)
    regs = [registration("a", receiver.url, users=".*", initial_delay=3600, max_delay=3600)]
    service, recorder, _ = make_service(open_store(db_url, reactor), regs, reactor, clock=clock)
    receiver.answer(503)
    service.startService()
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1), event(2)])  # at 1000, sent and refused: stored
        await down
    finally:
        await service.stopService()

    clock.advance(60)
    receiver.answer(200)
    receiver.then(413)  # the resend is too large: its halves go, each with its events' times
    service, recorder, _ = make_service(open_store(db_url, reactor), regs, reactor, clock=clock)
    metrics = Metrics(clock)
    service.observe(metrics)
    service.startService()
    try:
        await recorder.wait_for_acks(2)  # recovered first at start, at 1060
    finally:
        await service.stopService()
    assert [r.event_ids for r in receiver.requests[1:]] == [["$e1", "$e2"], ["$e1"], ["$e2"]]
    assert latencies(metrics, "a") == pytest.approx((2, 60 + 60))


@pytest_twisted.ensureDeferred
async def test_housekeeping_metrics(db_url: str, reactor: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families as families

    from delivery import Housekeeping
    from delivery.testing import ScriptedSender

    clock = Clock()
    service, recorder, _ = make_service(
        open_store(db_url, reactor),
        [registration("a", "http://127.0.0.1:1", users="@alice.*")],
        reactor,
        clock=clock,
        senders={"a": ScriptedSender()},
        housekeeping=Housekeeping(retention=10, dedupe_window=20, pace=0),
    )
    metrics = Metrics(clock)
    service.observe(metrics)
    service.startService()
    try:
        await service.started()
        await service.submit([event(1), event(2, sender="@carol:hs")])  # e2: no one wants it
        await recorder.wait_for_acks(1)
        clock.advance(11)
        await service.housekeep()
        clock.advance(11)
        await service.housekeep()
        samples: Samples = {}
        for family in families((await metrics.render(service)).decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    finally:
        await service.stopService()
    deleted = "delivery_housekeeping_deleted_total"
    assert value(samples, deleted, table="events") == 1  # e1; e2 went as it was routed
    assert value(samples, deleted, table="seen_events") == 2
    assert value(samples, "delivery_database_size_bytes") > 0
    assert ("delivery_database_rows", (("table", "events"),)) in samples


def test_lease_changes_and_refused_writes_are_counted() -> None:
    metrics = Metrics(Clock())
    metrics.lease_changed("router", "acquired")
    metrics.lease_changed("service:a", "acquired")
    metrics.lease_changed("service:a", "lost")
    metrics.lease_changed("service:a", "acquired")
    metrics.write_refused("service:a")
    metrics.write_refused("service:a")
    sample = metrics.registry.get_sample_value
    changes = "delivery_lease_changes_total"
    assert sample(changes, {"lease": "router", "change": "acquired"}) == 1
    assert sample(changes, {"lease": "service:a", "change": "acquired"}) == 2
    assert sample(changes, {"lease": "service:a", "change": "lost"}) == 1
    assert sample("delivery_writes_refused_total", {"lease": "service:a"}) == 2


@pytest_twisted.ensureDeferred
async def test_the_lease_gauges_are_read_at_scrape_on_postgres_only(
    db_url: str, reactor: Any
) -> None:
    from delivery.cluster import Cluster
    from delivery.testing import ScriptedSender

    clock = Clock()
    clock.advance(1000)
    service, _, _ = make_service(
        open_store(db_url, reactor),
        [registration("a", "http://127.0.0.1:1", users="@alice.*", request_timeout=2)],
        reactor,
        clock=clock,
        senders={"a": ScriptedSender()},
        cluster=None if db_url.startswith("sqlite") else Cluster(node_id="m", lease_ttl=3),
    )
    metrics = Metrics(clock)
    service.observe(metrics)
    service.startService()
    try:
        await service.started()
        text = (await metrics.render(service)).decode()
        held = service.leases_held
        view = await service.cluster()
    finally:
        await service.stopService()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    if db_url.startswith("sqlite"):
        assert held == frozenset()
        assert not [name for name, _ in samples if name == "delivery_leases_held"]
        assert value(samples, "delivery_cluster_nodes") == 0
    else:
        expected_router = 1 if "router" in held else 0
        assert value(samples, "delivery_leases_held", kind="router") == expected_router
        assert value(samples, "delivery_leases_held", kind="service") == len(held - {"router"})
        assert view is not None
        alive = sum(1 for node in view.nodes if node.alive)
        assert value(samples, "delivery_cluster_nodes") == alive
