"""
Events at ingest: validated once, encoded once; a batch with one bad event is refused whole
(InvalidEventError naming the index and the problem) and nothing of it is stored; ingest is
idempotent on ``event_id``.
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from delivery import DeliveryService, InvalidEventError
from delivery.events import DEFAULT_MAX_EVENT_BYTES, prepare, transaction_body
from delivery.interest import RoutingFields

from .harness import Recorder, event, make_service, registration
from .receiver import Receiver


def deeply_nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def deeply_nested_objects(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def cyclic() -> list[Any]:
    value: list[Any] = []
    value.append(value)
    return value


def _generator() -> Iterator[dict[str, Any]]:
    yield event(1)


# (batch, index of the bad event, words the message must contain)
INVALID: list[Any] = [
    # not a list of events
    pytest.param(event(1), -1, "list", id="a-single-event"),
    pytest.param("$e1", -1, "list", id="a-string"),
    pytest.param(b"[]", -1, "list", id="bytes"),
    pytest.param(None, -1, "list", id="none"),
    pytest.param(5, -1, "list", id="a-number"),
    pytest.param({event(1)["event_id"]: event(1)}, -1, "list", id="a-mapping"),
    pytest.param(_generator(), -1, "list", id="a-generator"),
    # not an object
    pytest.param([event(0), "$e1"], 1, "JSON object", id="string-event"),
    pytest.param([event(0), None], 1, "JSON object", id="null-event"),
    pytest.param([event(0), [event(1)]], 1, "JSON object", id="list-event"),
    pytest.param([7], 0, "JSON object", id="number-event"),
    # event_id
    pytest.param([event(0), {"type": "m.room.message"}], 1, "'event_id'", id="no-event-id"),
    pytest.param([{**event(0), "event_id": ""}], 0, "'event_id'", id="empty-event-id"),
    pytest.param(
        [event(0), {**event(1), "event_id": " "}], 1, "besides white space", id="blank-event-id"
    ),
    pytest.param(
        [{**event(0), "event_id": "\t\n\u3000"}], 0, "besides white space", id="white-event-id"
    ),
    pytest.param(
        [{**event(0), "event_id": "$" + "x" * 100_000, "sender": 5}],
        0,
        "$" + "x" * 63 + "…: 'sender'",
        id="long-event-id-quoted-short",
    ),
    pytest.param([event(0), {**event(1), "event_id": 1}], 1, "'event_id'", id="int-event-id"),
    pytest.param([{**event(0), "event_id": None}], 0, "'event_id'", id="null-event-id"),
    pytest.param([{**event(0), "event_id": ["$a"]}], 0, "'event_id'", id="list-event-id"),
    # routing fields
    pytest.param(
        [event(0), {**event(1), "sender": 5}], 1, "$e1: 'sender' must be a string", id="sender"
    ),
    pytest.param(
        [{**event(0), "room_id": ["!r"]}], 0, "$e0: 'room_id' must be a string", id="room_id"
    ),
    pytest.param([event(0, type={"a": 1})], 0, "$e0: 'type' must be a string", id="type"),
    pytest.param([event(0, state_key=0)], 0, "$e0: 'state_key' must be a string", id="state_key"),
    pytest.param([event(0, state_key=False)], 0, "'state_key' must be a string", id="bool-key"),
    # not JSON
    pytest.param([event(0), event(1, x=math.nan)], 1, "$e1: cannot be encoded", id="nan"),
    pytest.param([event(0, content={"n": math.inf})], 0, "cannot be encoded", id="infinity"),
    pytest.param([event(0, content=[-math.inf])], 0, "cannot be encoded", id="-infinity"),
    pytest.param([event(0, x={1, 2})], 0, "cannot be encoded", id="set"),
    pytest.param([event(0, x=b"bytes")], 0, "cannot be encoded", id="bytes-value"),
    pytest.param([event(0, x=object())], 0, "cannot be encoded", id="object"),
    pytest.param([event(0, x=1j)], 0, "cannot be encoded", id="complex"),
    pytest.param([event(0, x=datetime.date(2024, 1, 1))], 0, "cannot be encoded", id="date"),
    # keys that are not strings (the encoder would quietly turn 1 into "1")
    pytest.param([event(0, content={(1, 2): "a"})], 0, "key that is not a string", id="tuple-key"),
    pytest.param(
        [event(0, content={1: "a", "1": "b"})], 0, "key that is not a string: 1", id="int-key"
    ),
    pytest.param(
        [event(0), event(1, unsigned={"a": [{None: 1}]})], 1, "$e1: has a key", id="null-key"
    ),
    pytest.param([event(0, content={True: 1})], 0, "key that is not a string", id="bool-key"),
    pytest.param([event(0, content={1.5: 1})], 0, "key that is not a string", id="float-key"),
    pytest.param([event(0, x=10**5000)], 0, "cannot be encoded", id="int-too-long"),
    # lone surrogates cannot be UTF-8
    pytest.param(
        [event(0), event(1, content={"body": "a\ud800b"})],
        1,
        "$e1: cannot be encoded",
        id="surrogate-value",
    ),
    pytest.param([event(0, content={"\udfff": "b"})], 0, "cannot be encoded", id="surrogate-key"),
    pytest.param(
        [{**event(0), "event_id": "$\udc80"}], 0, "cannot be encoded", id="surrogate-event-id"
    ),
    pytest.param([event(0, sender="@\ud83d:hs")], 0, "cannot be encoded", id="surrogate-sender"),
    # too large
    pytest.param(
        [event(0), event(1, content={"body": "x" * DEFAULT_MAX_EVENT_BYTES})],
        1,
        "$e1: is ",
        id="too-large",
    ),
    pytest.param(
        [event(0, content={"body": "é" * 40_000})],
        0,
        "more than the limit of 65536",
        id="too-large-in-utf8",
    ),
    # too deep
    pytest.param(
        [event(0, content={"d": deeply_nested(5000)})],
        0,
        "nested more than 100",
        id="deeply-nested",
    ),
    pytest.param(
        [event(0, content={"d": deeply_nested(98)})], 0, "nested more than 100", id="nested-101"
    ),
    pytest.param(
        [event(0, content=deeply_nested_objects(99))], 0, "nested more", id="nested-objects"
    ),
    pytest.param([event(0, content={"d": cyclic()})], 0, "$e0: ", id="cyclic"),
]


def _check_error(error: InvalidEventError, index: int, words: str) -> None:
    assert error.index == index
    if index >= 0:
        assert str(error).startswith(f"event {index}: ")
    else:  # the batch itself is wrong: no event to name
        assert not str(error).startswith("event -")
    assert words in str(error)


@pytest.mark.parametrize(("batch", "index", "words"), INVALID)
def test_prepare_refuses(batch: Any, index: int, words: str) -> None:
    with pytest.raises(InvalidEventError) as info:
        prepare(batch)
    _check_error(info.value, index, words)


def test_nesting_up_to_the_limit_is_accepted() -> None:
    # the event is level 1, its content level 2: deeply_nested(97) adds 98 levels (100 in
    # all) and is accepted, deeply_nested(98) (101 levels) is refused above
    e = event(0, content={"d": deeply_nested(97)})
    (p,) = prepare([e])
    assert json.loads(p.json) == e
    e = event(0, content=deeply_nested_objects(98))
    assert json.loads(prepare([e])[0].json) == e


def test_tuples_are_json_arrays() -> None:
    (p,) = prepare([event(0, content={"a": (1, (2, 3))})])
    assert json.loads(p.json)["content"] == {"a": [1, [2, 3]]}


def test_prepare_encodes_compact_utf8_once() -> None:
    e = event(1, content={"body": "héllo ☃ \U0001f600", "n": [1, 2.5, None, True]})
    (prepared,) = prepare([e])
    assert prepared.event_id == "$e1"
    assert prepared.routing == RoutingFields("@alice:hs", "!room:hs", "m.room.message", None)
    assert prepared.json == json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode()
    assert "héllo ☃ \U0001f600".encode() in prepared.json
    assert json.loads(prepared.json) == e
    assert json.loads(transaction_body([prepared.json, prepared.json])) == {"events": [e, e]}


def test_prepare_accepts_an_empty_batch_and_tuples() -> None:
    assert prepare([]) == []
    assert [p.event_id for p in prepare((event(1), event(2)))] == ["$e1", "$e2"]


def test_prepare_routing_fields_may_be_absent_or_null() -> None:
    (p,) = prepare([{"event_id": "$x", "sender": None, "content": {}}])
    assert p.routing == RoutingFields(None, None, None, None)


def test_size_limit_is_inclusive() -> None:
    e = event(1, content={"body": "x" * 1000})
    size = len(prepare([e])[0].json)
    assert len(prepare([e], max_event_bytes=size)) == 1
    with pytest.raises(InvalidEventError, match=rf"is {size} bytes .* limit of {size - 1} bytes"):
        prepare([e], max_event_bytes=size - 1)


# -- through DeliveryService.submit --


@attrs.frozen
class Running:
    service: DeliveryService
    recorder: Recorder
    receiver: Receiver
    store: Any


@pytest_twisted.async_yield_fixture
async def running(store: Any, reactor: Any, receiver: Receiver) -> AsyncIterator[Running]:
    service, recorder, _clock = make_service(
        store, [registration("a", receiver.url, users="@alice:.*")], reactor
    )
    service.startService()
    try:
        yield Running(service, recorder, receiver, store)
    finally:
        await service.stopService()


@pytest.mark.parametrize(("batch", "index", "words"), INVALID)
@pytest_twisted.ensureDeferred
async def test_submit_refuses_and_stores_nothing(
    running: Running, batch: Any, index: int, words: str
) -> None:
    with pytest.raises(InvalidEventError) as info:
        await running.service.submit(batch)
    _check_error(info.value, index, words)
    assert await running.store.events_after(0, 100) == []
    # the next valid batch starts the stream: nothing was stored, nothing numbered
    assert await running.service.submit([event(100), event(101)]) == [1, 2]
    await running.receiver.wait_for_events(2)
    assert running.receiver.event_ids == ["$e100", "$e101"]
    stored = await running.store.events_after(0, 100)
    assert [s.event.event_id for s in stored] == ["$e100", "$e101"]


@pytest_twisted.ensureDeferred
async def test_submit_respects_max_event_bytes(
    store: Any, reactor: Any, receiver: Receiver
) -> None:
    small = event(1)
    size = len(prepare([small])[0].json)
    service, _recorder, _clock = make_service(
        store,
        [registration("a", receiver.url, users="@alice:.*")],
        reactor,
        max_event_bytes=size,
    )
    service.startService()
    try:
        with pytest.raises(InvalidEventError, match=rf"event 1: \$e2: is {size + 1} bytes"):
            await service.submit([small, event(2, content={"body": "message 22"})])
        assert await store.events_after(0, 10) == []
        assert await service.submit([small]) == [1]
        await receiver.wait_for_events(1)
    finally:
        await service.stopService()
    assert receiver.event_ids == ["$e1"]


@pytest_twisted.ensureDeferred
async def test_submit_empty_batch(running: Running) -> None:
    assert await running.service.submit([]) == []
    assert await running.store.events_after(0, 100) == []
    assert await running.service.submit([event(1)]) == [1]


@pytest_twisted.ensureDeferred
async def test_idempotent_ingest(running: Running) -> None:
    # Positions are strictly increasing, not contiguous: a resubmission may use up positions
    # (SQLite's AUTOINCREMENT counts conflicting inserts too), so only order is checked.
    service, receiver = running.service, running.receiver
    assert await service.submit([event(1), event(2)]) == [1, 2]
    # again: the first positions, nothing new
    assert await service.submit([event(1)]) == [1]
    assert await service.submit([event(2), event(1)]) == [2, 1]
    # the same event twice in one batch, with an old one between
    e3, again1, again3 = await service.submit([event(3), event(1), event(3)])
    assert (again1, again3) == (1, e3)
    assert e3 > 2
    # a resubmission with other content changes nothing: the first one stands
    changed = event(1, content={"body": "changed"})
    again1, e4 = await service.submit([changed, event(4)])
    assert again1 == 1
    assert e4 > e3
    await receiver.wait_for_events(4)
    # a sentinel: whatever else was on its way arrives before it
    (e5,) = await service.submit([event(5)])
    assert e5 > e4
    await receiver.wait_for_events(5)
    assert receiver.event_ids == ["$e1", "$e2", "$e3", "$e4", "$e5"]
    delivered = {e["event_id"]: e for r in receiver.accepted for e in r.events}
    assert delivered["$e1"] == event(1)
    stored = await running.store.events_after(0, 100)
    assert [(s.stream_id, s.event.event_id) for s in stored] == [
        (1, "$e1"),
        (2, "$e2"),
        (e3, "$e3"),
        (e4, "$e4"),
        (e5, "$e5"),
    ]
    assert json.loads(stored[0].event.json) == event(1)


@pytest_twisted.ensureDeferred
async def test_a_batch_of_one_event_twice_is_delivered_once(running: Running) -> None:
    assert await running.service.submit([event(1), event(1), event(1)]) == [1, 1, 1]
    await running.receiver.wait_for_events(1)
    (e2,) = await running.service.submit([event(2)])
    assert e2 > 1
    await running.receiver.wait_for_events(2)
    assert running.receiver.event_ids == ["$e1", "$e2"]
    stored = await running.store.events_after(0, 100)
    assert [s.event.event_id for s in stored] == ["$e1", "$e2"]


@pytest_twisted.ensureDeferred
async def test_events_arrive_as_submitted(running: Running) -> None:
    odd = event(
        1,
        content={"body": '☃ \U0001f600 \u2028 \x00 "quoted" \\', "n": 1.5e300, "neg": -0.0},
        unsigned={"age": 12, "nested": [{"a": [None, True, False]}]},
    )
    await running.service.submit([odd])
    await running.receiver.wait_for_events(1)
    assert running.receiver.accepted[0].events == [odd]


# -- never anything but InvalidEventError, and what is accepted round-trips --

strings = st.text(max_size=8) | st.sampled_from(["\ud800", "ok\udc00", "é", "\x00", "", "☃"])
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and ±Infinity included: they must be refused
    | strings
)
json_like = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(strings, children, max_size=4)
    ),
    max_leaves=15,
)
non_json = st.sampled_from([b"x", {1, 2}, 1j, object(), datetime.date(2024, 1, 1)])
# not JSON: objects with keys that are not strings, at any depth
bad_keys = st.recursive(
    st.dictionaries(st.integers() | st.none() | st.booleans() | st.floats(), leaves, min_size=1),
    lambda children: (
        st.lists(children, min_size=1, max_size=2)
        | st.dictionaries(strings, children, min_size=1, max_size=2)
    ),
    max_leaves=6,
)


#: 5 one time in 16
ONE_IN_16 = st.sampled_from(range(16))


@st.composite
def event_like(draw: st.DrawFn) -> Any:
    """Mostly events that are nearly right, with something wrong one time in a few."""

    def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
        return draw(bad) if draw(ONE_IN_16) == 5 else draw(good)

    if draw(ONE_IN_16) == 5:
        return draw(json_like)  # not an object, mostly
    e: dict[str, Any] = {"event_id": mostly(st.text(min_size=1, max_size=6), json_like)}
    routing = st.sampled_from(["@alice:hs", "!r:hs", "m.room.member", "m.room.message", ""])
    for key in draw(st.lists(st.sampled_from(["sender", "room_id", "type", "state_key"]))):
        e[key] = mostly(routing | strings, json_like)
    if draw(st.booleans()):
        e["content"] = draw(json_like)
    if draw(st.booleans()):
        e["unsigned"] = mostly(json_like, non_json | bad_keys)
    if draw(ONE_IN_16) == 5:
        del e["event_id"]
    return e


batches = st.one_of(st.lists(event_like(), max_size=5), json_like)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches, st.just(DEFAULT_MAX_EVENT_BYTES) | st.integers(min_value=1, max_value=1000))
def test_prepare_raises_only_invalid_event_error(batch: Any, limit: int) -> None:
    error: InvalidEventError | None = None
    try:
        prepared = prepare(batch, max_event_bytes=limit)
    except InvalidEventError as e:
        error = e
    if error is not None:
        assert -1 <= error.index < (len(batch) if isinstance(batch, list) else 0)
        return
    assert isinstance(batch, list)
    assert len(prepared) == len(batch)
    for original, p in zip(batch, prepared, strict=True):
        assert json.loads(p.json) == original
        assert len(p.json) <= limit
        assert p.event_id == original["event_id"]
        assert p.routing == RoutingFields(
            original.get("sender"),
            original.get("room_id"),
            original.get("type"),
            original.get("state_key"),
        )
