"""DeliveryService as an embedder uses it: the public API, outside event sources, errors."""

from __future__ import annotations

import ast
import inspect
import re
import sqlite3
import sys
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import implementer, provider
from zope.interface.interface import InterfaceClass

import delivery
import delivery.testing
from delivery import (
    DeliveryService,
    IEventSource,
    NotAcceptingEventsError,
    StoredEvent,
    UnknownServiceError,
)
from delivery.store import open_store
from delivery.store._schema import SCHEMA_VERSION

from .harness import event, make_service, registration, txn_ids

#: what ``delivery`` exports: the design's names, and every type their methods return or raise
PUBLIC_NAMES = [
    "Attempt",
    "Cluster",
    "ClusterError",
    "ClusterView",
    "DeadLetter",
    "DeliveryError",
    "DeliveryOptions",
    "DeliveryService",
    "Event",
    "Fence",
    "FencedError",
    "Housekeeping",
    "IDeliveryObserver",
    "IEventSource",
    "ISender",
    "IStore",
    "Ingested",
    "InvalidEventError",
    "InvalidRegistrationError",
    "InvalidStoreURLError",
    "LeaseInfo",
    "Namespace",
    "NoURLError",
    "NodeInfo",
    "NotAcceptingEventsError",
    "PassResult",
    "PurgeResult",
    "QueuedEvent",
    "Registration",
    "ReloadResult",
    "ReplayResult",
    "RoutingFields",
    "SchemaTooNewError",
    "SendResult",
    "ServiceRecord",
    "ServiceRegisteredError",
    "ServiceStatus",
    "ServiceSummary",
    "StoreConfigurationError",
    "StoreLockedError",
    "StoreUnavailableError",
    "StoredEvent",
    "StoredTransaction",
    "UnknownServiceError",
]

#: modules of the daemon, not of the library: their errors are for the command line
DAEMON_MODULES = ("delivery.api", "delivery.cli", "delivery.config", "delivery.daemon")


def test_the_public_surface_is_what_the_design_names() -> None:
    assert sorted(delivery.__all__) == PUBLIC_NAMES
    assert sorted(delivery.__all__) == sorted(set(delivery.__all__))
    for name in delivery.__all__:
        assert getattr(delivery, name).__module__.startswith("delivery")
    assert callable(delivery.store.open_store)
    for method in ("submit", "status", "retry_now", "startService", "stopService"):
        assert callable(getattr(DeliveryService, method))


def _named(hint: object) -> Iterator[object]:
    """The classes and interfaces of ``delivery`` a type hint names (``Deferred[list[X]]``: X)."""
    if isinstance(hint, (type, InterfaceClass)) and hint.__module__.startswith("delivery"):
        yield hint
    for arg in typing.get_args(hint) if not isinstance(hint, list) else hint:
        yield from _named(arg)


def _raised(doc: str | None, namespace: dict[str, Any]) -> Iterator[object]:
    """
    The errors a docstring says are raised (``:raises SomeError:``), found where the
    function is defined or else in ``delivery``.
    """
    for name in re.findall(r":raises (\w+):", doc or ""):
        found = namespace.get(name, getattr(delivery, name, None))
        assert found is not None, f"{name} (in {doc!r}) is not a name of delivery"
        yield found


def _interface_methods(interface: InterfaceClass) -> Iterator[tuple[str, object, str | None]]:
    """``(name, return annotation, docstring)`` of each method an interface declares."""
    module = sys.modules[interface.__module__]
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.ClassDef) and node.name == interface.__name__:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.returns is not None:
                    hint = eval(ast.unparse(item.returns), vars(module))
                    yield item.name, hint, interface[item.name].getDoc()


