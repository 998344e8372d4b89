"""
The daemon's HTTP API on twisted.web: ingest, administration, health and metrics.

JSON in and out; every error is ``{"errcode": "...", "error": "..."}`` in the Matrix style.
Only ``/health`` answers without a token. ``docs/openapi.yaml`` describes all of it.

A request is judged on its headers before its body is read (``Api.screen``: the route,
the method, one ``Authorization`` header with the route's token, ``Content-Type:
application/json`` on a body); the site (:func:`make_site`, from ``_http``) answers what
fails there at once and closes the connection, caps the open connections and gives a
body a deadline. Bodies are UTF-8 JSON, with no key twice in an object. An error quotes
at most a short prefix of what it refuses.
"""

from __future__ import annotations

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
from twisted.web.http_headers import Headers

from ._http import (
    JSON_TYPE,
    ApiError,
    ApiSite,
    Connections,
    authorize,
    dumps,
    parse_json,
    require_json,
)
from ._log import Logger
from .errors import (
    DeliveryError,
    InvalidEventError,
    NotAcceptingEventsError,
    NoURLError,
    ServiceRegisteredError,
    StoreUnavailableError,
    UnknownServiceError,
)
from .events import shorten
from .metrics import Metrics
from .records import (
    OUTCOMES,
    Attempt,
    ClusterView,
    DeadLetter,
    LeaseInfo,
    ReloadResult,
    ReplayResult,
    ServiceStatus,
    StoredTransaction,
)
from .service import DeliveryService

log = Logger()
T = TypeVar("T")

_DIGITS = re.compile(r"[0-9]{1,19}")
#: the most dead letters one request names
MAX_IDS = 1000
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
#: the keys of a replay's body: positions, and times
REPLAY_POSITIONS = ("from_stream_id", "to_stream_id")
REPLAY_TIMES = ("from_ts", "to_ts")


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


def make_site(
    api: Api,
    max_body: int,
    connections: Connections | None = None,
    reactor: IReactorTime | None = None,
) -> ApiSite:
    """A site for the API: body size limit, connection cap, timeouts, no access log."""
    return ApiSite(api, api.screen, max_body, connections or Connections(), reactor)


Handler = Callable[..., Awaitable[tuple[int, Any]]]


