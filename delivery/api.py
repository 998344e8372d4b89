"""
The daemon's HTTP API on twisted.web: ingest, administration, health and metrics.

JSON in and out; every error is ``{"errcode": "...", "error": "..."}`` in the Matrix style.
Only ``GET /health`` answers without a token. ``docs/openapi.yaml`` describes all of it.
"""

from __future__ import annotations

import hmac
import io
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web import resource, server

from ._log import Logger
from .errors import (
    DeliveryError,
    InvalidEventError,
    StoreUnavailableError,
    UnknownServiceError,
)
from .metrics import Metrics
from .records import DeadLetter, StoredTransaction
from .service import DeliveryService, ReloadResult, ServiceRegisteredError, ServiceStatus

log = Logger()
T = TypeVar("T")

JSON_TYPE = b"application/json"
_DIGITS = re.compile(r"[0-9]{1,19}")
#: the most dead letters one request names
MAX_IDS = 1000
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


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
class Limits:
    max_events_per_request: int = 1000
    max_request_bytes: int = 10 * 1024 * 1024
    #: ingest requests being stored at once before new ones get 429
    max_concurrent_ingests: int = 64
    #: seconds /health waits for the database
    health_timeout: float = 5.0


@attrs.frozen
class Tokens:
    ingest: str = attrs.field(repr=False)
    admin: str = attrs.field(repr=False)
    metrics: str = attrs.field(repr=False)


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


def make_site(api: Api, max_body: int, idle_timeout: float = 60) -> server.Site:
    """A Site for the API: body size limit, idle connections closed, no access log."""

    class Request(LimitedRequest):
        pass

    Request.max_body = max_body
    # Bodies are JSON: no form parsing by twisted.web (it answers malformed forms itself).
    site = server.Site(
        api, requestFactory=Request, timeout=idle_timeout, parsePOSTFormSubmission=False
    )
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # one line per request is noise
    return site


Handler = Callable[..., Awaitable[tuple[int, Any]]]


@attrs.frozen
class _Route:
    method: bytes
    pattern: re.Pattern[str]
    token: str | None  # which token: "ingest", "admin", "metrics", or None
    handler: Handler


