"""Building services for tests: registrations pointing at test receivers, events."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from delivery import DeliveryService, Registration
from delivery.store._schema import txn_id_base
from delivery.testing import RecordingObserver

from .receiver import HS_TOKEN


def registration(
    service_id: str,
    url: str | None,
    users: str | None = None,
    rooms: str | None = None,
    aliases: str | None = None,
    exclusive: bool = True,
    **options: Any,
) -> Registration:
    # These tests move their clock in leaps (10 s and more) while requests to real
    # receivers are in flight: none may time out in a leap unless a test says so.
    options.setdefault("request_timeout", 60.0)
    namespaces: dict[str, list[dict[str, Any]]] = {}
    for kind, regex in (("users", users), ("rooms", rooms), ("aliases", aliases)):
        if regex is not None:
            namespaces[kind] = [{"regex": regex, "exclusive": exclusive}]
    return Registration.from_dict(
        {
            "id": service_id,
            "url": url,
            "as_token": f"as-{service_id}",
            "hs_token": HS_TOKEN,
            "sender_localpart": f"{service_id}bot",
            "namespaces": namespaces,
            "delivery": options,
        }
    )


def txn_id(store: Any, n: int) -> int:
    """The id of a service's ``n``-th transaction in an open store's database (1: its first)."""
    return txn_id_base(store.instance) + n


def txn_ids(store: Any, *ns: int) -> list[str]:
    """The ids of a service's transactions ``ns``, as a receiver reads them in the URL."""
    return [str(txn_id(store, n)) for n in ns]


def event(
    n: int, sender: str = "@alice:hs", room: str = "!room:hs", **extra: Any
) -> dict[str, Any]:
    return {
        "event_id": f"$e{n}",
        "type": "m.room.message",
        "sender": sender,
        "room_id": room,
        "content": {"body": f"message {n}"},
        **extra,
    }


#: an observer that keeps what happened and lets a test wait for it (each wait fails after
#: 15 seconds of the real reactor): the one ``delivery.testing`` gives embedders
Recorder = RecordingObserver


def make_service(
    store: Any, registrations: list[Registration], reactor: Any, **kwargs: Any
) -> tuple[DeliveryService, Recorder, Clock]:
    clock = kwargs.pop("clock", None) or Clock()
    # Not a cluster unless a test asks: these tests move their clock in leaps, past any
    # lease a renewal (a real round trip to PostgreSQL) would have kept; tests/test_cluster.py
    # drives leases on the clock step by step.
    kwargs.setdefault("cluster", None)
    service = DeliveryService(store, registrations, reactor=reactor, clock=clock, **kwargs)
    recorder = Recorder()
    service.observe(recorder)
    return service, recorder, clock


def started(db_url: str, reactor: Any, registrations: list[Registration], **kwargs: Any) -> Any:
    """A service on ``db_url`` (a new store), started: ``(service, recorder, clock)``."""
    from delivery.store import open_store

    service, recorder, clock = make_service(
        open_store(db_url, reactor), registrations, reactor, **kwargs
    )
    service.startService()
    return service, recorder, clock
