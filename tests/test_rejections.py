"""
Answers that are not "try again later": a transaction too large (413), content the
receiver refuses (400, 422), a service gone (410); dead letters, redrive and discard.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from delivery.store import open_store

from .harness import event, make_service, registration, txn_id, txn_ids


def started(db_url: str, reactor: Any, **options: Any) -> Any:
    regs = [registration("a", options.pop("url"), users=".*", **options)]
    service, recorder, clock = make_service(open_store(db_url, reactor), regs, reactor)
    service.startService()
    return service, recorder, clock


@pytest_twisted.ensureDeferred
async def test_a_transaction_too_large_is_halved_with_new_ids_in_order(db_url, reactor, receiver):
    receiver.then(413)  # the first transaction, of four events
    service, recorder, _ = started(db_url, reactor, url=receiver.url, max_events=4)
    try:
        await service.submit([event(n) for n in range(4)])
        await recorder.wait_for_acks(2)
        one, two, three = txn_ids(service.store, 1, 2, 3)
        assert [(r.txn_id, r.event_ids) for r in receiver.requests] == [
            (one, ["$e0", "$e1", "$e2", "$e3"]),
            (two, ["$e0", "$e1"]),
            (three, ["$e2", "$e3"]),
        ]
        status = await service.status("a")
        assert (status.state, status.stored_transactions, status.last_txn_id) == (
            "up",
            0,
            txn_id(service.store, 3),
        )
        assert recorder.states == []  # never DOWN
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_single_event_too_large_becomes_a_dead_letter(db_url, reactor, receiver):
    receiver.refuse("$e1", 413, body=b'{"errcode":"M_TOO_LARGE"}')
    service, recorder, _ = started(db_url, reactor, url=receiver.url, max_events=4)
    try:
        await service.submit([event(n) for n in range(3)])
        await recorder.wait_for(lambda: receiver.event_ids == ["$e0", "$e2"])
        (letter,) = await service.dead_letters("a")
        assert (letter.event_id, letter.status) == ("$e1", 413)
        assert "M_TOO_LARGE" in (letter.answer or "")
        assert recorder.dead_letters == [("a", 1, 413)]
        assert (await service.status("a")).state == "up"
    finally:
        await service.stopService()


@pytest.mark.parametrize("status", [400, 422])
@pytest_twisted.ensureDeferred
async def test_refused_content_is_bisected_after_three_attempts(db_url, reactor, receiver, status):
    receiver.refuse("$e2", status, body=b'{"error":"bad event"}')
    service, recorder, clock = started(
        db_url,
        reactor,
        url=receiver.url,
        max_events=4,
        probe=False,
        initial_delay=1,
        max_delay=1,
    )
    try:
        await service.submit([event(n) for n in range(4)])
        for attempt in (1, 2):  # the receiver may be wrong for a while: DOWN, back off
            down = recorder.wait_for_state("a", "down")
            if attempt == 2:
                clock.advance(1.2)
            await down
        clock.advance(1.2)  # the third attempt: bisect
        await recorder.wait_for_state("a", "up")
        await recorder.wait_for(lambda: receiver.event_ids == ["$e0", "$e1", "$e3"])
        assert [r.txn_id for r in receiver.accepted] == txn_ids(service.store, 2, 5)
        (letter,) = await service.dead_letters("a")
        assert (letter.event_id, letter.status, letter.txn_id) == (
            "$e2",
            status,
            txn_id(service.store, 4),
        )
        assert "bad event" in (letter.answer or "")
        assert (await service.status("a")).stored_transactions == 0
        # the rest keeps flowing
        await service.submit([event(9)])
        await recorder.wait_for(lambda: receiver.event_ids[-1:] == ["$e9"])
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_dead_letters_are_redriven_in_order_or_discarded(db_url, reactor, receiver):
    receiver.refuse("$e1", 413)
    receiver.refuse("$e2", 413)
    service, recorder, _ = started(db_url, reactor, url=receiver.url, max_events=1)
    try:
        await service.submit([event(n) for n in range(4)])
        await recorder.wait_for(lambda: receiver.event_ids == ["$e0", "$e3"])
        letters = await service.dead_letters("a")
        assert [d.event_id for d in letters] == ["$e1", "$e2"]
        receiver.rules.clear()  # the receiver was fixed
        await service.submit([event(4)])
        await recorder.wait_for(lambda: receiver.event_ids[-1:] == ["$e4"])
        assert await service.redrive("a") == 2
        await recorder.wait_for(lambda: receiver.event_ids[-2:] == ["$e1", "$e2"])
        assert await service.dead_letters("a") == []
        # discard, by id
        receiver.refuse("$e5", 413)
        receiver.refuse("$e6", 413)
        await service.submit([event(5), event(6)])
        await recorder.wait_for(lambda: len(recorder.dead_letters) == 4)
        first, _ = await service.dead_letters("a")
        assert await service.discard("a", [first.id]) == 1
        assert [d.event_id for d in await service.dead_letters("a")] == ["$e6"]
        assert await service.discard("a") == 1
        assert await service.dead_letters("a") == []
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_service_gone_is_disabled_until_enabled(db_url, reactor, receiver):
    receiver.then(410)
    service, recorder, clock = started(db_url, reactor, url=receiver.url)
    try:
        disabled = recorder.wait_for_state("a", "disabled")
        await service.submit([event(1)])
        await disabled
        await service.submit([event(2)])
        await service.routed()
        clock.advance(3600)  # no backoff, no probe: nothing is sent
        await service.retry_now("a")  # a retry does not end it either
        status = await service.status("a")
        assert (status.state, status.stored_transactions, status.queued_events) == (
            "disabled",
            1,
            1,
        )
        assert len(receiver.requests) == 1
    finally:
        await service.stopService()

    # disabled it stays, across a restart
    service, recorder, clock = started(db_url, reactor, url=receiver.url)
    try:
        assert (await service.status("a")).state == "disabled"
        up = recorder.wait_for_state("a", "up")
        await service.enable("a")
        await up
        await recorder.wait_for(lambda: receiver.event_ids == ["$e1", "$e2"])
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1, 1, 2)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_registration_can_choose_what_an_answer_means(db_url, reactor, receiver):
    receiver.then(404)
    receiver.then(413)
    service, recorder, _ = started(
        db_url, reactor, url=receiver.url, actions={404: "disable", 413: "retry"}
    )
    try:
        disabled = recorder.wait_for_state("a", "disabled")
        await service.submit([event(1)])
        await disabled
        down = recorder.wait_for_state("a", "down")
        await service.enable("a")
        await down  # the 413 was a plain failure, as asked
        assert (await service.dead_letters("a")) == []
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_enabled_after_a_recovery_the_stored_transaction_still_goes_first(
    db_url, reactor, receiver
):
    """A recovery that replayed everything, then 410: enabling replays again, in order."""
    receiver.then(503)
    service, recorder, _clock = started(db_url, reactor, url=receiver.url)
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        up = recorder.wait_for_state("a", "up")
        await service.retry_now("a")  # recovers: $e1 again, then nothing more is stored
        await up
        receiver.then(410)
        disabled = recorder.wait_for_state("a", "disabled")
        await service.submit([event(2)])
        await disabled
        await service.submit([event(3)])
        await service.routed()
        up = recorder.wait_for_state("a", "up")
        await service.enable("a")
        await up
        await recorder.wait_for(lambda: receiver.event_ids == ["$e1", "$e2", "$e3"])
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1, 1, 2, 2, 3)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_failure_inside_a_bisection_keeps_stream_order(
    db_url: str, reactor: Any, receiver: Any
) -> None:
    # T1 [e0..e3] is refused and halved into T2 [e0, e1] and T3 [e2, e3]; T2 is refused and
    # halved into T4 [e0] (a dead letter) and T5 [e1], which fails with 503. T3 has the
    # lower id but holds later events: the recovery sends T5 first.
    from .receiver import Answer

    receiver.refuse("$e0", 400)
    once = [True]

    def e1_alone(request: Any) -> bool:
        if request.event_ids == ["$e1"] and once:
            once.clear()
            return True
        return False

    receiver.rules.append((e1_alone, Answer(503)))
    regs = [
        registration(
            "a",
            receiver.url,
            users=".*",
            max_events=4,
            reject_attempts=1,
            initial_delay=1,
            max_delay=1,
            probe=False,
        )
    ]
    service, recorder, clock = make_service(open_store(db_url, reactor), regs, reactor)
    service.startService()
    try:
        await service.submit([event(n) for n in range(4)])
        await recorder.wait_for_state("a", "down")
        up = recorder.wait_for_state("a", "up")
        clock.advance(1.2)
        await up
        await receiver.wait_for(lambda: len(receiver.event_ids) >= 3)
        assert receiver.event_ids == ["$e1", "$e2", "$e3"]
    finally:
        await service.stopService()
