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
import hashlib
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.web import resource, server

from .housekeeping_child import poisoned
from .receiver import HS_TOKEN
from .receiver_process import PING_PATH, TXN_PREFIX, Delays, Log, transaction_error


class Failing:
    """When a service's answers fail: while a file is absent."""

    def __init__(self, until: Path | None) -> None:
        self._until = until

    def now(self) -> bool:
        return self._until is not None and not self._until.exists()

    def fixed(self) -> bool:
        """Whether it failed and does no more."""
        return self._until is not None and self._until.exists()


class ServiceEndpoint(resource.Resource):
    """What one service's port answers."""

    isLeaf = True

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
        super().__init__()
        self.service_id = service_id
        self._log = log
        self._delays = delays
        self._reactor = reactor
        self._down = down
        self._picky = picky
        self._fixed_delay = fixed_delay

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
            status = 503 if self._down.now() else 200
            self._log.write({"service": self.service_id, "kind": "ping", "status": status})
            return self._answer(request, status)
        if method != "PUT" or not path.startswith(TXN_PREFIX):
            return self._refuse(request, 404, f"{method} {path}: not an AS API endpoint")
        error = transaction_error(body)
        if error is not None:
            return self._refuse(request, 400, f"{path}: {error}")
        status = self._status(json.loads(body)["events"])
        delay = self._delays.next() if status == 200 else 0.0
        if status == 200 and self._picky.fixed():
            delay = self._fixed_delay
        self._log.write(
            {
                "service": self.service_id,
                "kind": "txn",
                "txn": path[len(TXN_PREFIX) :],
                "sha256": hashlib.sha256(body).hexdigest(),
                "body": body.decode("utf-8"),
                "delay": delay,
                "status": status,
            }
        )
        if not delay:
            return self._answer(request, status)
        self._answer_later(request, delay)
        return server.NOT_DONE_YET

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


async def run(reactor: Any, options: argparse.Namespace) -> None:
    delays = Delays(random.Random(options.seed), options.slow, options.hold)
    down = set(options.down.split(",")) if options.down else set()
    picky = set(options.picky.split(",")) if options.picky else set()
    never = Failing(None)
    with open(options.log, "a", encoding="utf-8") as out:
        log = Log(out)
        ports: dict[str, int] = {}
        for service_id in options.services.split(","):
            endpoint = ServiceEndpoint(
                service_id,
                log,
                delays,
                reactor,
                Failing(Path(options.recover)) if service_id in down else never,
                Failing(Path(options.fixed)) if service_id in picky else never,
                options.fixed_delay,
            )
            site = server.Site(endpoint)
            site.noisy = False
            ports[service_id] = reactor.listenTCP(0, site, interface="127.0.0.1").getHost().port
        sys.stdout.write(json.dumps(ports) + "\n")
        sys.stdout.flush()
        # Serve until SIGTERM stops the reactor.
        await Deferred()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", required=True, help="append one JSON line a request here")
    parser.add_argument("--services", required=True, help="service ids, one port each")
    parser.add_argument("--down", default="", help="services answering 503 until --recover")
    parser.add_argument("--recover", default="recovered", help="the file that ends --down")
    parser.add_argument("--picky", default="", help="services refusing poisoned events")
    parser.add_argument("--fixed", default="fixed", help="the file that ends --picky")
    parser.add_argument("--fixed-delay", type=float, default=0.0, help="answers held then")
    parser.add_argument("--seed", type=int, default=0, help="seed of the answer delays")
    parser.add_argument("--slow", type=float, default=0.3, help="share answered in 1-8 ms")
    parser.add_argument("--hold", type=float, default=0.04, help="share held 50-120 ms")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    task.react(run, [parse_args(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