@attrs.frozen
class _Route:
    method: bytes
    pattern: re.Pattern[str]
    token: str | None  # which token: "ingest", "admin", "metrics", or None
    handler: Handler
    #: whether the handler reads a JSON body (which must then say so in Content-Type)
    body: bool = False


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
            _Route(b"POST", re.compile(r"/v1/events"), "ingest", self.ingest, body=True),
            _Route(b"GET", re.compile(r"/v1/services"), "admin", self.list_services),
            _Route(b"GET", re.compile(rf"/v1/services/{segment}"), "admin", self.get_service),
            _Route(b"POST", re.compile(rf"/v1/services/{segment}/retry"), "admin", self.retry),
            _Route(
                b"GET",
                re.compile(rf"/v1/services/{segment}/transactions"),
                "admin",
                self.list_transactions,
            ),
            _Route(
                b"GET",
                re.compile(rf"/v1/services/{segment}/attempts"),
                "admin",
                self.list_attempts,
            ),
            _Route(b"DELETE", re.compile(rf"/v1/services/{segment}/queue"), "admin", self.purge),
            _Route(b"POST", re.compile(rf"/v1/services/{segment}/enable"), "admin", self.enable),
            _Route(
                b"POST", re.compile(rf"/v1/services/{segment}/ping"), "admin", self.ping, body=True
            ),
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
                body=True,
            ),
            _Route(
                b"POST",
                re.compile(rf"/v1/services/{segment}/dead-letters/discard"),
                "admin",
                self.discard,
                body=True,
            ),
            _Route(
                b"POST",
                re.compile(rf"/v1/services/{segment}/replay"),
                "admin",
                self.replay,
                body=True,
            ),
            _Route(b"POST", re.compile(r"/v1/reload"), "admin", self.reload),
            _Route(b"GET", re.compile(r"/v1/cluster"), "admin", self.get_cluster),
            _Route(b"GET", re.compile(r"/health"), None, self.health),
            _Route(b"HEAD", re.compile(r"/health"), None, self.health),
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
            request.write(dumps(body))
        request.finish()

    async def _dispatch(self, request: server.Request) -> tuple[int, Any]:
        # Screened already when the request came through an ApiSite; again here for any
        # other site, and for a reload that changed the tokens in between.
        route, match = self.screen(
            request.method, request.path, request.requestHeaders, self._has_body(request)
        )
        args = {k: unquote(v) for k, v in match.groupdict().items()}
        return await route.handler(request, **args)

    def screen(
        self, method: bytes, raw_path: bytes, headers: Headers, has_body: bool
    ) -> tuple[_Route, re.Match[str]]:
        """
        The route of a request, judged on its headers alone.

        :raises ApiError: 404 or 405 for no such route; 400 for two ``Authorization``
            headers, 401 without the route's token; 415 for a body that is not labelled
            JSON.
        """
        path = raw_path.partition(b"?")[0].decode("utf-8", "replace")
        found = [(r, m) for r in self._routes if (m := r.pattern.fullmatch(path)) is not None]
        if not found:
            raise ApiError(404, "M_UNRECOGNIZED", f"no endpoint at {shorten(path)}")
        chosen = [(r, m) for r, m in found if r.method == method]
        if not chosen:
            allowed = ", ".join(sorted(r.method.decode() for r, _ in found))
            given = shorten(method.decode("ascii", "replace"))
            raise ApiError(
                405,
                "M_UNRECOGNIZED",
                f"{given} is not allowed on {shorten(path)}; use {allowed}",
                {"Allow": allowed},
            )
        route, match = chosen[0]
        if route.token is not None:
            authorize(headers, getattr(self.tokens, route.token))
        if route.body and has_body:
            require_json(headers)
        return route, match

    @staticmethod
    def _has_body(request: server.Request) -> bool:
        if getattr(request, "too_large", False):
            return True
        assert request.content is not None
        return bool(request.content.seek(0, io.SEEK_END))

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
        return parse_json(self._raw_body(request))

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
            "deleted_dead_letters": result.dead_letters,
        }

    async def enable(self, request: server.Request, service_id: str) -> tuple[int, Any]:
        await self.delivery.enable(service_id)
        return 200, {}

    async def ping(self, request: server.Request, service_id: str) -> tuple[int, Any]:
        """As a homeserver's ``POST /_matrix/client/v1/appservice/{id}/ping`` answers."""
        transaction_id = None
        if self._raw_body(request).strip():
            body = self._json_body(request)
            transaction_id = body.get("transaction_id") if isinstance(body, dict) else None
            if not isinstance(body, dict) or not isinstance(transaction_id, str | None):
                raise ApiError(
                    400, "M_BAD_JSON", 'the body must be {} or {"transaction_id": "a string"}'
                )
        try:
            result = await self.delivery.ping(service_id, transaction_id)
        except NoURLError as e:
            raise ApiError(400, "M_URL_NOT_SET", str(e)) from None
        if result.ok:
            return 200, {"duration_ms": int(result.duration * 1000)}
        error = result.error or "no answer"
        if result.status is not None:
            return 502, {
                "errcode": "M_BAD_STATUS",
                "error": error,
                "status": result.status,
                "body": result.body or "",
            }
        if result.timed_out:
            return 504, {"errcode": "M_CONNECTION_TIMEOUT", "error": error}
        return 502, {"errcode": "M_CONNECTION_FAILED", "error": error}

    async def list_dead_letters(self, request: server.Request, service_id: str) -> tuple[int, Any]:
        return await self._page(
            request,
            "dead_letters",
            lambda after, limit: self.delivery.dead_letters(service_id, after, limit),
            dead_letter_json,
            lambda d: d.id,
        )

    async def list_attempts(self, request: server.Request, service_id: str) -> tuple[int, Any]:
        """
        One page of the delivery log, newest first: ``before`` (an attempt's id),
        ``limit`` and ``outcome`` in, ``next_before`` (the page's last id, when there are
        older ones) out.
        """
        before = self._int_arg(request, "before", 0, 1, 2**62) or None
        limit = self._int_arg(request, "limit", 100, 1, 1000)
        values = (request.args or {}).get(b"outcome")
        outcome = values[0].decode("utf-8", "replace") if values else None
        if outcome is not None and outcome not in OUTCOMES:
            raise ApiError(400, "M_INVALID_PARAM", f"outcome must be one of {', '.join(OUTCOMES)}")
        items = await self.delivery.attempts(
            service_id, before=before, limit=limit + 1, outcome=outcome
        )
        page = items[:limit]
        return 200, {
            "attempts": [attempt_json(a) for a in page],
            "next_before": page[-1].id if len(items) > limit else None,
        }

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

    async def replay(self, request: server.Request, service_id: str) -> tuple[int, Any]:
        if service_id not in self.delivery.registrations:
            raise UnknownServiceError(service_id)
        body = self._json_body(request)
        shape = (
            'the body must be {"from_ts": T} or {"from_stream_id": N}, and may add an end,'
            ' "to_ts" or "to_stream_id"'
        )
        if not isinstance(body, dict):
            raise ApiError(400, "M_BAD_JSON", shape)
        for key, value in body.items():
            if key not in REPLAY_POSITIONS + REPLAY_TIMES:
                problem = f"unknown key {shorten(json.dumps(key))}: {shape}"
            elif value is None:
                continue
            elif key in REPLAY_POSITIONS and type(value) is not int:
                problem = f"{key} must be a whole number: a stream position"
            elif key in REPLAY_TIMES and type(value) not in (int, float):
                problem = f"{key} must be a number: a unix time, in seconds"
            else:
                continue
            raise ApiError(400, "M_BAD_JSON", problem)
        try:
            result = await self.delivery.replay(service_id, **body)
        except ValueError as e:
            raise ApiError(400, "M_INVALID_PARAM", str(e)) from None
        except NotAcceptingEventsError as e:
            raise ApiError(409, "M_FORBIDDEN", str(e)) from None
        return 200, replay_json(result)

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

    async def get_cluster(self, request: server.Request) -> tuple[int, Any]:
        view = await self.delivery.cluster()
        if view is None:
            raise ApiError(
                404,
                "M_NOT_FOUND",
                "this daemon is not part of a cluster: its database is SQLite, which one"
                " daemon uses at a time; use PostgreSQL to run several daemons",
            )
        return 200, cluster_json(view)

    async def health(self, request: server.Request) -> tuple[int, Any]:
        problem = self.delivery.store.health()
        if problem is not None:
            # (the store logs each change of its health; this answers while it lasts)
            return 503, {"errcode": "M_UNAVAILABLE", "error": problem}
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
        "owner": status.owner,
    }


