"""
What the HTTP API takes, and when it decides: a request is judged on its headers (route,
token, one Authorization header, Content-Type) before a byte of its body is read; bodies
are UTF-8 JSON without duplicate keys; connections are capped and a body has a deadline.
Raw sockets on 127.0.0.1 play the clients that treq would not be (headers without a body,
a body a byte at a time, idle connections).
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import protocol, task
from twisted.internet.defer import Deferred

from delivery._http import Connections
from delivery.api import Api, Tokens, make_site
from delivery.events import QUOTED
from delivery.service import DeliveryService
from delivery.store import open_store

from .daemon_harness import (
    ADMIN,
    INGEST,
    Running,
    auth,
    start_daemon,
    write_config,
    write_registration,
)
from .harness import event
from .test_postgres_outage import _answers, make_read_only
from .waiting import Conditions


class RawClient(protocol.Protocol):
    """A client that writes exactly what it is told and keeps everything it receives."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = False
        self.connected_: Deferred[RawClient] = Deferred()
        self._conditions = Conditions()

    def connectionMade(self) -> None:
        self.connected_.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._conditions.check()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self._conditions.check()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def until_closed(self) -> Deferred[None]:
        return self._conditions.wait_for(lambda: self.closed)

    def until_received(self, text: bytes) -> Deferred[None]:
        return self._conditions.wait_for(lambda: text in self.received)

    @property
    def status(self) -> int:
        return int(self.received.split(b" ", 2)[1])

    def body(self) -> Any:
        return json.loads(self.received.partition(b"\r\n\r\n")[2])


async def connect(reactor: Any, url: str) -> RawClient:
    port = int(url.rsplit(":", 1)[1])
    client = RawClient()
    factory = protocol.ClientFactory.forProtocol(lambda: client)
    reactor.connectTCP("127.0.0.1", port, factory)
    return await client.connected_


def head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def started(tmp_path: Path, reactor: Any, receiver: Any, **extra: Any) -> Running:
    config = write_config(tmp_path, [write_registration(tmp_path, "a", receiver.url)], **extra)
    return await start_daemon(config, reactor)


async def post(
    running: Running, body: bytes | None, content_type: str | None, path: str = "/v1/events"
) -> tuple[int, Any]:
    """A POST with exactly these headers: the ingest token, and this Content-Type if any."""
    headers = auth(INGEST if path == "/v1/events" else ADMIN)
    if content_type is not None:
        headers.setRawHeaders("Content-Type", [content_type])
    response = await treq.post(running.url + path, data=body, headers=headers, persistent=False)
    return response.code, await response.json()


# -- headers first --


@pytest_twisted.ensureDeferred
async def test_a_request_without_its_token_is_refused_before_its_body(tmp_path, reactor, receiver):
    running = await started(tmp_path, reactor, receiver)
    try:
        # 10 MB announced, none sent: the answer comes on the headers alone.
        for method, path, token in [
            ("POST", "/v1/events", None),
            ("POST", "/v1/events", "wrong"),
            ("POST", "/v1/events", ADMIN),
            ("POST", "/v1/services/a/dead-letters/redrive", INGEST),
            ("POST", "/v1/services/a/dead-letters/discard", None),
        ]:
            client = await connect(reactor, running.url)
            authorization = [f"Authorization: Bearer {token}"] if token else []
            client.write(
                head(
                    method,
                    path,
                    *authorization,
                    "Content-Type: application/json",
                    "Content-Length: 10000000",
                )
            )
            await client.until_closed()
            assert client.status == 401, (path, token, client.received)
            assert client.body()["errcode"] == (
                "M_MISSING_TOKEN" if token is None else "M_UNKNOWN_TOKEN"
            )
        # and 100-continue is not sent to invite the body
        client = await connect(reactor, running.url)
        client.write(head("POST", "/v1/events", "Expect: 100-continue", "Content-Length: 5"))
        await client.until_closed()
        assert client.received.startswith(b"HTTP/1.1 401 "), client.received
        # the right token gets its body read and taken
        assert await running.ingest([event(1)]) == [1]
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_two_authorization_headers_are_refused(tmp_path, reactor, receiver):
    running = await started(tmp_path, reactor, receiver)
    try:
        for path, token in [("/v1/events", INGEST), ("/v1/services", ADMIN)]:
            client = await connect(reactor, running.url)
            method = "POST" if path == "/v1/events" else "GET"
            client.write(
                head(
                    method,
                    path,
                    "Authorization: Bearer nonsense",
                    f"Authorization: Bearer {token}",
                    "Content-Length: 0",
                )
            )
            await client.until_closed()
            assert client.status == 400, client.received
            assert client.body()["errcode"] == "M_INVALID_PARAM"
            assert "2 Authorization headers" in client.body()["error"]
        assert await running.ingest([event(1)]) == [1]
    finally:
        await running.daemon.stopService()


