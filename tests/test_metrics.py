"""/metrics: Prometheus text format, and figures that move as events flow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from .daemon_harness import ADMIN, start_daemon, write_config, write_registration
from .harness import event
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
