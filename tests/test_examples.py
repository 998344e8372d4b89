"""The runnable examples of the docs and README run as written."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
import yaml
from twisted.internet import protocol
from twisted.internet.defer import Deferred

from .receiver import HS_TOKEN

ROOT = Path(__file__).resolve().parent.parent


class _Child(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


def test_the_readme_shows_the_embedding_example_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "docs/examples/embed.py").read_text()
    assert example.strip() in readme


@pytest_twisted.ensureDeferred
async def test_the_embedding_example_delivers(tmp_path: Path, reactor: Any, receiver: Any) -> None:
    registration = yaml.safe_load((ROOT / "examples/registration.yaml").read_text())
    registration["url"] = receiver.url
    registration["hs_token"] = HS_TOKEN
    (tmp_path / "registration.yaml").write_text(yaml.safe_dump(registration))
    child = _Child()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = reactor.spawnProcess(
        child,
        sys.executable,
        [sys.executable, str(ROOT / "docs/examples/embed.py")],
        env=env,
        path=str(tmp_path),
    )
    try:
        await receiver.wait_for_events(1)
        assert receiver.event_ids == ["$hello"]
    finally:
        if child.ended.called is False:
            process.signalProcess(signal.SIGINT)
    assert await child.ended == 0, child.output.decode()
    assert b"committed at [1]" in child.output
    assert (tmp_path / "delivery.db").exists()