# -- what a body must be --


@pytest_twisted.ensureDeferred
async def test_a_body_must_be_labelled_json(tmp_path, reactor, receiver):
    running = await started(tmp_path, reactor, receiver)
    try:
        body = json.dumps({"events": [event(1)]}).encode()
        for content_type in [
            None,
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/json; charset=latin-1",
            "application/json; charset=utf-16",
            "application/json; boundary=x",
            "application/jsonx",
        ]:
            status, answer = await post(running, body, content_type)
            assert (status, answer["errcode"]) == (415, "M_UNRECOGNIZED"), content_type
            assert "Content-Type: application/json" in answer["error"]
            assert (content_type or "none") in answer["error"]
        for n, content_type in enumerate(
            [
                "application/json",
                "Application/JSON",
                "application/json; charset=utf-8",
                'application/json;charset="UTF-8"',
            ],
            start=1,
        ):
            body = json.dumps({"events": [event(n)]}).encode()
            assert await post(running, body, content_type) == (200, {"stream_ids": [n]})
        # a request without a body needs no label
        redrive = "/v1/services/a/dead-letters/redrive"
        assert await post(running, None, None, redrive) == (200, {"redriven": 0})
        assert await post(running, b"", None, redrive) == (200, {"redriven": 0})
        await receiver.wait_for_events(4)
        assert receiver.event_ids == [f"$e{n}" for n in range(1, 5)]
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_a_body_must_be_utf8_without_a_byte_order_mark(tmp_path, reactor, receiver):
    running = await started(tmp_path, reactor, receiver)
    try:
        text = json.dumps({"events": [event(1)]})
        for raw, says in [
            (codecs.BOM_UTF8 + text.encode(), "byte order mark"),
            (text.encode("utf-16"), "UTF-16"),
            (text.encode("utf-16-le"), "UTF-16"),
            (text.encode("utf-16-be"), "UTF-16"),
            (text.encode("utf-32"), "UTF-16 or UTF-32"),
            (text.replace("message", "m\xe9ssage").encode("latin-1"), "not UTF-8"),
        ]:
            status, answer = await post(running, raw, "application/json")
            assert (status, answer["errcode"]) == (400, "M_NOT_JSON"), raw[:8]
            assert says in answer["error"], answer
        assert await running.ingest([event(1)]) == [1]
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_a_key_given_twice_is_refused_at_any_depth(tmp_path, reactor, receiver):
    running = await started(tmp_path, reactor, receiver)
    try:
        for raw, key in [
            (b'{"events": [{"event_id": "$dupA", "event_id": "$dupB"}]}', '"event_id"'),
            (b'{"events": [], "events": [{"event_id": "$x"}]}', '"events"'),
            (b'{"events": [{"event_id": "$x", "content": {"a": {"b": 1, "b": 2}}}]}', '"b"'),
            (
                b'{"events": [{"event_id": "$x", "c": [{"k\\u00e9": 1, "k\xc3\xa9": 2}]}]}',
                '"k\\u00e9"',
            ),
        ]:
            status, answer = await post(running, raw, "application/json")
            assert (status, answer["errcode"]) == (400, "M_BAD_JSON"), raw
            assert answer["error"] == f"the key {key} is given twice in an object"
        # nothing refused was stored; the same keys once each are fine
        raw = b'{"events": [{"event_id": "$dupA", "sender": "@a:hs", "content": {"b": 1, "c": 2}}]}'
        assert await post(running, raw, "application/json") == (200, {"stream_ids": [1]})
        await receiver.wait_for_events(1)
        assert receiver.event_ids == ["$dupA"]
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_errors_quote_only_a_short_prefix_of_what_they_refuse(tmp_path, reactor, receiver):
    running = await started(tmp_path, reactor, receiver, max_request_bytes=4_000_000)
    try:
        huge = "$" + "x" * 1_000_000
        for bad, errcode in [
            ({"events": [{"event_id": " "}]}, "M_BAD_JSON"),
            ({"events": [{"event_id": huge, "sender": 5}]}, "M_BAD_JSON"),
            ({"events": [{"event_id": huge, "pad": "y" * 70000}]}, "M_BAD_JSON"),
        ]:
            status, answer = await running.request("POST", "/v1/events", bad, token=INGEST)
            assert (status, answer["errcode"]) == (400, errcode)
            assert len(answer["error"]) < 200, answer["error"][:300]
        assert answer["error"].startswith(f"event 0: {huge[:QUOTED]}…: is ")
        key = "k" * 100_000
        raw = f'{{"events": [], "{key}": 1, "{key}": 2}}'.encode()
        status, answer = await post(running, raw, "application/json")
        assert (status, answer["errcode"]) == (400, "M_BAD_JSON")
        assert len(answer["error"]) < 200
        path = "/v1/" + "p" * 5000
        status, answer = await running.request("GET", path)
        assert (status, answer["error"]) == (404, f"no endpoint at {path[:QUOTED]}…")
    finally:
        await running.daemon.stopService()


