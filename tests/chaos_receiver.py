"""
The receiver of ``scripts/chaos``: application services that fail at random, in a process
of their own. It does not use ``delivery``.

Run as::

    python -m tests.chaos_receiver --log PATH --services s0,s1 [--seed N] [--fail-rate F]

One :class:`tests.faults.FaultyReceiver` per service, each on a port of 127.0.0.1; once
listening it prints ``{"s0": port, ...}`` as one JSON line. A share ``--fail-rate`` of the
requests (transactions and pings) fail, each in one of the ways of :data:`FAILURES`: a 5xx
(some with ``Retry-After``), a reset, a hang until the sender gives up, an answer slower
than ``--timeout``, a slow answer within it, bytes that are not HTTP, a hang in the middle
of the body, or the service going down (connections refused) for a moment. Of the others,
some are answered after a few milliseconds and a few held for longer, so that a sender
killed at a random moment often has a request in flight.

Every request is logged *before* it is answered, one JSON line each, in the format of
``tests.receiver_process`` (which ``tests.test_sigkill.ReceiverLog`` reads), with two more
fields: ``answer``, how it was answered (``200``, ``503``, ``reset``, ``slow 2.5 s 200``,
...), and ``accepts``, whether that answer was a success; and a line ``{"seq", "service",
"kind": "down", "seconds"}`` when a service goes down. SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from .faults import (
    Fault,
    FaultyReceiver,
    Seen,
    answer,
    garbage,
    hang,
    hang_in_body,
    ok,
    reset,
    slow,
)
from .receiver_process import Log

#: the ways a failing request fails, and how often (relative weights)
FAILURES = {
    "5xx": 30,
    "5xx-retry-after": 8,
    "reset": 18,
    "hang": 7,
    "too-slow": 5,
    "slow": 14,
    "garbage": 6,
    "hang-in-body": 4,
    "down": 8,
}


class ChaosReceiver(FaultyReceiver):
    """A service that fails at random; see the module's documentation."""

    def __init__(
        self,
        reactor: Any,
        service_id: str,
        rng: random.Random,
        options: argparse.Namespace,
        on_request: Callable[[Seen], None],
        on_down: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__(reactor, on_request=on_request)
        self.service_id = service_id
        self.rng = rng
        self.options = options
        self.on_down = on_down

    def next_fault(self, kind: str) -> Fault:
        rng = self.rng
        if rng.random() >= self.options.fail_rate:
            roll = rng.random()
            if roll < self.options.hold:
                return slow(rng.uniform(0.05, 0.12))
            if roll < self.options.hold + self.options.slow:
                return slow(rng.uniform(0.001, 0.008))
            return ok()
        failure = rng.choices(list(FAILURES), list(FAILURES.values()))[0]
        timeout = self.options.timeout
        if failure == "5xx":
            return answer(rng.choice((500, 502, 503, 504)))
        if failure == "5xx-retry-after":
            return answer(rng.choice((429, 503)), retry_after=str(rng.randint(0, 1)))
        if failure == "hang":
            return hang()
        if failure == "too-slow":
            return slow(timeout + rng.uniform(0.1, 1.0))
        if failure == "slow":
            return slow(rng.uniform(0.1, timeout * 0.6))
        if failure == "garbage":
            return garbage()
        if failure == "hang-in-body":
            return hang_in_body(200)
        if failure == "down":
            self.reactor.callLater(0, self._go_down, rng.uniform(0.1, 0.8))
        return reset()  # the request that found it going down

    def _go_down(self, seconds: float) -> None:
        if self.is_up:
            if self.on_down is not None:
                self.on_down(seconds)
            Deferred.fromCoroutine(self.down())
            self.reactor.callLater(seconds, self._come_up)

    def _come_up(self) -> None:
        try:
            self.up()
        except Exception:  # the port is taken for the moment: try again shortly
            self.reactor.callLater(0.05, self._come_up)


def record(service_id: str, seen: Seen) -> dict[str, Any]:
    """The log line of one request, in ``tests.receiver_process``'s format and more."""
    if seen.refusal is not None:
        return {"service": service_id, "kind": "error", "error": seen.refusal}
    fields = {"answer": seen.fault.describe(), "accepts": seen.fault.accepts}
    if seen.kind == "ping":
        return {"service": service_id, "kind": "ping", **fields}
    return {
        "service": service_id,
        "kind": "txn",
        "txn": seen.txn_id,
        "sha256": hashlib.sha256(seen.body).hexdigest(),
        "body": seen.body.decode("utf-8"),
        "delay": seen.fault.delay,
        **fields,
    }


async def run(reactor: Any, options: argparse.Namespace) -> None:
    rng = random.Random(options.seed)
    with open(options.log, "a", encoding="utf-8") as out:
        log = Log(out)
        ports: dict[str, int] = {}
        for service_id in options.services.split(","):

            def write(seen: Seen, service_id: str = service_id) -> None:
                log.write(record(service_id, seen))

            def down(seconds: float, service_id: str = service_id) -> None:
                log.write({"service": service_id, "kind": "down", "seconds": seconds})

            receiver = ChaosReceiver(reactor, service_id, rng, options, write, down)
            receiver.up(0)
            ports[service_id] = receiver.port_number
        sys.stdout.write(json.dumps(ports) + "\n")
        sys.stdout.flush()
        # Serve until SIGTERM stops the reactor.
        await Deferred()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", required=True, help="append one JSON line a request here")
    parser.add_argument("--services", required=True, help="service ids, one port each: a,b,c")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--fail-rate", type=float, default=0.1, help="share of requests failed")
    parser.add_argument(
        "--timeout", type=float, default=2.0, help="the sender's request timeout, seconds"
    )
    parser.add_argument("--slow", type=float, default=0.3, help="share answered in 1-8 ms")
    parser.add_argument("--hold", type=float, default=0.04, help="share held 50-120 ms")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    task.react(run, [parse_args(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
