"""
The load process of the ``ingest-http`` benchmark (``benchmarks.bench_load``), run as a real
process against a small ``POST /v1/events`` server on 127.0.0.1 that answers as told.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import pytest_twisted
from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web import resource, server

import benchmarks.bench_load

TOKEN = "ingest-secret-token"
SCRIPT = Path(benchmarks.bench_load.__file__)
ROOT = SCRIPT.parent.parent


@attrs.frozen
class Answer:
    status: int = 200
    body: bytes = b'{"stream_ids":[]}'
    headers: dict[str, str] = attrs.Factory(dict)


@attrs.frozen
class Received:
    authorization: list[str]
    events: list[dict[str, Any]]
    status: int


class Ingest(resource.Resource):
    """``POST /v1/events`` as the API answers it: 200 unless a scripted answer says else."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []
        self.script: list[Answer] = []
        self.default = Answer()
        self.port: Any = None
        self.url = ""

    @property
    def accepted(self) -> list[Received]:
        return [r for r in self.received if r.status == 200]

    def render_POST(self, request: server.Request) -> bytes:
        assert request.path == b"/v1/events"
        assert request.content is not None
        answer = self.script.pop(0) if self.script else self.default
        self.received.append(
            Received(
                [v.decode() for v in request.requestHeaders.getRawHeaders(b"authorization", [])],
                json.loads(request.content.read())["events"],
                answer.status,
            )
        )
        request.setResponseCode(answer.status)
        request.setHeader(b"Content-Type", b"application/json")
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        return answer.body


async def start_ingest(reactor: Any) -> Ingest:
    ingest = Ingest()
    site = server.Site(ingest)
    site.noisy = False
    ingest.port = reactor.listenTCP(0, site, interface="127.0.0.1")
    ingest.url = f"http://127.0.0.1:{ingest.port.getHost().port}"
    return ingest


async def run_load(
    reactor: Any, url: str, *args: str, module: bool = False
) -> tuple[str, str, int]:
    """Runs the load process (by path, or with ``-m``); its stdout, stderr and exit code."""
    how = ["-m", "benchmarks.bench_load"] if module else [str(SCRIPT)]
    options = ["--url", url, "--token", TOKEN, "--concurrency", "3", "--prefix", "t", *args]
    out, err, code = await getProcessOutputAndValue(
        sys.executable, [*how, *options], env=dict(os.environ), path=str(ROOT), reactor=reactor
    )
    return out.decode(), err.decode(), code


def ids(received: list[Received]) -> Counter[str]:
    return Counter(e["event_id"] for r in received for e in r.events)


@pytest_twisted.ensureDeferred
async def test_every_event_arrives_once_with_the_time_it_was_sent(reactor):
    ingest = await start_ingest(reactor)
    try:
        before = time.time()
        out, err, code = await run_load(reactor, ingest.url, "--events", "1000", "--batch", "100")
        after = time.time()
    finally:
        await defer.maybeDeferred(ingest.port.stopListening)

    assert (code, err) == (0, "")
    assert ids(ingest.received) == Counter(f"$t-{i}" for i in range(1000))
    assert [len(r.events) for r in ingest.received] == [100] * 10
    assert all(r.authorization == [f"Bearer {TOKEN}"] for r in ingest.received)
    line = json.loads(out)
    assert out.count("\n") == 1
    assert set(line) == {"events", "requests", "started", "finished", "retries"}
    assert (line["events"], line["requests"], line["retries"]) == (1000, 10, 0)
    assert before <= line["started"] <= line["finished"] <= after
    stamps = [e["content"]["ts"] for r in ingest.received for e in r.events]
    assert all(isinstance(ts, float) for ts in stamps)
    assert all(line["started"] <= ts <= line["finished"] for ts in stamps)
    # everything else as benchmarks.bench.make_events makes it (requests overlap: any order)
    first = next(e for r in ingest.received for e in r.events if e["event_id"] == "$t-0")
    assert first == {
        "event_id": "$t-0",
        "type": "m.room.message",
        "room_id": "!bench:example.org",
        "sender": "@bench_user:example.org",
        "content": {
            "msgtype": "m.text",
            "body": "benchmark message 0",
            "ts": first["content"]["ts"],
        },
    }


@pytest_twisted.ensureDeferred
async def test_a_last_short_batch(reactor):
    ingest = await start_ingest(reactor)
    try:
        out, err, code = await run_load(reactor, ingest.url, "--events", "250", "--batch", "100")
    finally:
        await defer.maybeDeferred(ingest.port.stopListening)

    assert (code, err) == (0, "")
    assert sorted(len(r.events) for r in ingest.received) == [50, 100, 100]
    assert ids(ingest.received) == Counter(f"$t-{i}" for i in range(250))
    assert json.loads(out)["requests"] == 3


@pytest_twisted.ensureDeferred
async def test_unavailable_is_sent_again(reactor):
    ingest = await start_ingest(reactor)
    unavailable = Answer(
        503,
        b'{"errcode":"M_UNAVAILABLE","error":"the database does not answer"}',
        {"Retry-After": "1"},
    )
    ingest.script = [unavailable, unavailable]
    try:
        out, err, code = await run_load(
            reactor, ingest.url, "--events", "1000", "--retry-delay", "0.05", module=True
        )
    finally:
        await defer.maybeDeferred(ingest.port.stopListening)

    assert (code, err) == (0, "")
    assert [r.status for r in ingest.received].count(503) == 2
    assert len(ingest.received) == 12
    assert ids(ingest.accepted) == Counter(f"$t-{i}" for i in range(1000))
    line = json.loads(out)
    assert (line["events"], line["requests"], line["retries"]) == (1000, 10, 2)


@pytest_twisted.ensureDeferred
async def test_a_refused_batch_stops_it_with_one_line(reactor):
    ingest = await start_ingest(reactor)
    ingest.default = Answer(400, b'{"errcode":"M_BAD_JSON","error":"event 3: no event_id"}')
    try:
        out, err, code = await run_load(reactor, ingest.url, "--events", "1000")
    finally:
        await defer.maybeDeferred(ingest.port.stopListening)

    assert code == 1
    assert out == ""
    assert err == (
        f"bench_load: POST {ingest.url}/v1/events answered 400 M_BAD_JSON: event 3: no event_id\n"
    )


@pytest_twisted.ensureDeferred
async def test_no_daemon_stops_it_with_one_line(reactor):
    ingest = await start_ingest(reactor)
    await defer.maybeDeferred(ingest.port.stopListening)

    out, err, code = await run_load(reactor, ingest.url, "--events", "100")

    assert code == 1
    assert out == ""
    assert err.startswith(f"bench_load: no answer from {ingest.url}/v1/events: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err
