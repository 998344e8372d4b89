"""
Replay: recent events queued again for one service, through ``DeliveryService.replay``,
``POST /v1/services/{id}/replay`` and ``delivery replay``, against real receivers, on
both stores. The copies go after everything already queued, in new transactions, with
the original JSON; no other service gets anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from delivery import (
    IEventSource,
    NotAcceptingEventsError,
    ReplayResult,
    StoredEvent,
    UnknownServiceError,
    cli,
)
from delivery.store import open_store
from delivery.store._sql import Query

from .daemon_harness import ADMIN, INGEST, start_daemon, write_config, write_registration
from .harness import event, make_service, registration, started, txn_id
from .receiver import Receiver, start_receiver, stop_receiver


def _set_housekeeping(deleted_stream_id: int, deleted_ts: float | None) -> Any:
    """What the housekeeper writes once retention has deleted events (set by hand here)."""
    yield Query(
        "UPDATE housekeeping SET deleted_stream_id = ?, deleted_ts = ?",
        (deleted_stream_id, deleted_ts),
        fetch="count",
    )


def _delete_events(up_to: int) -> Any:
    """Delete the events up to a position, as retention would."""
    yield Query("DELETE FROM events WHERE stream_id <= ?", (up_to,), fetch="count")


def _event_ids(table: str) -> Any:
    rows = yield Query(f"SELECT event_id FROM {table} ORDER BY stream_id")
    return [row[0] for row in rows]


def _replayed(receiver: Receiver, skip: int) -> list[str]:
    """The event ids the receiver accepted after its first ``skip`` transactions."""
    return [e for r in receiver.accepted[skip:] for e in r.event_ids]


@pytest_twisted.ensureDeferred
async def test_a_replay_comes_after_what_was_queued_in_new_transactions_with_the_original_json(
    db_url, reactor, receiver
):
    other = await start_receiver(reactor)
    regs = [
        registration("a", receiver.url, users="@a_.*", initial_delay=60, probe=False),
        registration("b", other.url, rooms="!b:.*"),
    ]
    service, recorder, _ = started(db_url, reactor, regs)
    try:
        first = [
            event(1, sender="@a_1:hs"),
            event(2, sender="@b_x:hs", room="!b:hs"),  # b's only
            event(3, sender="@a_1:hs", room="!b:hs"),  # both
            event(4, sender="@a_2:hs"),
        ]
        assert await service.submit(first) == [1, 2, 3, 4]
        await receiver.wait_for_events(3)
        await other.wait_for_events(2)
        # a goes down: one transaction stored and failing, one event queued behind it
        receiver.answer(503)
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(5, sender="@a_3:hs")])
        await down
        await service.submit([event(6, sender="@a_4:hs")])
        await service.routed()
        before = len(receiver.requests)
        other_before = len(other.requests)

        result = await service.replay("a", from_stream_id=1)
        assert result == ReplayResult(
            queued=5, first_stream_id=1, last_stream_id=6, partly_deleted=False
        )
        await service.routed()
        status = await service.status("a")
        assert (status.stored_transactions, status.queued_events) == (1, 6)

        receiver.answer(200)
        await service.retry_now("a")
        wanted = ["$e1", "$e3", "$e4", "$e5", "$e6"]
        await receiver.wait_for(lambda: len(receiver.event_ids) == 3 + 2 + 5)
        # what was stored and queued first, then the replay, in stream order
        assert receiver.event_ids == ["$e1", "$e3", "$e4", "$e5", "$e6", *wanted]
        delivered = receiver.accepted
        ids = [int(r.txn_id) for r in delivered]
        assert ids == sorted(set(ids))
        stored = int(receiver.requests[before - 1].txn_id)  # the one a had stored, down
        assert stored == txn_id(service.store, 2)
        assert [r.event_ids for r in delivered if int(r.txn_id) == stored] == [["$e5"]]
        # the queued event and the copies, in new transactions, with the original JSON
        later = [r for r in delivered if int(r.txn_id) > stored]
        assert [e for r in later for e in r.event_ids] == ["$e6", *wanted]
        originals = {e["event_id"]: e for e in [*first, event(5, sender="@a_3:hs")]}
        originals["$e6"] = event(6, sender="@a_4:hs")
        assert [e for r in later for e in r.events] == [originals[e] for e in ["$e6", *wanted]]

        # b got nothing more, and has nothing waiting
        await service.routed()
        assert len(other.requests) == other_before
        assert other.event_ids == ["$e2", "$e3"]
        b = await service.status("b")
        assert (b.queued_events, b.stored_transactions) == (0, 0)
    finally:
        await service.stopService()
        await stop_receiver(other)


@pytest_twisted.ensureDeferred
async def test_a_replay_by_time_or_by_position_with_or_without_an_end(db_url, reactor, receiver):
    regs = [registration("a", receiver.url, users="@a_.*"), registration("b", None, users=".*")]
    service, _, clock = started(db_url, reactor, regs)
    try:
        for n in range(1, 5):  # ingested at 10, 20, 30, 40
            clock.advance(10)
            await service.submit([event(n, sender="@a_1:hs")])
        await service.submit([event(9, sender="@nobody:hs")])  # wanted by no one: not kept
        await receiver.wait_for_events(4)
        await service.routed()
        seen = 4
        for kwargs, expected, span in [
            ({"from_ts": 20}, ["$e2", "$e3", "$e4"], (2, 4)),
            ({"from_ts": 15, "to_ts": 30}, ["$e2", "$e3"], (2, 3)),
            ({"from_stream_id": 3}, ["$e3", "$e4"], (3, 4)),
            ({"from_stream_id": 2, "to_stream_id": 3}, ["$e2", "$e3"], (2, 3)),
            ({"from_stream_id": 0, "to_ts": 10}, ["$e1"], (1, 1)),
            ({"from_ts": 0, "to_stream_id": 2}, ["$e1", "$e2"], (1, 2)),
            # an end past the sorter's position: only what it has routed
            ({"from_stream_id": 4, "to_stream_id": 10**6}, ["$e4"], (4, 4)),
        ]:
            result = await service.replay("a", **kwargs)
            assert result == ReplayResult(len(expected), *span, False), kwargs
            await receiver.wait_for_events(seen + len(expected))
            assert receiver.event_ids[seen:] == expected, kwargs
            seen += len(expected)
        # nothing in the range: nothing queued
        for kwargs in [{"from_stream_id": 100}, {"from_ts": 41}, {"from_ts": 0, "to_ts": 5}]:
            assert await service.replay("a", **kwargs) == ReplayResult(0, None, None, False)
        # copies are never replayed again, and no one else got anything
        assert await service.replay("a", from_stream_id=0) == ReplayResult(4, 1, 4, False)
        await receiver.wait_for_events(seen + 4)
        assert receiver.event_ids[seen:] == ["$e1", "$e2", "$e3", "$e4"]
        assert (await service.status("b")).queued_events == 0
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_replay_larger_than_a_chunk_goes_chunk_by_chunk_in_order(
    db_url, reactor, receiver, monkeypatch
):
    monkeypatch.setattr("delivery._replay.REPLAY_CHUNK", 3)
    other = await start_receiver(reactor)
    regs = [
        registration("a", receiver.url, users="@a_.*"),
        registration("b", other.url, users="@b_.*"),
    ]
    service, _, clock = started(db_url, reactor, regs)
    try:
        for n in range(1, 11):  # a's are odd, b's even; ingested at 10, 20, ... 100
            clock.advance(10)
            await service.submit([event(n, sender="@a_1:hs" if n % 2 else "@b_1:hs")])
        await receiver.wait_for_events(5)
        await other.wait_for_events(5)
        await service.routed()
        seen = 5
        for kwargs, expected, span in [
            ({"from_stream_id": 1}, ["$e1", "$e3", "$e5", "$e7", "$e9"], (1, 9)),
            ({"from_ts": 35}, ["$e5", "$e7", "$e9"], (5, 9)),
            ({"from_stream_id": 2, "to_stream_id": 9}, ["$e3", "$e5", "$e7", "$e9"], (3, 9)),
            ({"from_ts": 0, "to_ts": 60}, ["$e1", "$e3", "$e5"], (1, 5)),
        ]:
            result = await service.replay("a", **kwargs)
            assert result == ReplayResult(len(expected), *span, False), kwargs
            await receiver.wait_for_events(seen + len(expected))
            assert receiver.event_ids[seen:] == expected, kwargs
            seen += len(expected)
        await service.routed()
        assert other.event_ids == ["$e2", "$e4", "$e6", "$e8", "$e10"]
        assert (await service.status("b")).queued_events == 0
    finally:
        await service.stopService()
        await stop_receiver(other)


@pytest_twisted.ensureDeferred
async def test_partly_deleted_says_when_retention_deleted_part_of_the_range(
    db_url, reactor, receiver
):
    service, _, clock = started(db_url, reactor, [registration("a", receiver.url, users=".*")])
    try:
        for n in range(1, 6):  # ingested at 10, 20, 30, 40, 50
            clock.advance(10)
            await service.submit([event(n)])
        await receiver.wait_for_events(5)
        await service.routed()
        skip = len(receiver.accepted)
        assert (await service.replay("a", from_stream_id=1)).partly_deleted is False
        # retention deleted the first three events
        await service.store._run(_delete_events, 3)
        await service.store._run(_set_housekeeping, 3, 30.0)
        for kwargs, partly in [
            ({"from_stream_id": 1}, True),
            ({"from_stream_id": 3}, True),
            ({"from_stream_id": 4}, False),
            ({"from_stream_id": 3, "to_stream_id": 3}, True),
            ({"from_ts": 0}, True),
            ({"from_ts": 30}, True),
            ({"from_ts": 31}, False),
        ]:
            result = await service.replay("a", **kwargs)
            assert result.partly_deleted is partly, kwargs
        result = await service.replay("a", from_stream_id=1)
        assert result == ReplayResult(2, 4, 5, True)  # what is left
        count = 5 + 2 + 2 + 2 + 0 + 2 + 2 + 2 + 2
        await receiver.wait_for(lambda: len(_replayed(receiver, skip)) == count)
        assert _replayed(receiver, skip)[-2:] == ["$e4", "$e5"]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_interest_is_the_registrations_now_with_aliases_looked_up(db_url, reactor, receiver):
    other = await start_receiver(reactor)
    lookups: list[str] = []

    def aliases(room: str) -> Deferred[Sequence[str]]:
        lookups.append(room)
        return succeed(["#a_room:hs"] if room == "!x:hs" else [])

    regs = [
        registration("a", receiver.url, aliases="#a_.*"),
        registration("b", other.url, users="@b_.*"),
    ]
    service, _, _ = started(db_url, reactor, regs, alias_lookup=aliases)
    try:
        await service.submit(
            [
                event(1, sender="@nobody:hs", room="!x:hs"),  # a's, through the room's alias
                event(2, sender="@b_1:hs", room="!y:hs"),  # b's
                event(3, sender="@b_2:hs", room="!x:hs"),  # both
            ]
        )
        await receiver.wait_for_events(2)
        await other.wait_for_events(2)
        await service.routed()
        lookups.clear()
        assert await service.replay("a", from_stream_id=1) == ReplayResult(2, 1, 3, False)
        assert sorted(set(lookups)) == ["!x:hs", "!y:hs"]
        await receiver.wait_for_events(4)
        assert receiver.event_ids == ["$e1", "$e3", "$e1", "$e3"]
        # b's registration changes: a replay to b follows its namespaces now
        await service.reload([regs[0], registration("b", other.url, users="@nobody:.*")])
        lookups.clear()
        assert await service.replay("b", from_stream_id=1) == ReplayResult(1, 1, 1, False)
        assert lookups == []  # b has no aliases namespace
        await other.wait_for_events(3)
        assert other.event_ids == ["$e2", "$e3", "$e1"]
    finally:
        await service.stopService()
        await stop_receiver(other)


@pytest_twisted.ensureDeferred
async def test_a_copy_goes_to_its_service_alone_whatever_the_namespaces(db_url, reactor, receiver):
    store = open_store(db_url, reactor)
    await store.open()
    try:
        mine = StoredEvent.of(0, event(1, sender="@a_1:hs")).event
        nobodys = StoredEvent.of(0, event(6, sender="@nobody:hs")).event
        assert (await store.insert_events([mine, nobodys], 5.0)).stream_ids == [1, 2]
        # copies made by a replay: for a (of an event its namespaces do not want), for a
        # service no longer registered, for one without a url
        copy = StoredEvent.of(1, event(2, sender="@nobody:hs"))
        await store.insert_replay("a", [copy], "k1", 6.0)
        copy = StoredEvent.of(1, event(3, sender="@a_2:hs"))
        await store.insert_replay("gone", [copy], "k2", 6.0)
        copy = StoredEvent.of(1, event(4, sender="@a_3:hs"))
        await store.insert_replay("quiet", [copy], "k3", 6.0)
        read = await store.events_after(0, 10)
        assert [(e.stream_id, e.event.event_id, e.replay_for) for e in read] == [
            (1, "$e1", None),
            (2, "$e6", None),
            (3, "replay:k1:1", "a"),
            (4, "replay:k2:1", "gone"),
            (5, "replay:k3:1", "quiet"),
        ]
        assert json.loads(read[2].event.json) == event(2, sender="@nobody:hs")
        assert read[2].received_ts == 6.0
        # only originals are replayed
        originals = await store.replay_originals(0, 10, None, None, 10)
        assert [e.stream_id for e in originals] == [1, 2]
    finally:
        await store.close()

    regs = [
        registration("a", receiver.url, users="@a_.*"),
        registration("quiet", None, users=".*"),
    ]
    service, _, _ = started(db_url, reactor, regs)
    try:
        await service.routed()
        await receiver.wait_for_events(2)
        assert receiver.event_ids == ["$e1", "$e2"]
        assert (await service.status("quiet")).queued_events == 0
        # what no one wants is deleted; a copy's id is no producer's, and is not kept
        assert await service.store._run(_event_ids, "seen_events") == ["$e6"]
        assert await service.store._run(_event_ids, "events") == ["$e1", "replay:k1:1"]
        # a producer's event is not mistaken for a copy
        assert await service.submit([event(5, sender="@a_1:hs")]) == [6]
        await receiver.wait_for_events(3)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_copy_and_its_original_in_one_refused_transaction_keep_their_places(
    db_url, reactor, receiver
):
    """Bisected, dead-lettered and redriven: each by its own position, not by its id."""
    receiver.answer(503)
    regs = [
        registration(
            "a", receiver.url, users=".*", initial_delay=60, probe=False, reject_attempts=1
        )
    ]
    service, recorder, _ = started(db_url, reactor, regs)
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        await service.submit([event(2), event(3)])  # queued behind the stored transaction
        await service.routed()
        assert await service.replay("a", from_stream_id=2) == ReplayResult(2, 2, 3, False)
        await service.routed()
        receiver.answer(200)
        receiver.refuse("$e2", 400)
        await service.retry_now("a")
        await recorder.wait_for(lambda: len(recorder.dead_letters) == 2)
        await receiver.wait_for(lambda: receiver.event_ids == ["$e1", "$e3", "$e3"])
        letters = await service.dead_letters("a")
        assert [(d.event_id, d.stream_id) for d in letters] == [("$e2", 2), ("$e2", 4)]
        receiver.rules.clear()
        assert await service.redrive("a") == 2
        await receiver.wait_for(lambda: receiver.event_ids[3:] == ["$e2", "$e2"])
        assert (await service.status("a")).queued_events == 0
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_replay_survives_a_restart(db_url, reactor, receiver):
    receiver.answer(503)
    regs = [registration("a", receiver.url, users=".*", initial_delay=60, probe=False)]
    service, recorder, _ = started(db_url, reactor, regs)
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1), event(2), event(3)])
        await down
        await service.routed()
        assert await service.replay("a", from_stream_id=1) == ReplayResult(3, 1, 3, False)
    finally:
        await service.stopService()  # straight after: the copies may not even be routed

    receiver.answer(200)
    service, recorder, _ = started(db_url, reactor, regs)
    try:
        await recorder.wait_for(
            lambda: sum(t.event_count for _, t, r in recorder.results if r.ok) == 6
        )
        assert receiver.event_ids == ["$e1", "$e2", "$e3"] * 2
        status = await service.status("a")
        assert (status.queued_events, status.stored_transactions) == (0, 0)
    finally:
        await service.stopService()


@implementer(IEventSource)
class _Nothing:
    def events_after(self, position: int, limit: int) -> Deferred[Sequence[StoredEvent]]:
        return succeed([])


@pytest_twisted.ensureDeferred
async def test_what_cannot_be_replayed_says_why(db_url, reactor, receiver):
    regs = [registration("a", receiver.url, users=".*")]
    service, _, _ = started(db_url, reactor, regs)
    try:
        with pytest.raises(UnknownServiceError, match="no application service with id 'nope'"):
            await service.replay("nope", from_stream_id=1)
        cases: list[tuple[dict[str, Any], str]] = [
            ({}, "give one start of the replay: from_ts or from_stream_id"),
            ({"from_ts": 1, "from_stream_id": 1}, "give one start of the replay"),
            ({"from_ts": 1, "to_ts": 2, "to_stream_id": 3}, "give at most one end of the replay"),
            ({"from_stream_id": -1}, "from_stream_id must be a whole number from 0 to"),
            ({"from_stream_id": 1.5}, "from_stream_id must be a whole number"),
            ({"from_stream_id": True}, "from_stream_id must be a whole number"),
            ({"from_stream_id": 2**63}, "from_stream_id must be a whole number"),
            ({"from_stream_id": 1, "to_stream_id": "2"}, "to_stream_id must be a whole number"),
            ({"from_ts": -0.5}, "from_ts must be a time in seconds, 0 or more, not -0.5"),
            ({"from_ts": float("nan")}, "from_ts must be a time in seconds"),
            ({"from_ts": float("inf")}, "from_ts must be a time in seconds"),
            ({"from_ts": 10**400}, "from_ts must be a time in seconds"),
            ({"from_ts": "1"}, "from_ts must be a time in seconds"),
            ({"from_stream_id": 5, "to_stream_id": 4}, r"to_stream_id \(4\) is before"),
            ({"from_ts": 5, "to_ts": 4.5}, r"to_ts \(4.5\) is before from_ts \(5\)"),
        ]
        for kwargs, message in cases:
            with pytest.raises(ValueError, match=message):
                await service.replay("a", **kwargs)
    finally:
        await service.stopService()

    service, _, _ = make_service(
        open_store(db_url, reactor), regs, reactor, event_source=_Nothing()
    )
    service.startService()
    try:
        with pytest.raises(NotAcceptingEventsError, match="replay is not possible"):
            await service.replay("a", from_stream_id=1)
    finally:
        await service.stopService()


# -- the API and the command line --


def _daemon_config(tmp_path: Path, db_url: str, receiver: Receiver) -> Path:
    registrations = [
        write_registration(tmp_path, "a", receiver.url, users="@a_.*"),
        write_registration(tmp_path, "b", None, users="@b_.*"),
    ]
    return write_config(tmp_path, registrations, database=db_url)


@pytest_twisted.ensureDeferred
async def test_the_replay_endpoint(tmp_path, db_url, reactor, receiver):
    running = await start_daemon(_daemon_config(tmp_path, db_url, receiver), reactor)
    path = "/v1/services/a/replay"
    try:
        await running.ingest([event(1, sender="@a_1:hs"), event(2, sender="@b_1:hs")])
        await running.ingest([event(3, sender="@a_2:hs")])
        await receiver.wait_for_events(2)
        await running.daemon.delivery.routed()

        for token in (None, "nonsense", INGEST):
            status, body = await running.request("POST", path, {"from_ts": 0}, token=token)
            assert status == 401, body
        for service_id in ("nope", "a%2F", "A"):
            status, body = await running.request(
                "POST", f"/v1/services/{service_id}/replay", {"from_ts": 0}
            )
            assert (status, body["errcode"]) == (404, "M_NOT_FOUND"), service_id
        for bad, errcode, says in [
            ({}, "M_INVALID_PARAM", "give one start of the replay: from_ts or from_stream_id"),
            ({"from_ts": 0, "from_stream_id": 1}, "M_INVALID_PARAM", "give one start"),
            ({"from_ts": None}, "M_INVALID_PARAM", "give one start"),
            ({"from_ts": 0, "to_ts": 1, "to_stream_id": 1}, "M_INVALID_PARAM", "at most one end"),
            ({"from_stream_id": "1"}, "M_BAD_JSON", "from_stream_id must be a whole number"),
            ({"from_stream_id": 1.0}, "M_BAD_JSON", "from_stream_id must be a whole number"),
            ({"from_ts": True}, "M_BAD_JSON", "from_ts must be a number"),
            ({"from_ts": [1]}, "M_BAD_JSON", "from_ts must be a number"),
            ({"from_stream_id": -1}, "M_INVALID_PARAM", "from 0 to 4611686018427387904"),
            ({"from_stream_id": 2**62 + 1}, "M_INVALID_PARAM", "from 0 to 4611686018427387904"),
            ({"from_ts": -1}, "M_INVALID_PARAM", "from_ts must be a time in seconds, 0 or more"),
            ({"from_ts": 10, "to_ts": 9}, "M_INVALID_PARAM", "to_ts (9) is before from_ts (10"),
            ({"from_stream_id": 3, "to_stream_id": 2}, "M_INVALID_PARAM", "to_stream_id (2)"),
            ({"since": 60}, "M_BAD_JSON", 'unknown key "since"'),
            ([{"from_ts": 0}], "M_BAD_JSON", 'the body must be {"from_ts": T}'),
            ("from_ts", "M_BAD_JSON", 'the body must be {"from_ts": T}'),
        ]:
            status, body = await running.request("POST", path, bad)
            assert (status, body["errcode"]) == (400, errcode), bad
            assert says in body["error"], (bad, body)
        for raw in (b"", b"{", b'{"from_ts": 1e999}'):
            status, body = await running.request("POST", path, raw=raw)
            assert status == 400, (raw, body)
        status, body = await running.request(
            "POST", path, raw=b'{"from_ts": 0}', headers={"Content-Type": "text/plain"}
        )
        assert status == 415, body
        assert receiver.event_ids == ["$e1", "$e3"]  # none of that replayed anything

        status, body = await running.request("POST", path, {"from_stream_id": 1})
        assert (status, body) == (
            200,
            {"queued": 2, "first_stream_id": 1, "last_stream_id": 3, "partly_deleted": False},
        )
        await receiver.wait_for_events(4)
        status, body = await running.request(
            "POST", path, {"from_ts": 0, "to_stream_id": 2, "to_ts": None}
        )
        assert (status, body["queued"], body["last_stream_id"]) == (200, 1, 1)
        await receiver.wait_for_events(5)
        assert receiver.event_ids == ["$e1", "$e3", "$e1", "$e3", "$e1"]
        status, body = await running.request("POST", "/v1/services/b/replay", {"from_ts": 0})
        assert (status, body["queued"]) == (200, 0)  # b has no url: it receives nothing
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_delivery_replay_asks_the_running_daemon(tmp_path, db_url, reactor, receiver, capsys):
    config = _daemon_config(tmp_path, db_url, receiver)
    running = await start_daemon(config, reactor)
    try:
        await running.ingest([event(n, sender="@a_1:hs") for n in (1, 2, 3)])
        await receiver.wait_for_events(3)
        await running.daemon.delivery.routed()
        common = [str(config), "--url", running.url]

        code = await deferToThread(cli.main, ["replay", "a", *common, "--from-stream-id", "2"])
        out, err = capsys.readouterr()
        assert (code, err) == (0, "")
        assert out == "a: 2 event(s) queued again (stream positions 2 to 3)\n"
        await receiver.wait_for_events(5)

        argv = ["replay", "a", "-c", str(config), "--since", "3600", "--to-stream-id", "1"]
        code = await deferToThread(cli.main, [*argv, "--url", running.url, "--json"])
        out, err = capsys.readouterr()
        assert (code, err) == (0, "")
        assert json.loads(out) == {
            "queued": 1,
            "first_stream_id": 1,
            "last_stream_id": 1,
            "partly_deleted": False,
        }
        await receiver.wait_for_events(6)
        assert receiver.event_ids == ["$e1", "$e2", "$e3", "$e2", "$e3", "$e1"]

        code = await deferToThread(cli.main, ["replay", "a", *common, "--from-ts", "1e12"])
        assert (code, capsys.readouterr().out) == (0, "a: no event in that range to replay\n")

        for argv, message in [
            (["replay", "nope", *common, "--since", "60"], "no application service with id"),
            (
                ["replay", "a", *common, "--from-stream-id", "3", "--to-stream-id", "2"],
                "to_stream_id (2) is before from_stream_id (3)",
            ),
        ]:
            code = await deferToThread(cli.main, argv)
            err = capsys.readouterr().err
            assert code == 1, err
            assert err.startswith("delivery: "), err
            assert err.count("\n") == 1, err
            assert message in err, err
            assert "Traceback" not in err
            assert ADMIN not in err
    finally:
        await running.daemon.stopService()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "one of the arguments --from-ts --since --from-stream-id is required"),
        (["--from-ts", "1", "--since", "5"], "not allowed with argument"),
        (["--since", "-5"], "--since must be 0 or more, not -5.0"),
        (["--from-stream-id", "x"], "invalid int value: 'x'"),
        (["--from-ts", "nan"], "--from-ts must be 0 or more, not nan"),
        (["--since", "1", "--to-ts", "1", "--to-stream-id", "2"], "not allowed with argument"),
    ],
)
def test_a_bad_replay_command_line_prints_its_usage(
    tmp_path: Path, capsys: Any, extra: list[str], message: str
) -> None:
    config = write_config(tmp_path, [])
    with pytest.raises(SystemExit) as exit:
        cli.main(["replay", "a", str(config), *extra])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: delivery replay [-h]"), err
    assert message in err, err
