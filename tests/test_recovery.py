"""
What a DOWN service's wait does with probes, and what the log says about it, against a
real receiver on a Clock.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import provider

from .harness import event, registration, started


@pytest.fixture
def lines() -> Any:
    """What ``delivery`` logs during the test, as text."""
    found: list[str] = []

    @provider(ILogObserver)
    def observe(e: LogEvent) -> None:
        if e.get("log_namespace", "").startswith("delivery"):
            found.append(formatEvent(e))

    globalLogPublisher.addObserver(observe)
    yield found
    globalLogPublisher.removeObserver(observe)


@pytest.mark.parametrize("answer", [302, 307, 400, 401, 403, 429, 500])
@pytest_twisted.ensureDeferred
async def test_a_probe_answered_as_a_transaction_would_fail_does_not_end_the_wait(
    sqlite_url, reactor, receiver, answer
):
    receiver.then(502)  # the transaction fails; every probe gets `answer`
    receiver.answer(answer, headers={"Location": "/elsewhere"})
    service, recorder, clock = started(
        sqlite_url,
        reactor,
        [registration("a", receiver.url, users=".*", initial_delay=60, probe_interval=5, jitter=0)],
    )
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        for n in range(1, 11):
            probed = recorder.wait_for(lambda n=n: len(recorder.probes) == n)
            clock.advance(5)
            await probed
        assert len(receiver.requests) == 1  # no transaction was retried meanwhile
        assert (await service.status("a")).state == "down"
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_after_a_probe_started_retry_fails_the_wait_goes_on(db_url, reactor, receiver):
    # A receiver that answers pings but refuses transactions: the first probe ends the
    # wait, the retry fails, and then the service waits out the 60 s the probe cut short,
    # without probing, instead of being retried every probe_interval.
    receiver.then(502)  # the transaction
    receiver.then(200)  # the first probe
    receiver.then(502)  # the retry it starts
    service, recorder, clock = started(
        db_url,
        reactor,
        [registration("a", receiver.url, users=".*", initial_delay=60, probe_interval=5, jitter=0)],
    )
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        down = recorder.wait_for_state("a", "down")
        clock.advance(5)
        await down
        assert (len(receiver.pings), len(receiver.requests)) == (1, 2)
        status = await service.status("a")
        assert status.next_retry == 60
        clock.advance(54)
        assert (len(receiver.pings), len(receiver.requests)) == (1, 2)
        up = recorder.wait_for_state("a", "up")
        clock.advance(1)
        await up
        assert len(receiver.requests) == 3
        assert len({r.txn_id for r in receiver.requests}) == 1  # one transaction, resent
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_down_is_logged_once_then_reminded_then_up(sqlite_url, reactor, receiver, lines):
    receiver.answer(503)
    service, recorder, clock = started(
        sqlite_url,
        reactor,
        [registration("a", receiver.url, users=".*", max_delay=60, probe=False, jitter=0)],
    )
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        # 1, 2, 4, ... 60 s waits: 20 failures take about 15 minutes.
        for _ in range(20):
            status = await service.status("a")
            down = recorder.wait_for_state("a", "down")
            clock.advance(status.next_retry - clock.seconds())
            await down
        receiver.answer(200)
        up = recorder.wait_for_state("a", "up")
        clock.advance((await service.status("a")).next_retry - clock.seconds())
        await up
    finally:
        await service.stopService()
    about_a = [line for line in lines if "a is" in line]
    assert [line.split(":")[0] for line in about_a] == [
        "a is DOWN",
        "a is still DOWN after 21 failed attempts",
        "a is UP again after 21 failed attempt(s); backlog drained",
    ]
    assert not [line for line in lines if "RECOVERING" in line]


@pytest_twisted.ensureDeferred
async def test_our_tokens_echoed_by_a_receiver_are_never_kept(db_url, reactor, receiver, lines):
    # A receiver that echoes the request's headers, once at the start of its answer and
    # once across the point where the kept text is cut.
    echo = "Authorization: Bearer hs-secret-token; as_token=as-a"
    body = (echo + " " + "x" * (300 - len(echo) - 10) + " hs-secret-token " + "y" * 50).encode()
    receiver.then(500, body=body)
    receiver.answer(500, body=body)
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
        status = await service.status("a")
        (stored,) = await service.transactions("a")
        kept = [status.last_error, stored.last_error, recorder.probes[0][1].error, *lines]
    finally:
        await service.stopService()
    assert status.last_error is not None
    assert status.last_error.startswith("HTTP 500: Authorization: Bearer <redacted>; as_token=")
    for text in kept:
        assert text is not None
        for secret in ("hs-secret", "secret-token", "as_token=as-a"):
            assert secret not in text, text
