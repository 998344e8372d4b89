"""
Delivery against a receiver that fails in every way a real one does (``tests.faults``).

Each failure mode must be a failure: the service goes DOWN with a last error that says
what happened, the transaction stays stored, and once the receiver is back it is resent
with the same id and the same body and delivered, once. A slow answer within the request
timeout is a success. (400, 410, 413 and 422 have handling of their own, not tested here.)
The service's clock is a ``task.Clock`` shared with the receiver, so
that advancing it moves the sender's timeouts and the receiver's slow answers together.
"""

from __future__ import annotations

import email.utils
import re
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from delivery.store import open_store

from .faults import (
    SERVER_ERRORS,
    SUCCESSES,
    Fault,
    FaultyReceiver,
    answer,
    garbage,
    hang,
    hang_in_body,
    ok,
    reset,
    slow,
)
from .harness import Recorder, event, make_service, registration, txn_id, txn_ids
from .waiting import Conditions

#: a clock that reads like the real one, so that HTTP dates mean something to it
NOW = 1_700_000_000.0
TIMEOUT = 30.0

#: what the service says of a request that got no complete answer in time
TIMED_OUT = re.escape(f"no complete answer within {TIMEOUT:g} s")
#: ... of a connection reset before the answer (today: "ConnectionLost: Connection to the
#: other side was lost in a non-clean fashion.")
RESET = r"(?i).*\b(lost|reset|closed)\b.*"
#: ... of an answer that is not HTTP (today: "ParseError: ('non-integer status code', ...)")
NOT_HTTP = r"(?i).*\b(ParseError|not HTTP|malformed|invalid)\b.*"


def started(
    db_url: str, reactor: Any, receiver: FaultyReceiver, **options: Any
) -> tuple[Any, Recorder, Clock]:
    clock = Clock()
    clock.advance(NOW)
    options.setdefault("request_timeout", TIMEOUT)
    service, recorder, clock = make_service(
        open_store(db_url, reactor),
        [registration("a", receiver.url, users=".*", **options)],
        reactor,
        clock=clock,
    )
    receiver.use_clock(clock)
    service.startService()
    return service, recorder, clock


async def fails_then_delivers(
    db_url: str,
    reactor: Any,
    receiver: FaultyReceiver,
    fault: Fault,
    error: str,
    *,
    wait: float = 0.0,
    **options: Any,
) -> tuple[Any, Clock]:
    """
    The first send meets ``fault``: after ``wait`` seconds on the service's clock the
    service is DOWN with a last error matching ``error``, its transaction kept; the next
    attempt (when the backoff is over) is answered 200 and delivers the same transaction.
    Returns the service's last status while DOWN and the clock.
    """
    receiver.then(fault)
    service, recorder, clock = started(db_url, reactor, receiver, **options)
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await receiver.wait_for_requests(1)
        if wait:
            clock.advance(wait)
        await down
        status = await service.status("a")
        assert status.state == "down"
        assert re.fullmatch(error, status.last_error or ""), status.last_error
        assert (status.stored_transactions, status.failure_count) == (1, 1)
        (txn,) = await service.store.transactions("a", 0, 10)
        assert (txn.txn_id, txn.attempts) == (txn_id(service.store, 1), 1)
        assert txn.last_error == status.last_error

        up = recorder.wait_for_state("a", "up")
        assert status.next_retry is not None
        clock.advance(status.next_retry - clock.seconds())
        await up
        first, again = receiver.transactions
        assert [first.txn_id, again.txn_id] == txn_ids(service.store, 1, 1)
        assert first.body == again.body
        assert receiver.event_ids == ["$e1"]
        assert len(receiver.ok) == 1
        after = await service.status("a")
        assert (after.state, after.stored_transactions, after.last_error) == ("up", 0, None)
        return status, clock
    finally:
        await service.stopService()


# -- no answer in time --


@pytest_twisted.ensureDeferred
async def test_an_answer_slower_than_the_request_timeout_is_a_failure(
    db_url, reactor, faulty_receiver
):
    await fails_then_delivers(
        db_url, reactor, faulty_receiver, slow(TIMEOUT + 10), TIMED_OUT, wait=TIMEOUT
    )