# -- /health --


@pytest_twisted.ensureDeferred
async def test_head_health_answers_like_get_without_a_body(tmp_path, reactor, receiver):
    running = await started(tmp_path, reactor, receiver)
    try:
        response = await treq.head(running.url + "/health", persistent=False)
        assert response.code == 200
        assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
        assert await response.content() == b""
    finally:
        await running.daemon.stopService()


# -- connections --


@pytest_twisted.ensureDeferred
async def test_connections_over_the_cap_are_refused_at_once(tmp_path, reactor, receiver):
    running = await started(tmp_path, reactor, receiver, http={"max_connections": 3})
    site = running.daemon.site
    idle = [await connect(reactor, running.url) for _ in range(3)]
    try:
        await until(reactor, lambda: site.open_connections == 3)
        # one more: a 503 at once, before it sends anything, and closed
        extra = await connect(reactor, running.url)
        await extra.until_closed()
        assert extra.status == 503, extra.received
        assert b"\r\nRetry-After: 1\r\n" in extra.received
        assert extra.body() == {
            "errcode": "M_UNAVAILABLE",
            "error": "more than 3 connections are open; retry shortly",
        }
        assert site.open_connections == 3
        # the idle ones go; the next client is served
        for client in idle:
            client.close()
        await until(reactor, lambda: site.open_connections == 0)
        assert await running.ingest([event(1)]) == [1]
        assert (await running.request("GET", "/health", token=None))[0] == 200
    finally:
        for client in idle:
            client.close()
        await running.daemon.stopService()


async def until(reactor: Any, condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("the condition never held")


@pytest_twisted.ensureDeferred
async def test_a_slow_body_is_cut_at_its_deadline(tmp_path, reactor):
    clock = task.Clock()
    store = open_store(f"sqlite:///{tmp_path / 'never-opened.db'}", reactor)
    api = Api(DeliveryService(store, [], reactor=reactor), Tokens(INGEST, ADMIN, "m"))
    site = make_site(api, 4000, Connections(body_timeout=4.5, idle_timeout=2), reactor=clock)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        client = await connect(reactor, f"http://127.0.0.1:{port.getHost().port}")
        client.write(
            head(
                "POST",
                "/v1/events",
                f"Authorization: Bearer {INGEST}",
                "Content-Type: application/json",
                "Content-Length: 100",
            )
            + b"{"
        )
        # the headers are in: the deadline is set, 4.5 s from now
        await until(reactor, lambda: any(c.getTime() == 4.5 for c in clock.getDelayedCalls()))
        # a byte now and then keeps the idle timeout (2 s) from firing, not the deadline
        for _ in range(4):
            clock.advance(1)
            client.write(b" ")
            # (the idle timeout starts again once the byte is in)
            later = clock.seconds() + 2
            await until(
                reactor,
                lambda: any(c.getTime() == later for c in clock.getDelayedCalls()),  # noqa: B023
            )
        assert not client.closed
        clock.advance(1)
        await client.until_closed()
        assert client.status == 408, client.received
        assert client.body() == {
            "errcode": "M_UNKNOWN",
            "error": "the request body did not arrive within 4.5 s",
        }
        await until(reactor, lambda: site.open_connections == 0)
    finally:
        await port.stopListening()


# -- a store that cannot answer --


@pytest_twisted.ensureDeferred
async def test_a_database_that_cannot_be_written_makes_ingest_and_health_answer_503(
    tmp_path: Path, postgres_url: str, reactor: Any, receiver: Any
) -> None:
    running = await started(tmp_path, reactor, receiver, database=postgres_url)
    store = running.daemon.delivery.store

    async def read_only(on: bool) -> None:
        await make_read_only(postgres_url, on)
        await _answers(reactor, store)

    try:
        assert await running.ingest([event(1)]) == [1]
        await read_only(True)
        response = await treq.post(
            running.url + "/v1/events",
            json={"events": [event(2)]},
            headers=auth(INGEST),
            persistent=False,
        )
        body = await response.json()
        assert (response.code, body["errcode"]) == (503, "M_UNAVAILABLE"), body
        assert "cannot be written: read-only" in body["error"]
        assert response.headers.getRawHeaders("Retry-After") == ["1"]
        health = await treq.get(running.url + "/health", persistent=False)
        assert health.code == 503
        assert "read-only" in (await health.json())["error"]
        await read_only(False)
        assert await running.ingest([event(2)]) == [2]  # nothing of the refused one stayed
        health = await treq.get(running.url + "/health", persistent=False)
        assert health.code == 200
    finally:
        await read_only(False)
        await running.daemon.stopService()
