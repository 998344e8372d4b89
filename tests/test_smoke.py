from __future__ import annotations

import pytest_twisted

from .harness import event, make_service, registration


@pytest_twisted.ensureDeferred
async def test_one_event_is_sent_at_once(db_url, reactor, receiver):
    from delivery.store import open_store

    store = open_store(db_url, reactor)
    service, recorder, clock = make_service(store, [registration("a", receiver.url, users="@alice:.*")], reactor)
    service.startService()
    ids = await service.submit([event(1)])
    assert ids == [1]
    await receiver.wait_for_events(1)
    assert receiver.event_ids == ["$e1"]
    assert receiver.requests[0].txn_id == "1"
    await service.stopService()
