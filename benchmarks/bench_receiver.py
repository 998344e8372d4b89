"""
The receiver of the benchmarks (``benchmarks.bench``), in a process of its own.

Run as::

    python -m benchmarks.bench_receiver [--ports N]

It listens on ``N`` ports of 127.0.0.1 (1 unless told; each like another receiver, for
many services) and prints ``{"ports": [...]}`` as one JSON line once it is listening.
What arrives at any port counts together. It answers:

- ``PUT /_matrix/app/v1/transactions/{txnId}``: 200, after parsing the body with
  ``json.loads`` and noting, for every event, when it arrived (``time.time()``) and, if the
  event's content carries one, how long after its ``ts`` (the producer's ``time.time()``
  at submit) that was;
- ``POST /_matrix/app/v1/ping``: 200;
- both with 503 instead, without looking at the body, while it is down (``POST /down``,
  until ``POST /up``);
- ``GET /stats?count=N``: the statistics (see :meth:`Stats.as_json`) once at least ``N``
  events have arrived (at once without ``count``);
- ``POST /reset``: forgets everything, for the next run.

SIGTERM stops it.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.web import http, resource, server

TXN_PREFIX = b"/_matrix/app/v1/transactions/"


class Stats:
    """
    What arrived: counts, first and last arrival times, each transaction's arrival time and
    size, and the latencies carried.
    """

    def __init__(self) -> None:
        self.events = 0
        self.transactions = 0
        self.first_arrival: float | None = None
        self.last_arrival: float | None = None
        self.arrivals: list[tuple[float, int]] = []
        self.latencies: list[float] = []

    def record(self, events: list[dict[str, Any]]) -> None:
        now = time.time()
        self.transactions += 1
        self.events += len(events)
        if self.first_arrival is None:
            self.first_arrival = now
        self.last_arrival = now
        self.arrivals.append((now, len(events)))
        for event in events:
            content = event.get("content")
            if isinstance(content, dict) and isinstance(content.get("ts"), float):
                self.latencies.append(now - content["ts"])

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "events": self.events,
                "transactions": self.transactions,
                "first_arrival": self.first_arrival,
                "last_arrival": self.last_arrival,
                "arrivals": self.arrivals,
                "latencies": self.latencies,
            }
        ).encode()


class Endpoint(resource.Resource):
    """Every path of the receiver."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.stats = Stats()
        #: ``(count, request)`` of the ``GET /stats`` waiting for ``count`` events
        self._waiting: list[tuple[int, server.Request]] = []
        self.down = False

    def render_PUT(self, request: server.Request) -> bytes:
        if self.down:
            request.setResponseCode(503)
            return b'{"errcode":"M_UNKNOWN","error":"down for the benchmark"}'
        if not request.path.startswith(TXN_PREFIX) or request.content is None:
            request.setResponseCode(404)
            return b"{}"
        self.stats.record(json.loads(request.content.read())["events"])
        self._answer_waiting()
        return b"{}"

    def render_POST(self, request: server.Request) -> bytes:
        if request.path == b"/reset":
            self.stats = Stats()
            self.down = False
        elif request.path in (b"/down", b"/up"):
            self.down = request.path == b"/down"
        elif self.down:
            request.setResponseCode(503)
        return b"{}"

    def render_GET(self, request: server.Request) -> bytes | int:
        wanted = int(request.args.get(b"count", [b"0"])[0])
        if self.stats.events >= wanted:
            return self.stats.as_json()
        self._waiting.append((wanted, request))
        return server.NOT_DONE_YET

    def _answer_waiting(self) -> None:
        still = []
        for wanted, request in self._waiting:
            if self.stats.events >= wanted:
                request.write(self.stats.as_json())
                request.finish()
            else:
                still.append((wanted, request))
        self._waiting = still


class QuietSite(server.Site):
    """A site that keeps no access log (it would cost more than the answers)."""

    def log(self, request: http.Request) -> None:
        pass


async def run(reactor: Any, ports: int) -> None:
    site = QuietSite(Endpoint())  # type: ignore[no-untyped-call]
    site.noisy = False
    numbers = [
        reactor.listenTCP(0, site, interface="127.0.0.1").getHost().port for _ in range(ports)
    ]
    sys.stdout.write(json.dumps({"ports": numbers}) + "\n")
    sys.stdout.flush()
    await Deferred()  # serve until SIGTERM stops the reactor


def main() -> None:
    ports = int(sys.argv[sys.argv.index("--ports") + 1]) if "--ports" in sys.argv else 1
    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor, ports)))


if __name__ == "__main__":
    main()
