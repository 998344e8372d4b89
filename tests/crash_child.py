"""
The process that ``test_sigkill`` kills: a :class:`delivery.DeliveryService` on a SQLite
file, sending to the receiver process, fed with a fixed stream of events.

Run as::

    python -m tests.crash_child --db PATH --urls a=URL,b=URL,c=URL --start N --count 5000

It submits events ``N`` to ``count - 1`` in batches, ``--pause`` seconds apart, and once
``submit()`` has returned for a batch it prints ``ACKED <index of its last event>
<stream positions of its events, comma-separated>`` and flushes: an event is acknowledged
only after that line. When every event has been submitted it prints ``DONE <count>`` and
keeps delivering until it is killed (SIGKILL) or stopped (SIGTERM stops it cleanly).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import globalLogBeginner, textFileLogObserver

from delivery import DeliveryService, Registration
from delivery.store import open_store

from .harness import registration


@attrs.frozen
class ServiceSpec:
    """One application service of the crash test and the namespaces it registers."""

    id: str
    users: str | None = None
    rooms: str | None = None
    max_events: int = 100
    #: failed attempts before the events a service refuses are isolated (the default)
    reject_attempts: int = 3


#: Overlapping interests: ``a`` wants senders starting with ``@a``, ``b`` wants the room
#: ``!r1:hs`` (``re.match``, so not ``!q!r1:hs``), ``c`` wants every event.
SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("a", users="@a", max_events=10),
    ServiceSpec("b", rooms="!r1:", max_events=25),
    ServiceSpec("c", users=".*", max_events=50),
)

SENDERS = ("@alice:hs", "@bob:hs", "@anna:hs", "@carol:hs", "@dave-a:hs")
ROOMS = ("!r1:hs", "!r2:hs", "!r11:hs", "!q!r1:hs")


def make_event(index: int) -> dict[str, Any]:
    """Event number ``index`` of the test stream; the same every time it is asked for."""
    sender = SENDERS[(index * 7 + index // 3) % len(SENDERS)]
    room = ROOMS[(index * 3 + index // 5) % len(ROOMS)]
    return {
        "event_id": f"$ev{index}:hs",
        "type": "m.room.message",
        "sender": sender,
        "room_id": room,
        "content": {"body": f"message {index}" + " é" * (index % 4), "n": index},
    }


def registrations(
    urls: Mapping[str, str], services: Sequence[ServiceSpec] = SERVICES
) -> list[Registration]:
    """The ``services``, sending to ``urls[service id]``, retrying fast."""
    return [
        registration(
            spec.id,
            urls[spec.id],
            users=spec.users,
            rooms=spec.rooms,
            max_events=spec.max_events,
            reject_attempts=spec.reject_attempts,
            initial_delay=0.05,
            max_delay=0.5,
            probe_interval=0.2,
            request_timeout=10.0,
        )
        for spec in services
    ]


def announce(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def parse_urls(text: str) -> dict[str, str]:
    """``a=URL,b=URL`` as a mapping."""
    return dict(item.split("=", 1) for item in text.split(","))


async def run(reactor: Any, options: argparse.Namespace) -> None:
    service = DeliveryService(
        open_store(options.db, reactor),
        registrations(parse_urls(options.urls)),
        reactor=reactor,
        poll_interval=options.poll_interval,
    )
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    await submit_all(reactor, service, options, make_event)


async def submit_all(
    reactor: Any,
    service: DeliveryService,
    options: argparse.Namespace,
    event: Callable[[int], dict[str, Any]],
    again: int = 0,
) -> None:
    """
    Submit events ``--start`` to ``--count - 1`` in batches, ``--pause`` seconds apart
    (those below ``again`` back to back), announcing each batch once acknowledged; then
    announce ``DONE`` and keep delivering until killed, or stopped by SIGTERM.
    """
    for first in range(options.start, options.count, options.batch):
        indices = range(first, min(first + options.batch, options.count))
        positions = await service.submit([event(i) for i in indices])
        announce(f"ACKED {indices[-1]} {','.join(map(str, positions))}")
        if options.pause and indices[-1] >= again:
            await task.deferLater(reactor, options.pause)
    announce(f"DONE {options.count}")
    await Deferred()


def parser(doc: str | None, urls: str, count: int) -> argparse.ArgumentParser:
    """
    The options of a crash test's child (``doc``: its module's docstring; ``urls``: the
    services' URLs, as an example; ``count``: events in the stream by default).
    """
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--db", required=True, help="the database URL")
    parser.add_argument("--urls", required=True, help=urls)
    parser.add_argument("--start", type=int, default=0, help="first event to submit")
    parser.add_argument("--count", type=int, default=count, help="events in the stream")
    parser.add_argument("--batch", type=int, default=20, help="events per submit()")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between submits")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser_ = parser(__doc__, "a=URL,b=URL,c=URL", 5000)
    parser_.add_argument("--poll-interval", type=float, default=0.05)
    return parser_.parse_args(argv)


def launch(
    run: Callable[[Any, argparse.Namespace], Coroutine[Any, Any, None]],
    options: argparse.Namespace,
) -> None:
    """Log to stderr, and ``run(reactor, options)`` until it ends or the reactor stops."""
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    task.react(run, [options])


def main(argv: Sequence[str] | None = None) -> None:
    launch(run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
