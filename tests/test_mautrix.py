"""
Interop with a receiver written by others: mautrix's application-service transaction
endpoint (``AppServiceServerMixin``, what every mautrix bridge runs), served by aiohttp on
127.0.0.1 in a thread of its own with its own asyncio event loop, while the Twisted reactor
keeps running in the main thread.

Everything mautrix observes is handed to the reactor thread with ``callFromThread``, so the
test reads it there without locks and is woken the moment the condition it waits for holds.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import attrs
import pytest_twisted
from aiohttp import web
from mautrix.appservice import AppServiceServerMixin
from mautrix.types import JSON, Event, MessageEvent
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from delivery import Registration

from .harness import event, make_service, registration, txn_id, txn_ids
from .receiver import HS_TOKEN
from .waiting import Conditions

T = TypeVar("T")

TRANSACTIONS = "/_matrix/app/v1/transactions/"


def matrix_event(n: int) -> dict[str, Any]:
    """An event mautrix can deserialize (it wants ``origin_server_ts`` and a ``msgtype``)."""
    return event(
        n,
        origin_server_ts=1_700_000_000_000 + n,
        content={"msgtype": "m.text", "body": f"message {n}"},
    )


class _AppService(AppServiceServerMixin):
    """mautrix's transaction endpoint, telling the test what it handles."""

    def __init__(self, owner: MautrixReceiver, hs_token: str) -> None:
        super().__init__(log=logging.getLogger("tests.mautrix"), hs_token=hs_token)
        # handle every event before answering, in order (as bridges that care about order do)
        self.synchronous_handlers = True
        self._owner = owner
        self.matrix_event_handler(self._on_event)

    async def handle_transaction(self, txn_id: str, *, events: list[JSON], **kwargs: Any) -> JSON:
        ids = [e.get("event_id") for e in events]
        self._owner.report(self._owner.handled.append, (txn_id, ids))
        return await super().handle_transaction(txn_id, events=events, **kwargs)

    async def _on_event(self, evt: Event) -> None:
        self._owner.report(self._owner.events.append, evt)


@attrs.frozen
class Answered:
    method: str
    path: str
    status: int


