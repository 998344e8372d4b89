"""Building services for tests: registrations pointing at test receivers, events."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from delivery import DeliveryService, IDeliveryObserver, Registration, SendResult
from delivery.records import StoredTransaction
from delivery.store._schema import txn_id_base

from .receiver import HS_TOKEN
from .waiting import Conditions


def registration(
    service_id: str,
    url: str | None,
    users: str | None = None,
    rooms: str | None = None,
    aliases: str | None = None,
    exclusive: bool = True,
    **options: Any,
) -> Registration:
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


@implementer(IDeliveryObserver)
class Recorder:
    """An observer that keeps what happened and lets a test wait for it."""

    def __init__(self) -> None:
        self.states: list[tuple[str, str, str, str | None]] = []
        self.results: list[tuple[str, StoredTransaction, SendResult]] = []
        self.probes: list[tuple[str, SendResult]] = []
        self.ingested = 0
        self.dead_letters: list[tuple[str, int, int | None]] = []
        self.routed: dict[str, int] = {}
        self._conditions = Conditions()

    def state_changed(self, service_id: str, old: str, new: str, reason: str | None) -> None:
        self.states.append((service_id, old, new, reason))
        self._check()

    def transaction_done(self, service_id: str, txn: StoredTransaction, result: SendResult) -> None:
        self.results.append((service_id, txn, result))
        self._check()

    def probe_done(self, service_id: str, result: SendResult) -> None:
        self.probes.append((service_id, result))
        self._check()

    def dead_lettered(self, service_id: str, count: int, status: int | None) -> None:
        self.dead_letters.append((service_id, count, status))
        self._check()

    def events_ingested(self, count: int) -> None:
        self.ingested += count

    def events_routed(self, counts: Any) -> None:
        for service_id, count in counts.items():
            self.routed[service_id] = self.routed.get(service_id, 0) + count

    def wait_for(self, condition: Any, timeout: float = 15) -> Deferred[None]:
        """Fires when ``condition()`` holds; fails after ``timeout`` real seconds."""
        return self._conditions.wait_for(condition, timeout)

    def wait_for_acks(self, count: int) -> Deferred[None]:
        """Until ``count`` transactions have been acknowledged (and forgotten)."""
        return self.wait_for(lambda: sum(1 for _, _, r in self.results if r.ok) >= count)

    def wait_for_state(self, service_id: str, state: str) -> Deferred[None]:
        count = sum(1 for s in self.states if s[0] == service_id and s[2] == state)
        return self.wait_for(
            lambda: sum(1 for s in self.states if s[0] == service_id and s[2] == state) > count
        )

    def _check(self) -> None:
        self._conditions.check()


def make_service(
    store: Any, registrations: list[Registration], reactor: Any, **kwargs: Any
) -> tuple[DeliveryService, Recorder, Clock]:
    clock = kwargs.pop("clock", None) or Clock()
    service = DeliveryService(store, registrations, reactor=reactor, clock=clock, **kwargs)
    recorder = Recorder()
    service.observe(recorder)
    return service, recorder, clock
