"""
``scripts/run``, the quick start: the tokens the first run makes are kept beside the
configuration (mode 0600, git-ignored) and used again, the environment's win, and the
``export`` lines it prints are the ones that work, for curl and for ``delivery``.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import protocol
from twisted.internet.defer import Deferred

from .daemon_harness import auth, write_config, write_registration
from .harness import event

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts/run")
LISTENING = re.compile(rb"HTTP API listening on 127\.0\.0\.1:(\d+)")
EXPORT = re.compile(rb"^  export DELIVERY_INGEST_TOKEN=(\S+) DELIVERY_ADMIN_TOKEN=(\S+)$", re.M)


class _Run(protocol.ProcessProtocol):
    """``scripts/run`` in a child process, up to the daemon's port."""

    def __init__(self) -> None:
        self.output = b""
        self.port: Deferred[int] = Deferred()
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = LISTENING.search(self.output)
        if match and not self.port.called:
            self.port.callback(int(match.group(1)))

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.port.called:
            self.port.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback((reason.value.exitCode, reason.value.signal))


async def _run_once(reactor: Any, config: Path, env: dict[str, str]) -> tuple[bytes, bytes, int]:
    """Run ``scripts/run CONFIG`` until it listens, ingest with the token it printed, stop."""
    child = _Run()
    process = reactor.spawnProcess(child, SCRIPT, [SCRIPT, str(config)], env=env, path=str(ROOT))
    try:
        port = await child.port
        match = EXPORT.search(child.output)
        assert match, child.output.decode()
        ingest, admin = match.groups()
        response = await treq.post(
            f"http://127.0.0.1:{port}/v1/events",
            json={"events": [event(port)]},
            headers=auth(ingest.decode()),
            persistent=False,
        )
        assert response.code == 200, await response.text()
    finally:
        process.signalProcess(signal.SIGTERM)
    assert await child.ended in ((None, signal.SIGTERM), (0, None)), child.output.decode()
    return ingest, admin, port


@pytest_twisted.ensureDeferred
async def test_the_first_run_keeps_its_tokens_and_later_runs_use_them(
    tmp_path: Path, reactor: Any
) -> None:
    registration = write_registration(tmp_path, "bridge", None)
    config = write_config(
        tmp_path,
        [registration],
        ingest_token="${DELIVERY_INGEST_TOKEN}",
        admin_token="${DELIVERY_ADMIN_TOKEN}",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    tokens = tmp_path / "delivery.tokens"

    ingest, admin, _ = await _run_once(reactor, config, env)
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    kept = tokens.read_text()
    assert f"export DELIVERY_INGEST_TOKEN={ingest.decode()}\n" in kept
    assert f"export DELIVERY_ADMIN_TOKEN={admin.decode()}\n" in kept
    assert len(ingest) >= 32
    assert ingest != admin

    # again, with an admin token of our own: the kept ingest token, ours for admin
    again, chosen, _ = await _run_once(reactor, config, {**env, "DELIVERY_ADMIN_TOKEN": "mine"})
    assert (again, chosen) == (ingest, b"mine")
    assert tokens.read_text() == kept

    # what the printed lines say to do in another terminal works
    delivery = Path(sys.executable).with_name("delivery")
    checked = subprocess.run(
        ["bash", "-c", f". {tokens} && {delivery} check-config --config {config}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert "valid" in checked.stdout


def test_the_kept_tokens_are_not_committed() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "examples/delivery.tokens"], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0


def test_a_missing_configuration_is_one_line() -> None:
    result = subprocess.run(
        [SCRIPT, "no-such.yaml"], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert result.returncode == 1
    assert result.stderr == (
        "scripts/run: no configuration file no-such.yaml: name one, or give none for"
        " examples/delivery.yaml\n"
    )
