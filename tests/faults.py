"""
A Matrix application-service receiver that fails on purpose: the fault-injection receiver.

:class:`FaultyReceiver` is a twisted.web resource on 127.0.0.1 that answers each request as
told, by a :class:`Fault`: a status (any 2xx, 4xx or 5xx, with ``Retry-After`` or other
headers), a slow answer, a hang before the headers, a hang in the middle of the body, a
reset connection, bytes that are not HTTP. The next requests follow a script
(:meth:`FaultyReceiver.then`), every other one the default (:meth:`FaultyReceiver.answer`);
a subclass may choose otherwise (:meth:`FaultyReceiver.next_fault`). It goes down (stops
listening: connections are refused) and comes back up on the same port on command.

It records every request (kind, transaction id, body, headers, time of arrival on its
clock, and the fault it answered with) *before* answering, and tells ``on_request`` too,
so that a log written there holds every request that reached it. Tests wait for what it
received with :meth:`FaultyReceiver.wait_for` and the helpers around it.

Slow answers wait on the receiver's clock: give it the service's ``task.Clock``
(:meth:`FaultyReceiver.use_clock`) and one ``clock.advance()`` moves the sender's timeout
and the receiver's answer together.

The ``faulty_receiver`` fixture is one started on the test reactor, stopped after the test.
"""

from __future__ import annotations

import json
import socket
import struct
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import attrs
import pytest_twisted
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web import resource, server

from .receiver import HS_TOKEN
from .receiver_process import PING_PATH, TXN_PREFIX, transaction_error
from .waiting import Conditions

#: what the ``garbage`` fault sends: the start of an SSH banner, not an HTTP answer
GARBAGE = b"SSH-2.0-OpenSSH_9.6 \x00\xff\xfe not HTTP at all\r\n\r\n"

#: every status the fault tests use, by family
SUCCESSES = (200, 201, 202, 204)
REFUSALS = (400, 401, 403, 404, 408, 410, 413, 422, 429)
SERVER_ERRORS = (500, 502, 503, 504)

#: the kinds of :class:`Fault`
KINDS = ("answer", "slow", "hang", "hang_in_body", "reset", "garbage")


@attrs.frozen
class Fault:
    """How the receiver answers one request. Build one with the functions below."""

    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    status: int = 200
    body: bytes = b"{}"
    headers: tuple[tuple[str, str], ...] = ()
    #: seconds before a slow answer, on the receiver's clock
    delay: float = 0.0

    @property
    def accepts(self) -> bool:
        """Whether this answer, if it reaches the sender, tells it the request succeeded."""
        return self.kind in ("answer", "slow") and 200 <= self.status < 300

    def describe(self) -> str:
        """A few words for logs: ``200``, ``503``, ``slow 2.5 s 200``, ``reset``, ..."""
        if self.kind == "answer":
            return str(self.status)
        if self.kind == "slow":
            return f"slow {self.delay:g} s {self.status}"
        if self.kind == "hang_in_body":
            return f"hang in body {self.status}"
        return self.kind


def _error_body(status: int) -> bytes:
    return json.dumps({"errcode": "M_UNKNOWN", "error": f"fault injected: {status}"}).encode()