class Api(resource.Resource):
    isLeaf = True

    def __init__(
        self,
        delivery: DeliveryService,
        tokens: Tokens,
        *,
        metrics: Metrics | None = None,
        reload: Callable[[], Awaitable[ReloadResult]] | None = None,
        limits: Limits = Limits(),
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.delivery = delivery
        self.tokens = tokens
        self.metrics = metrics
        self._reload = reload
        self.limits = limits
        self.clock = clock if clock is not None else delivery.clock
        self._ingesting = 0
        segment = r"(?P<service_id>[^/]+)"
        self._routes = [
            _Route(b"POST", re.compile(r"/v1/events"), "ingest", self.ingest),
            _Route(b"GET", re.compile(r"/v1/services"), "admin", self.list_services),
            _Route(b"GET", re.compile(rf"/v1/services/{segment}"), "admin", self.get_service),
            _Route(b"POST", re.compile(rf"/v1/services/{segment}/retry"), "admin", self.retry),
            _Route(
                b"GET",
                re.compile(rf"/v1/services/{segment}/transactions"),
                "admin",
                self.list_transactions,
            ),
            _Route(b"DELETE", re.compile(rf"/v1/services/{segment}/queue"), "admin", self.purge),
            _Route(b"POST", re.compile(rf"/v1/services/{segment}/enable"), "admin", self.enable),
            _Route(
                b"GET",
                re.compile(rf"/v1/services/{segment}/dead-letters"),
                "admin",
                self.list_dead_letters,
            ),
            _Route(
                b"POST",
                re.compile(rf"/v1/services/{segment}/dead-letters/redrive"),
                "admin",
                self.redrive,
            ),
            _Route(
                b"POST",
                re.compile(rf"/v1/services/{segment}/dead-letters/discard"),
                "admin",
                self.discard,
            ),
            _Route(b"POST", re.compile(r"/v1/reload"), "admin", self.reload),
            _Route(b"GET", re.compile(r"/health"), None, self.health),
            _Route(b"GET", re.compile(r"/metrics"), "metrics", self.render_metrics),
        ]

    # -- twisted.web --

    def render(self, request: server.Request) -> int:
        Deferred.fromCoroutine(self._answer(request))
        return server.NOT_DONE_YET

    async def _answer(self, request: server.Request) -> None:
        try:
            status, body = await self._dispatch(request)
        except ApiError as e:
            status, body = e.status, {"errcode": e.errcode, "error": e.error}
            for name, value in e.headers.items():
                request.setHeader(name, value)
        except UnknownServiceError as e:
            status, body = 404, {"errcode": "M_NOT_FOUND", "error": str(e)}
        except StoreUnavailableError as e:
            # Nothing was acknowledged: the client retries (ingest is idempotent).
            status, body = 503, {"errcode": "M_UNAVAILABLE", "error": str(e)}
            request.setHeader("Retry-After", "1")
        except Exception:
            log.failure(
                "answering {method} {path} failed", method=request.method, path=request.path
            )
            status, body = 500, {"errcode": "M_UNKNOWN", "error": "internal error (logged)"}
        if request.finished or request.channel is None:
            return  # the client went away
        request.setResponseCode(status)
        if isinstance(body, bytes):
            request.setHeader(b"Content-Type", METRICS_TYPE)
            request.write(body)
        else:
            request.setHeader(b"Content-Type", JSON_TYPE)
            request.write(json.dumps(body, separators=(",", ":")).encode())
        request.finish()

    async def _dispatch(self, request: server.Request) -> tuple[int, Any]:
        path = request.path.decode("utf-8", "replace")
        found = [(r, m) for r in self._routes if (m := r.pattern.fullmatch(path)) is not None]
        if not found:
            raise ApiError(404, "M_UNRECOGNIZED", f"no endpoint at {path}")
        chosen = [(r, m) for r, m in found if r.method == request.method]
        if not chosen:
            allowed = ", ".join(sorted(r.method.decode() for r, _ in found))
            method = request.method.decode("ascii", "replace")
            raise ApiError(
                405,
                "M_UNRECOGNIZED",
                f"{method} is not allowed on {path}; use {allowed}",
                {"Allow": allowed},
            )
        route, match = chosen[0]
        if route.token is not None:
            self._authorize(request, getattr(self.tokens, route.token))
        args = {k: unquote(v) for k, v in match.groupdict().items()}
        return await route.handler(request, **args)

    def _authorize(self, request: server.Request, expected: str) -> None:
        header = request.getHeader(b"Authorization")
        scheme, _, given = (header or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            raise ApiError(401, "M_MISSING_TOKEN", "send Authorization: Bearer <token>")
        if not hmac.compare_digest(given.strip(), expected.encode()):
            raise ApiError(401, "M_UNKNOWN_TOKEN", "the token is not valid for this endpoint")

    # -- reading requests --

    def _raw_body(self, request: server.Request) -> bytes:
        if getattr(request, "too_large", False):
            raise ApiError(
                413,
                "M_TOO_LARGE",
                f"the request body is larger than {self.limits.max_request_bytes} bytes",
            )
        assert request.content is not None
        request.content.seek(0)
        return request.content.read()  # type: ignore[no-any-return]

    def _json_body(self, request: server.Request) -> Any:
        raw = self._raw_body(request)
        try:
            return json.loads(raw, parse_constant=_no_constants)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, "M_NOT_JSON", f"the body is not valid JSON: {e}") from None

    @staticmethod
    def _int_arg(request: server.Request, name: str, default: int, lo: int, hi: int) -> int:
        values = (request.args or {}).get(name.encode())
        if not values:
            return default
        text = values[0].decode("utf-8", "replace")
        if not _DIGITS.fullmatch(text) or not lo <= int(text) <= hi:
            raise ApiError(
                400, "M_INVALID_PARAM", f"{name} must be a whole number from {lo} to {hi}"
            )
        return int(text)

    # -- handlers --

    async def ingest(self, request: server.Request) -> tuple[int, Any]:
        body = self._json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("events"), list):
            raise ApiError(400, "M_BAD_JSON", 'the body must be {"events": [ ... ]}')
        events = body["events"]
        if len(events) > self.limits.max_events_per_request:
            raise ApiError(
                413,
                "M_TOO_LARGE",
                f"{len(events)} events in one request; at most "
                f"{self.limits.max_events_per_request}",
            )
        if self._ingesting >= self.limits.max_concurrent_ingests:
            raise ApiError(
                429,
                "M_LIMIT_EXCEEDED",
                "too many ingest requests at once; retry shortly",
                {"Retry-After": "1"},
            )
        self._ingesting += 1
        try:
            ids = await self.delivery.submit(events)
        except InvalidEventError as e:
            raise ApiError(400, "M_BAD_JSON", str(e)) from None
        finally:
            self._ingesting -= 1
        return 200, {"stream_ids": ids}

    async def list_services(self, request: server.Request) -> tuple[int, Any]:
        return 200, {"services": [status_json(s) for s in await self.delivery.statuses()]}

    async def get_service(self, request: server.Request, service_id: str) -> tuple[int, Any]:
        return 200, await self._status(service_id)

    async def _status(self, service_id: str) -> dict[str, Any]:
        return status_json(await self.delivery.status(service_id))

    async def retry(self, request: server.Request, service_id: str) -> tuple[int, Any]:
        await self.delivery.retry_now(service_id)
        return 200, {}

    async def list_transactions(self, request: server.Request, service_id: str) -> tuple[int, Any]:
        return await self._page(
            request,
            "transactions",
            lambda after, limit: self.delivery.transactions(service_id, after, limit),
            transaction_json,
            lambda t: t.txn_id,
        )

    async def _page(
        self,
        request: server.Request,
        key: str,
        fetch: Callable[[int, int], Awaitable[Sequence[T]]],
        as_json: Callable[[T], dict[str, Any]],
        position: Callable[[T], int],
    ) -> tuple[int, Any]:
        """One page of a listing: ``from`` and ``limit`` in, ``next_from`` out."""
        after = self._int_arg(request, "from", 0, 0, 2**62)
        limit = self._int_arg(request, "limit", 100, 1, 1000)
        items = await fetch(after, limit + 1)
        page = items[:limit]
        return 200, {
            key: [as_json(item) for item in page],
            "next_from": position(page[-1]) if len(items) > limit else None,
        }

    async def purge(self, request: server.Request, service_id: str) -> tuple[int, Any]:
        try:
            result = await self.delivery.purge(service_id)
        except ServiceRegisteredError as e:
            raise ApiError(409, "M_FORBIDDEN", str(e)) from None
        return 200, {
            "deleted_events": result.queued_events,
            "deleted_transactions": result.stored_transactions,
        }

    async def enable(self, request: server.Request, service_id: str) -> tuple[int, Any]:
        await self.delivery.enable(service_id)
        return 200, {}

    async def list_dead_letters(self, request: server.Request, service_id: str) -> tuple[int, Any]:
        return await self._page(
            request,
            "dead_letters",
            lambda after, limit: self.delivery.dead_letters(service_id, after, limit),
            dead_letter_json,
            lambda d: d.id,
        )

    def _ids(self, request: server.Request, require: bool) -> list[int] | None:
        """The ``ids`` of a dead-letter request; None for all (which discard must say)."""
        if not self._raw_body(request).strip() and not require:
            return None
        body = self._json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "M_BAD_JSON", 'the body must be {"ids": [...]} or {"all": true}')
        if body.get("all") is True and "ids" not in body:
            return None
        ids = body.get("ids")
        if (
            not isinstance(ids, list)
            or len(ids) > MAX_IDS
            or not all(type(i) is int and 0 < i < 2**62 for i in ids)
        ):
            raise ApiError(
                400,
                "M_BAD_JSON",
                f'give the dead letters as {{"ids": [1, 2]}} (at most {MAX_IDS} ids), or'
                ' {"all": true}',
            )
        return ids

    async def _require(self, service_id: str) -> None:
        if not await self.delivery.knows(service_id):
            raise UnknownServiceError(service_id)

    async def redrive(self, request: server.Request, service_id: str) -> tuple[int, Any]:
        await self._require(service_id)
        ids = self._ids(request, require=False)
        count = await self.delivery.redrive(service_id, ids)
        return 200, {"redriven": count}

    async def discard(self, request: server.Request, service_id: str) -> tuple[int, Any]:
        await self._require(service_id)
        ids = self._ids(request, require=True)
        count = await self.delivery.discard(service_id, ids)
        return 200, {"discarded": count}

    async def reload(self, request: server.Request) -> tuple[int, Any]:
        if self._reload is None:
            raise ApiError(404, "M_UNRECOGNIZED", "this server has no configuration to reload")
        try:
            result = await self._reload()
        except (DeliveryError, ValueError) as e:
            raise ApiError(422, "M_INVALID_CONFIG", f"nothing changed: {e}") from None
        return 200, {
            "added": list(result.added),
            "changed": list(result.changed),
            "removed": list(result.removed),
        }

    async def health(self, request: server.Request) -> tuple[int, Any]:
        ping = self.delivery.store.ping()
        ping.addTimeout(self.limits.health_timeout, self.clock)
        try:
            await ping
        except Exception as e:
            log.warn("health check: the database does not answer: {error}", error=e)
            return 503, {"errcode": "M_UNAVAILABLE", "error": "the database does not answer"}
        return 200, {"status": "ok"}

    async def render_metrics(self, request: server.Request) -> tuple[int, Any]:
        if self.metrics is None:
            raise ApiError(404, "M_UNRECOGNIZED", "metrics are not enabled")
        return 200, await self.metrics.render(self.delivery)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def status_json(status: ServiceStatus) -> dict[str, Any]:
    return {
        "service_id": status.service_id,
        "state": status.state,
        "queued_events": status.queued_events,
        "stored_transactions": status.stored_transactions,
        "oldest_pending_age": status.oldest_pending_age,
        "last_success": status.last_success,
        "last_error": status.last_error,
        "attempts": status.failure_count,
        "next_retry": status.next_retry,
        "last_txn_id": status.last_txn_id,
    }


def transaction_json(txn: StoredTransaction) -> dict[str, Any]:
    return {
        "txn_id": txn.txn_id,
        "events": txn.event_count,
        "bytes": len(txn.body),
        "first_stream_id": txn.first_stream_id,
        "last_stream_id": txn.last_stream_id,
        "created": txn.created_ts,
        "attempts": txn.attempts,
        "first_attempt": txn.first_attempt_ts,
        "last_attempt": txn.last_attempt_ts,
        "last_error": txn.last_error,
    }


def dead_letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "stream_id": letter.stream_id,
        "event_id": letter.event_id,
        "event": json.loads(letter.json),
        "txn_id": letter.txn_id,
        "status": letter.status,
        "answer": letter.answer,
        "created": letter.created_ts,
    }
