"""
The receiver of ``test_sigkill_housekeeping``, in a process of its own: the receiver of
``tests.receiver_process`` (one port a service, one JSON line a request, written and
flushed before the answer, some answers delayed or held), with two services that fail:

- the services of ``--down`` answer every request (transactions and pings) 503 until the
  file ``--recover`` exists;
- the services of ``--picky`` answer 400 to a transaction that carries an event of
  :func:`tests.housekeeping_child.poisoned`, until the file ``--fixed`` exists; from then
  on they hold every answer ``--fixed-delay`` seconds (what they were sent stays stored
  that long, for the test to look at).

Run as::

    python -m tests.housekeeping_receiver --log PATH --services up,down,picky \
        --down down --recover PATH --picky picky --fixed PATH [--seed N]

It prints ``{"up": port, ...}`` once it is listening. A transaction's log line is
``{"seq", "service", "kind": "txn", "txn", "sha256", "body", "delay", "status"}`` (a
refused one too, with its status); a ping's ``{"seq", "service", "kind": "ping",
"status"}``; anything that is not the AS API (a wrong token, a bad body, an unknown path)
``{"seq", "service", "kind": "error", "error"}``. SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.web import server

from . import receiver_process
from .housekeeping_child import poisoned
from .receiver_process import Delays, Log


class Failing:
    """When a service's answers fail: while a file is absent."""

    def __init__(self, until: Path | None) -> None:
        self._until = until

    def now(self) -> bool:
        return self._until is not None and not self._until.exists()

    def fixed(self) -> bool:
        """Whether it failed and does no more."""
        return self._until is not None and self._until.exists()


class ServiceEndpoint(receiver_process.ServiceEndpoint):
    """What one service's port answers: that of ``tests.receiver_process``, or a failure."""

    def __init__(
        self,
        service_id: str,
        log: Log,
        delays: Delays,
        reactor: Any,
        down: Failing,
        picky: Failing,
        fixed_delay: float = 0.0,
    ) -> None:
        super().__init__(service_id, log, delays, reactor)
        self._down = down
        self._picky = picky
        self._fixed_delay = fixed_delay

    def _ping(self, request: server.Request) -> bytes:
        status = 503 if self._down.now() else 200
        self._log.write({"service": self.service_id, "kind": "ping", "status": status})
        return self._answer(request, status)

    def _verdict(self, body: bytes) -> tuple[int, float]:
        status = self._status(json.loads(body)["events"])
        delay = self._delays.next() if status == 200 else 0.0
        if status == 200 and self._picky.fixed():
            delay = self._fixed_delay
        return status, delay

    def _logged(self, status: int) -> dict[str, Any]:
        return {"status": status}

    def _status(self, events: list[dict[str, Any]]) -> int:
        if self._down.now():
            return 503
        if self._picky.now() and any(poisoned(e["content"]["n"]) for e in events):
            return 400
        return 200

    def _answer(self, request: server.Request, status: int) -> bytes:
        request.setResponseCode(status)
        if status == 503:
            return b'{"errcode": "M_UNKNOWN", "error": "down for now"}'
        if status == 400:
            return b'{"errcode": "M_BAD_JSON", "error": "an event this service refuses"}'
        return b"{}"


async def run(reactor: Any, options: argparse.Namespace) -> None:
    down = set(options.down.split(",")) if options.down else set()
    picky = set(options.picky.split(",")) if options.picky else set()
    never = Failing(None)

    def endpoint(service_id: str, log: Log, delays: Delays) -> ServiceEndpoint:
        return ServiceEndpoint(
            service_id,
            log,
            delays,
            reactor,
            Failing(Path(options.recover)) if service_id in down else never,
            Failing(Path(options.fixed)) if service_id in picky else never,
            options.fixed_delay,
        )

    await receiver_process.serve(reactor, options, endpoint)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = receiver_process.parser(__doc__)
    parser.add_argument("--down", default="", help="services answering 503 until --recover")
    parser.add_argument("--recover", default="recovered", help="the file that ends --down")
    parser.add_argument("--picky", default="", help="services refusing poisoned events")
    parser.add_argument("--fixed", default="fixed", help="the file that ends --picky")
    parser.add_argument("--fixed-delay", type=float, default=0.0, help="answers held then")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    task.react(run, [parse_args(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
