"""Embed delivery in a Twisted program: events in, application services out."""

import sys

from twisted.internet import defer, task

from delivery import DeliveryService, Registration
from delivery.store import open_store


async def main(reactor):
    bridge = Registration.from_file(sys.argv[1] if len(sys.argv) > 1 else "registration.yaml")
    service = DeliveryService(open_store("sqlite:///delivery.db"), [bridge])
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    event = {"event_id": "$hello", "type": "m.room.message", "room_id": "!r:example.org",
             "sender": "@telegram_42:example.org", "content": {"body": "hello"}}
    print("committed at", await service.submit([event]), flush=True)
    await defer.Deferred()  # deliver (and retry) until stopped with Ctrl-C


task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
