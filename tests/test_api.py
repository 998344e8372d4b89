"""
The daemon's HTTP API as its users see it: a real in-process daemon (``start_daemon``) on
a real port, real Matrix AS receivers on 127.0.0.1, every endpoint of ``delivery.api``.

Every answer body this module receives is kept in ``BODIES``; the last test checks that
no token or registration secret ever appears in one.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import pytest
import pytest_twisted
import treq
import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from delivery.events import transaction_body

from .daemon_harness import ADMIN, INGEST, Running, start_daemon, write_config
from .harness import event, txn_id, txn_ids
from .receiver import HS_TOKEN, start_receiver, stop_receiver

METRICS = "metrics-secret-token"

#: every answer body received in this module (checked for secrets by the last test)
BODIES: list[bytes] = []
#: every secret the daemons of this module were given
SECRETS: set[str] = {INGEST, ADMIN, METRICS, HS_TOKEN}

#: delivery options for a service that must stay DOWN until the test says otherwise
SLOW: dict[str, Any] = {"initial_delay": 100, "max_delay": 1000, "jitter": 0, "probe": False}


# -- helpers --


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def errcode(self) -> Any:
        return self.json().get("errcode")


async def call(
    running: Running,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = ADMIN,
    raw: bytes | IBodyProducer | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """
    One request to the daemon; the answer's body is kept in BODIES. A body goes as
    ``application/json`` unless ``headers`` give a Content-Type.
    """
    all_headers: dict[bytes | str, bytes | str] = dict((headers or {}).items())
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None and not any(str(k).lower() == "content-type" for k in all_headers):
        all_headers["Content-Type"] = "application/json"
    response = await treq.request(
        method, running.url + path, data=data, headers=all_headers, persistent=False
    )
    content = await response.content()
    BODIES.append(content)
    found = {
        name.decode("latin-1").lower(): values[-1].decode("latin-1")
        for name, values in response.headers.getAllRawHeaders()
    }
    return Answer(response.code, found, content)


async def ingest(running: Running, events: list[dict[str, Any]]) -> list[int]:
    answer = await call(running, "POST", "/v1/events", {"events": events}, token=INGEST)
    assert answer.status == 200, answer.body
    return list(answer.json()["stream_ids"])


async def status_of(running: Running, service_id: str) -> dict[str, Any]:
    answer = await call(running, "GET", f"/v1/services/{quote(service_id, safe='')}")
    assert answer.status == 200, answer.body
    result: dict[str, Any] = answer.json()
    return result


async def transactions(running: Running, service_id: str, query: str = "") -> Answer:
    return await call(running, "GET", f"/v1/services/{service_id}/transactions{query}")


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    """Poll ``check`` every 10 ms until it holds; fail after ``timeout`` seconds."""
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


async def until_status(running: Running, service_id: str, **expected: Any) -> dict[str, Any]:
    """Poll the service's status until the given fields have the given values."""
    found: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal found
        found = await status_of(running, service_id)
        return all(found[k] == v for k, v in expected.items())

    try:
        await until(check, f"{service_id} to have {expected}")
    except AssertionError:
        raise AssertionError(f"{service_id} never had {expected}; last {found}") from None
    return found


def register(
    folder: Path,
    service_id: str,
    url: str | None,
    *,
    file: str | None = None,
    users: str = ".*",
    **options: Any,
) -> Path:
    """A Matrix registration file (named ``file``, else after the id)."""
    as_token = f"as-{service_id}-secret"
    SECRETS.add(as_token)
    data: dict[str, Any] = {
        "id": service_id,
        "url": url,
        "as_token": as_token,
        "hs_token": HS_TOKEN,
        "sender_localpart": "bot",
        "namespaces": {"users": [{"regex": users, "exclusive": False}]},
    }
    if options:
        data["delivery"] = options
    path = folder / (file or f"{service_id}.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def configure(folder: Path, registrations: list[Path], **extra: Any) -> Path:
    return write_config(folder, registrations, **{"metrics_token": METRICS, **extra})


async def start(folder: Path, reactor: Any, registrations: list[Path], **extra: Any) -> Running:
    return await start_daemon(configure(folder, registrations, **extra), reactor)


def padded(size: int, n: int = 1) -> bytes:
    """An ingest body of exactly ``size`` bytes holding one event."""
    body = json.dumps({"events": [event(n, pad="")]}).encode()
    assert len(body) <= size
    return json.dumps({"events": [event(n, pad="x" * (size - len(body)))]}).encode()


@implementer(IBodyProducer)
class Chunked:
    """A request body of unknown length: the client sends it with chunked encoding."""

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes, size: int = 512) -> None:
        self.data = data
        self.size = size

    def startProducing(self, consumer: IConsumer) -> Any:
        for start in range(0, len(self.data), self.size):
            consumer.write(self.data[start : start + self.size])
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


# -- POST /v1/events --


