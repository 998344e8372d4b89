"""
The HTTP plumbing of the daemon's API, below its routes: the site and its connections
(a cap on open connections, a deadline for a body once its headers are in, a body limit
that drops rather than buffers), the check of a request on its headers before its body is
read (the screen the API hands the site), the token and ``Content-Type`` checks, and JSON
bodies in and errors out in the Matrix style. Whatever is refused before the body is
answered at once and the connection closed: a client without a token never makes the
daemon store a byte of its body.
"""

from __future__ import annotations

import codecs
import hmac
import io
import json
import re
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.http_headers import Headers

from .events import shorten

JSON_TYPE = b"application/json"
#: how a body may be labelled: application/json, with at most a charset of utf-8
_CHARSET = re.compile(rb'\s*charset\s*=\s*("?)utf-8\1\s*', re.IGNORECASE)

#: judges a request on its method, path, headers and whether it has a body; raises
#: :class:`ApiError` to refuse it
Screen = Callable[[bytes, bytes, Headers, bool], object]


class ApiError(Exception):
    """An answer other than success: the status, the Matrix errcode, and what went wrong."""

    def __init__(
        self, status: int, errcode: str, error: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(error)
        self.status = status
        self.errcode = errcode
        self.error = error
        self.headers = headers or {}


@attrs.frozen
class Connections:
    """What the site allows a connection."""

    #: open connections at once; one more is answered 503 and closed
    max_connections: int = 512
    #: seconds a body may take to arrive once its headers are in
    body_timeout: float = 30.0
    #: seconds a connection may sit idle
    idle_timeout: float = 60.0


class LimitedRequest(server.Request):
    """A request whose body is dropped, not buffered, once it is larger than allowed."""

    max_body = 10 * 1024 * 1024
    too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.too_large = True
            self.content = io.BytesIO()
        else:
            super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self.too_large = True
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]


class _Channel(http.HTTPChannel):
    """
    One connection of an :class:`ApiSite`. A request that its ``screen`` refuses on
    its headers, a connection over the cap and a body past its deadline are answered at
    once (``HTTPChannel`` would read the body first) and the connection is closed; a
    refused connection reads nothing more.
    """

    site: ApiSite
    _refused = False
    _body_deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self.site.open_connections += 1
        cap = self.site.connections.max_connections
        if self.site.open_connections > cap:
            self._refuse(
                ApiError(
                    503,
                    "M_UNAVAILABLE",
                    f"more than {cap} connections are open; retry shortly",
                    {"Retry-After": "1"},
                )
            )

    def allHeadersReceived(self) -> None:
        # Before the body (and before "100 Continue" would invite it).
        try:
            self.site.screen(
                self._command, self._path, self.requests[-1].requestHeaders, self.length != 0
            )
        except ApiError as e:
            self._refuse(e)
            return
        super().allHeadersReceived()  # type: ignore[no-untyped-call]
        if self.length != 0:
            self._body_deadline = self.callLater(  # type: ignore[no-untyped-call]
                self.site.connections.body_timeout, self._body_too_slow
            )

    def _body_too_slow(self) -> None:
        self._body_deadline = None
        timeout = self.site.connections.body_timeout
        self._refuse(
            ApiError(408, "M_UNKNOWN", f"the request body did not arrive within {timeout:g} s")
        )

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        if not self._refused:
            super().allContentReceived()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_deadline()
        self.site.open_connections -= 1
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def _cancel_deadline(self) -> None:
        deadline, self._body_deadline = self._body_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _refuse(self, error: ApiError) -> None:
        """Answer ``error`` and close, reading nothing more of this connection."""
        self._refused = True
        self._cancel_deadline()
        assert self.transport is not None
        body = error_json(error.errcode, error.error)
        reason = http.RESPONSES.get(error.status, b"Error")
        head = [
            b"HTTP/1.1 %d %s" % (error.status, reason),
            b"Content-Type: " + JSON_TYPE,
            b"Content-Length: %d" % len(body),
            b"Connection: close",
            *(f"{name}: {value}".encode("latin-1") for name, value in error.headers.items()),
        ]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.loseConnection()  # type: ignore[no-untyped-call]


