"""
``docs/openapi.yaml`` against the server, both ways: every route of the live ``Api`` is
documented with its method and token, and every documented operation is a route; and a
real in-process daemon answers good and bad requests of every operation only with
statuses the spec lists for it, with bodies that validate against the documented schemas,
never with a 500, and gives every answer the spec documents at least once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import jsonschema  # type: ignore[import-untyped]
import pytest_twisted
import treq
import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from delivery.api import Api, Tokens, make_site
from delivery.service import DeliveryService
from delivery.store import open_store

from .daemon_harness import ADMIN, INGEST, Running, start_daemon, write_config, write_registration
from .harness import event
from .receiver import Receiver, start_receiver, stop_receiver

SPEC_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
#: the Api's token names and the security schemes that stand for them
SCHEMES = {"ingest": "ingestToken", "admin": "adminToken", "metrics": "metricsToken"}
METRICS = "metrics-secret-token"
TOKENS = {"ingestToken": INGEST, "adminToken": ADMIN, "metricsToken": METRICS}


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(path template, lower-case method, operation) for every documented operation."""
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


def deref(node: Any) -> Any:
    """``node`` with a ``$ref`` into this spec followed (repeatedly)."""
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), f"only local references are used: {ref}"
        node = SPEC
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def validator(schema: dict[str, Any]) -> Any:
    """A JSON Schema 2020-12 validator for ``schema``, with the spec's components resolvable."""
    root = {"$schema": jsonschema.Draft202012Validator.META_SCHEMA["$id"], "allOf": [schema]}
    return jsonschema.Draft202012Validator({**root, "components": SPEC["components"]})


def parameters(path: str, method: str) -> list[dict[str, Any]]:
    item = SPEC["paths"][path]
    found = [deref(p) for p in item.get("parameters", [])]
    found += [deref(p) for p in item[method].get("parameters", [])]
    return found


def security(operation: dict[str, Any]) -> list[dict[str, list[str]]]:
    return list(operation.get("security", SPEC.get("security", [])))


def route_template(pattern: str) -> str:
    """The OpenAPI path of a route's regular expression: ``(?P<x>[^/]+)`` becomes ``{x}``."""
    path = re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", pattern)
    assert not set(path) & set("()[]^$*+?\\|."), f"cannot read the route {pattern!r}"
    return path