@pytest_twisted.ensureDeferred
async def test_a_batch_is_stored_and_reaches_the_receiver(tmp_path, reactor, receiver):
    running = await start(tmp_path, reactor, [register(tmp_path, "a", receiver.url)])
    try:
        answer = await call(
            running, "POST", "/v1/events", {"events": [event(1), event(2), event(3)]}, token=INGEST
        )
        assert answer.status == 200
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == {"stream_ids": [1, 2, 3]}
        await receiver.wait_for_events(3)
        assert receiver.event_ids == ["$e1", "$e2", "$e3"]
        assert receiver.requests[0].events == [event(1), event(2), event(3)]
        assert await ingest(running, []) == []
        assert await ingest(running, [event(4)]) == [4]
        await receiver.wait_for_events(4)
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_ingest_is_idempotent_by_event_id(tmp_path, reactor, receiver):
    running = await start(tmp_path, reactor, [register(tmp_path, "a", receiver.url)])
    try:
        assert await ingest(running, [event(1), event(2)]) == [1, 2]
        await receiver.wait_for_events(2)
        assert await ingest(running, [event(1), event(2)]) == [1, 2]
        changed = {**event(1), "content": {"body": "changed"}}
        assert await ingest(running, [changed]) == [1]
        # (a duplicate uses up a stream position without taking it: positions only grow)
        two, three, again = await ingest(running, [event(2), event(3), event(3)])
        assert (two, again) == (2, three)
        assert three > 2
        await receiver.wait_for_events(3)
        (four,) = await ingest(running, [event(4)])
        assert four > three
        await receiver.wait_for_events(4)
        # each event once, as first given, and no transaction for the duplicates
        assert receiver.event_ids == ["$e1", "$e2", "$e3", "$e4"]
        assert sum(len(r.event_ids) for r in receiver.requests) == 4
        assert receiver.requests[0].events[0] == event(1)
        last = txn_id(running.daemon.delivery.store, len(receiver.requests))
        assert (await status_of(running, "a"))["last_txn_id"] == last
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_ingest_takes_only_the_ingest_token(tmp_path, reactor, receiver):
    running = await start(tmp_path, reactor, [register(tmp_path, "a", receiver.url)])
    try:
        batch = {"events": [event(1)]}
        for headers, errcode in [
            ({}, "M_MISSING_TOKEN"),
            ({"Authorization": f"Basic {INGEST}"}, "M_MISSING_TOKEN"),
            ({"Authorization": "Bearer"}, "M_MISSING_TOKEN"),
            ({"Authorization": INGEST}, "M_MISSING_TOKEN"),
            ({"Authorization": "Bearer nonsense"}, "M_UNKNOWN_TOKEN"),
            ({"Authorization": f"Bearer {ADMIN}"}, "M_UNKNOWN_TOKEN"),
            ({"Authorization": f"Bearer {METRICS}"}, "M_UNKNOWN_TOKEN"),
            ({"Authorization": f"Bearer {INGEST}x"}, "M_UNKNOWN_TOKEN"),
            ({"Authorization": f"Bearer {INGEST[:-1]}"}, "M_UNKNOWN_TOKEN"),
        ]:
            answer = await call(running, "POST", "/v1/events", batch, token=None, headers=headers)
            assert (answer.status, answer.errcode) == (401, errcode), headers
            assert set(answer.json()) == {"errcode", "error"}
        # a bad body with no token is still a 401: the token is checked first
        answer = await call(running, "POST", "/v1/events", raw=b"{", token=None)
        assert (answer.status, answer.errcode) == (401, "M_MISSING_TOKEN")
        # nothing refused was stored: the first good event gets the first stream id
        lower = {"Authorization": f"bearer {INGEST}"}
        answer = await call(running, "POST", "/v1/events", batch, token=None, headers=lower)
        assert (answer.status, answer.json()) == (200, {"stream_ids": [1]})
        await receiver.wait_for_events(1)
        assert len(receiver.requests) == 1
    finally:
        await running.daemon.stopService()


NOT_JSON = [
    b"",
    b"{",
    b"{'events': []}",
    b'{"events": [1,]}',
    b'{"events": [NaN]}',
    b'{"events": [{"event_id": "$x", "n": Infinity}]}',
    b'{"events": -Infinity}',
    b"\xff\xfe\x00",
    b'{"events": []} {}',
    b"[" * 3000 + b"]" * 3000,
]
NOT_A_BATCH = [
    b"[]",
    b'"events"',
    b"null",
    b"1",
    b"{}",
    b'{"events": {}}',
    b'{"events": "abc"}',
    b'{"events": null}',
    b'{"events": 1}',
    b'{"Events": []}',
    b'[{"events": []}]',
]


@pytest_twisted.ensureDeferred
async def test_a_body_that_is_not_a_json_batch_is_400(tmp_path, reactor, receiver):
    running = await start(tmp_path, reactor, [register(tmp_path, "a", receiver.url)])
    try:
        for raw in NOT_JSON:
            answer = await call(running, "POST", "/v1/events", raw=raw, token=INGEST)
            assert (answer.status, answer.errcode) == (400, "M_NOT_JSON"), raw[:40]
        for raw in NOT_A_BATCH:
            answer = await call(running, "POST", "/v1/events", raw=raw, token=INGEST)
            assert (answer.status, answer.errcode) == (400, "M_BAD_JSON"), raw
            assert answer.json()["error"] == 'the body must be {"events": [ ... ]}'
        assert await ingest(running, [event(1)]) == [1]
        await receiver.wait_for_events(1)
        assert receiver.event_ids == ["$e1"]
    finally:
        await running.daemon.stopService()


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"x": value}
    return value


