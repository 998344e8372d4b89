"""The runnable examples of the docs and README run as written."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
import yaml
from twisted.internet import protocol
from twisted.internet.defer import Deferred

from .receiver import HS_TOKEN
from .waiting import Conditions

ROOT = Path(__file__).resolve().parent.parent
EMBED = ROOT / "docs/examples/embed.py"


class _Child(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int | None] = Deferred()
        self._conditions = Conditions()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self._conditions.check()

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)

    def wait_for_output(self, pattern: bytes) -> Deferred[None]:
        return self._conditions.wait_for(lambda: re.search(pattern, self.output) is not None)


def _embed(reactor: Any, folder: Path, *args: str) -> tuple[_Child, Any]:
    child = _Child()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = reactor.spawnProcess(
        child, sys.executable, [sys.executable, str(EMBED), *args], env=env, path=str(folder)
    )
    return child, process


def _bridge(folder: Path, url: str) -> None:
    """The example registration, copied as the README says, its url set to ``url``."""
    registration = yaml.safe_load((ROOT / "examples/registration.yaml").read_text())
    registration["url"] = url
    registration["hs_token"] = HS_TOKEN
    registration["delivery"].update(initial_delay=0.05, max_delay=0.1)
    (folder / "registration.yaml").write_text(yaml.safe_dump(registration))


async def _interrupted(child: _Child, process: Any) -> bytes:
    if not child.ended.called:
        process.signalProcess(signal.SIGINT)
    assert await child.ended == 0, child.output.decode()
    return child.output


def test_the_readme_shows_the_embedding_example_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    assert EMBED.read_text().strip() in readme


@pytest_twisted.ensureDeferred
async def test_the_embedding_example_delivers_and_says_so(
    tmp_path: Path, reactor: Any, receiver: Any
) -> None:
    _bridge(tmp_path, receiver.url)
    child, process = _embed(reactor, tmp_path)
    try:
        await receiver.wait_for_events(1)
        assert receiver.event_ids == ["$hello"]
        (txn,) = receiver.accepted
        await child.wait_for_output(rb"transaction \d+ \(1 event\(s\)\) delivered")
    finally:
        output = await _interrupted(child, process)
    assert b"committed at [1]" in output
    assert f"telegram: transaction {txn.txn_id} (1 event(s)) delivered".encode() in output
    assert b"not delivered" not in output
    assert (tmp_path / "delivery.db").exists()


@pytest_twisted.ensureDeferred
async def test_the_embedding_example_shows_a_failure_and_the_retry(
    tmp_path: Path, reactor: Any, receiver: Any
) -> None:
    receiver.then(503, body=b'{"error": "starting up"}')
    _bridge(tmp_path, receiver.url)
    child, process = _embed(reactor, tmp_path)
    try:
        await receiver.wait_for_events(1)
        await child.wait_for_output(rb"\) delivered")
    finally:
        output = (await _interrupted(child, process)).decode()
    failed = output.index("(1 event(s)) not delivered: HTTP 503")
    down = output.index("telegram: up -> down (HTTP 503")
    delivered = output.index("(1 event(s)) delivered")
    assert failed < down < delivered, output
    assert "-> up" in output[down:], output


@pytest_twisted.ensureDeferred
async def test_the_embedding_example_without_a_registration_says_what_to_do(
    tmp_path: Path, reactor: Any
) -> None:
    child, _ = _embed(reactor, tmp_path)
    assert await child.ended == 1
    output = child.output.decode()
    assert output.count("\n") == 1, output
    assert "there is no registration.yaml: copy examples/registration.yaml there" in output
    assert "Traceback" not in output
    assert not (tmp_path / "delivery.db").exists()


@pytest_twisted.ensureDeferred
async def test_the_embedding_example_names_what_is_wrong_in_a_registration(
    tmp_path: Path, reactor: Any
) -> None:
    (tmp_path / "bridge.yaml").write_text("id: telegram\nurl: ftp://nowhere\n")
    child, _ = _embed(reactor, tmp_path, "bridge.yaml")
    assert await child.ended == 1
    output = child.output.decode()
    assert output.startswith("embed.py: invalid registration bridge.yaml: field "), output
    assert output.count("\n") == 1, output
    assert "Traceback" not in output


def test_the_example_configurations_cluster_section_works_once_uncommented() -> None:
    from delivery.cluster import Cluster
    from delivery.config import parse_config

    text = (ROOT / "examples/delivery.yaml").read_text()
    assert "\n#cluster:\n" in text
    uncommented = re.sub(r"^#(cluster:|  \w+:)", r"\1", text, flags=re.MULTILINE)
    data = yaml.safe_load(uncommented)
    assert set(data["cluster"]) == {"node_id", "lease_ttl"}
    data["database"] = "postgresql://delivery@db.example.org/delivery"
    environ = {"DELIVERY_INGEST_TOKEN": "i", "DELIVERY_ADMIN_TOKEN": "a"}
    config = parse_config(data, "delivery.yaml", ROOT / "examples", environ)
    assert config.node() == Cluster(node_id="delivery-1", lease_ttl=15)
    assert config.node() == Cluster(node_id="delivery-1")  # the example's ttl is the default