def answer(
    status: int = 200,
    body: bytes | None = None,
    *,
    retry_after: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Fault:
    """
    Answer at once with ``status``; the body is ``{}`` for a 2xx (nothing for 204) and a
    Matrix error otherwise. ``retry_after`` is a ``Retry-After`` value (seconds or a date).
    """
    if body is None:
        body = b"" if status == 204 else b"{}" if 200 <= status < 300 else _error_body(status)
    all_headers = dict(headers or {})
    if retry_after is not None:
        all_headers["Retry-After"] = retry_after
    return Fault("answer", status, body, tuple(all_headers.items()))


def ok(status: int = 200) -> Fault:
    return answer(status)


def slow(delay: float, status: int = 200, body: bytes | None = None) -> Fault:
    """Answer like :func:`answer`, but only ``delay`` seconds (receiver's clock) later."""
    return attrs.evolve(answer(status, body), kind="slow", delay=delay)


def hang() -> Fault:
    """Read the request and never answer: no status line, no headers."""
    return Fault("hang")


def hang_in_body(status: int = 200, length: int = 1000, part: bytes = b'{"partial":') -> Fault:
    """
    Send the status line and headers with ``Content-Length: length``, then ``part`` of the
    body, then nothing more.
    """
    return Fault("hang_in_body", status, part, (("Content-Length", str(length)),))


def reset() -> Fault:
    """Abort the TCP connection without answering (a reset: RST, not FIN)."""
    return Fault("reset")


def garbage(data: bytes = GARBAGE) -> Fault:
    """Answer with bytes that are not HTTP, then close the connection."""
    return Fault("garbage", body=data)


# -- what it received --


@attrs.frozen
class Seen:
    """One request, as the receiver saw it when it arrived, and how it answered."""

    seq: int
    #: "txn", "ping" or "other" (an unknown path or method)
    kind: str
    method: str
    path: str
    txn_id: str | None
    body: bytes
    #: lower-cased names
    headers: dict[str, list[str]]
    #: seconds on the receiver's clock
    time: float
    fault: Fault
    #: the local port it came to
    port: int
    #: why the receiver refused it (an unknown endpoint, a wrong token, a body that is not
    #: a transaction), whatever the fault would have been; None for a proper request
    refusal: str | None = None

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(json.loads(self.body)["events"])

    @property
    def event_ids(self) -> list[str]:
        return [e["event_id"] for e in self.events]


class _TrackingSite(server.Site):
    """A Site that remembers its connections, so that going down can drop them."""

    def __init__(self, root: resource.Resource, connections: weakref.WeakSet[Any]) -> None:
        super().__init__(root)
        self._connections = connections

    def buildProtocol(self, addr: Any) -> Any:
        connection = super().buildProtocol(addr)
        self._connections.add(connection)
        return connection


class FaultyReceiver(resource.Resource):
    """See the module's documentation."""

    isLeaf = True

    def __init__(
        self,
        reactor: Any,
        *,
        hs_token: str = HS_TOKEN,
        clock: IReactorTime | None = None,
        on_request: Callable[[Seen], None] | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.hs_token = hs_token
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.on_request = on_request
        self.default: Fault = ok()
        self.script: list[Fault] = []
        #: when set, pings are answered so and do not take from the script
        self.ping_answer: Fault | None = None
        #: every request, in order of arrival
        self.requests: list[Seen] = []
        #: transaction requests answered 2xx (the whole answer written), resends included
        self.ok: list[Seen] = []
        self.port_number = 0
        self._port: Any = None
        #: requests not answered yet (hanging or slow), and their pending answers
        self._open: dict[server.Request, tuple[Seen, IDelayedCall | None]] = {}
        #: every connection made to it and still open (kept-alive ones included)
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self._conditions = Conditions()

    # -- what the test tells it --

    def use_clock(self, clock: IReactorTime) -> None:
        """Time requests and wait for slow answers on ``clock`` from now on."""
        self.clock = clock

    def answer(self, fault: Fault) -> None:
        """Answer every request so from now on (once the script is used up)."""
        self.default = fault

    def then(self, *faults: Fault) -> None:
        """Answer the next requests so, one fault each, after those scripted already."""
        self.script.extend(faults)

    def next_fault(self, kind: str) -> Fault:
        """How to answer a request of this kind ("txn", "ping"): the script, else the default."""
        if kind == "ping" and self.ping_answer is not None:
            return self.ping_answer
        return self.script.pop(0) if self.script else self.default

    # -- up and down --

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port_number}"

    @property
    def is_up(self) -> bool:
        return self._port is not None

    def up(self, port: int | None = None) -> None:
        """Listen (again, on the same port unless told otherwise)."""
        if self._port is not None:
            return
        site = _TrackingSite(self, self._connections)
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        number = self.port_number if port is None else port
        self._port = self.reactor.listenTCP(number, site, interface="127.0.0.1")
        self.port_number = self._port.getHost().port

    async def down(self) -> None:
        """Stop listening (new connections are refused) and drop every open connection."""
        port, self._port = self._port, None
        self.release()
        if port is not None:
            await defer.maybeDeferred(port.stopListening)
        for connection in list(self._connections):
            # twisted.web wraps the HTTP/1.1 channel (to negotiate HTTP/2)
            channel = getattr(connection, "_channel", connection)
            if getattr(channel, "transport", None) is not None:
                channel.transport.abortConnection()

    # -- what the test reads --

    @property
    def transactions(self) -> list[Seen]:
        """Every transaction request, resends included, whatever the answer."""
        return [r for r in self.requests if r.kind == "txn"]

    @property
    def pings(self) -> list[Seen]:
        return [r for r in self.requests if r.kind == "ping"]

    @property
    def accepted(self) -> list[Seen]:
        """Transactions answered 2xx, the first such answer of each id only."""
        seen: dict[str, Seen] = {}
        for r in self.ok:
            seen.setdefault(r.txn_id or "", r)
        return list(seen.values())

    @property
    def event_ids(self) -> list[str]:
        """Event ids of accepted transactions, in order, each transaction once."""
        return [e for r in self.accepted for e in r.event_ids]

    @property
    def pending(self) -> int:
        """Requests not answered yet: hanging, or waiting to answer slowly."""
        return len(self._open)

    def wait_for(self, condition: Callable[[], bool], timeout: float = 15) -> Deferred[None]:
        """Fires when ``condition()`` holds; fails after ``timeout`` real seconds."""
        return self._conditions.wait_for(condition, timeout)

    def wait_for_requests(self, count: int) -> Deferred[None]:
        """Until ``count`` transaction requests have arrived (answered or not)."""
        return self.wait_for(lambda: len(self.transactions) >= count)

    def wait_for_events(self, count: int) -> Deferred[None]:
        """Until ``count`` events have been accepted."""
        return self.wait_for(lambda: len(self.event_ids) >= count)

    def wait_for_pings(self, count: int) -> Deferred[None]:
        return self.wait_for(lambda: len(self.pings) >= count)

    # -- twisted.web --

    def _kind(self, method: str, path: str) -> str:
        if method == "PUT" and path.startswith(TXN_PREFIX):
            return "txn"
        if method == "POST" and path == PING_PATH:
            return "ping"
        return "other"

    def render(self, request: server.Request) -> bytes | int:
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        headers = {
            k.decode().lower(): [v.decode("utf-8", "replace") for v in vs]
            for k, vs in request.requestHeaders.getAllRawHeaders()
        }
        body = request.content.read() if request.content is not None else b""
        kind = self._kind(method, path)
        authorization = request.getHeader("authorization")
        refusal = None
        if kind == "other":
            refusal = f"{method} {path}: not an AS API endpoint"
            fault = answer(404, b'{"errcode":"M_UNRECOGNIZED","error":"not an AS API endpoint"}')
        elif authorization != f"Bearer {self.hs_token}":
            refusal = f"{method} {path}: bad authorization {authorization!r}"
            fault = answer(403, b'{"errcode":"M_FORBIDDEN","error":"bad hs_token"}')
        elif kind == "txn" and (error := transaction_error(body)) is not None:
            refusal = f"{path}: {error}"
            fault = answer(400, b'{"errcode":"M_BAD_JSON","error":"not a transaction"}')
        else:
            fault = self.next_fault(kind)
        seen = Seen(
            seq=len(self.requests) + 1,
            kind=kind,
            method=method,
            path=path,
            txn_id=path[len(TXN_PREFIX) :] if kind == "txn" else None,
            body=body,
            headers=headers,
            time=self.clock.seconds(),
            fault=fault,
            port=request.getHost().port,
            refusal=refusal,
        )
        self.requests.append(seen)
        try:
            if self.on_request is not None:
                self.on_request(seen)  # before answering: the request is on record
            return self._respond(request, seen)
        finally:
            self._conditions.check()

    def _respond(self, request: server.Request, seen: Seen) -> bytes | int:
        fault = seen.fault
        if fault.kind == "answer":
            self._head(request, fault)
            self._answered(seen)
            return fault.body
        transport = request.channel.transport if request.channel is not None else None
        if fault.kind == "reset":
            if transport is not None:
                # SO_LINGER 0: closing sends RST, the connection is reset, not closed
                handle = transport.getHandle()  # type: ignore[attr-defined]
                handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abortConnection()  # type: ignore[attr-defined]
            return server.NOT_DONE_YET
        if fault.kind == "garbage":
            if transport is not None:
                transport.write(fault.body)
                transport.loseConnection()
            return server.NOT_DONE_YET
        self._hold(request, seen)
        if fault.kind == "hang_in_body":
            self._head(request, fault)
            request.write(fault.body)
        return server.NOT_DONE_YET

    def _head(self, request: server.Request, fault: Fault) -> None:
        request.setResponseCode(fault.status)
        request.setHeader(b"Content-Type", b"application/json")
        for name, value in fault.headers:
            request.setHeader(name, value)

    def _answered(self, seen: Seen) -> None:
        if seen.kind == "txn" and seen.fault.accepts:
            self.ok.append(seen)

    def _hold(self, request: server.Request, seen: Seen) -> None:
        """Keep an unanswered request; a slow one is answered after its delay."""
        call = None
        if seen.fault.kind == "slow":
            call = self.clock.callLater(seen.fault.delay, self._answer_late, request)
        self._open[request] = (seen, call)

        def gone(_: object) -> None:
            _, pending = self._open.pop(request, (seen, None))
            if pending is not None and pending.active():
                pending.cancel()

        request.notifyFinish().addErrback(gone)

    def _answer_late(self, request: server.Request, fault: Fault | None = None) -> None:
        held = self._open.pop(request, None)
        if held is None or request.channel is None:
            return  # the client gave up
        seen, call = held
        if call is not None and call.active():
            call.cancel()
        if fault is not None:
            seen = attrs.evolve(seen, fault=fault)
        self._head(request, seen.fault)
        self._answered(seen)
        request.write(seen.fault.body)
        request.finish()
        self._conditions.check()

    def release(self) -> None:
        """Drop the connections of every request not answered yet."""
        for request, (_, call) in list(self._open.items()):
            if call is not None and call.active():
                call.cancel()
            if request.channel is not None and request.channel.transport is not None:
                request.channel.transport.abortConnection()  # type: ignore[attr-defined]
        self._open.clear()

    def finish_held(self, fault: Fault | None = None) -> None:
        """
        Answer now every request not answered yet whose head is not out (hanging, or
        slow): as a slow one would have been, or with ``fault`` (an ``answer()``).
        """
        for request, (seen, _) in list(self._open.items()):
            if seen.fault.kind in ("hang", "slow"):
                self._answer_late(request, fault or attrs.evolve(seen.fault, kind="answer"))

    async def stop(self) -> None:
        await self.down()


async def start_faulty_receiver(reactor: Any, **kwargs: Any) -> FaultyReceiver:
    receiver = FaultyReceiver(reactor, **kwargs)
    receiver.up(0)
    return receiver


@pytest_twisted.async_yield_fixture
async def faulty_receiver(reactor: Any) -> AsyncIterator[FaultyReceiver]:
    """A :class:`FaultyReceiver` on 127.0.0.1 answering 200 until told otherwise."""
    receiver = await start_faulty_receiver(reactor)
    yield receiver
    await receiver.stop()