@pytest_twisted.ensureDeferred
async def test_an_invalid_event_refuses_the_whole_batch(tmp_path, reactor, receiver):
    running = await start(
        tmp_path, reactor, [register(tmp_path, "a", receiver.url)], max_event_bytes=2000
    )
    try:
        bad: list[tuple[list[Any], int]] = [
            ([event(1), {"type": "m.room.message"}], 1),
            ([event(1), event(2), "not an object"], 2),
            ([{"event_id": ""}, event(1)], 0),
            ([event(1), {"event_id": 5}], 1),
            ([event(1), {**event(2), "sender": 5}], 1),
            ([event(1), event(2), {**event(3), "state_key": ["a"]}], 2),
            ([event(1), {**event(2), "content": nested(150)}], 1),
            ([event(1), event(2, pad="x" * 2000)], 1),
            ([event(1), None], 1),
        ]
        for batch, index in bad:
            answer = await call(running, "POST", "/v1/events", {"events": batch}, token=INGEST)
            assert (answer.status, answer.errcode) == (400, "M_BAD_JSON"), batch
            assert answer.json()["error"].startswith(f"event {index}: "), answer.json()
        # a number JSON allows but no event can carry (1e999 reads as infinity)
        raw = b'{"events": [{"event_id": "$ok"}, {"event_id": "$inf", "n": 1e999}]}'
        answer = await call(running, "POST", "/v1/events", raw=raw, token=INGEST)
        assert (answer.status, answer.errcode) == (400, "M_BAD_JSON")
        assert answer.json()["error"].startswith("event 1: $inf: ")

        status = await status_of(running, "a")
        assert (status["queued_events"], status["stored_transactions"]) == (0, 0)
        assert status["last_txn_id"] == txn_id(running.daemon.delivery.store, 0)  # none yet
        assert receiver.requests == []
        # nothing of any refused batch was stored: the next event gets the first stream id
        assert await ingest(running, [event(1)]) == [1]
        await receiver.wait_for_events(1)
        assert receiver.event_ids == ["$e1"]
        assert (await status_of(running, "a"))["last_txn_id"] == txn_id(
            running.daemon.delivery.store, 1
        )
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_more_events_than_max_events_per_request_is_413(tmp_path, reactor, receiver):
    running = await start(
        tmp_path, reactor, [register(tmp_path, "a", receiver.url)], max_events_per_request=5
    )
    try:
        six = {"events": [event(n) for n in range(1, 7)]}
        answer = await call(running, "POST", "/v1/events", six, token=INGEST)
        assert (answer.status, answer.errcode) == (413, "M_TOO_LARGE")
        assert "6 events" in answer.json()["error"]
        assert "at most 5" in answer.json()["error"]
        assert await ingest(running, [event(n) for n in range(1, 6)]) == [1, 2, 3, 4, 5]
        await receiver.wait_for_events(5)
        assert receiver.event_ids == [f"$e{n}" for n in range(1, 6)]
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_a_body_over_max_request_bytes_is_413_whatever_its_framing(
    tmp_path, reactor, receiver
):
    running = await start(
        tmp_path, reactor, [register(tmp_path, "a", receiver.url)], max_request_bytes=2000
    )
    try:
        too_large = ("M_TOO_LARGE", "the request body is larger than 2000 bytes")
        # with Content-Length: the limit itself is fine, one byte more is not
        answer = await call(running, "POST", "/v1/events", raw=padded(2000, 1), token=INGEST)
        assert (answer.status, answer.json()) == (200, {"stream_ids": [1]})
        for raw in (padded(2001, 2), b"x" * 2001, padded(1_000_000, 3)):
            answer = await call(running, "POST", "/v1/events", raw=raw, token=INGEST)
            assert answer.status == 413
            assert (answer.errcode, answer.json()["error"]) == too_large
        # chunked (no Content-Length): the same limit
        answer = await call(
            running, "POST", "/v1/events", raw=Chunked(padded(2000, 4)), token=INGEST
        )
        assert (answer.status, answer.json()) == (200, {"stream_ids": [2]})
        for raw in (padded(2001, 5), padded(300_000, 6)):
            answer = await call(running, "POST", "/v1/events", raw=Chunked(raw), token=INGEST)
            assert answer.status == 413
            assert (answer.errcode, answer.json()["error"]) == too_large
        # nothing refused was stored, and the daemon keeps working
        assert await ingest(running, [event(7)]) == [3]
        await receiver.wait_for_events(3)
        assert receiver.event_ids == ["$e1", "$e4", "$e7"]
        assert (await call(running, "GET", "/health", token=None)).status == 200
    finally:
        await running.daemon.stopService()


# -- GET /v1/services, GET /v1/services/{id}, POST /v1/services/{id}/retry --


@pytest_twisted.ensureDeferred
async def test_service_status_follows_the_events(tmp_path, reactor, receiver):
    receiver.answer(500, body=b'{"errcode":"M_UNKNOWN","error":"bridge is down"}')
    running = await start(tmp_path, reactor, [register(tmp_path, "a", receiver.url, **SLOW)])
    store = running.daemon.delivery.store
    try:
        answer = await call(running, "GET", "/v1/services")
        assert answer.status == 200
        fresh = {
            "service_id": "a",
            "state": "up",
            "queued_events": 0,
            "stored_transactions": 0,
            "oldest_pending_age": None,
            "last_success": None,
            "last_error": None,
            "attempts": 0,
            "next_retry": None,
            "last_txn_id": txn_id(store, 0),
            "owner": None,  # SQLite: no cluster
        }
        assert answer.json() == {"services": [fresh]}
        assert await status_of(running, "a") == fresh

        # the receiver fails: DOWN, with the error, the attempt and the next retry
        started = time.time()
        await ingest(running, [event(1)])
        await receiver.wait_for_requests(1)
        down = await until_status(running, "a", state="down")
        assert down["attempts"] == 1
        assert down["last_error"].startswith("HTTP 500: ")
        assert "bridge is down" in down["last_error"]
        assert started + 100 - 1 <= down["next_retry"] <= time.time() + 100
        assert (down["stored_transactions"], down["queued_events"]) == (1, 0)
        assert down["last_txn_id"] == txn_id(store, 1)
        assert 0 <= down["oldest_pending_age"] <= time.time() - started + 1
        assert down["last_success"] is None

        # events arriving while DOWN wait in the queue; no transaction is cut for them
        await ingest(running, [event(2), event(3)])
        down = await until_status(running, "a", queued_events=2)
        assert (down["state"], down["stored_transactions"], down["last_txn_id"]) == (
            "down",
            1,
            txn_id(store, 1),
        )
        (listed,) = (await call(running, "GET", "/v1/services")).json()["services"]
        assert listed.pop("oldest_pending_age") >= down.pop("oldest_pending_age")
        assert listed == down
        assert len(receiver.requests) == 1

        # a retry that fails again: two attempts, the next wait doubled
        retried = time.time()
        answer = await call(running, "POST", "/v1/services/a/retry")
        assert (answer.status, answer.json()) == (200, {})
        down = await until_status(running, "a", attempts=2, state="down")
        assert retried + 200 - 1 <= down["next_retry"] <= time.time() + 200
        assert [r.txn_id for r in receiver.requests] == txn_ids(store, 1, 1)
        assert receiver.requests[0].body == receiver.requests[1].body

        # the receiver is back: a retry delivers everything and the service is UP
        receiver.answer(200)
        recovered = time.time()
        assert (await call(running, "POST", "/v1/services/a/retry")).status == 200
        await receiver.wait_for_events(3)
        up = await until_status(running, "a", state="up", queued_events=0, stored_transactions=0)
        assert recovered - 1 <= up["last_success"] <= time.time() + 1
        assert {k: up[k] for k in ("last_error", "attempts", "next_retry")} == {
            "last_error": None,
            "attempts": 0,
            "next_retry": None,
        }
        assert up["oldest_pending_age"] is None
        assert up["last_txn_id"] == txn_id(store, 2)
        assert receiver.event_ids == ["$e1", "$e2", "$e3"]
    finally:
        await running.daemon.stopService()