def cluster_json(view: ClusterView) -> dict[str, Any]:
    """
    The nodes of a cluster and who holds what. A lease counts as held only while it is
    current (it has an owner and has not expired by ``view.now``); ``expires_in`` is then
    the seconds left, else null.
    """

    def held(lease: LeaseInfo) -> bool:
        return (
            lease.owner is not None
            and lease.expires_ts is not None
            and lease.expires_ts >= view.now
        )

    services = sorted(view.services, key=lambda item: item[0])
    holding: dict[str, list[str]] = {}
    for service_id, lease in services:
        if held(lease):
            holding.setdefault(str(lease.owner), []).append(service_id)
    return {
        "node_id": view.node_id,
        "lease_ttl": view.lease_ttl,
        "router": view.router,
        "nodes": [
            {
                "node_id": node.node_id,
                "host": node.host,
                "pid": node.pid,
                "started": node.started_ts,
                "heartbeat_age": max(0.0, view.now - node.heartbeat_ts),
                "alive": node.alive,
                "leases": holding.get(node.node_id, []),
                "router": node.node_id == view.router,
            }
            for node in sorted(view.nodes, key=lambda n: n.node_id)
        ],
        "services": [
            {
                "service_id": service_id,
                "owner": lease.owner if held(lease) else None,
                "epoch": lease.epoch,
                "expires_in": (
                    None
                    if not held(lease) or lease.expires_ts is None
                    else lease.expires_ts - view.now
                ),
            }
            for service_id, lease in services
        ],
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


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    return {
        "id": attempt.id,
        "txn_id": attempt.txn_id,
        "started": attempt.ts,
        "duration": attempt.duration,
        "events": attempt.event_count,
        "status": attempt.status,
        "outcome": attempt.outcome,
        "error": attempt.error,
        "resend": attempt.resend,
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


def replay_json(result: ReplayResult) -> dict[str, Any]:
    return {
        "queued": result.queued,
        "first_stream_id": result.first_stream_id,
        "last_stream_id": result.last_stream_id,
        "partly_deleted": result.partly_deleted,
    }
