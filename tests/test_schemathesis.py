"""
Schemathesis against docs/openapi.yaml on a running daemon: whatever it sends, no 500, no
crash, and every answer is one the description documents, in its documented form.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from .daemon_harness import write_config, write_registration
from .receiver import start_receiver, stop_receiver
from .test_daemon import run_daemon, stopped_cleanly

ROOT = Path(__file__).resolve().parent.parent
ST = str(Path(sys.executable).with_name("st"))
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)


@pytest_twisted.ensureDeferred
async def test_schemathesis_finds_nothing(tmp_path: Path, reactor: Any) -> None:
    token = "fuzz-token-for-every-endpoint"
    # A receiver that answers: a ping passes a receiver's failure on as 502 or 504, by
    # design (tested in test_openapi), which would read as a server error here.
    receiver = await start_receiver(reactor)
    registration = write_registration(
        tmp_path, "bridge", receiver.url, initial_delay=0.05, max_delay=0.2
    )
    config = write_config(
        tmp_path, [registration], ingest_token=token, admin_token=token, metrics_token=token
    )
    child, process, url = await run_daemon(reactor, tmp_path, config)
    try:
        command = [
            ST, "run", str(ROOT / "docs/openapi.yaml"), "--url", url,
            "--header", f"Authorization: Bearer {token}", "--checks", CHECKS,
            "--max-examples", "25", "--seed", os.environ.get("DELIVERY_SCHEMATHESIS_SEED", "1"),
        ]  # fmt: skip
        result = await deferToThread(
            subprocess.run,
            command,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
            cwd=tmp_path,
        )
    finally:
        process.signalProcess("TERM")
    await stopped_cleanly(child)
    await stop_receiver(receiver)  # no traceback: nothing it sent crashed a handler
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
