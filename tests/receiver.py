"""
A Matrix application-service receiver on 127.0.0.1 for tests: a small twisted.web server
that records every request and answers as told (status, Retry-After, hang).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.web import resource, server

from .waiting import Conditions

HS_TOKEN = "hs-secret-token"


@attrs.frozen
class Received:
    txn_id: str
    body: bytes
    headers: dict[str, list[str]]
    #: the query string's arguments
    args: dict[str, list[str]] = attrs.Factory(dict)

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(json.loads(self.body)["events"])

    @property
    def event_ids(self) -> list[str]:
        return [e["event_id"] for e in self.events]


@attrs.define
class Answer:
    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = attrs.Factory(dict)
    #: never answer (until the test calls release())
    hang: bool = False
    #: send the status line, headers and part of the body, then nothing more
    hang_in_body: bool = False


class Receiver(resource.Resource):
    isLeaf = True

    def __init__(self, hs_token: str = HS_TOKEN) -> None:
        super().__init__()
        self.hs_token = hs_token
        self.requests: list[Received] = []
        self.pings: list[Received] = []
        self.default = Answer()
        self.script: list[Answer] = []
        #: answers for the transactions a rule picks, before the script and the default
        self.rules: list[tuple[Callable[[Received], bool], Answer]] = []
        self.hanging: list[server.Request] = []
        self.held: list[Received] = []
        #: transaction requests answered 2xx, in order, resends included
        self.ok: list[Received] = []
        self._conditions = Conditions()
        self.port: Any = None
        #: TCP connections accepted
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    # -- what the test tells it --

    def answer(self, status: int = 200, **kwargs: Any) -> None:
        """Answer every request from now on like this."""
        self.default = Answer(status, **kwargs)

    def refuse(self, event_id: str, status: int = 400, **kwargs: Any) -> None:
        """Answer ``status`` to every transaction that holds this event."""
        self.rules.append((lambda r: event_id in r.event_ids, Answer(status, **kwargs)))

    def then(self, status: int = 200, **kwargs: Any) -> None:
        """Answer the next request (after those scripted already) like this."""
        self.script.append(Answer(status, **kwargs))

    # -- what the test reads --

    @property
    def accepted(self) -> list[Received]:
        """Transactions answered 2xx, first receipt of each id only."""
        seen: dict[str, Received] = {}
        for r in self.ok:
            seen.setdefault(r.txn_id, r)
        return list(seen.values())

    @property
    def event_ids(self) -> list[str]:
        """Event ids of accepted transactions, in order, each transaction once."""
        return [e for r in self.accepted for e in r.event_ids]

    def wait_for(self, condition: Callable[[], bool], timeout: float = 15) -> Deferred[None]:
        """Fires when ``condition()`` holds; fails after ``timeout`` real seconds."""
        return self._conditions.wait_for(condition, timeout)

    def wait_for_events(self, count: int) -> Deferred[None]:
        return self.wait_for(lambda: len(self.event_ids) >= count)

    def wait_for_requests(self, count: int) -> Deferred[None]:
        return self.wait_for(lambda: len(self.requests) >= count)

    def wait_for_pings(self, count: int) -> Deferred[None]:
        return self.wait_for(lambda: len(self.pings) >= count)

    # -- twisted.web --

    def render(self, request: server.Request) -> bytes | int:
        path = request.path.decode()
        headers = {
            k.decode().lower(): [v.decode() for v in vs]
            for k, vs in request.requestHeaders.getAllRawHeaders()
        }
        body = request.content.read() if request.content is not None else b""
        args = {k.decode(): [v.decode() for v in vs] for k, vs in (request.args or {}).items()}
        received = Received(path.rsplit("/", 1)[-1], body, headers, args)
        if path == "/_matrix/app/v1/ping" and request.method == b"POST":
            self.pings.append(received)
        elif path.startswith("/_matrix/app/v1/transactions/") and request.method == b"PUT":
            self.requests.append(received)
        else:
            request.setResponseCode(404)
            return b'{"errcode":"M_UNRECOGNIZED"}'
        answer = next(
            (a for rule, a in self.rules if received in self.requests and rule(received)),
            None,
        )
        if answer is None:
            answer = self.script.pop(0) if self.script else self.default
        if headers.get("authorization") != [f"Bearer {self.hs_token}"]:
            answer = Answer(403, b'{"errcode":"M_FORBIDDEN"}')
        if answer.hang_in_body:
            request.setResponseCode(answer.status)
            request.setHeader(b"Content-Length", b"1000")
            request.write(b'{"partial":')
            self.hanging.append(request)
            self.held.append(received)
            self._check()
            return server.NOT_DONE_YET
        if answer.hang:
            self.hanging.append(request)
            self.held.append(received)
            self._check()
            return server.NOT_DONE_YET
        request.setResponseCode(answer.status)
        for name, value in answer.headers.items():
            request.setHeader(name, value)
        if received in self.requests and 200 <= answer.status < 300:
            self.ok.append(received)
        self._check()
        return answer.body

    def _check(self) -> None:
        self._conditions.check()

    def release(self) -> None:
        """Drop the hanging requests' connections."""
        for request in self.hanging:
            if request.channel is not None:
                request.channel.transport.abortConnection()  # type: ignore[union-attr]
        self.hanging.clear()
        self.held.clear()

    def finish_held(self, status: int = 200) -> None:
        """Answer the hanging requests now."""
        for request, received in zip(self.hanging, self.held, strict=True):
            if request.channel is None:
                continue  # the client gave up
            request.setResponseCode(status)
            if 200 <= status < 300 and received in self.requests:
                self.ok.append(received)
            request.write(b"{}")
            request.finish()
        self.hanging.clear()
        self.held.clear()
        self._check()


class _Site(server.Site):
    """A site that counts the connections its receiver accepts."""

    def buildProtocol(self, addr: Any) -> Any:
        self.resource.connections += 1
        return super().buildProtocol(addr)


async def start_receiver(reactor: Any, hs_token: str = HS_TOKEN) -> Receiver:
    receiver = Receiver(hs_token)
    site = _Site(receiver)
    site.noisy = False
    receiver.port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return receiver


async def stop_receiver(receiver: Receiver) -> None:
    receiver.release()
    await defer.maybeDeferred(receiver.port.stopListening)
