"""Embed delivery in a Twisted program: events in, application services out."""

import os
import sys

from twisted.internet import defer, task
from zope.interface import implementer

from delivery import DeliveryService, IDeliveryObserver, InvalidRegistrationError, Registration
from delivery.store import open_store


@implementer(IDeliveryObserver)
class Printer:
    """Says what happens to the events: state changes and every attempt to deliver."""

    def state_changed(self, service_id, old, new, reason):
        print(f"{service_id}: {old} -> {new}" + (f" ({reason})" if reason else ""), flush=True)

    def transaction_done(self, service_id, txn, result):
        outcome = "delivered" if result.ok else f"not delivered: {result.error}"
        sent = f"transaction {txn.txn_id} ({txn.event_count} event(s))"
        print(f"{service_id}: {sent} {outcome}", flush=True)

    def probe_done(self, service_id, result):
        pass

    def events_ingested(self, count):
        pass

    def events_routed(self, counts):
        pass

    def dead_lettered(self, service_id, count, status):
        print(f"{service_id}: {count} event(s) refused (HTTP {status}), set aside", flush=True)


def registration(path):
    if not os.path.exists(path):
        sys.exit(
            f"embed.py: there is no {path}: copy examples/registration.yaml there, set its url"
            " to where the bridge listens (or name another file: embed.py FILE)"
        )
    try:
        return Registration.from_file(path)
    except InvalidRegistrationError as e:
        sys.exit(f"embed.py: {e}")


async def main(reactor, bridge):
    service = DeliveryService(open_store("sqlite:///delivery.db"), [bridge])
    service.observe(Printer())
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    event = {
        "event_id": "$hello",
        "type": "m.room.message",
        "room_id": "!r:example.org",
        "sender": "@telegram_42:example.org",
        "content": {"body": "hello"},
    }
    print("committed at", await service.submit([event]), flush=True)
    await defer.Deferred()  # deliver (and retry) until stopped with Ctrl-C


bridge = registration(sys.argv[1] if len(sys.argv) > 1 else "registration.yaml")
task.react(lambda reactor: defer.ensureDeferred(main(reactor, bridge)))