def test_the_spec_is_openapi_31_with_valid_schemas_and_references():
    assert SPEC["openapi"].startswith("3.1.")
    assert "security" not in SPEC, "every operation states its own token"
    for name, scheme in SPEC["components"]["securitySchemes"].items():
        assert scheme == {**scheme, "type": "http", "scheme": "bearer"}, name
    assert set(SPEC["components"]["securitySchemes"]) == set(SCHEMES.values())

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(SPEC):
        assert deref({"$ref": ref}) is not None, ref  # a KeyError if it leads nowhere
    for name, schema in SPEC["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["type"] == "object", name

    for name, response in SPEC["components"]["responses"].items():
        assert response["description"], name
        jsonschema.Draft202012Validator.check_schema(
            response["content"]["application/json"]["schema"]
        )

    ids = [operation["operationId"] for _, _, operation in operations()]
    assert len(ids) == len(set(ids))
    for path, method, operation in operations():
        assert operation.get("summary"), (path, method)
        assert operation["responses"], (path, method)
        for status, response in operation["responses"].items():
            response = deref(response)
            assert re.fullmatch(r"[1-5]\d\d", status), (path, method, status)
            assert response["description"], (path, method, status)
            for media, content in response["content"].items():
                assert media in ("application/json", "text/plain"), (path, method, status)
                jsonschema.Draft202012Validator.check_schema(content["schema"])
        body = operation.get("requestBody")
        if body is not None:
            assert isinstance(body["required"], bool), (path, method)
            jsonschema.Draft202012Validator.check_schema(
                body["content"]["application/json"]["schema"]
            )


def test_every_route_is_documented_and_every_documented_operation_is_a_route(tmp_path, reactor):
    store = open_store(f"sqlite:///{tmp_path / 'never-opened.db'}", reactor)
    api = Api(DeliveryService(store, [], reactor=reactor), Tokens("i", "a", "m"))
    routes = {
        (route_template(r.pattern.pattern), r.method.decode("ascii").lower()): r.token
        for r in api._routes
    }
    assert len(routes) == len(api._routes), "two routes with the same path and method"
    documented = {(path, method): operation for path, method, operation in operations()}
    assert sorted(routes) == sorted(documented)
    for (path, method), token in routes.items():
        operation = documented[path, method]
        expected: list[dict[str, list[str]]] = [] if token is None else [{SCHEMES[token]: []}]
        assert security(operation) == expected, (path, method)
        in_path = set(re.findall(r"\{(\w+)\}", path))
        params = parameters(path, method)
        assert {p["name"] for p in params if p["in"] == "path"} == in_path, (path, method)
        assert all(p["required"] for p in params if p["in"] == "path")
        if token is not None:
            assert operation["responses"]["401"] == {"$ref": "#/components/responses/Unauthorized"}


# -- the live daemon --


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def send(
    url: str,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    all_headers: dict[bytes | str, bytes | str] = dict((headers or {}).items())
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    if body is not None and not any(str(k).lower() == "content-type" for k in all_headers):
        all_headers["Content-Type"] = "application/json"
    response = await treq.request(
        method, url + path, data=body, headers=all_headers, persistent=False
    )
    content = await response.content()
    found = {
        name.decode("latin-1").lower(): values[-1].decode("latin-1")
        for name, values in response.headers.getAllRawHeaders()
    }
    return Answer(response.code, found, content)


class Checker:
    """Sends requests and checks each answer against the spec; collects every problem."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: set[tuple[str, str, str]] = set()
        self.problems: list[str] = []
        self.count = 0

    async def call(
        self,
        method: str,
        template: str,
        *,
        expect: int,
        path: str | None = None,
        query: str = "",
        token: str | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        url: str | None = None,
    ) -> Answer:
        """One request to a documented operation; ``path`` is ``template`` with ids filled in."""
        target = (path or template) + (f"?{query}" if query else "")
        answer = await send(
            url or self.url, method, target, token=token, body=body, headers=headers
        )
        what = f"{method.upper()} {target} (token {'none' if token is None else token[:6]}...)"
        self.count += 1
        self.seen.add((method.lower(), template, str(answer.status)))
        if answer.status != expect:
            self.problems.append(f"{what}: {answer.status}, expected {expect}: {answer.body!r}")
        operation = SPEC["paths"][template][method.lower()]
        response = operation["responses"].get(str(answer.status))
        if response is None:
            self.problems.append(f"{what}: {answer.status} is not documented: {answer.body!r}")
        else:
            self.conforms(deref(response), answer, what)
        return answer

    async def undocumented(
        self, method: str, path: str, response: str, expect: int, allow: str | None = None
    ) -> None:
        """A request that no operation takes: it gets ``components.responses[response]``."""
        answer = await send(self.url, method, path, token=ADMIN)
        what = f"{method} {path}"
        self.count += 1
        if answer.status != expect:
            self.problems.append(f"{what}: {answer.status}, expected {expect}: {answer.body!r}")
        self.conforms(SPEC["components"]["responses"][response], answer, what)
        if allow is not None and answer.headers.get("allow") != allow:
            self.problems.append(f"{what}: Allow {answer.headers.get('allow')!r}, not {allow!r}")

    def conforms(self, response: dict[str, Any], answer: Answer, what: str) -> None:
        # (503: the database away; 502 and 504: a receiver's failure a ping passes on)
        if answer.status >= 500 and answer.status not in (502, 503, 504):
            self.problems.append(f"{what}: {answer.status}: {answer.body!r}")
        for name, header in response.get("headers", {}).items():
            header = deref(header)
            value = answer.headers.get(name.lower())
            if value is None:
                if header.get("required"):
                    self.problems.append(f"{what}: no {name} header")
                continue
            schema = header["schema"]
            typed: Any = (
                int(value) if schema.get("type") == "integer" and value.isdigit() else value
            )
            for error in validator(schema).iter_errors(typed):
                self.problems.append(f"{what}: header {name}: {error.message}")
        content = response.get("content", {})
        media = answer.headers.get("content-type", "").split(";")[0].strip()
        if media not in content:
            self.problems.append(f"{what}: Content-Type {media!r} is not one of {list(content)}")
            return
        if what.startswith("HEAD "):
            if answer.body:
                self.problems.append(f"{what}: a body: {answer.body!r}")
            return  # the headers of GET, no body
        if media == "application/json":
            try:
                data = answer.json()
            except ValueError:
                self.problems.append(f"{what}: the body is not JSON: {answer.body!r}")
                return
        else:
            data = answer.body.decode("utf-8")
        for error in validator(content[media]["schema"]).iter_errors(data):
            path = "/".join(str(p) for p in error.absolute_path)
            self.problems.append(f"{what}: /{path}: {error.message}")

    def documented(self) -> set[tuple[str, str, str]]:
        return {
            (method, path, status)
            for path, method, operation in operations()
            for status in operation["responses"]
        }


def hang() -> Deferred[None]:
    """A database that never answers."""
    return Deferred()


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    from twisted.internet import reactor

    deadline = reactor.seconds() + timeout
    while not await check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


def config_files(tmp_path: Path, receiver: Receiver, failing: Receiver, gone: bool) -> Path:
    slow = {"initial_delay": 300, "probe": False}
    registrations = [
        write_registration(tmp_path, "a", receiver.url, users=".*"),
        write_registration(tmp_path, "b", failing.url, users="@bob:.*", **slow),
        # (for the pings: no events are for them)
        write_registration(
            tmp_path, "silent", failing.url, users="@silent:.*", request_timeout=0.5, **slow
        ),
        write_registration(tmp_path, "nourl", None, users="@nourl:.*"),
    ]
    if gone:
        registrations.append(
            write_registration(tmp_path, "gone", failing.url, users="@gone:.*", **slow)
        )
    return write_config(
        tmp_path,
        registrations,
        metrics_token=METRICS,
        max_events_per_request=5,
        max_request_bytes=4000,
    )


#: ingest bodies, what the server answers, and so whether the documented schema must
#: accept them (it must accept exactly the ones answered 200)
INGEST_BODIES: list[tuple[Any, int]] = [
    ({"events": [event(1)]}, 200),
    ({"events": []}, 200),
    ({"events": [{"event_id": "$nulls", "sender": None, "room_id": None}]}, 200),
    ({"events": [{"event_id": "$extra"}], "extra": True}, 200),
    ({"events": [event(2), event(1)]}, 200),
    ({"events": [{"event_id": ""}]}, 400),
    ({"events": [{"event_id": 5}]}, 400),
    ({"events": [{"sender": "@alice:hs"}]}, 400),
    ({"events": [event(3), {"event_id": "$r", "room_id": 5}]}, 400),
    ({"events": [{"event_id": "$s", "state_key": []}]}, 400),
    ({"events": [{"event_id": "$t", "type": {"a": 1}}]}, 400),
    ({"events": ["$u"]}, 400),
    ({"events": [None]}, 400),
    ({"events": {}}, 400),
    ({"events": None}, 400),
    ({"events": "abc"}, 400),
    ({}, 400),
    ([], 400),
    ("events", 400),
    (None, 400),
]

NOT_JSON = [b"", b"{", b'{"events": [NaN]}', b'{"events": Infinity}', b"\xff\xfe", b"[" * 3000]


@pytest_twisted.ensureDeferred
async def test_every_answer_is_documented_and_every_documented_answer_happens(
    tmp_path, reactor, receiver
):
    failing = await start_receiver(reactor)
    failing.answer(500, body=b'{"errcode":"M_UNKNOWN"}')
    config = config_files(tmp_path, receiver, failing, gone=True)
    running = await start_daemon(config, reactor)
    check = Checker(running.url)
    try:
        await sweep(check, running, config, tmp_path, receiver, failing, reactor)
    finally:
        await running.daemon.stopService()
        await stop_receiver(failing)
    assert not check.problems, "\n".join(check.problems)
    missing = check.documented() - check.seen - ON_POSTGRES
    assert not missing, f"documented answers never seen: {sorted(missing)}"
    assert check.count > 150


#: the answers only a daemon on PostgreSQL gives (the sweep runs on SQLite): seen by
#: test_the_cluster_answers_on_postgres_are_documented
ON_POSTGRES = {("get", "/v1/cluster", "200")}


async def sweep(
    check: Checker,
    running: Running,
    config: Path,
    tmp_path: Path,
    receiver: Receiver,
    failing: Receiver,
    reactor: Any,
) -> None:
    api = running.daemon.api

    # b goes DOWN with one stored transaction that has failed once.
    async def b_has_failed() -> bool:
        status, body = await running.request("GET", "/v1/services/b/transactions")
        return status == 200 and [t["attempts"] for t in body["transactions"]] == [1]

    await running.ingest([event(100, sender="@bob:hs"), event(101, sender="@gone:hs")])
    await until(b_has_failed, "b to fail once")

    # Tokens and unknown ids, for every operation, from the spec alone.
    for path, method, operation in operations():
        schemes = [name for requirement in security(operation) for name in requirement]
        right = TOKENS[schemes[0]] if schemes else None
        filled = path.replace("{service_id}", "a")
        if schemes:
            wrong = [t for t in (INGEST, ADMIN, METRICS) if t != right]
            for token in [None, "nonsense", *wrong]:
                await check.call(method, path, path=filled, token=token, expect=401)
            await check.call(
                method,
                path,
                path=filled,
                headers={"Authorization": f"Basic {right}"},
                expect=401,
            )
            await check.call(
                method, path, path=filled, headers={"Authorization": "Bearer "}, expect=401
            )
        if "{service_id}" in path:
            for unknown in ("nope", "a%2Fb", "%00", "%FF", quote("ü /x", safe="")):
                await check.call(
                    method,
                    path,
                    path=path.replace("{service_id}", unknown),
                    token=right,
                    expect=404,
                )
        # query parameters: the documented bounds (or choices) are the server's
        for param in parameters(path, method):
            if param["in"] != "query":
                continue
            schema = param["schema"]
            if schema["type"] == "string":  # one of a few words
                words = [(w, 200) for w in schema["enum"]]
                for value, expect in [*words, ("", 400), ("nope", 400), ("OK", 400)]:
                    query = f"{param['name']}={value}"
                    await check.call(
                        method, path, path=filled, query=query, token=right, expect=expect
                    )
                continue
            assert schema["type"] == "integer"
            lo, hi = schema["minimum"], schema["maximum"]
            name = param["name"]
            for value, expect in [
                (lo, 200),
                (hi, 200),
                (schema["default"], 200),
                (lo - 1, 400),
                (hi + 1, 400),
                ("x", 400),
                ("", 400),
                ("1.5", 400),
                ("%201", 400),
                ("1e3", 400),
                ("0x10", 400),
            ]:
                await check.call(
                    method, path, path=filled, query=f"{name}={value}", token=right, expect=expect
                )

    # POST /v1/events: the request schema accepts exactly what the server takes.
    request_schema = validator(
        SPEC["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    )
    for body, expect in INGEST_BODIES:
        answer = await check.call(
            "POST", "/v1/events", body=json.dumps(body).encode(), token=INGEST, expect=expect
        )
        accepted = request_schema.is_valid(body)
        if accepted != (answer.status == 200):
            check.problems.append(
                f"the request schema {'accepts' if accepted else 'refuses'} {body!r},"
                f" the server answers {answer.status}"
            )
    for raw in NOT_JSON:
        await check.call("POST", "/v1/events", body=raw, token=INGEST, expect=400)
    six = json.dumps({"events": [event(n) for n in range(10, 16)]}).encode()
    await check.call("POST", "/v1/events", body=six, token=INGEST, expect=413)
    big = json.dumps({"events": [event(20, pad="x" * 4000)]}).encode()
    await check.call("POST", "/v1/events", body=big, token=INGEST, expect=413)
    await check.call("POST", "/v1/events", body=b"x" * 5000, token=INGEST, expect=413)
    good = json.dumps({"events": [event(21)]}).encode()
    limits = api.limits
    api.limits = attrs.evolve(limits, max_concurrent_ingests=0)  # as if 64 were being stored
    try:
        await check.call("POST", "/v1/events", body=good, token=INGEST, expect=429)
    finally:
        api.limits = limits
    await check.call("POST", "/v1/events", body=good, token=INGEST, expect=200)

    # A body must be labelled JSON, on every operation that reads one; one Authorization.
    for template, token in [
        ("/v1/events", INGEST),
        ("/v1/services/{service_id}/dead-letters/redrive", ADMIN),
        ("/v1/services/{service_id}/dead-letters/discard", ADMIN),
        ("/v1/services/{service_id}/replay", ADMIN),
    ]:
        path = template.replace("{service_id}", "a")
        for content_type in ("text/plain", "application/json; charset=latin-1"):
            await check.call(
                "POST",
                template,
                path=path,
                token=token,
                body=b'{"all": true}',
                headers={"Content-Type": content_type},
                expect=415,
            )
    for method, path in [("POST", "/v1/events"), ("GET", "/v1/services")]:
        both = [f"Bearer {ADMIN}", f"Bearer {INGEST}"]
        answer = await send(check.url, method, path, headers={"Authorization": both})  # type: ignore[dict-item]
        check.count += 1
        if answer.status != 400:
            check.problems.append(f"two Authorization headers: {answer.status}: {answer.body!r}")
        responses = SPEC["components"]["responses"]
        check.conforms(responses["TwoAuthorizations"], answer, "two Authorization headers")

    # The admin endpoints' good requests, and what a body does to those that take none.
    await check.call("GET", "/v1/services", token=ADMIN, expect=200)
    for service_id in ("a", "b", "gone", "%61"):
        template = "/v1/services/{service_id}"
        await check.call(
            "GET", template, path=f"/v1/services/{service_id}", token=ADMIN, expect=200
        )
        template = "/v1/services/{service_id}/transactions"
        await check.call(
            "GET", template, path=f"/v1/services/{service_id}/transactions", token=ADMIN, expect=200
        )
    await check.call(
        "GET",
        "/v1/services/{service_id}/transactions",
        path="/v1/services/b/transactions",
        query="from=0&limit=1",
        token=ADMIN,
        expect=200,
    )
    await check.call(
        "POST",
        "/v1/services/{service_id}/retry",
        path="/v1/services/a/retry",
        token=ADMIN,
        body=b"{not json",
        expect=200,
    )
    await check.call(
        "DELETE",
        "/v1/services/{service_id}/queue",
        path="/v1/services/a/queue",
        token=ADMIN,
        expect=409,
    )

    # Enabling, and dead letters (none yet: the behaviour is tested in test_rejections).
    for method, template, body, expect in [
        ("POST", "/v1/services/{service_id}/enable", None, 200),
        ("GET", "/v1/services/{service_id}/dead-letters", None, 200),
        ("POST", "/v1/services/{service_id}/dead-letters/redrive", None, 200),
        ("POST", "/v1/services/{service_id}/dead-letters/redrive", b'{"ids": [1, 2]}', 200),
        ("POST", "/v1/services/{service_id}/dead-letters/redrive", b'{"ids": "x"}', 400),
        ("POST", "/v1/services/{service_id}/dead-letters/redrive", b"{not json", 400),
        ("POST", "/v1/services/{service_id}/dead-letters/redrive", b"x" * 5000, 413),
        ("POST", "/v1/services/{service_id}/dead-letters/discard", b'{"all": true}', 200),
        ("POST", "/v1/services/{service_id}/dead-letters/discard", b'{"ids": [3]}', 200),
        ("POST", "/v1/services/{service_id}/dead-letters/discard", None, 400),
        ("POST", "/v1/services/{service_id}/dead-letters/discard", b"[1]", 400),
        ("POST", "/v1/services/{service_id}/dead-letters/discard", b"x" * 5000, 413),
    ]:
        path = template.replace("{service_id}", "a")
        await check.call(method, template, path=path, token=ADMIN, body=body, expect=expect)

    # Ping (the behaviour is tested in test_api): each answer a homeserver's ping gives.
    ping_path = "/v1/services/{service_id}/ping"
    for service_id, body, expect in [
        ("silent", None, 504),  # its receiver holds the answer (nothing else goes there now)
        ("a", None, 200),
        ("a", b'{"transaction_id": "txn-1"}', 200),
        ("a", b'{"transaction_id": 1}', 400),
        ("a", b"x" * 5000, 413),
        ("nourl", None, 400),
        ("b", None, 502),
        ("nope", None, 404),
    ]:
        if service_id == "silent":
            failing.then(hang=True)
        path = ping_path.replace("{service_id}", service_id)
        await check.call("POST", ping_path, path=path, token=ADMIN, body=body, expect=expect)
        failing.release()
    await check.call(
        "POST",
        ping_path,
        path="/v1/services/a/ping",
        token=ADMIN,
        body=b"{}",
        headers={"Content-Type": "text/plain"},
        expect=415,
    )

    # Replay (the behaviour is tested in test_replay): the request schema accepts what the
    # server takes, but for an end before its start, which it cannot say.
    replay = "/v1/services/{service_id}/replay"
    replay_schema = validator(
        SPEC["paths"][replay]["post"]["requestBody"]["content"]["application/json"]["schema"]
    )
    for replay_body, expect in [
        ({"from_stream_id": 1}, 200),
        ({"from_ts": 0, "to_stream_id": 1}, 200),
        ({"from_ts": None, "from_stream_id": 2, "to_ts": 1e12}, 200),
        ({}, 400),
        ({"from_ts": 0, "from_stream_id": 1}, 400),
        ({"from_ts": 0, "to_ts": 1, "to_stream_id": 1}, 400),
        ({"from_stream_id": "1"}, 400),
        ({"from_stream_id": -1}, 400),
        ({"from_stream_id": 2**62 + 1}, 400),
        ({"from_ts": 0, "since": 1}, 400),
        ([], 400),
    ]:
        answer = await check.call(
            "POST",
            replay,
            path="/v1/services/a/replay",
            token=ADMIN,
            body=json.dumps(replay_body).encode(),
            expect=expect,
        )
        if replay_schema.is_valid(replay_body) != (answer.status == 200):
            check.problems.append(
                f"the replay schema disagrees with the server's {answer.status} on {replay_body!r}"
            )
    for raw, expect in [(b'{"from_ts": 5, "to_ts": 4}', 400), (b"{", 400), (b"x" * 5000, 413)]:
        await check.call(
            "POST", replay, path="/v1/services/a/replay", token=ADMIN, body=raw, expect=expect
        )
    delivery = running.daemon.delivery
    delivery._external_source = True  # as if embedded with an event source
    try:
        await check.call(
            "POST",
            replay,
            path="/v1/services/a/replay",
            token=ADMIN,
            body=b'{"from_ts": 0}',
            expect=409,
        )
    finally:
        delivery._external_source = False

    # POST /v1/reload: unchanged, broken, then without "gone".
    await check.call("POST", "/v1/reload", token=ADMIN, body=b"{not json", expect=200)
    good_config = config.read_text()
    config.write_text(good_config + "no_such_key: 1\n")
    await check.call("POST", "/v1/reload", token=ADMIN, expect=422)
    (tmp_path / "a.yaml").write_text("id: [")
    config.write_text(good_config)
    await check.call("POST", "/v1/reload", token=ADMIN, expect=422)
    config_files(tmp_path, receiver, failing, gone=False)
    answer = await check.call("POST", "/v1/reload", token=ADMIN, expect=200)
    assert answer.json() == {"added": [], "changed": [], "removed": ["gone"]}

    # DELETE /v1/services/{id}/queue and retry on the orphaned service.
    for method, template, expect in [
        ("GET", "/v1/services/{service_id}", 200),
        ("POST", "/v1/services/{service_id}/retry", 404),
        ("DELETE", "/v1/services/{service_id}/queue", 200),
        ("DELETE", "/v1/services/{service_id}/queue", 404),
        ("GET", "/v1/services/{service_id}", 404),
    ]:
        path = template.replace("{service_id}", "gone")
        await check.call(method, template, path=path, token=ADMIN, expect=expect)

    # GET /v1/cluster: SQLite is no cluster (the 200 is on PostgreSQL: ON_POSTGRES).
    answer = await check.call("GET", "/v1/cluster", token=ADMIN, expect=404)
    if "SQLite" not in answer.body.decode():
        check.problems.append(f"GET /v1/cluster on SQLite does not say why: {answer.body!r}")

    # GET /health and GET /metrics.
    await check.call("GET", "/health", expect=200)
    await check.call("HEAD", "/health", expect=200)
    await check.call("GET", "/health", token="nonsense", expect=200)
    metrics = await check.call("GET", "/metrics", token=METRICS, expect=200)
    families = list(text_string_to_metric_families(metrics.body.decode("utf-8")))
    assert families
    assert all(f.name.startswith("delivery_") for f in families), [f.name for f in families]
    store = running.daemon.delivery.store
    ping = store.ping
    store.ping = hang  # type: ignore[method-assign]
    api.limits = attrs.evolve(limits, health_timeout=0.01)
    try:
        await check.call("GET", "/health", expect=503)
        await check.call("HEAD", "/health", expect=503)
    finally:
        store.ping = ping  # type: ignore[method-assign]
        api.limits = limits
    await check.call("GET", "/health", expect=200)

    # The same API embedded without a configuration or metrics.
    bare = Api(running.daemon.delivery, Tokens(INGEST, ADMIN, METRICS))
    port = reactor.listenTCP(0, make_site(bare, 4000), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}"
        await check.call("POST", "/v1/reload", token=ADMIN, url=url, expect=404)
        await check.call("GET", "/metrics", token=METRICS, url=url, expect=404)
        await check.call("GET", "/v1/services", token=ADMIN, url=url, expect=200)
    finally:
        await port.stopListening()

    # Paths no operation has, and methods a path does not take.
    for path in ("/", "/v1", "/v1/", "/v1/services/", "/v1/services/a/nope", "/v1/events/1"):
        for method in ("GET", "POST", "PUT"):
            await check.undocumented(method, path, "UnknownPath", 404)
    for path in ("/healthz", "/metrics/", "/v1/services/a/b/queue", "//v1/services"):
        await check.undocumented("GET", path, "UnknownPath", 404)
    for path, item in SPEC["paths"].items():
        taken = sorted(m.upper() for m in item if m in HTTP_METHODS)
        filled = path.replace("{service_id}", "a")
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            if method not in taken:
                allow = ", ".join(taken)
                await check.undocumented(method, filled, "MethodNotAllowed", 405, allow)


@pytest_twisted.ensureDeferred
async def test_a_form_content_type_is_refused_in_json(tmp_path, reactor, receiver):
    config = write_config(tmp_path, [write_registration(tmp_path, "a", receiver.url)])
    running = await start_daemon(config, reactor)
    try:
        body = json.dumps({"events": [event(1)]}).encode()
        answer = await send(
            running.url,
            "POST",
            "/v1/events",
            token=INGEST,
            body=body,
            headers={"Content-Type": "multipart/form-data; boundary=x"},
        )
        assert answer.headers.get("content-type") == "application/json"
        assert (answer.status, answer.json()["errcode"]) == (415, "M_UNRECOGNIZED")
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_the_cluster_answers_on_postgres_are_documented(
    tmp_path, reactor, receiver, postgres_url
):
    config = write_config(
        tmp_path,
        [
            write_registration(tmp_path, "a", receiver.url, users="@a:.*"),
            write_registration(tmp_path, "b", receiver.url, users="@b:.*"),
        ],
        database=postgres_url,
        cluster={"node_id": "node-one", "lease_ttl": 3},
        defaults={"request_timeout": 2},
    )
    running = await start_daemon(config, reactor)
    check = Checker(running.url)

    async def leases_taken() -> bool:
        status, body = await running.request("GET", "/v1/cluster")
        assert status == 200, body
        return body["router"] == "node-one" and all(s["owner"] for s in body["services"])

    try:
        await until(leases_taken, "the one node to take every lease", timeout=20)
        answer = await check.call("GET", "/v1/cluster", token=ADMIN, expect=200)
        await check.call("GET", "/v1/services", token=ADMIN, expect=200)
        await check.call(
            "GET", "/v1/services/{service_id}", path="/v1/services/a", token=ADMIN, expect=200
        )
    finally:
        await running.daemon.stopService()
    assert not check.problems, "\n".join(check.problems)
    assert check.seen >= ON_POSTGRES
    body = answer.json()
    assert (body["node_id"], body["lease_ttl"], body["router"]) == ("node-one", 3, "node-one")
    (node,) = body["nodes"]
    assert (node["node_id"], node["alive"], node["router"]) == ("node-one", True, True)
    assert sorted(node["leases"]) == ["a", "b"]
    assert [s["service_id"] for s in body["services"]] == ["a", "b"]
    assert all(s["owner"] == "node-one" for s in body["services"])