@pytest_twisted.ensureDeferred
async def test_a_slow_answer_within_the_request_timeout_is_a_success(
    db_url, reactor, faulty_receiver
):
    faulty_receiver.then(slow(TIMEOUT - 1))
    service, recorder, clock = started(db_url, reactor, faulty_receiver)
    try:
        await service.submit([event(1)])
        await faulty_receiver.wait_for_requests(1)
        clock.advance(TIMEOUT - 1)
        await recorder.wait_for_acks(1)
        assert faulty_receiver.event_ids == ["$e1"]
        assert len(faulty_receiver.transactions) == 1
        assert recorder.states == []
        status = await service.status("a")
        assert (status.state, status.stored_transactions, status.last_error) == ("up", 0, None)
        assert recorder.results[0][2].duration == TIMEOUT - 1
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_hangs_before_the_headers_is_a_failure(
    db_url, reactor, faulty_receiver
):
    await fails_then_delivers(db_url, reactor, faulty_receiver, hang(), TIMED_OUT, wait=TIMEOUT)


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_hangs_in_the_middle_of_the_body_is_a_failure(
    db_url, reactor, faulty_receiver
):
    await fails_then_delivers(
        db_url, reactor, faulty_receiver, hang_in_body(200), TIMED_OUT, wait=TIMEOUT
    )


# -- broken connections and answers --


@pytest_twisted.ensureDeferred
async def test_a_reset_connection_is_a_failure(db_url, reactor, faulty_receiver):
    await fails_then_delivers(db_url, reactor, faulty_receiver, reset(), RESET)


@pytest_twisted.ensureDeferred
async def test_an_answer_that_is_not_http_is_a_failure(db_url, reactor, faulty_receiver):
    await fails_then_delivers(db_url, reactor, faulty_receiver, garbage(), NOT_HTTP)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("fault", "words"),
    [
        pytest.param(reset(), "connection", id="reset"),
        pytest.param(garbage(), "HTTP", id="garbage"),
    ],
)
async def test_the_last_error_of_a_broken_answer_is_in_plain_words(
    db_url, reactor, faulty_receiver, fault, words
):
    faulty_receiver.then(fault)
    service, recorder, _ = started(db_url, reactor, faulty_receiver)
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        error = (await service.status("a")).last_error or ""
        assert words in error, error
        # words, not a Python exception's name and arguments
        assert not re.match(r"[A-Z]\w+: ", error), error
        assert "SSH-2.0" not in error, error
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_is_down_is_a_failure_until_it_is_up(
    db_url, reactor, faulty_receiver
):
    await faulty_receiver.down()
    service, recorder, clock = started(db_url, reactor, faulty_receiver)
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        status = await service.status("a")
        assert (status.state, status.last_error) == ("down", "connection refused")
        assert status.stored_transactions == 1
        faulty_receiver.up()
        up = recorder.wait_for_state("a", "up")
        assert status.next_retry is not None
        clock.advance(status.next_retry - clock.seconds())
        await up
        assert [r.txn_id for r in faulty_receiver.transactions] == txn_ids(service.store, 1)
        assert faulty_receiver.event_ids == ["$e1"]
    finally:
        await service.stopService()


# -- answers --


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("code", SERVER_ERRORS)
async def test_a_server_error_is_a_failure(db_url, reactor, faulty_receiver, code):
    await fails_then_delivers(
        db_url, reactor, faulty_receiver, answer(code), rf"HTTP {code}: .*fault injected.*"
    )


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("code", [401, 403, 404, 408])
async def test_a_refusal_is_a_failure(db_url, reactor, faulty_receiver, code):
    await fails_then_delivers(
        db_url, reactor, faulty_receiver, answer(code), rf"HTTP {code}: .*fault injected.*"
    )


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("code", SUCCESSES)
async def test_any_2xx_is_a_success(db_url, reactor, faulty_receiver, code):
    faulty_receiver.then(ok(code))
    service, recorder, _ = started(db_url, reactor, faulty_receiver)
    try:
        await service.submit([event(1)])
        await recorder.wait_for_acks(1)
        assert faulty_receiver.event_ids == ["$e1"]
        assert recorder.states == []
        assert (await service.status("a")).stored_transactions == 0
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "retry_after",
    [
        pytest.param(lambda now: "120", id="seconds"),
        pytest.param(lambda now: email.utils.formatdate(now + 120, usegmt=True), id="http-date"),
    ],
)
async def test_429_with_retry_after_waits_as_asked(db_url, reactor, faulty_receiver, retry_after):
    status, _ = await fails_then_delivers(
        db_url,
        reactor,
        faulty_receiver,
        answer(429, retry_after=retry_after(NOW)),
        r"HTTP 429: .*",
        max_delay=600,
        probe=False,
    )
    assert status.next_retry - NOW == 120


