"""
A Matrix application-service receiver in a process of its own, for ``test_sigkill``.

Run as::

    python -m tests.receiver_process --log PATH --services a,b,c [--seed N]

It listens on one port of 127.0.0.1 per service and prints ``{"a": port, ...}`` as one
JSON line once it is listening. For every request it appends one JSON line to the log file
and flushes it *before* answering, so the log holds everything that reached the receiver,
including requests whose sender was killed before it read the answer:

- ``{"seq", "service", "kind": "txn", "txn", "sha256", "body", "delay"}`` for a
  ``PUT /_matrix/app/v1/transactions/{txnId}`` (answered 200);
- ``{"seq", "service", "kind": "ping"}`` for a ``POST /_matrix/app/v1/ping`` (200);
- ``{"seq", "service", "kind": "error", "error", ...}`` for anything else: a wrong token,
  a body that is not a transaction, an unknown path (answered 4xx).

Some answers are delayed a few milliseconds, and a few are held for longer (``delay`` in
the log line says how long), so that a sender killed at a random moment is often killed
while a request is in flight. SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.web import resource, server

from .receiver import HS_TOKEN

TXN_PREFIX = "/_matrix/app/v1/transactions/"
PING_PATH = "/_matrix/app/v1/ping"


class Log:
    """The shared log file: one JSON object a line, flushed line by line."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._seq = 0

    def write(self, record: dict[str, Any]) -> None:
        self._seq += 1
        self._out.write(json.dumps({"seq": self._seq, **record}) + "\n")
        self._out.flush()


class Delays:
    """How long to wait before answering a transaction request, chosen at random."""

    def __init__(self, rng: random.Random, slow: float, hold: float) -> None:
        self._rng = rng
        self._slow = slow
        self._hold = hold

    def next(self) -> float:
        roll = self._rng.random()
        if roll < self._hold:
            return self._rng.uniform(0.05, 0.12)
        if roll < self._hold + self._slow:
            return self._rng.uniform(0.001, 0.008)
        return 0.0


def transaction_error(body: bytes) -> str | None:
    """Why ``body`` is not a Matrix transaction body, or None."""
    try:
        data = json.loads(body)
    except ValueError as e:
        return f"body is not JSON: {e}"
    if not isinstance(data, dict) or not isinstance(data.get("events"), list):
        return "body has no list of events"
    if not all(isinstance(e, dict) and isinstance(e.get("event_id"), str) for e in data["events"]):
        return "an event has no event_id"
    return None


class ServiceEndpoint(resource.Resource):
    """What one service's port answers."""

    isLeaf = True

    def __init__(self, service_id: str, log: Log, delays: Delays, reactor: Any) -> None:
        super().__init__()
        self.service_id = service_id
        self._log = log
        self._delays = delays
        self._reactor = reactor

    def render(self, request: server.Request) -> bytes | int:
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        body = request.content.read() if request.content is not None else b""
        authorization = request.getHeader("authorization")
        if authorization != f"Bearer {HS_TOKEN}":
            return self._refuse(
                request, 403, f"{method} {path}: bad authorization {authorization!r}"
            )
        if method == "POST" and path == PING_PATH:
            return self._ping(request)
        if method != "PUT" or not path.startswith(TXN_PREFIX):
            return self._refuse(request, 404, f"{method} {path}: not an AS API endpoint")
        error = transaction_error(body)
        if error is not None:
            return self._refuse(request, 400, f"{path}: {error}")
        status, delay = self._verdict(body)
        self._log.write(
            {
                "service": self.service_id,
                "kind": "txn",
                "txn": path[len(TXN_PREFIX) :],
                "sha256": hashlib.sha256(body).hexdigest(),
                "body": body.decode("utf-8"),
                "delay": delay,
                **self._logged(status),
            }
        )
        if not delay:
            return self._answer(request, status)
        self._answer_later(request, delay)
        return server.NOT_DONE_YET

    def _ping(self, request: server.Request) -> bytes:
        self._log.write({"service": self.service_id, "kind": "ping"})
        return b"{}"

    def _verdict(self, body: bytes) -> tuple[int, float]:
        """
        The status to answer a transaction (``body``) with, and how long to hold the
        answer first: here always 200, after a delay chosen at random.
        """
        return 200, self._delays.next()

    def _logged(self, status: int) -> dict[str, Any]:
        """What a transaction's log line says besides the request (here: nothing)."""
        return {}

    def _answer(self, request: server.Request, status: int) -> bytes:
        """The body of an answer given at once (here always a success)."""
        return b"{}"

    def _refuse(self, request: server.Request, status: int, error: str) -> bytes:
        self._log.write({"service": self.service_id, "kind": "error", "error": error})
        request.setResponseCode(status)
        return json.dumps({"errcode": "M_UNKNOWN", "error": error}).encode()

    def _answer_later(self, request: server.Request, delay: float) -> None:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer() -> None:
            if not gone:
                request.write(b"{}")
                request.finish()

        self._reactor.callLater(delay, answer)


async def serve(
    reactor: Any,
    options: argparse.Namespace,
    endpoint: Callable[[str, Log, Delays], resource.Resource],
) -> None:
    """Listen on one port a service, each answered by ``endpoint(service id, log, delays)``."""
    delays = Delays(random.Random(options.seed), options.slow, options.hold)
    with open(options.log, "a", encoding="utf-8") as out:
        log = Log(out)
        ports: dict[str, int] = {}
        for service_id in options.services.split(","):
            site = server.Site(endpoint(service_id, log, delays))
            site.noisy = False
            ports[service_id] = reactor.listenTCP(0, site, interface="127.0.0.1").getHost().port
        sys.stdout.write(json.dumps(ports) + "\n")
        sys.stdout.flush()
        # Serve until SIGTERM stops the reactor.
        await Deferred()


async def run(reactor: Any, options: argparse.Namespace) -> None:
    await serve(reactor, options, lambda s, log, delays: ServiceEndpoint(s, log, delays, reactor))


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The options of a receiver process (``doc``: its module's docstring)."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--log", required=True, help="append one JSON line a request here")
    parser.add_argument("--services", required=True, help="service ids, one port each: a,b,c")
    parser.add_argument("--seed", type=int, default=0, help="seed of the answer delays")
    parser.add_argument("--slow", type=float, default=0.3, help="share answered in 1-8 ms")
    parser.add_argument("--hold", type=float, default=0.04, help="share held 50-120 ms")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    return parser(__doc__).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    task.react(run, [parse_args(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