def _methods(owner: Any) -> Iterator[tuple[str, object, str | None, dict[str, Any]]]:
    """``(name, return annotation, docstring, globals)`` of each public method or field."""
    if isinstance(owner, InterfaceClass):
        for name, hint, doc in _interface_methods(owner):
            yield name, hint, doc, vars(sys.modules[owner.__module__])
        return
    if inspect.isfunction(owner):
        yield (
            owner.__name__,
            typing.get_type_hints(owner)["return"],
            owner.__doc__,
            owner.__globals__,
        )
        return
    if attrs.has(owner):
        for name, hint in typing.get_type_hints(owner).items():
            yield name, hint, None, {}
    for cls in owner.__mro__:
        if not cls.__module__.startswith("delivery"):
            continue
        for name, member in vars(cls).items():
            function = getattr(member, "__func__", getattr(member, "fget", member))
            if name.startswith("_") or not inspect.isfunction(function):
                continue
            hints = typing.get_type_hints(function)
            yield name, hints.get("return"), function.__doc__, function.__globals__


def _reachable() -> dict[object, str]:
    """
    Every class or interface of ``delivery`` that a public name's methods return or raise,
    or that their results' fields hold, then theirs in turn: where each was first seen.
    """
    todo: list[Any] = [getattr(delivery, name) for name in delivery.__all__]
    todo += [delivery.store.open_store]
    todo += [getattr(delivery.testing, name) for name in delivery.testing.__all__]
    seen: dict[object, str] = {}
    while todo:
        owner = todo.pop()
        if not (isinstance(owner, (type, InterfaceClass)) or inspect.isfunction(owner)):
            continue  # a constant
        for name, hint, doc, namespace in _methods(owner):
            for found in [*_named(hint), *_raised(doc, namespace)]:
                if found not in seen:
                    seen[found] = f"{owner.__name__}.{name}"
                    todo.append(found)
    return seen


def test_everything_a_public_method_returns_or_raises_is_public() -> None:
    missing = []
    for found, where in _reachable().items():
        exported = delivery.testing if found.__module__ == "delivery.testing" else delivery
        name = getattr(found, "__name__", "")
        if name not in exported.__all__ or getattr(exported, name) is not found:
            missing.append(f"{where}: {name} is not in {exported.__name__}.__all__")
    assert not missing
    assert {delivery.ReloadResult, delivery.StoredTransaction} <= _reachable().keys()


def test_every_error_the_library_raises_is_public() -> None:
    def subclasses(cls: type[Exception]) -> Iterator[type[Exception]]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    errors = [e for e in subclasses(delivery.DeliveryError) if e.__module__ not in DAEMON_MODULES]
    assert delivery.StoreLockedError in errors
    assert [e.__name__ for e in errors if getattr(delivery, e.__name__, None) is not e] == []


def test_registration_ids_must_be_unique(store: Any) -> None:
    regs = [registration("a", "http://127.0.0.1:1"), registration("a", "http://127.0.0.1:2")]
    with pytest.raises(ValueError, match="two registrations have the id 'a'"):
        DeliveryService(store, regs)


@pytest_twisted.ensureDeferred
async def test_unknown_services_are_reported_by_name(db_url: str, reactor: Any) -> None:
    service, _, _ = make_service(open_store(db_url, reactor), [], reactor)
    service.startService()
    try:
        with pytest.raises(UnknownServiceError, match="no application service with id 'nope'"):
            await service.status("nope")
        with pytest.raises(UnknownServiceError):
            await service.retry_now("nope")
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_submit_before_start_says_so(db_url: str, reactor: Any) -> None:
    service, _, _ = make_service(open_store(db_url, reactor), [], reactor)
    with pytest.raises(delivery.DeliveryError, match="call startService"):
        await service.submit([event(1)])