# -- one after another --


@pytest_twisted.ensureDeferred
async def test_every_failure_in_turn_then_one_delivery_with_the_same_id(
    db_url, reactor, faulty_receiver
):
    faults = [
        reset(),
        garbage(),
        answer(503, retry_after="2"),
        hang_in_body(200),
        hang(),
        slow(TIMEOUT + 1),
        answer(429),
        answer(404),
        ok(),
    ]
    faulty_receiver.then(*faults)
    service, recorder, clock = started(
        db_url, reactor, faulty_receiver, initial_delay=1, max_delay=1, jitter=0, probe=False
    )
    try:
        await service.submit([event(1), event(2)])
        for n in range(1, len(faults)):
            await faulty_receiver.wait_for_requests(n)
            down = recorder.wait_for(lambda: len(recorder.results) >= n)  # noqa: B023 (awaited here)
            if faults[n - 1].kind in ("hang", "hang_in_body", "slow"):
                clock.advance(TIMEOUT)
            await down
            status = await service.status("a")
            assert (status.state, status.failure_count) == ("down", n)
            assert status.next_retry is not None
            clock.advance(status.next_retry - clock.seconds())
        await recorder.wait_for_acks(1)
        requests = faulty_receiver.transactions
        assert [r.txn_id for r in requests] == txn_ids(service.store, 1) * len(faults)
        assert {r.body for r in requests} == {requests[0].body}
        assert faulty_receiver.event_ids == ["$e1", "$e2"]
        assert [r.fault for r in requests] == faults
        status = await service.status("a")
        assert (status.state, status.stored_transactions) == ("up", 0)
    finally:
        await service.stopService()


# -- the receiver does what it says, on the wire --


class _Raw(protocol.Protocol):
    """A client that sends bytes and keeps what comes back."""

    def __init__(self) -> None:
        self.data = b""
        #: fires with how the connection ended (a message)
        self.lost: Deferred[str] = Deferred()
        self.conditions = Conditions()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.conditions.check()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost.callback(f"{getattr(reason.type, '__name__', '?')}: {reason.getErrorMessage()}")


async def _raw_put(reactor: Any, receiver: FaultyReceiver) -> _Raw:
    raw = _Raw()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", receiver.port_number), raw)
    body = b'{"events":[]}'
    assert raw.transport is not None
    raw.transport.write(
        b"PUT /_matrix/app/v1/transactions/7 HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer hs-secret-token\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return raw


@pytest_twisted.ensureDeferred
async def test_on_the_wire_a_hang_in_the_body_sends_a_head_and_part_of_the_body(
    reactor, faulty_receiver
):
    faulty_receiver.then(hang_in_body(200, length=1000, part=b'{"partial":'))
    raw = await _raw_put(reactor, faulty_receiver)
    await raw.conditions.wait_for(lambda: b'{"partial":' in raw.data)
    head, _, body = raw.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: 1000" in head
    assert body == b'{"partial":'
    assert not raw.lost.called
    assert faulty_receiver.pending == 1
    assert faulty_receiver.transactions[0].txn_id == "7"
    faulty_receiver.release()
    await raw.lost


@pytest_twisted.ensureDeferred
async def test_on_the_wire_garbage_is_not_http_and_a_reset_is_a_reset(reactor, faulty_receiver):
    faulty_receiver.then(garbage(), reset())
    raw = await _raw_put(reactor, faulty_receiver)
    assert (await raw.lost).startswith("ConnectionDone:")
    assert raw.data == faulty_receiver.transactions[0].fault.body
    assert not raw.data.startswith(b"HTTP/")

    raw = await _raw_put(reactor, faulty_receiver)
    how = await raw.lost
    assert raw.data == b""
    assert how.startswith("ConnectionLost:"), how  # a reset: a FIN would be ConnectionDone


@pytest_twisted.ensureDeferred
async def test_down_refuses_connections_and_up_listens_on_the_same_port(reactor, faulty_receiver):
    port = faulty_receiver.port_number
    await faulty_receiver.down()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    faulty_receiver.up()
    assert faulty_receiver.port_number == port
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