class MautrixReceiver:
    """
    mautrix's AS server on aiohttp, in its own thread and event loop.

    Read its attributes from the reactor thread only: the aiohttp thread hands everything
    over with ``reactor.callFromThread``.
    """

    def __init__(self, reactor: Any, hs_token: str = HS_TOKEN) -> None:
        self.reactor = reactor
        self.appservice = _AppService(self, hs_token)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run_loop, name="mautrix", daemon=True)
        self.port = 0
        #: (txn id, event ids) of each transaction mautrix handled (not deduplicated away)
        self.handled: list[tuple[str, list[str]]] = []
        #: the events mautrix's event handlers received, deserialized
        self.events: list[Event] = []
        #: every request answered, with mautrix's status (or ours, for lost answers)
        self.answered: list[Answered] = []
        #: transactions still to be handled by mautrix but answered 502, as if a proxy in
        #: front of the bridge lost the answer (set before anything is sent)
        self.lose_answers = 0
        self._lock = threading.Lock()
        self._conditions = Conditions()
        self._loop_done: Deferred[None] = Deferred()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def event_ids(self) -> list[str]:
        return [str(e.event_id) for e in self.events]

    # -- the aiohttp thread --

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()
            self.reactor.callFromThread(self._loop_done.callback, None)

    def report(self, fn: Callable[[T], object], value: T) -> None:
        """Called in the aiohttp thread: apply ``fn(value)`` in the reactor thread."""
        self.reactor.callFromThread(self._apply, fn, value)

    def _apply(self, fn: Callable[[T], object], value: T) -> None:
        fn(value)
        self._conditions.check()

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        def answered(status: int) -> None:
            self.report(self.answered.append, Answered(request.method, request.path, status))

        try:
            response = await handler(request)
        except web.HTTPException as e:
            answered(e.status)
            raise
        if request.path.startswith(TRANSACTIONS) and response.status == 200:
            with self._lock:
                lose = self.lose_answers > 0
                self.lose_answers -= lose
            if lose:
                answered(502)
                return web.json_response({"errcode": "M_UNKNOWN"}, status=502)
        answered(response.status)
        return response

    async def _serve(self) -> int:
        app = web.Application(middlewares=[self._middleware])
        self.appservice.register_routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- the reactor thread --

    def _call(self, coro: Coroutine[Any, Any, T]) -> Deferred[T]:
        """Run ``coro`` on the aiohttp loop; a Deferred (in the reactor) of its result."""
        d: Deferred[T] = Deferred()

        def fire(future: Future[T]) -> None:
            exc = future.exception()
            if exc is not None:
                d.errback(Failure(exc))
            else:
                d.callback(future.result())

        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        future.add_done_callback(lambda f: self.reactor.callFromThread(fire, f))
        return d

    async def start(self) -> None:
        self.thread.start()
        self.port = await self._call(self._serve())

    async def stop(self) -> None:
        try:
            await self._call(self._cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            await self._loop_done
            self.thread.join()

    def wait_for(self, condition: Callable[[], bool], timeout: float = 15) -> Deferred[None]:
        """Fires when ``condition()`` holds; fails after ``timeout`` real seconds."""
        return self._conditions.wait_for(condition, timeout)

    def wait_for_events(self, count: int) -> Deferred[None]:
        return self.wait_for(lambda: len(self.events) >= count)

    def wait_for_answers(self, count: int) -> Deferred[None]:
        """
        Until ``count`` requests are answered. mautrix tells us before its answer leaves, but
        the reactor may read the answer first: wait for the report rather than assume it.
        """
        return self.wait_for(lambda: len(self.answered) >= count)


@pytest_twisted.async_yield_fixture
async def mautrix(reactor: Any) -> AsyncIterator[MautrixReceiver]:
    receiver = MautrixReceiver(reactor)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()
    assert not receiver.thread.is_alive()


def _transaction_requests(receiver: MautrixReceiver) -> list[tuple[str, int]]:
    return [
        (a.path.removeprefix(TRANSACTIONS), a.status)
        for a in receiver.answered
        if a.method == "PUT" and a.path.startswith(TRANSACTIONS)
    ]


@pytest_twisted.ensureDeferred
async def test_mautrix_receives_every_event_once_in_order(
    store: Any, reactor: Any, mautrix: MautrixReceiver
) -> None:
    service, recorder, _clock = make_service(
        store, [registration("bridge", mautrix.url, users="@alice:.*")], reactor
    )
    events = [matrix_event(n) for n in range(250)]
    service.startService()
    try:
        ids = await service.submit(events)
        assert ids == list(range(1, 251))
        await mautrix.wait_for_events(250)
        # a moment for anything extra to show: the pipeline reports each acknowledged txn
        await recorder.wait_for(lambda: len(recorder.results) == 3)
        await mautrix.wait_for_answers(3)
        status = await service.status("bridge")
    finally:
        await service.stopService()

    expected = [e["event_id"] for e in events]
    assert mautrix.event_ids == expected
    one, two, three = txn_ids(store, 1, 2, 3)
    assert [txn for txn, _ in mautrix.handled] == [one, two, three]
    assert [len(ids) for _, ids in mautrix.handled] == [100, 100, 50]
    assert [i for _, ids in mautrix.handled for i in ids] == expected
    # mautrix accepted our Authorization header for every transaction
    assert _transaction_requests(mautrix) == [(one, 200), (two, 200), (three, 200)]
    # and deserialized what we sent into its own types, unchanged
    first = mautrix.events[0]
    assert isinstance(first, MessageEvent)
    assert first.sender == "@alice:hs"
    assert first.room_id == "!room:hs"
    assert first.timestamp == 1_700_000_000_000
    assert first.content.body == "message 0"
    assert status.state == "up"
    assert status.stored_transactions == 0
    assert status.queued_events == 0
    assert status.last_txn_id == txn_id(store, 3)
    assert [r.ok for _, _, r in recorder.results] == [True, True, True]


@pytest_twisted.ensureDeferred
async def test_mautrix_rejects_a_wrong_hs_token(
    store: Any, reactor: Any, mautrix: MautrixReceiver
) -> None:
    wrong: Registration = attrs.evolve(
        registration("bridge", mautrix.url, users="@alice:.*"), hs_token="not-the-hs-token"
    )
    service, recorder, _clock = make_service(store, [wrong], reactor)
    service.startService()
    try:
        down = recorder.wait_for_state("bridge", "down")
        await service.submit([matrix_event(n) for n in range(5)])
        await down
        await mautrix.wait_for_answers(1)
        status = await service.status("bridge")
    finally:
        await service.stopService()

    assert status.state == "down"
    assert status.last_error is not None
    assert "401" in status.last_error or "403" in status.last_error
    assert status.failure_count == 1
    # nothing is lost: the transaction stays stored for when the token is fixed
    assert status.stored_transactions == 1
    assert mautrix.events == []
    assert mautrix.handled == []
    assert _transaction_requests(mautrix) == [(str(txn_id(store, 1)), 401)]
    ((service_id, txn, result),) = recorder.results
    assert (service_id, txn.txn_id, result.ok, result.status) == (
        "bridge",
        txn_id(store, 1),
        False,
        401,
    )


@pytest_twisted.ensureDeferred
async def test_a_wrong_hs_token_is_not_retried_on_every_probe(
    store: Any, reactor: Any, mautrix: MautrixReceiver
) -> None:
    """
    mautrix refuses our probe with 401 too: that answer must not end the backoff wait
    (it is not "a successful probe"), or a service with a wrong token gets the stored
    transaction resent every ``probe_interval`` instead of backing off.
    """
    reg = registration("bridge", mautrix.url, users="@alice:.*", initial_delay=60, max_delay=300)
    wrong: Registration = attrs.evolve(reg, hs_token="not-the-hs-token")
    service, recorder, clock = make_service(store, [wrong], reactor, rng=random.Random(0))
    service.startService()
    try:
        down = recorder.wait_for_state("bridge", "down")
        await service.submit([matrix_event(0)])
        await down
        clock.advance(wrong.options.probe_interval)
        # the probe's outcome (and a retry it starts) is recorded before probe_done
        await recorder.wait_for(lambda: len(recorder.probes) >= 1)
        states = [new for _, _, new, _ in recorder.states]
        status = await service.status("bridge")
    finally:
        await service.stopService()
    assert [(r.ok, r.status) for _, r in recorder.probes] == [(False, 401)]
    assert states == ["down"], "the 401 probe ended the backoff wait"
    assert status.next_retry is not None
    assert status.next_retry > clock.seconds()


@pytest_twisted.ensureDeferred
async def test_mautrix_dedupes_a_resent_transaction(
    store: Any, reactor: Any, mautrix: MautrixReceiver
) -> None:
    """
    mautrix handles transaction 1 but its answer is lost (a 502 from "a proxy"): we resend
    transaction 1 with the same id and body, and mautrix, which remembers the ids it has
    handled, answers 200 without handling the events a second time.
    """
    mautrix.lose_answers = 1
    service, recorder, _clock = make_service(
        store, [registration("bridge", mautrix.url, users="@alice:.*")], reactor
    )
    events = [matrix_event(n) for n in range(250)]
    service.startService()
    try:
        down = recorder.wait_for_state("bridge", "down")
        await service.submit(events)
        await down
        await mautrix.wait_for(lambda: len(mautrix.handled) >= 1)
        first = str(txn_id(store, 1))
        assert mautrix.handled == [(first, [e["event_id"] for e in events[:100]])]
        up = recorder.wait_for_state("bridge", "up")
        await service.retry_now("bridge")
        await mautrix.wait_for_events(250)
        await up
        await recorder.wait_for(lambda: len(recorder.results) == 4)
        await mautrix.wait_for_answers(4)
        status = await service.status("bridge")
    finally:
        await service.stopService()

    expected = [e["event_id"] for e in events]
    assert mautrix.event_ids == expected
    one, two, three = txn_ids(store, 1, 2, 3)
    assert [txn for txn, _ in mautrix.handled] == [one, two, three]
    assert _transaction_requests(mautrix) == [(one, 502), (one, 200), (two, 200), (three, 200)]
    sent = [(str(txn.txn_id), txn.body, result.status) for _, txn, result in recorder.results]
    assert [(t, s) for t, _, s in sent] == [(one, 502), (one, 200), (two, 200), (three, 200)]
    assert sent[0][1] == sent[1][1], "the resent transaction must have the same body"
    assert status.state == "up"
    assert status.stored_transactions == 0
    assert status.last_txn_id == txn_id(store, 3)


@pytest_twisted.ensureDeferred
async def test_mautrix_answers_our_probe(
    store: Any, reactor: Any, mautrix: MautrixReceiver
) -> None:
    """
    While the service is DOWN we probe it with ``POST /_matrix/app/v1/ping``; mautrix
    answers (it checks our token there too) and the wait ends at once: the stored
    transaction is resent with its own id, and mautrix dedupes it.
    """
    mautrix.lose_answers = 1
    reg = registration("bridge", mautrix.url, users="@alice:.*", initial_delay=30, max_delay=60)
    service, recorder, clock = make_service(store, [reg], reactor)
    service.startService()
    try:
        down = recorder.wait_for_state("bridge", "down")
        await service.submit([matrix_event(n) for n in range(3)])
        await down
        status = await service.status("bridge")
        assert status.next_retry is not None
        assert status.next_retry - clock.seconds() > reg.options.probe_interval
        up = recorder.wait_for_state("bridge", "up")
        clock.advance(reg.options.probe_interval)
        await up
        await mautrix.wait_for_events(3)
        await recorder.wait_for(lambda: len(recorder.results) == 2)
        await mautrix.wait_for_answers(3)
    finally:
        await service.stopService()

    assert [(p, r.ok, r.status) for p, r in recorder.probes] == [("bridge", True, 200)]
    first = str(txn_id(store, 1))
    assert [(a.method, a.path, a.status) for a in mautrix.answered] == [
        ("PUT", TRANSACTIONS + first, 502),
        ("POST", "/_matrix/app/v1/ping", 200),
        ("PUT", TRANSACTIONS + first, 200),
    ]
    assert mautrix.handled == [(first, ["$e0", "$e1", "$e2"])]
    assert mautrix.event_ids == ["$e0", "$e1", "$e2"]


@pytest_twisted.ensureDeferred
async def test_an_operators_ping_reaches_mautrix(
    store: Any, reactor: Any, mautrix: MautrixReceiver
) -> None:
    """``ping()`` is mautrix's ``POST /_matrix/app/v1/ping``: 200, or its refusal of our token."""
    good = registration("bridge", mautrix.url, users="@alice:.*")
    wrong: Registration = attrs.evolve(
        registration("other", mautrix.url, users="@bob:.*"), hs_token="not-the-hs-token"
    )
    service, _recorder, _clock = make_service(store, [good, wrong], reactor)
    service.startService()
    try:
        await service.started()
        ok = await service.ping("bridge", "ping-txn-1")
        refused = await service.ping("other")
        await mautrix.wait_for_answers(2)
        status = await service.status("bridge")
    finally:
        await service.stopService()

    assert (ok.ok, ok.status, ok.timed_out) == (True, 200, False)
    assert ok.duration >= 0
    assert (refused.ok, refused.status) == (False, 401)
    assert refused.body is not None
    assert "M_UNKNOWN_TOKEN" in refused.body
    assert [(a.method, a.path, a.status) for a in mautrix.answered] == [
        ("POST", "/_matrix/app/v1/ping", 200),
        ("POST", "/_matrix/app/v1/ping", 401),
    ]
    assert status.state == "up"  # a ping changes nothing
    assert mautrix.handled == []


def test_matrix_event_deserializes() -> None:
    """The events these tests send are valid for mautrix on their own (no network)."""
    parsed = Event.deserialize(matrix_event(7))
    assert isinstance(parsed, MessageEvent)
    assert parsed.event_id == "$e7"
