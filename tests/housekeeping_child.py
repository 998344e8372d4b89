"""
The process that ``test_sigkill_housekeeping`` kills: a :class:`delivery.DeliveryService`
with aggressive housekeeping (payloads kept 1 s, small batches, no pause between them),
sending to three services of ``tests.housekeeping_receiver``, fed with a fixed stream.

Run as::

    python -m tests.housekeeping_child --db URL --urls up=URL,down=URL,picky=URL \
        --start N --count 2400 [--redrive picky]

It submits events ``N`` to ``count - 1`` in batches, ``--pause`` seconds apart (those
below ``--again``, submitted again after a kill, back to back), and once ``submit()``
has returned for a batch it prints ``ACKED <index of its last event> <stream positions
of its events, comma-separated>`` and flushes. Around every housekeeping batch (one
database transaction) it prints ``HK BEGIN <operation>`` before the batch is handed to
the store and ``HK END <operation> <rows deleted> <seconds>`` once it has committed, so
that the test can tell whether a kill landed while a batch was under way.

With ``--redrive SERVICE`` it first sends that service's dead letters again, two at a
time, each time about when a pass of housekeeping begins (``--seed`` chooses the
moments), and prints ``REDRIVEN <count>``. When every event has been submitted it prints
``DONE <count>`` and keeps delivering until it is killed (SIGKILL) or stopped (SIGTERM).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from delivery import DeliveryService, Housekeeping, IStore
from delivery.store import open_store

from . import crash_child
from .crash_child import ServiceSpec, announce, parse_urls, registrations, submit_all

#: what the child's housekeeping keeps: payloads 1 s, ids 5 s (longer than a restart takes,
#: so that an event submitted again after a kill is still recognised), the delivery log
#: 2 s or 100 attempts a service; 50 rows a batch, batches back to back, a pass every 0.1 s
HOUSEKEEPING = Housekeeping(
    retention=1.0,
    dedupe_window=5.0,
    attempt_retention=2.0,
    attempts_per_service=100,
    batch_size=50,
    pace=0.0,
    interval=0.1,
)

#: the store operations that are housekeeping batches, announced before and after
BATCHES = ("delete_events", "prune_seen", "prune_attempts")


#: ``up`` wants every sender but ``@nobody``, ``down`` (answered 503 until the test lets it
#: recover) the room ``!r1:hs``, ``picky`` (which refuses the events of :func:`poisoned` on
#: their own, with 400) alice's and carol's events. Nobody wants ``@nobody``'s events
#: outside ``!r1:hs``: the sorter deletes those as it routes them.
SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("up", users="@(alice|bob|carol|dave):", max_events=20),
    ServiceSpec("down", rooms="!r1:", max_events=25),
    ServiceSpec("picky", users="@(alice|carol):", max_events=10, reject_attempts=1),
)

SENDERS = ("@alice:hs", "@bob:hs", "@carol:hs", "@dave:hs", "@nobody:hs")
ROOMS = ("!r1:hs", "!r2:hs", "!r3:hs")


def make_event(index: int) -> dict[str, Any]:
    """Event number ``index`` of the test stream; the same every time it is asked for."""
    return {
        "event_id": f"$hk{index}:hs",
        "type": "m.room.message",
        "sender": SENDERS[(index * 7 + index // 3) % len(SENDERS)],
        "room_id": ROOMS[(index * 2 + index // 5) % len(ROOMS)],
        "content": {"body": f"message {index}" + " é" * (index % 3), "n": index},
    }


def poisoned(index: int) -> bool:
    """Whether ``picky`` refuses event ``index`` on its own (until the test fixes it)."""
    return index % 29 == 11


#: fired (and emptied) as the next pass of housekeeping ends its last batch
pass_over: list[Deferred[None]] = []


def _announced(name: str, operation: Callable[..., Deferred[Any]]) -> Callable[..., Deferred[Any]]:
    def batch(*args: Any) -> Deferred[Any]:
        began = time.monotonic()
        announce(f"HK BEGIN {name}")
        done = operation(*args)

        def ended(result: Any) -> Any:
            deleted = result[0] if isinstance(result, tuple) else result
            announce(f"HK END {name} {deleted} {time.monotonic() - began:.6f}")
            if name == BATCHES[-1]:
                waiting = list(pass_over)
                pass_over.clear()
                for waiter in waiting:
                    waiter.callback(None)
            return result

        return done.addCallback(ended)

    return batch


def announce_batches(store: IStore) -> IStore:
    """Have ``store`` print a line before and after each housekeeping batch."""
    for name in BATCHES:
        setattr(store, name, _announced(name, getattr(store, name)))
    return store


async def run(reactor: Any, options: argparse.Namespace) -> None:
    service = DeliveryService(
        announce_batches(open_store(options.db, reactor)),
        registrations(parse_urls(options.urls), SERVICES),
        reactor=reactor,
        poll_interval=0.05,
        housekeeping=HOUSEKEEPING,
    )
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    if options.redrive:
        await service.started()
        announce(f"REDRIVEN {await redrive(reactor, service, options)}")
    # (and keep delivering, and housekeeping, until killed or stopped by SIGTERM)
    await submit_all(reactor, service, options, make_event, again=options.again)


async def redrive(reactor: Any, service: DeliveryService, options: argparse.Namespace) -> int:
    """
    Redrive the service's dead letters, a few at a time, each time about when the next
    pass of housekeeping begins (its first batch looks at the dead letters' events, as
    old as they are): a redrive moves them from the dead letters to the queue while it
    runs.
    """
    rng = random.Random(options.seed)
    letters = await service.dead_letters(options.redrive, limit=1000)
    ids = [letter.id for letter in letters]
    count = 0
    for first in range(0, len(ids), 2):
        over: Deferred[None] = Deferred()
        pass_over.append(over)
        await over
        # the next pass begins ``interval`` after this one's last batch (and its count of
        # the rows): from a little before to a little after it
        interval = HOUSEKEEPING.interval
        await task.deferLater(reactor, rng.uniform(interval - 0.012, interval + 0.004))
        count += await service.redrive(options.redrive, ids[first : first + 2])
    return count


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = crash_child.parser(__doc__, "up=URL,down=URL,picky=URL", 2400)
    parser.add_argument("--again", type=int, default=0, help="no pause before this event")
    parser.add_argument("--redrive", default=None, help="redrive this service's dead letters")
    parser.add_argument("--seed", type=int, default=0, help="seed of the redrive's moments")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    crash_child.launch(run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
