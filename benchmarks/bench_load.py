"""
The load of the ``ingest-http`` benchmark (``benchmarks.bench``), in a process of its own:
it offers events to a running daemon's ``POST /v1/events``.

Run as::

    python -m benchmarks.bench_load --url URL --token TOKEN --events N
                                  [--batch 100] [--concurrency 4] [--prefix STR]
                                  [--senders N] [--start-at T] [--cpu]

(from the repository's root, or by the path of this file: it needs Twisted and treq,
not ``delivery``). It starts sending at once (or at ``--start-at``), keeps
``--concurrency`` requests in flight over as many persistent connections, each with the
next batch of ``--batch`` events, and prints one JSON line when every event is
acknowledged::

    {"events": N, "requests": R, "started": t0, "finished": t1, "retries": k}

``requests`` counts the requests answered 200 (one per batch), ``retries`` the requests
answered 503 (the database does not answer) or 429 (too many ingests at once) and sent
again after ``--retry-delay`` seconds; ``started`` and ``finished`` are ``time.time()``
before the first request and after the last answer. Any other answer, or no answer, stops
it with one line on stderr and exit status 1. With ``--cpu`` the line also has ``"cpu"``:
the user and system seconds this process spent from ``started`` to ``finished``.

The events are those of ``benchmarks.bench.make_events`` (``$PREFIX-0`` to
``$PREFIX-{N-1}``), but ``content.ts`` is ``time.time()`` when the request that carries it
is sent (the receiver measures latency from it). With ``--senders N`` the ``i``-th event is
from ``@bridge{i % N}_{i}:example.org`` (as ``make_events(..., senders=N)`` has it), so the
events spread evenly over the users of N services, not all from one user. Every body is
encoded before the clock starts, split around the place of ``ts``; a request only joins
the parts with the time. ``--start-at T`` waits, once the bodies are encoded, until
``time.time()`` is ``T`` (several load processes started together then begin together).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import treq
from twisted.internet import task
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

#: answers after which the same request is sent again: nothing of it was stored
RETRY_STATUSES = frozenset((503, 429))

#: stand for the number of an event, its sender's number and ``content.ts`` in the
#: template of an event
_I = "@@i@@"
_U = "@@u@@"
_TS = "@@ts@@"


class LoadError(Exception):
    """The daemon refused a batch or could not be reached: the load stops."""


def event(
    prefix: str, i: int | str, ts: float | str, user: int | str | None = None
) -> dict[str, Any]:
    """
    The ``i``-th event, shaped as ``benchmarks.bench.make_events`` makes them: from
    ``@bridge{user}_{i}`` (``make_events``'s ``senders``), or ``@bench_user`` if None.
    """
    return {
        "event_id": f"${prefix}-{i}",
        "type": "m.room.message",
        "room_id": "!bench:example.org",
        "sender": f"@bridge{user}_{i}:example.org"
        if user is not None
        else "@bench_user:example.org",
        "content": {"msgtype": "m.text", "body": f"benchmark message {i}", "ts": ts},
    }


def encode_bodies(prefix: str, total: int, size: int, senders: int = 0) -> list[list[bytes]]:
    """
    Every request body, split where its events' ``ts`` go (see :func:`stamp`); the events
    from ``senders`` users (see :func:`event`), or from one if 0.

    One event is encoded with ``json.dumps``; the others are that template with their
    numbers put in, many times faster than encoding each.
    """
    if _I in prefix or _U in prefix:
        raise ValueError(f"the prefix must not hold {_I!r} or {_U!r}: {prefix!r}")
    user = _U if senders else None
    template = json.dumps(event(prefix, _I, _TS, user), separators=(",", ":"))
    head, tail = template.split(f'"{_TS}"')
    # the head as a format string: {0} the event's number, {1} its sender's
    form = head.replace("{", "{{").replace("}", "}}").replace(_I, "{0}").replace(_U, "{1}")
    bodies = []
    for start in range(0, total, size):
        numbers = range(start, min(start + size, total))
        heads = [form.format(i, i % senders if senders else 0) for i in numbers]
        parts = ['{"events":[' + heads[0], *(f"{tail},{h}" for h in heads[1:]), tail + "]}"]
        bodies.append([p.encode() for p in parts])
    return bodies


def stamp(parts: list[bytes], now: float) -> bytes:
    """The body of these parts, every event's ``ts`` being ``now``."""
    return repr(now).encode().join(parts)


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Load:
    """Offers the bodies, ``concurrency`` at a time, and counts what it took."""

    def __init__(
        self, reactor: Any, url: str, token: str, concurrency: int, retry_delay: float
    ) -> None:
        self._reactor = reactor
        self._url = f"{url.rstrip('/')}/v1/events".encode()
        self._headers = Headers(
            {b"Authorization": [f"Bearer {token}".encode()], b"Content-Type": [b"application/json"]}
        )
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = concurrency
        self._pool.retryAutomatically = False
        self._agent = Agent(reactor, connectTimeout=10, pool=self._pool)
        self._concurrency = concurrency
        self._retry_delay = retry_delay
        self.requests = 0
        self.retries = 0

    async def offer(self, bodies: list[list[bytes]]) -> None:
        """Send every body; each of ``concurrency`` slots takes the next one in turn."""
        work = iter(bodies)
        slots = [Deferred.fromCoroutine(self._slot(work)) for _ in range(self._concurrency)]
        try:
            await gatherResults(slots, consumeErrors=True)
        except FirstError as e:
            e.subFailure.raiseException()
        finally:
            await self._pool.closeCachedConnections()

    async def _slot(self, work: Iterator[list[bytes]]) -> None:
        for parts in work:
            while not await self._post(stamp(parts, time.time())):
                self.retries += 1
                await task.deferLater(self._reactor, self._retry_delay)
            self.requests += 1

    async def _post(self, body: bytes) -> bool:
        """Whether the daemon took the body; False if it asks for it again later."""
        try:
            response = await self._agent.request(
                b"POST", self._url, self._headers, BytesProducer(body)
            )
            answer = await treq.content(response)
        except Exception as e:
            raise LoadError(f"no answer from {self._url.decode()}: {describe(e)}") from None
        if response.code == 200:
            return True
        if response.code in RETRY_STATUSES:
            return False
        raise LoadError(
            f"POST {self._url.decode()} answered {response.code} {matrix_error(answer)}"
        )


def describe(error: BaseException) -> str:
    """One line on why a request failed (Twisted wraps the cause in a list of Failures)."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(describe(r.value) for r in reasons)
    return str(error).strip() or type(error).__name__


def matrix_error(body: bytes) -> str:
    """The errcode and error of a Matrix error body, else its text (cut short)."""
    try:
        parsed = json.loads(body)
        return f"{parsed['errcode']}: {parsed['error']}"
    except (ValueError, TypeError, KeyError):
        text = body.decode("utf-8", "replace").replace("\n", " ").strip()
        return text[:200] or "(no body)"


def cpu_seconds() -> float:
    """The user and system seconds this process has spent so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(reactor: Any, options: argparse.Namespace) -> None:
    bodies = encode_bodies(options.prefix, options.events, options.batch, options.senders)
    load = Load(reactor, options.url, options.token, options.concurrency, options.retry_delay)
    if options.start_at is not None:
        await task.deferLater(reactor, max(0.0, options.start_at - time.time()))
    started = time.time()
    cpu = cpu_seconds()
    try:
        await load.offer(bodies)
    except LoadError as e:
        sys.stderr.write(f"bench_load: {e}\n")
        raise SystemExit(1) from None
    finished = time.time()
    line: dict[str, Any] = {
        "events": options.events,
        "requests": load.requests,
        "started": started,
        "finished": finished,
        "retries": load.retries,
    }
    if options.cpu:
        line["cpu"] = cpu_seconds() - cpu
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the daemon's API, e.g. http://127.0.0.1:8008")
    parser.add_argument("--token", required=True, help="the ingest token")
    parser.add_argument("--events", type=int, required=True, help="how many events to offer")
    parser.add_argument("--batch", type=positive, default=100, help="events per request")
    parser.add_argument("--concurrency", type=positive, default=4, help="requests in flight")
    parser.add_argument("--prefix", default="load", help="of the event ids: $PREFIX-i")
    parser.add_argument(
        "--senders",
        type=int,
        default=0,
        help="spread the events over the users @bridge{i %% N}_{i} of N services (0: one user)",
    )
    parser.add_argument(
        "--start-at", type=float, help="time.time() at which to begin, once the bodies are made"
    )
    parser.add_argument(
        "--cpu", action="store_true", help='report this process\'s CPU seconds ("cpu")'
    )
    parser.add_argument(
        "--retry-delay", type=float, default=0.1, help="seconds before sending again on 503/429"
    )
    options = parser.parse_args(argv)
    if options.events < 0:
        parser.error("--events must not be negative")
    if urlsplit(options.url).scheme not in ("http", "https"):
        parser.error(f"--url must be http://HOST:PORT of the daemon, not {options.url!r}")
    if _I in options.prefix or _U in options.prefix:
        parser.error(f"--prefix must not hold {_I!r} or {_U!r}")
    if options.senders < 0:
        parser.error("--senders must not be negative")
    return options


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor, options)))


if __name__ == "__main__":
    main()
