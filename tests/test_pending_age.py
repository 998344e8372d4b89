"""max_pending_age: an alert (a log line and a metric), never a silent drop."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface import implementer

from delivery.metrics import Metrics
from delivery.service import AGE_CHECK_INTERVAL
from delivery.store import open_store

from .harness import event, make_service, registration


@pytest_twisted.ensureDeferred
async def test_events_pending_too_long_raise_an_alert_and_stay(db_url, reactor, receiver):
    receiver.answer(503)
    regs = [
        registration(
            "slow",
            receiver.url,
            users=".*",
            max_pending_age=100,
            initial_delay=3600,
            max_delay=3600,
            probe=False,
        ),
        registration("other", None, users=".*"),
    ]
    service, recorder, clock = make_service(open_store(db_url, reactor), regs, reactor)
    metrics = Metrics(clock)
    service.observe(metrics)
    lines: list[str] = []

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if "max_pending_age" in event.get("log_format", ""):
            lines.append(event["log_format"].format(**event))

    globalLogPublisher.addObserver(observe)
    service.startService()
    try:
        down = recorder.wait_for_state("slow", "down")
        await service.submit([event(1)])
        await down
        assert await service.pending_too_long() == {}
        clock.advance(101)
        assert await service.pending_too_long() == {"slow": 101}
        text = (await metrics.render(service)).decode()
        samples = {
            (s.name, s.labels.get("service")): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }
        assert samples[("delivery_pending_age_exceeded", "slow")] == 1
        assert ("delivery_pending_age_exceeded", "other") not in samples
        assert sum("longer than its max_pending_age of 100 s" in line for line in lines) == 1
        clock.advance(AGE_CHECK_INTERVAL)  # the periodic check: no second warning
        assert await service.pending_too_long() == {"slow": 101 + AGE_CHECK_INTERVAL}
        assert sum("longer than" in line for line in lines) == 1
        status = await service.status("slow")
        assert (status.stored_transactions, status.state) == (1, "down")  # nothing dropped
        receiver.answer(200)
        up = recorder.wait_for_state("slow", "up")
        await service.retry_now("slow")
        await up
        assert await service.pending_too_long() == {}
        assert any("nothing pending longer" in line for line in lines)
    finally:
        globalLogPublisher.removeObserver(observe)
        await service.stopService()
