"""``delivery.testing``: the observer, the scripted sender and the service on a clock."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import TimeoutError
from twisted.internet.task import Clock

from delivery import SendResult
from delivery.records import StoredTransaction
from delivery.testing import (
    OK,
    RecordingObserver,
    ScriptedSender,
    failure,
    service_on_clock,
)

from .harness import event, registration

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs/examples/testing.py"


def _txn(n: int) -> StoredTransaction:
    return StoredTransaction("a", n, b"{}", 1, n, n, 0.0)


def _answer(d: Any) -> SendResult:
    results: list[SendResult] = []
    d.addCallback(results.append)
    (result,) = results
    return result


def test_a_scripted_sender_answers_in_order_and_repeats_its_last_answer() -> None:
    sender = ScriptedSender([failure(503), failure(), OK], [failure(502), OK])
    answers = [_answer(sender.send(_txn(n))) for n in (1, 1, 1, 2)]
    assert [a.status for a in answers] == [503, None, 200, 200]
    assert [a.error for a in answers] == ["HTTP 503", "connection refused", None, None]
    assert [t.txn_id for t in sender.transactions] == [1, 1, 1, 2]
    assert [_answer(sender.ping()).ok for _ in range(3)] == [False, True, True]
    assert sender.pings == 3


def test_a_scripted_sender_takes_everything_unless_told_otherwise() -> None:
    sender = ScriptedSender()
    assert _answer(sender.send(_txn(1))) == OK
    assert _answer(sender.ping()) == OK


def test_a_scripted_sender_can_choose_each_answer() -> None:
    sender = ScriptedSender(
        lambda txn: OK if txn.txn_id % 2 else failure(429, retry_after=30), lambda: failure(404)
    )
    assert _answer(sender.send(_txn(1))) == OK
    assert _answer(sender.send(_txn(2))) == failure(429, retry_after=30)
    assert _answer(sender.ping()).status == 404


def test_a_scripted_sender_on_a_clock_answers_after_its_latency() -> None:
    clock = Clock()
    sender = ScriptedSender([failure(500), OK], clock=clock, latency=2.0)
    first = sender.send(_txn(1))
    clock.advance(1.9)
    assert not first.called
    clock.advance(0.1)
    assert _answer(first).status == 500
    second = sender.send(_txn(1))
    second.cancel()  # the service abandons a request in flight: an answer, not an error
    assert _answer(second) == SendResult(ok=False, error="the request was abandoned")
    assert not clock.getDelayedCalls()


def test_a_scripted_sender_refuses_an_empty_script_or_a_latency_without_a_clock() -> None:
    with pytest.raises(ValueError, match="at least one answer"):
        ScriptedSender([])
    with pytest.raises(ValueError, match="at least one ping answer"):
        ScriptedSender(ping_answers=[])
    with pytest.raises(ValueError, match="needs the clock"):
        ScriptedSender(latency=1.0)


def test_the_observer_waits_for_a_condition_and_times_out_on_its_reactor() -> None:
    reactor = Clock()  # what the safety timeout counts on
    observer = RecordingObserver(reactor)
    down = observer.wait_for_state("a", "down")
    acked = observer.wait_for_acks(1)
    never = observer.wait_for(lambda: False, timeout=5)
    observer.state_changed("a", "up", "down", "HTTP 503")
    assert down.called
    assert not acked.called
    observer.transaction_done("a", _txn(1), OK)
    assert acked.called
    reactor.advance(5)
    errors: list[Any] = []
    never.addErrback(errors.append)
    assert errors[0].check(TimeoutError)
    assert observer.wait_for_acks(1).called  # a condition that holds already: at once
    assert observer.states == [("a", "up", "down", "HTTP 503")]
    assert observer.results == [("a", _txn(1), OK)]


def test_the_observer_keeps_probes_dead_letters_and_counts() -> None:
    observer = RecordingObserver(Clock())
    observer.probe_done("a", failure(502))
    observer.dead_lettered("a", 2, 400)
    observer.events_ingested(3)
    observer.events_routed({"a": 2, "b": 1})
    observer.events_routed({"a": 1})
    assert observer.probes == [("a", failure(502))]
    assert observer.dead_letters == [("a", 2, 400)]
    assert observer.ingested == 3
    assert observer.routed == {"a": 3, "b": 1}


@pytest_twisted.ensureDeferred
async def test_a_service_on_a_clock_goes_down_and_up_as_the_clock_says(reactor: Any) -> None:
    bridge = registration(
        "a", "http://127.0.0.1:9", users="@a_.*", initial_delay=10, probe_interval=2
    )
    sender = ScriptedSender([failure(503), failure(503), OK], [failure(502), OK])
    async with service_on_clock([bridge], {"a": sender}, reactor=reactor) as running:
        service, clock, observer = running.service, running.clock, running.observer
        down = observer.wait_for_state("a", "down")
        assert await service.submit([event(1, sender="@a_1:hs"), event(2, sender="@a_2:hs")])
        await down
        retry = (await service.status("a")).next_retry
        assert retry is not None
        # The first probe is answered 502: the wait goes on.
        probed = observer.wait_for(lambda: len(observer.probes) == 1)
        clock.advance(2)
        await probed
        assert service.state_of("a") == "down"
        # The second is answered: a retry at once, which fails; the wait it cut short goes on.
        down_again = observer.wait_for_state("a", "down")
        clock.advance(2)
        await down_again
        assert (await service.status("a")).next_retry == retry
        # The retry at the end of the wait is answered: the service is back.
        up = observer.wait_for_state("a", "up")
        clock.advance(retry - clock.seconds())
        await up
        assert (await service.status("a")).stored_transactions == 0
    txn_ids = {t.txn_id for t in sender.transactions}
    assert len(sender.transactions) == 3
    assert len(txn_ids) == 1  # one transaction, resent with its id
    assert [(s[2], s[3]) for s in observer.states] == [
        ("down", "HTTP 503"),
        ("recovering", None),
        ("down", "HTTP 503"),
        ("recovering", None),
        ("up", None),
    ]
    assert [r.status for _, _, r in observer.results] == [503, 503, 200]
    assert [r.status for _, r in observer.probes] == [502, 200]
    assert sender.pings == 2
    assert observer.ingested == 2
    assert observer.routed == {"a": 2}


@pytest_twisted.ensureDeferred
async def test_a_service_on_a_clock_gives_every_registration_a_sender(reactor: Any) -> None:
    registrations = [registration(i, "http://127.0.0.1:9", users=f"@{i}_.*") for i in "ab"]
    async with service_on_clock(registrations, reactor=reactor) as running:
        await running.service.submit([event(1, sender="@a_1:hs"), event(2, sender="@b_1:hs")])
        await running.observer.wait_for_acks(2)
        assert sorted(running.senders) == ["a", "b"]
        assert [len(s.transactions) for s in running.senders.values()] == [1, 1]


@pytest_twisted.ensureDeferred
async def test_a_service_on_a_clock_is_stopped_and_its_file_deleted(reactor: Any) -> None:
    async with service_on_clock([], reactor=reactor) as running:
        assert running.service.running
        assert running.path.exists()
    assert not running.service.running
    assert not running.path.parent.exists()


@pytest_twisted.ensureDeferred
async def test_a_service_on_a_clock_is_cleaned_up_when_the_test_fails(reactor: Any) -> None:
    with pytest.raises(RuntimeError, match="the test failed"):
        async with service_on_clock([], reactor=reactor) as running:
            raise RuntimeError("the test failed")
    assert not running.service.running
    assert not running.path.parent.exists()


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("testing_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: the README's example, run as the test it is
test_the_readme_testing_example = _example().test_the_bridge_gets_its_event_after_an_outage


def test_the_readme_shows_the_testing_example_verbatim() -> None:
    assert EXAMPLE.read_text().strip() in (ROOT / "README.md").read_text()