@pytest_twisted.ensureDeferred
async def test_a_start_failure_is_reported_to_callers(tmp_path: Path, reactor: Any) -> None:
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    logged: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(e: LogEvent) -> None:
        logged.append(e)

    globalLogPublisher.addObserver(observe)
    service, _, _ = make_service(open_store(f"sqlite:///{path}", reactor), [], reactor)
    service.startService()
    try:
        with pytest.raises(Exception, match="upgrade delivery"):
            await service.submit([event(1)])
    finally:
        await service.stopService()
        globalLogPublisher.removeObserver(observe)
    # The reason in one line, with no traceback: it is the user's to fix.
    (line,) = [formatEvent(e) for e in logged if "could not start" in formatEvent(e)]
    assert line.startswith("delivery could not start: the database is at schema version")
    assert not [e for e in logged if e.get("log_failure") is not None]


@pytest_twisted.ensureDeferred
async def test_a_service_without_url_receives_nothing(db_url, reactor, receiver) -> None:
    regs = [registration("quiet", None, users=".*"), registration("a", receiver.url, users=".*")]
    service, recorder, _ = make_service(open_store(db_url, reactor), regs, reactor)
    service.startService()
    try:
        await service.submit([event(1)])
        await recorder.wait_for_acks(1)
        status = await service.status("quiet")
        assert (status.state, status.queued_events) == ("up", 0)
    finally:
        await service.stopService()


@implementer(IEventSource)
class ListSource:
    """An embedder's own event source: a list with stream positions 10, 20, 30, ..."""

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []

    def add(self, *events: dict[str, Any]) -> None:
        for e in events:
            self.events.append(StoredEvent.of(10 * (len(self.events) + 1), e, 0.0))

    def events_after(self, position: int, limit: int) -> Deferred[Sequence[StoredEvent]]:
        return succeed([e for e in self.events if e.stream_id > position][:limit])


@pytest_twisted.ensureDeferred
async def test_an_embedder_can_plug_its_own_event_source(db_url, reactor, receiver) -> None:
    source = ListSource()
    source.add(event(1), event(2, sender="@nobody-wants:hs"), event(3))
    regs = [registration("a", receiver.url, users="@alice:.*")]
    service, recorder, clock = make_service(
        open_store(db_url, reactor), regs, reactor, event_source=source, poll_interval=5
    )
    service.startService()
    try:
        await recorder.wait_for_acks(1)
        assert receiver.event_ids == ["$e1", "$e3"]
        with pytest.raises(NotAcceptingEventsError):
            await service.submit([event(4)])
        source.add(event(4))
        clock.advance(5)  # the next poll finds it
        await recorder.wait_for_acks(2)
        assert receiver.event_ids == ["$e1", "$e3", "$e4"]
    finally:
        await service.stopService()

    # the position is kept: a restart does not deliver anything twice
    service, recorder, _ = make_service(
        open_store(db_url, reactor), regs, reactor, event_source=source
    )
    service.startService()
    try:
        await service.routed()
        source.add(event(5))
        await service.routed()
        await recorder.wait_for_acks(1)
        assert receiver.event_ids == ["$e1", "$e3", "$e4", "$e5"]
        assert [r.txn_id for r in receiver.requests] == txn_ids(service.store, 1, 2, 3)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_memory_does_not_grow_with_the_backlog(db_url, reactor, receiver) -> None:
    receiver.answer(500)
    regs = [
        registration(
            "a", receiver.url, users=".*", max_events=10, initial_delay=3600, max_delay=3600
        )
    ]
    service, recorder, _ = make_service(open_store(db_url, reactor), regs, reactor, pool_window=25)
    service.startService()
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(0)])
        await down
        for start in range(1, 2001, 500):
            await service.submit([event(n) for n in range(start, start + 500)])
        await service.routed()
        assert service._pool.pending("a") <= 25
        assert (await service.status("a")).queued_events == 2000

        receiver.answer(200)
        up = recorder.wait_for_state("a", "up")
        await service.retry_now("a")
        await up
        await receiver.wait_for_events(2001)
        assert receiver.event_ids == [f"$e{n}" for n in range(2001)]
        assert [len(r.event_ids) for r in receiver.requests[2:]] == [10] * 200
    finally:
        await service.stopService()
