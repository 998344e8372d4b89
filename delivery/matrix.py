"""
The Matrix application-service wire protocol: ``PUT /_matrix/app/v1/transactions/{txnId}``
and ``POST /_matrix/app/v1/ping``, over one persistent connection pool.

Requests go straight to twisted.web's ``Agent`` with the URL made once per service: treq's
per-request URL parsing, IDNA encoding and cookie handling cost more than the rest of a
transaction's sending together when transactions are small and many.
"""

from __future__ import annotations

import email.utils
import json
import sys
from typing import Any
from urllib.parse import quote

from hyperlink import URL
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.error import (
    ConnectError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import BadResponseVersion, ParseError
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from ._interfaces import ISender, SendResult
from .records import StoredTransaction
from .registration import Registration

#: how much of an answer's body is kept (for error messages); the rest is read and dropped
ANSWER_LIMIT = 4096


_DONE = Failure(ResponseDone())


class _BoundedBody(Protocol):
    """Reads a response body to its end, keeping at most ``limit`` bytes of it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.kept = 0
        self.finished: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.kept < self.limit:
            part = data[: self.limit - self.kept]
            self.parts.append(part)
            self.kept += len(part)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)


def read_body(response: IResponse) -> Deferred[bytes]:
    protocol = _BoundedBody(ANSWER_LIMIT)
    response.deliverBody(protocol)
    return protocol.finished


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now``: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _cause(failure: Failure) -> Failure:
    """What made a request fail: the first reason of a response never (or not all) received."""
    while failure.check(ResponseNeverReceived, ResponseFailed):
        reasons = getattr(failure.value, "reasons", [])
        if not reasons:
            break
        failure = reasons[0]
    return failure


def timed_out(failure: Failure) -> bool:
    """Whether a request failed for want of a complete answer in time."""
    return _cause(failure).check(TimeoutError, CancelledError) is not None


def describe_failure(failure: Failure, timeout: float) -> str:
    """Words an operator can act on for a request that got no answer."""
    failure = _cause(failure)
    if failure.check(TimeoutError, CancelledError):
        return f"no complete answer within {timeout:g} s"
    if failure.check(ConnectionRefusedError):
        return "connection refused"
    if failure.check(ConnectionLost, ConnectionDone):
        return "the connection was closed before the answer was complete"
    if failure.check(ParseError, BadResponseVersion):
        return "the answer is not HTTP"
    if failure.check(DNSLookupError):
        return "cannot resolve the host name"
    if failure.check(ConnectError):
        return f"cannot connect: {failure.getErrorMessage()}"
    return f"{getattr(failure.type, '__name__', 'error')}: {failure.getErrorMessage()}"


#: how much of an error answer's text is kept, for error messages and the store
ERROR_TEXT_LIMIT = 300

#: what stands for a secret of ours that a receiver echoed
REDACTED = "<redacted>"


def describe_answer(status: int, body: bytes, secrets: tuple[str, ...] = ()) -> str:
    """
    ``HTTP status: text``, the text being the start of the answer, with every secret in
    ``secrets`` (a receiver may echo our request's headers) replaced before it is cut, so
    that no part of a secret is kept either.
    """
    text = answer_text(body, secrets)
    return f"HTTP {status}" + (f": {text}" if text else "")


def answer_text(body: bytes, secrets: tuple[str, ...] = ()) -> str:
    """The start of an answer as text, every secret in ``secrets`` replaced before the cut."""
    text = body.decode("utf-8", "replace")
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text[:ERROR_TEXT_LIMIT].strip()


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


class ConnectionPool:
    """
    One persistent HTTP connection pool shared by the senders of every service.

    By default it keeps every connection a request leaves idle: a service has one request
    in flight at a time, so that is a connection per service at most, and services behind
    one host and port (several bridges on one address) keep theirs instead of connecting
    anew for each transaction. Idle connections close after Twisted's four minutes.
    """

    def __init__(self, reactor: Any, max_per_host: int | None = None) -> None:
        self.reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool._factory = _QuietFactory  # no "Starting factory" line per connection
        self.pool.maxPersistentPerHost = sys.maxsize if max_per_host is None else max_per_host
        self.pool.retryAutomatically = False

    def agent(self, connect_timeout: float) -> Agent:
        return Agent(self.reactor, connectTimeout=connect_timeout, pool=self.pool)

    def close(self) -> Deferred[None]:
        d: Deferred[None] = self.pool.closeCachedConnections()
        return d


@implementer(ISender)
class MatrixSender:
    """Sends one application service's transactions, the Matrix way."""

    def __init__(
        self, registration: Registration, connections: ConnectionPool, clock: IReactorTime
    ) -> None:
        if registration.url is None:
            raise ValueError(f"registration {registration.id!r} has no url to send to")
        self.registration = registration
        self.url = registration.url
        self._clock = clock
        self._agent = connections.agent(registration.options.connect_timeout)
        #: the URL as the wire has it (host name in IDNA, path percent-encoded)
        self._base = URL.from_text(self.url).to_uri().to_text().encode("ascii")
        #: never kept from an answer: a receiver may echo our token, or its own
        self._secrets = tuple(
            sorted({registration.hs_token, registration.as_token}, key=len, reverse=True)
        )
        self._headers = Headers(
            {
                b"Authorization": [f"Bearer {registration.hs_token}".encode()],
                b"Content-Type": [b"application/json"],
            }
        )
        #: after every path: the token again, for receivers that read it from the query
        self._query = (
            b"?access_token=" + quote(registration.hs_token, safe="").encode("ascii")
            if registration.options.legacy_authorization
            else b""
        )

    def send(self, txn: StoredTransaction) -> Deferred[SendResult]:
        return self._request(b"PUT", b"/_matrix/app/v1/transactions/%d" % txn.txn_id, txn.body)

    def ping(self, transaction_id: str | None = None) -> Deferred[SendResult]:
        body = {} if transaction_id is None else {"transaction_id": transaction_id}
        return self._request(b"POST", b"/_matrix/app/v1/ping", json.dumps(body).encode())

    def _request(self, method: bytes, path: bytes, body: bytes) -> Deferred[SendResult]:
        timeout = self.registration.options.request_timeout
        start = self._clock.seconds()
        d = Deferred.fromCoroutine(self._exchange(method, self._base + path + self._query, body))
        d.addTimeout(timeout, self._clock)

        def done(result: tuple[int, bytes, str | None]) -> SendResult:
            status, answer, retry_after = result
            ok = 200 <= status < 300
            text = None if ok else answer_text(answer, self._secrets)
            return SendResult(
                ok=ok,
                status=status,
                error=None if text is None else f"HTTP {status}" + (f": {text}" if text else ""),
                retry_after=parse_retry_after(retry_after, self._clock.seconds()),
                duration=self._clock.seconds() - start,
                body=text,
            )

        def failed(failure: Failure) -> SendResult:
            return SendResult(
                ok=False,
                error=describe_failure(failure, timeout),
                duration=self._clock.seconds() - start,
                timed_out=timed_out(failure),
            )

        return d.addCallbacks(done, failed)

    async def _exchange(
        self, method: bytes, url: bytes, body: bytes
    ) -> tuple[int, bytes, str | None]:
        response = await self._agent.request(method, url, self._headers, BytesProducer(body))
        answer = await read_body(response)
        retry_after = response.headers.getRawHeaders("Retry-After", [None])[0]
        return response.code, answer, retry_after


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