def _closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on (a connection is refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_twisted.ensureDeferred
async def test_ping_answers_as_a_homeserver_does(tmp_path, reactor, receiver):
    registrations = [
        register(tmp_path, "a", receiver.url, users="@a_.*", **SLOW),
        register(tmp_path, "quick", receiver.url, users="@q_.*", request_timeout=0.5, **SLOW),
        register(tmp_path, "nourl", None, users="@n_.*"),
        register(tmp_path, "closed", f"http://127.0.0.1:{_closed_port()}", users="@c_.*"),
    ]
    running = await start(tmp_path, reactor, registrations)
    try:
        answer = await call(running, "POST", "/v1/services/a/ping")
        assert answer.status == 200, answer.json()
        assert set(answer.json()) == {"duration_ms"}
        assert isinstance(answer.json()["duration_ms"], int)
        assert receiver.pings[-1].body == b"{}"
        answer = await call(running, "POST", "/v1/services/a/ping", {"transaction_id": "t-1"})
        assert answer.status == 200
        assert json.loads(receiver.pings[-1].body) == {"transaction_id": "t-1"}

        # another answer: its status and the start of its body, our secrets hidden
        receiver.then(500, body=f'{{"error": "no", "echo": "{HS_TOKEN}"}}'.encode())
        answer = await call(running, "POST", "/v1/services/a/ping")
        assert (answer.status, answer.errcode) == (502, "M_BAD_STATUS")
        assert answer.json()["status"] == 500
        assert answer.json()["body"] == '{"error": "no", "echo": "<redacted>"}'
        assert answer.json()["error"].startswith("HTTP 500")
        # no answer in time, no connection, no URL
        receiver.then(hang=True)
        answer = await call(running, "POST", "/v1/services/quick/ping")
        assert (answer.status, answer.errcode) == (504, "M_CONNECTION_TIMEOUT")
        assert answer.json()["error"] == "no complete answer within 0.5 s"
        receiver.release()
        answer = await call(running, "POST", "/v1/services/closed/ping")
        assert (answer.status, answer.errcode) == (502, "M_CONNECTION_FAILED")
        assert answer.json()["error"] == "connection refused"
        answer = await call(running, "POST", "/v1/services/nourl/ping")
        assert (answer.status, answer.errcode) == (400, "M_URL_NOT_SET")
        assert "has no URL" in answer.json()["error"]
        # what is not a ping
        not_pings: list[Any] = [[], {"transaction_id": 7}, "x"]
        for body in not_pings:
            answer = await call(running, "POST", "/v1/services/a/ping", body)
            assert (answer.status, answer.errcode) == (400, "M_BAD_JSON"), body
        answer = await call(running, "POST", "/v1/services/nope/ping")
        assert (answer.status, answer.errcode) == (404, "M_NOT_FOUND")
        answer = await call(running, "POST", "/v1/services/a/ping", token=INGEST)
        assert (answer.status, answer.errcode) == (401, "M_UNKNOWN_TOKEN")
        # a ping changes nothing: no state, no retry, nothing sent
        assert (await status_of(running, "a"))["state"] == "up"
        assert receiver.requests == []
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_retry_sends_to_a_down_service_at_once(tmp_path, reactor, receiver):
    receiver.then(503)
    registrations = [register(tmp_path, "a", receiver.url, **SLOW)]
    running = await start(tmp_path, reactor, registrations)
    try:
        await ingest(running, [event(1)])
        await until_status(running, "a", state="down")
        await ingest(running, [event(2)])
        await until_status(running, "a", queued_events=1)
        # the receiver answers again, but only a retry (not the 100 s wait) sends now
        answer = await call(running, "POST", "/v1/services/a/retry")
        assert (answer.status, answer.json()) == (200, {})
        await receiver.wait_for_events(2)
        assert [r.txn_id for r in receiver.requests] == txn_ids(
            running.daemon.delivery.store, 1, 1, 2
        )
        await until_status(running, "a", state="up", queued_events=0, stored_transactions=0)
        # retrying an UP service changes nothing
        answer = await call(running, "POST", "/v1/services/a/retry")
        assert (answer.status, answer.json()) == (200, {})
        assert (await status_of(running, "a"))["state"] == "up"
        answer = await call(running, "POST", "/v1/services/nope/retry")
        assert (answer.status, answer.errcode) == (404, "M_NOT_FOUND")
        answer = await call(running, "POST", "/v1/services/a/retry", token=INGEST)
        assert (answer.status, answer.errcode) == (401, "M_UNKNOWN_TOKEN")
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_unknown_and_percent_encoded_service_ids(tmp_path, reactor, receiver):
    odd = "bridge/one ü?#%"
    registrations = [
        register(tmp_path, "a", receiver.url),
        register(tmp_path, odd, None, file="odd.yaml"),
    ]
    running = await start(tmp_path, reactor, registrations)
    try:
        listed = (await call(running, "GET", "/v1/services")).json()["services"]
        assert [s["service_id"] for s in listed] == ["a", odd]
        encoded = quote(odd, safe="")
        assert encoded == "bridge%2Fone%20%C3%BC%3F%23%25"
        answer = await call(running, "GET", f"/v1/services/{encoded}")
        assert (answer.status, answer.json()["service_id"]) == (200, odd)
        answer = await call(running, "GET", f"/v1/services/{encoded}/transactions")
        assert (answer.status, answer.json()) == (200, {"transactions": [], "next_from": None})
        assert (await call(running, "POST", f"/v1/services/{encoded}/retry")).status == 200
        answer = await call(running, "DELETE", f"/v1/services/{encoded}/queue")
        assert (answer.status, answer.errcode) == (409, "M_FORBIDDEN")
        assert (await call(running, "GET", "/v1/services/%61")).json()["service_id"] == "a"

        for method, path in [
            ("GET", "/v1/services/nope"),
            ("GET", "/v1/services/A"),
            ("GET", "/v1/services/a%2F"),
            ("GET", "/v1/services/%FF"),
            ("GET", "/v1/services/nope/transactions"),
            ("POST", "/v1/services/nope/retry"),
            ("DELETE", "/v1/services/nope/queue"),
        ]:
            answer = await call(running, method, path)
            assert (answer.status, answer.errcode) == (404, "M_NOT_FOUND"), path
        # an unencoded slash makes another path, which no endpoint has
        answer = await call(running, "GET", "/v1/services/bridge/one")
        assert (answer.status, answer.errcode) == (404, "M_UNRECOGNIZED")
    finally:
        await running.daemon.stopService()


# -- GET /v1/services/{id}/transactions --


@pytest_twisted.ensureDeferred
async def test_transactions_are_listed_and_paged(tmp_path, reactor, receiver):
    failing = await start_receiver(reactor)
    failing.answer(500, body=b"bridge is down")
    keep = register(tmp_path, "keep", receiver.url)
    running = await start(
        tmp_path, reactor, [keep, register(tmp_path, "gone", failing.url, **SLOW)]
    )
    try:
        await ingest(running, [event(1)])
        await failing.wait_for_requests(1)
        await until_status(running, "gone", state="down")

        async def failed_once() -> bool:
            found = (await transactions(running, "gone")).json()["transactions"]
            return [t["attempts"] for t in found] == [1]

        await until(failed_once, "the failure to be recorded")
        store = running.daemon.delivery.store
        base = txn_id(store, 0)

        def numbered(*ns: int) -> list[int]:
            return [base + n for n in ns]

        await ingest(running, [event(n) for n in range(2, 7)])
        await until_status(running, "gone", queued_events=5)
        await receiver.wait_for_events(6)

        # the stored transaction, as sent
        (sent,) = failing.requests
        answer = await transactions(running, "gone")
        assert answer.status == 200
        (txn,) = answer.json()["transactions"]
        assert answer.json()["next_from"] is None
        assert (txn["txn_id"], txn["events"], txn["bytes"]) == (base + 1, 1, len(sent.body))
        assert (txn["first_stream_id"], txn["last_stream_id"]) == (1, 1)
        assert txn["attempts"] == 1
        assert txn["last_error"] == "HTTP 500: bridge is down"
        assert txn["created"] <= txn["first_attempt"] <= txn["last_attempt"] <= time.time()
        assert (await transactions(running, "keep")).json() == {
            "transactions": [],
            "next_from": None,
        }

        # At most one transaction per service is stored while it is registered (one in
        # flight). For a backlog of them, orphan the service and cut its queue into
        # transactions through the store, as the TransactionMaker does.
        configure(tmp_path, [keep])
        answer = await call(running, "POST", "/v1/reload")
        assert answer.json() == {"added": [], "changed": [], "removed": ["gone"]}
        for queued in await store.queued("gone", 0, 100):
            body = transaction_body([queued.json])
            sid = queued.stream_id
            await store.store_transaction(
                "gone", sid, sid, 1, body, time.time(), [queued.received_ts]
            )

        answer = await transactions(running, "gone")
        listed = answer.json()["transactions"]
        assert [t["txn_id"] for t in listed] == numbered(1, 2, 3, 4, 5, 6)
        assert [t["first_stream_id"] for t in listed] == [1, 2, 3, 4, 5, 6]
        assert [t["attempts"] for t in listed] == [1, 0, 0, 0, 0, 0]
        assert listed[1]["first_attempt"] is None
        assert listed[1]["last_attempt"] is None
        assert listed[1]["last_error"] is None
        assert answer.json()["next_from"] is None

        async def page(query: str) -> tuple[list[int], int | None]:
            answer = await transactions(running, "gone", query)
            assert answer.status == 200, answer.body
            body = answer.json()
            return [t["txn_id"] for t in body["transactions"]], body["next_from"]

        assert await page("?limit=4") == (numbered(1, 2, 3, 4), base + 4)
        assert await page(f"?from={base + 4}&limit=4") == (numbered(5, 6), None)
        assert await page(f"?from={base + 4}&limit=2") == (numbered(5, 6), None)
        assert await page(f"?from={base + 2}&limit=2") == (numbered(3, 4), base + 4)
        assert await page("?from=0&limit=6") == (numbered(1, 2, 3, 4, 5, 6), None)
        assert await page("?limit=5") == (numbered(1, 2, 3, 4, 5), base + 5)
        assert await page(f"?from={base + 6}") == ([], None)
        assert await page(f"?from={base + 1000}") == ([], None)
        assert await page(f"?from={2**62}&limit=1000") == ([], None)
        seen: list[int] = []
        cursor: int | None = 0
        while cursor is not None:
            ids, cursor = await page(f"?from={cursor}&limit=1")
            seen += ids
        assert seen == numbered(1, 2, 3, 4, 5, 6)

        for query in [
            "?from=-1",
            "?from=abc",
            "?from=",
            "?from=1.5",
            "?from=1e3",
            "?from=%201",
            "?from=%2B1",
            f"?from={2**62 + 1}",
            "?limit=0",
            "?limit=1001",
            "?limit=-5",
            "?limit=",
            "?limit=ten",
            "?limit=0x10",
            "?from=1&limit=0",
        ]:
            answer = await transactions(running, "gone", query)
            assert (answer.status, answer.errcode) == (400, "M_INVALID_PARAM"), query
            name = "limit" if "limit" in query else "from"
            assert answer.json()["error"].startswith(f"{name} must be a whole number"), query
        answer = await transactions(running, "nope")
        assert (answer.status, answer.errcode) == (404, "M_NOT_FOUND")

        answer = await call(running, "DELETE", "/v1/services/gone/queue")
        assert answer.json() == {
            "deleted_events": 0,
            "deleted_transactions": 6,
            "deleted_dead_letters": 0,
        }
    finally:
        await running.daemon.stopService()
        await stop_receiver(failing)


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("?from=%C2%B2", id="from-superscript-two"),
        pytest.param("?limit=%C2%B2", id="limit-superscript-two"),
        pytest.param("?from=" + "9" * 5000, id="from-5000-digits"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_number_param_int_cannot_read_is_400(tmp_path, reactor, receiver, query):
    running = await start(tmp_path, reactor, [register(tmp_path, "a", receiver.url)])
    try:
        answer = await transactions(running, "a", query)
        assert (answer.status, answer.errcode) == (400, "M_INVALID_PARAM")
    finally:
        await running.daemon.stopService()


# -- POST /v1/reload, DELETE /v1/services/{id}/queue --


@pytest_twisted.ensureDeferred
async def test_reload_adds_changes_and_removes_services(tmp_path, reactor, receiver):
    old, new, added, failing = [await start_receiver(reactor) for _ in range(4)]
    failing.answer(500)
    keep = register(tmp_path, "keep", receiver.url)
    move = register(tmp_path, "move", old.url)
    config = configure(tmp_path, [keep, move, register(tmp_path, "gone", failing.url, **SLOW)])
    running = await start_daemon(config, reactor)
    try:
        await ingest(running, [event(1)])
        await until_status(running, "gone", state="down")
        await old.wait_for_events(1)
        await ingest(running, [event(2)])
        await until_status(running, "gone", queued_events=1)
        await old.wait_for_events(2)

        move = register(tmp_path, "move", new.url)
        configure(tmp_path, [keep, move, register(tmp_path, "added", added.url)])
        answer = await call(running, "POST", "/v1/reload")
        assert answer.status == 200
        assert answer.json() == {"added": ["added"], "changed": ["move"], "removed": ["gone"]}

        listed = (await call(running, "GET", "/v1/services")).json()["services"]
        assert [s["service_id"] for s in listed] == ["added", "gone", "keep", "move"]
        gone = await status_of(running, "gone")
        assert gone["state"] == "orphaned"
        assert (gone["queued_events"], gone["stored_transactions"]) == (1, 1)
        assert gone["last_txn_id"] == txn_id(running.daemon.delivery.store, 1)
        answer = await call(running, "POST", "/v1/services/gone/retry")
        assert (answer.status, answer.errcode) == (404, "M_NOT_FOUND")

        # new events go to the new set of services; the removed one keeps what it had
        await ingest(running, [event(3)])
        await receiver.wait_for_events(3)
        await new.wait_for_events(1)
        await added.wait_for_events(1)
        assert new.event_ids == ["$e3"]
        # transaction ids go on
        assert [r.txn_id for r in new.requests] == txn_ids(running.daemon.delivery.store, 3)
        assert added.event_ids == ["$e3"]
        assert old.event_ids == ["$e1", "$e2"]
        await running.daemon.delivery.routed()
        gone = await status_of(running, "gone")
        assert (gone["queued_events"], gone["stored_transactions"]) == (1, 1)
        assert len(failing.requests) == 1

        # only an orphaned service can be purged
        answer = await call(running, "DELETE", "/v1/services/keep/queue")
        assert (answer.status, answer.errcode) == (409, "M_FORBIDDEN")
        assert "keep" in answer.json()["error"]
        answer = await call(running, "DELETE", "/v1/services/gone/queue")
        assert (answer.status, answer.json()) == (
            200,
            {"deleted_events": 1, "deleted_transactions": 1, "deleted_dead_letters": 0},
        )
        answer = await call(running, "GET", "/v1/services/gone")
        assert (answer.status, answer.errcode) == (404, "M_NOT_FOUND")
        answer = await call(running, "DELETE", "/v1/services/gone/queue")
        assert (answer.status, answer.errcode) == (404, "M_NOT_FOUND")
        listed = (await call(running, "GET", "/v1/services")).json()["services"]
        assert [s["service_id"] for s in listed] == ["added", "keep", "move"]
        assert (await status_of(running, "keep"))["state"] == "up"

        answer = await call(running, "POST", "/v1/reload")
        assert answer.json() == {"added": [], "changed": [], "removed": []}
        answer = await call(running, "POST", "/v1/reload", token=INGEST)
        assert (answer.status, answer.errcode) == (401, "M_UNKNOWN_TOKEN")
    finally:
        await running.daemon.stopService()
        for r in (old, new, added, failing):
            await stop_receiver(r)


@pytest_twisted.ensureDeferred
async def test_an_orphaned_service_has_no_next_retry(tmp_path, reactor, receiver):
    receiver.answer(500)
    config = configure(tmp_path, [register(tmp_path, "gone", receiver.url, **SLOW)])
    running = await start_daemon(config, reactor)
    try:
        await ingest(running, [event(1)])

        async def recorded() -> bool:
            found = (await transactions(running, "gone")).json()["transactions"]
            return [t["attempts"] for t in found] == [1]

        await until(recorded, "the failure to be recorded")
        configure(tmp_path, [])
        assert (await call(running, "POST", "/v1/reload")).json()["removed"] == ["gone"]
        gone = await status_of(running, "gone")
        assert gone["state"] == "orphaned"
        assert gone["next_retry"] is None
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_a_broken_configuration_changes_nothing(tmp_path, reactor, receiver):
    keep = register(tmp_path, "keep", receiver.url)
    config = configure(tmp_path, [keep])
    running = await start_daemon(config, reactor)
    good_config, good_keep = config.read_text(), keep.read_text()
    extra = register(tmp_path, "extra", receiver.url)
    register(tmp_path, "keep", receiver.url, file="dup.yaml")
    settings = yaml.safe_load(good_config)

    def with_config(**changes: Any) -> Callable[[], object]:
        return lambda: config.write_text(yaml.safe_dump({**settings, **changes}))

    def with_keep(text: str) -> Callable[[], object]:
        return lambda: keep.write_text(text)

    def with_files(*names: str) -> Callable[[], object]:
        return with_config(app_service_config_files=list(names))

    broken: list[tuple[str, Callable[[], object], str]] = [
        ("unknown key", with_config(no_such_key=1), "no_such_key"),
        ("not YAML", lambda: config.write_text("listen: [\n"), "not valid YAML"),
        ("not a mapping", lambda: config.write_text("- a\n"), "expected a mapping"),
        ("empty token", with_config(ingest_token=""), "ingest_token"),
        ("bad number", with_config(poll_interval=-1), "poll_interval"),
        ("bad listen", with_config(listen="tcp:notaport"), "listen"),
        ("missing file", with_files("keep.yaml", "missing.yaml"), "missing.yaml"),
        ("unset variable", with_config(admin_token="${DELIVERY_TEST_UNSET}"), "UNSET"),
        ("same id twice", with_files("keep.yaml", "dup.yaml"), "both use the id"),
        ("bad url", with_keep(good_keep.replace(receiver.url, "ftp://x")), "'url'"),
        ("registration not YAML", with_keep("id: [\n"), "keep.yaml"),
        ("no id", with_keep(re.sub(r"(?m)^id: .*$", "", good_keep)), "'id'"),
        ("bad option", with_keep(good_keep + "delivery: {initial_delay: -1}\n"), "initial"),
        ("unknown option", with_keep(good_keep + "delivery: {nope: 1}\n"), "nope"),
        ("bad regex", with_keep(good_keep.replace(".*", "(")), "regex"),
    ]
    try:
        for n, (name, breaks, mentioned) in enumerate(broken, start=1):
            breaks()
            answer = await call(running, "POST", "/v1/reload")
            assert (answer.status, answer.errcode) == (422, "M_INVALID_CONFIG"), name
            error = answer.json()["error"]
            assert error.startswith("nothing changed: "), (name, error)
            assert mentioned in error, (name, error)
            config.write_text(good_config)
            keep.write_text(good_keep)
            # the old configuration is in force and delivers
            services = (await call(running, "GET", "/v1/services")).json()["services"]
            assert [s["service_id"] for s in services] == ["keep"], name
            assert await ingest(running, [event(n)]) == [n]
            await receiver.wait_for_events(n)

        # a valid new registration next to a broken one is not added either
        with_files("keep.yaml", "extra.yaml")()
        keep.write_text("id: [\n")
        answer = await call(running, "POST", "/v1/reload")
        assert (answer.status, answer.errcode) == (422, "M_INVALID_CONFIG")
        services = (await call(running, "GET", "/v1/services")).json()["services"]
        assert [s["service_id"] for s in services] == ["keep"]
        keep.write_text(good_keep)
        answer = await call(running, "POST", "/v1/reload")
        assert answer.json() == {"added": ["extra"], "changed": [], "removed": []}
        assert extra.name == "extra.yaml"
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_reload_applies_new_tokens(tmp_path, reactor, receiver):
    keep = register(tmp_path, "keep", receiver.url)
    running = await start(tmp_path, reactor, [keep])
    rotated = {"ingest_token": "rotated-ingest", "admin_token": "rotated-admin"}
    SECRETS.update(rotated.values())
    try:
        configure(tmp_path, [keep], **rotated, metrics_token=None)
        answer = await call(running, "POST", "/v1/reload")
        assert (answer.status, answer.json()) == (200, {"added": [], "changed": [], "removed": []})
        for token, path, method in [
            (ADMIN, "/v1/services", "GET"),
            (INGEST, "/v1/events", "POST"),
            (METRICS, "/metrics", "GET"),
        ]:
            answer = await call(running, method, path, {"events": []}, token=token)
            assert (answer.status, answer.errcode) == (401, "M_UNKNOWN_TOKEN"), path
        assert (await call(running, "GET", "/v1/services", token="rotated-admin")).status == 200
        answer = await call(running, "POST", "/v1/events", {"events": []}, token="rotated-ingest")
        assert answer.status == 200
        # without a metrics_token, /metrics takes the admin token
        assert (await call(running, "GET", "/metrics", token="rotated-admin")).status == 200
    finally:
        await running.daemon.stopService()


@implementer(ILogObserver)
class Warnings:
    """Keeps the keys of every 'need a restart' warning logged."""

    def __init__(self) -> None:
        self.restart_keys: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        if "keys" in event:
            self.restart_keys.append(str(event["keys"]))


@pytest_twisted.ensureDeferred
async def test_reload_applies_or_warns_about_request_limits(tmp_path, reactor, receiver):
    keep = register(tmp_path, "keep", receiver.url)
    running = await start(tmp_path, reactor, [keep], max_events_per_request=5)
    observe = Warnings()
    globalLogPublisher.addObserver(observe)
    try:
        configure(tmp_path, [keep], max_events_per_request=10)
        assert (await call(running, "POST", "/v1/reload")).status == 200
        answer = await call(
            running, "POST", "/v1/events", {"events": [event(n) for n in range(8)]}, token=INGEST
        )
        warned = any("max_events_per_request" in keys for keys in observe.restart_keys)
        assert answer.status == 200 or warned, "the new limit is ignored without a word"
    finally:
        globalLogPublisher.removeObserver(observe)
        await running.daemon.stopService()


@pytest.mark.parametrize(
    ("config_text", "why"),
    [
        pytest.param(
            "listen: ssl:0:privateKey=/nonexistent/key.pem\n",
            "FileNotFoundError",
            id="tls-listen-without-key-file",
        ),
        pytest.param("log: " + "[" * 3000 + "]" * 3000 + "\n", "RecursionError", id="deep-yaml"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_reload_of_an_unusable_configuration_is_422(
    tmp_path, reactor, receiver, config_text, why
):
    keep = register(tmp_path, "keep", receiver.url)
    config = configure(tmp_path, [keep])
    running = await start_daemon(config, reactor)
    try:
        config.write_text(config.read_text() + config_text)
        answer = await call(running, "POST", "/v1/reload")
        assert (answer.status, answer.errcode) == (422, "M_INVALID_CONFIG"), why
    finally:
        await running.daemon.stopService()


# -- GET /health, GET /metrics, unknown paths and methods --


@pytest_twisted.ensureDeferred
async def test_health_unknown_paths_and_wrong_methods(tmp_path, reactor, receiver):
    running = await start(tmp_path, reactor, [register(tmp_path, "a", receiver.url)])
    try:
        for token in (None, "nonsense", ADMIN):
            answer = await call(running, "GET", "/health", token=token)
            assert (answer.status, answer.json()) == (200, {"status": "ok"})
            assert answer.headers["content-type"] == "application/json"

        for method, path in [
            ("GET", "/"),
            ("GET", "/v1"),
            ("GET", "/v1/"),
            ("GET", "/v1/services/"),
            ("GET", "/v1/services/a/nope"),
            ("POST", "/v1/events/"),
            ("GET", "/healthz"),
            ("GET", "/HEALTH"),
            ("PUT", "/nope"),
        ]:
            for token in (None, ADMIN):
                answer = await call(running, method, path, token=token)
                assert (answer.status, answer.errcode) == (404, "M_UNRECOGNIZED"), path
                assert answer.json()["error"] == f"no endpoint at {path}"

        for method, path, allow in [
            ("GET", "/v1/events", "POST"),
            ("DELETE", "/v1/events", "POST"),
            ("POST", "/v1/services", "GET"),
            ("PUT", "/v1/services/a", "GET"),
            ("DELETE", "/v1/services/a", "GET"),
            ("GET", "/v1/services/a/retry", "POST"),
            ("POST", "/v1/services/a/transactions", "GET"),
            ("GET", "/v1/services/a/queue", "DELETE"),
            ("GET", "/v1/reload", "POST"),
            ("POST", "/health", "GET, HEAD"),
            ("PATCH", "/metrics", "GET"),
        ]:
            answer = await call(running, method, path, token=None)
            assert (answer.status, answer.errcode) == (405, "M_UNRECOGNIZED"), (method, path)
            assert answer.headers["allow"] == allow, (method, path)
            assert allow in answer.json()["error"]
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_metrics_take_the_metrics_token_and_count_what_happens(tmp_path, reactor, receiver):
    running = await start(tmp_path, reactor, [register(tmp_path, "a", receiver.url)])
    try:
        await ingest(running, [event(1), event(2), event(3)])
        await receiver.wait_for_events(3)
        await until_status(running, "a", stored_transactions=0)
        answer = await call(running, "GET", "/metrics", token=METRICS)
        assert answer.status == 200
        assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.body.decode())
            for s in family.samples
        }
        service = (("service", "a"),)
        assert samples["delivery_events_ingested_total", ()] == 3
        assert samples["delivery_events_routed_total", service] == 3
        assert samples["delivery_events_delivered_total", service] == 3
        assert samples["delivery_queued_events", service] == 0
        assert samples["delivery_stored_transactions", service] == 0
        assert samples["delivery_service_state", (("service", "a"), ("state", "up"))] == 1
        assert samples["delivery_service_state", (("service", "a"), ("state", "down"))] == 0
        outcome = (("outcome", "success"), ("service", "a"))
        assert samples["delivery_transactions_total", outcome] >= 1

        for token, errcode in [(None, "M_MISSING_TOKEN"), (ADMIN, "M_UNKNOWN_TOKEN")]:
            answer = await call(running, "GET", "/metrics", token=token)
            assert (answer.status, answer.errcode) == (401, errcode)
    finally:
        await running.daemon.stopService()


# -- secrets: keep this test last in the module --


@pytest_twisted.ensureDeferred
async def test_no_answer_reveals_a_secret(tmp_path, reactor, receiver):
    """
    No token, hs_token or as_token in any answer of this module; this test adds answers
    of its own first (errors and reloads of files with the secrets in odd places).
    """
    before = len(BODIES)
    failing = await start_receiver(reactor)
    failing.answer(401, body=b'{"errcode":"M_FORBIDDEN"}')
    keep = register(tmp_path, "keep", receiver.url)
    down = register(tmp_path, "down", failing.url, **SLOW)
    config = configure(tmp_path, [keep, down])
    running = await start_daemon(config, reactor)
    try:
        good_keep = keep.read_text()
        await ingest(running, [event(1)])
        await until_status(running, "down", state="down")
        for method, path in [
            ("GET", "/v1/services"),
            ("GET", "/v1/services/down"),
            ("GET", "/v1/services/down/transactions"),
            ("GET", "/v1/services/keep/transactions"),
            ("POST", "/v1/services/down/retry"),
            ("DELETE", "/v1/services/keep/queue"),
            ("GET", "/health"),
            ("GET", "/nope"),
        ]:
            await call(running, method, path)
        await call(running, "GET", "/metrics", token=METRICS)
        await call(running, "POST", "/v1/events", raw=b"{", token=INGEST)
        for wrong in (INGEST, METRICS, ADMIN + "x"):
            await call(running, "GET", "/v1/services", token=wrong)
        for breaks in [
            lambda: keep.write_text(good_keep.replace(f"hs_token: {HS_TOKEN}", "hs_token: 5")),
            lambda: keep.write_text(
                good_keep.replace("as_token: as-keep-secret", "as_token: [as-keep-secret]")
            ),
            lambda: keep.write_text(good_keep + f'hs_token: "{HS_TOKEN}\n'),
            lambda: keep.write_text(f"hs_token: {HS_TOKEN}: x\n" + good_keep),
            lambda: keep.write_text(good_keep.replace(f"hs_token: {HS_TOKEN}", "hs_token: ''")),
            lambda: config.write_text(config.read_text() + f"metrics_token: [{METRICS}]\n"),
            lambda: config.write_text(f"admin_token: {ADMIN}: x\n"),
            lambda: config.write_text(f"admin_token: {{{ADMIN}}}\n"),
        ]:
            good_config = config.read_text()
            breaks()
            answer = await call(running, "POST", "/v1/reload")
            assert answer.status == 422, answer.body
            config.write_text(good_config)
            keep.write_text(good_keep)
    finally:
        await running.daemon.stopService()
        await stop_receiver(failing)

    assert len(BODIES) - before >= 20
    for secret in sorted(SECRETS):
        leaks = [body for body in BODIES if secret.encode() in body]
        assert not leaks, f"{secret!r} is in {len(leaks)} answer(s), such as {leaks[0]!r}"
