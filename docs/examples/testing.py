"""Test against delivery: a bridge down once gets its event when it is back, on a clock."""

from pathlib import Path

import pytest_twisted

from delivery import Registration
from delivery.testing import OK, ScriptedSender, failure, service_on_clock

BRIDGE = Registration.from_file(Path(__file__).parents[2] / "examples/registration.yaml")
EVENT = {"event_id": "$1", "type": "m.room.message", "sender": "@telegram_1:example.org"}


@pytest_twisted.ensureDeferred
async def test_the_bridge_gets_its_event_after_an_outage():
    sender = ScriptedSender([failure(503), OK])  # down once, then up for good
    async with service_on_clock([BRIDGE], {"telegram": sender}) as running:
        down = running.observer.wait_for_state("telegram", "down")
        await running.service.submit([EVENT])
        await down
        up = running.observer.wait_for_state("telegram", "up")
        running.clock.advance(1.2)  # the first retry comes after 1 s (± 20 %)
        await up
    first, again = sender.transactions  # the same transaction, sent again with its id
    assert first.txn_id == again.txn_id