class ApiSite(server.Site):
    """
    The API's site: counts its open connections and hands every request to ``screen``
    (the Api's :meth:`~delivery.api.Api.screen`) as soon as its headers are in (see
    :class:`_Channel`).
    """

    protocol = _Channel  # type: ignore[assignment]  # plain HTTP/1.1 (HTTP/2 needs TLS)

    def __init__(
        self,
        root: resource.Resource,
        screen: Screen,
        max_body: int,
        connections: Connections,
        reactor: IReactorTime | None,
    ) -> None:
        class Request(LimitedRequest):
            pass

        Request.max_body = max_body
        # Bodies are JSON: no form parsing by twisted.web (it answers malformed forms itself).
        super().__init__(  # type: ignore[no-untyped-call]
            root,
            requestFactory=Request,
            timeout=connections.idle_timeout,
            reactor=reactor,
            parsePOSTFormSubmission=False,
        )
        self.screen = screen
        self.connections = connections
        self.open_connections = 0
        self.noisy = False

    def log(self, request: http.Request) -> None:
        """No access log: one line per request is noise."""


def authorize(headers: Headers, expected: str) -> None:
    """Refuse a request without exactly one ``Authorization: Bearer <expected>``."""
    given_headers = headers.getRawHeaders(b"Authorization") or []
    if len(given_headers) > 1:
        raise ApiError(
            400,
            "M_INVALID_PARAM",
            f"{len(given_headers)} Authorization headers; send one: Authorization: Bearer <token>",
        )
    scheme, _, given = (given_headers[0] if given_headers else b"").partition(b" ")
    if scheme.lower() != b"bearer" or not given.strip():
        raise ApiError(401, "M_MISSING_TOKEN", "send Authorization: Bearer <token>")
    if not hmac.compare_digest(given.strip(), expected.encode()):
        raise ApiError(401, "M_UNKNOWN_TOKEN", "the token is not valid for this endpoint")


def require_json(headers: Headers) -> None:
    """Refuse a body not labelled ``application/json`` (with, at most, charset utf-8)."""
    labels = headers.getRawHeaders(b"Content-Type") or []
    media, *parameters = labels[0].split(b";") if len(labels) == 1 else [b""]
    if media.strip().lower() != JSON_TYPE or not all(_CHARSET.fullmatch(p) for p in parameters):
        given = ", ".join(label.decode("latin-1") for label in labels) or "none"
        raise ApiError(
            415,
            "M_UNRECOGNIZED",
            f"send the body as Content-Type: application/json (UTF-8), not {shorten(given)}",
        )


class _DuplicateKey(ValueError):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's pairs as a dict; refused if a key comes twice (the dict is shorter)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return value


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(object_pairs_hook=_unique, parse_constant=_no_constants)
#: byte order marks of UTF-16 (and so of UTF-32, which start alike)
_WIDE_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def parse_json(raw: bytes) -> Any:
    """
    A request body as JSON: UTF-8 without a byte order mark, no constant JSON does not
    have (NaN, Infinity), no key twice in one object.

    :raises ApiError: 400 ``M_NOT_JSON``, or ``M_BAD_JSON`` for a duplicate key.
    """
    if raw.startswith(codecs.BOM_UTF8):
        raise ApiError(
            400, "M_NOT_JSON", "the body starts with a byte order mark: send UTF-8 without one"
        )
    # Without a mark, UTF-16 or UTF-32 JSON has a zero byte in its first four (UTF-8 JSON
    # has none at all).
    if raw.startswith(_WIDE_BOMS) or b"\x00" in raw[:4]:
        raise ApiError(400, "M_NOT_JSON", "the body is UTF-16 or UTF-32: send UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(
            400, "M_NOT_JSON", f"the body is not UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    try:
        return _decoder.decode(text)
    except _DuplicateKey as e:
        raise ApiError(
            400,
            "M_BAD_JSON",
            f"the key {shorten(json.dumps(e.args[0]))} is given twice in an object",
        ) from None
    except (ValueError, RecursionError) as e:
        raise ApiError(400, "M_NOT_JSON", f"the body is not valid JSON: {e}") from None


def dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def error_json(errcode: str, error: str) -> bytes:
    return dumps({"errcode": errcode, "error": error})
