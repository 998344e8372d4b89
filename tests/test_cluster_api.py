"""
The operator's view of several daemons on one PostgreSQL: ``GET /v1/cluster``, the owner in
a service's status, the cluster metrics and the ``cluster`` section on reload, against real
in-process daemons (on SQLite, which is no cluster, and on PostgreSQL).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

from .daemon_harness import (
    ADMIN,
    INGEST,
    Running,
    start_daemon,
    write_config,
    write_registration,
)
from .harness import event
from .receiver import Receiver

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)


async def cluster(running: Running) -> dict[str, Any]:
    status, body = await running.request("GET", "/v1/cluster")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def scrape(running: Running) -> Samples:
    status, body = await running.request("GET", "/metrics")
    assert status == 200, body
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def registrations(folder: Path, receiver: Receiver, *ids: str) -> list[Path]:
    return [write_registration(folder, i, receiver.url, users=f"@{i}_.*") for i in ids]


# -- SQLite: no cluster --


@pytest_twisted.ensureDeferred
async def test_on_sqlite_there_is_no_cluster(tmp_path: Path, reactor: Any, receiver: Any) -> None:
    config = write_config(tmp_path, registrations(tmp_path, receiver, "a"))
    running = await start_daemon(config, reactor)
    try:
        status, body = await running.request("GET", "/v1/cluster")
        unauthorized, _ = await running.request("GET", "/v1/cluster", token=INGEST)
        _, service = await running.request("GET", "/v1/services/a")
        samples = await scrape(running)
    finally:
        await running.daemon.stopService()
    assert status == 404
    assert body["errcode"] == "M_NOT_FOUND"
    assert body["error"].startswith("this daemon is not part of a cluster: its database is SQLite")
    assert unauthorized == 401
    assert service["owner"] is None
    assert not [name for name, _ in samples if name == "delivery_leases_held"]
    assert samples[("delivery_cluster_nodes", ())] == 0


# -- PostgreSQL: a cluster of one, and of two --


@pytest_twisted.ensureDeferred
async def test_a_daemon_alone_on_postgres_is_a_cluster_of_one(
    tmp_path: Path, reactor: Any, receiver: Any, postgres_url: str
) -> None:
    config = write_config(
        tmp_path,
        registrations(tmp_path, receiver, "a", "b"),
        database=postgres_url,
        cluster={"node_id": "solo", "lease_ttl": 3},
        defaults={"request_timeout": 2},
    )
    running = await start_daemon(config, reactor)
    try:

        async def everything_held() -> bool:
            body = await cluster(running)
            return body["router"] == "solo" and all(s["owner"] for s in body["services"])

        await until(everything_held, "the lone node to take every lease")
        body = await cluster(running)
        _, a = await running.request("GET", "/v1/services/a")
        _, listed = await running.request("GET", "/v1/services")
        await running.ingest([event(1, sender="@a_1:hs"), event(2, sender="@b_1:hs")])

        async def both_delivered() -> bool:
            _, body = await running.request("GET", "/v1/services")
            return all(s["last_success"] is not None for s in body["services"])

        await until(both_delivered, "both services to be sent their event")
        samples = await scrape(running)
        held = running.daemon.delivery.leases_held
    finally:
        await running.daemon.stopService()
    assert (body["node_id"], body["lease_ttl"], body["router"]) == ("solo", 3, "solo")
    (node,) = body["nodes"]
    assert node["node_id"] == "solo"
    assert (node["alive"], node["router"], sorted(node["leases"])) == (True, True, ["a", "b"])
    assert isinstance(node["pid"], int)
    assert node["host"]
    assert 0 <= node["heartbeat_age"] < 3
    services = {s["service_id"]: s for s in body["services"]}
    assert sorted(services) == ["a", "b"]
    for lease in services.values():
        assert lease["owner"] == "solo"
        assert 0 < lease["expires_in"] <= 3
        assert isinstance(lease["epoch"], int)
    assert a["owner"] == "solo"
    assert [s["owner"] for s in listed["services"]] == ["solo", "solo"]
    assert held == {"router", "service:a", "service:b"}
    assert samples[("delivery_leases_held", (("kind", "router"),))] == 1
    assert samples[("delivery_leases_held", (("kind", "service"),))] == 2
    assert samples[("delivery_cluster_nodes", ())] == 1
    acquired = (("change", "acquired"), ("lease", "router"))
    assert samples[("delivery_lease_changes_total", acquired)] >= 1


@pytest_twisted.ensureDeferred
async def test_two_daemons_on_one_postgres_share_the_services(
    tmp_path: Path, reactor: Any, receiver: Any, postgres_url: str
) -> None:
    ids = ["s1", "s2", "s3", "s4"]
    running: list[Running] = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        config = write_config(
            folder,
            registrations(folder, receiver, *ids),
            database=postgres_url,
            cluster={"node_id": f"node-{name}", "lease_ttl": 3},
            defaults={"request_timeout": 2},
        )
        running.append(await start_daemon(config, reactor))
    try:

        async def shared() -> bool:
            body = await cluster(running[0])
            nodes = {n["node_id"]: n for n in body["nodes"]}
            return (
                sorted(nodes) == ["node-one", "node-two"]
                and all(n["alive"] and n["leases"] for n in nodes.values())
                and all(s["owner"] for s in body["services"])
                and body["router"] is not None
            )

        await until(shared, "the two nodes to share the services", timeout=30)
        views = [await cluster(r) for r in running]
    finally:
        for r in running:
            await r.daemon.stopService()
    assert [v["node_id"] for v in views] == ["node-one", "node-two"]
    body = views[0]
    held = [lease for n in body["nodes"] for lease in n["leases"]]
    assert sorted(held) == ids  # each service has one sender
    owners = {s["service_id"]: s["owner"] for s in body["services"]}
    assert {n["node_id"]: sorted(n["leases"]) for n in body["nodes"]} == {
        node: sorted(i for i, o in owners.items() if o == node) for node in ("node-one", "node-two")
    }
    assert [n["router"] for n in body["nodes"]].count(True) == 1


# -- reload --


@implementer(ILogObserver)
class RestartWarnings:
    def __init__(self) -> None:
        self.keys: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        if "keys" in event:
            self.keys.append(str(event["keys"]))


@pytest_twisted.ensureDeferred
async def test_a_changed_cluster_section_needs_a_restart(
    tmp_path: Path, reactor: Any, receiver: Any, postgres_url: str
) -> None:
    files = registrations(tmp_path, receiver, "a")
    write_config(tmp_path, files, database=postgres_url, cluster={"node_id": "before"})
    running = await start_daemon(tmp_path / "delivery.yaml", reactor)
    warnings = RestartWarnings()
    globalLogPublisher.addObserver(warnings)
    try:
        status, _ = await running.request("POST", "/v1/reload")
        assert (status, warnings.keys) == (200, [])
        write_config(tmp_path, files, database=postgres_url, cluster={"node_id": "after"})
        status, _ = await running.request("POST", "/v1/reload")
        assert status == 200
        body = await cluster(running)
    finally:
        globalLogPublisher.removeObserver(warnings)
        await running.daemon.stopService()
    assert warnings.keys == ["cluster"]
    assert body["node_id"] == "before"  # until the restart


@pytest_twisted.ensureDeferred
async def test_reload_refuses_a_cluster_section_on_sqlite(
    tmp_path: Path, reactor: Any, receiver: Any
) -> None:
    files = registrations(tmp_path, receiver, "a")
    config = write_config(tmp_path, files)
    running = await start_daemon(config, reactor)
    try:
        write_config(tmp_path, files, cluster={"node_id": "x"})
        status, body = await running.request("POST", "/v1/reload")
    finally:
        await running.daemon.stopService()
    assert (status, body["errcode"]) == (422, "M_INVALID_CONFIG")
    assert "SQLite is single-process" in body["error"]
    assert ADMIN not in body["error"]
