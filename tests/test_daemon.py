"""
The daemon as an operator runs it: the installed twistd plugin in a real process, SIGTERM,
restarts, SIGHUP; and the ``delivery`` command.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import protocol, task
from twisted.internet.defer import Deferred

from delivery import cli

from .daemon_harness import ADMIN, INGEST, auth, write_config, write_registration
from .harness import event
from .receiver import start_receiver, stop_receiver
from .waiting import Conditions

TWISTD = str(Path(sys.executable).with_name("twistd"))
LISTENING = re.compile(rb"HTTP API listening on 127\.0\.0\.1:(\d+)")


class DaemonProcess(protocol.ProcessProtocol):
    """``twistd -n delivery`` in a child process, watched through its output."""

    def __init__(self) -> None:
        self.output = b""
        self.port: Deferred[int] = Deferred()
        #: how it ended: (exit code, signal); twistd ends itself with the signal it got
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()
        self._conditions = Conditions()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = LISTENING.search(self.output)
        if match and not self.port.called:
            self.port.callback(int(match.group(1)))
        self._conditions.check()

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.port.called:
            self.port.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback((reason.value.exitCode, reason.value.signal))

    def wait_for_output(self, text: bytes) -> Deferred[None]:
        return self._conditions.wait_for(lambda: text in self.output)


async def run_daemon(reactor: Any, folder: Path, config: Path) -> tuple[DaemonProcess, Any, str]:
    child = DaemonProcess()
    # From a folder outside the repository and without PYTHONPATH: the plugin must come
    # from the installation.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = reactor.spawnProcess(
        child,
        TWISTD,
        [TWISTD, "--nodaemon", "--pidfile=", "delivery", "--config", str(config)],
        env=env,
        path=str(folder),
    )
    port = await child.port
    return child, process, f"http://127.0.0.1:{port}"


async def stopped_cleanly(child: DaemonProcess) -> None:
    """The daemon shut down in order on SIGTERM: services stopped, nothing failed."""
    how = await child.ended
    output = child.output.decode(errors="replace")
    assert how in ((None, signal.SIGTERM), (0, None)), output
    assert "Server Shut Down." in output
    assert "Traceback" not in output
    assert "Unhandled" not in output


async def post_events(url: str, events: list[dict[str, Any]]) -> list[int]:
    response = await treq.post(
        url + "/v1/events",
        json={"events": events},
        headers=auth(INGEST),
        persistent=False,
    )
    body = await response.json()
    assert response.code == 200, body
    return list(body["stream_ids"])


async def services(url: str) -> dict[str, Any]:
    response = await treq.get(
        url + "/v1/services",
        headers=auth(ADMIN),
        persistent=False,
    )
    body = await response.json()
    return {s["service_id"]: s for s in body["services"]}


def test_the_plugin_is_installed_and_documents_its_options(tmp_path: Path) -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    listing = subprocess.run(
        [TWISTD, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert re.search(r"^\s+delivery\s+Reliable event delivery", listing.stdout, re.M)
    own = subprocess.run(
        [TWISTD, "delivery", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--config=" in own.stdout


def test_a_broken_config_is_one_clear_line_not_a_traceback(tmp_path: Path) -> None:
    import subprocess

    config = write_config(tmp_path, [], ingest_token="")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "delivery", "--config", str(config)],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "key 'ingest_token': is empty" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest_twisted.ensureDeferred
async def test_the_daemon_delivers_stops_on_sigterm_and_resumes_after_a_restart(
    tmp_path: Path, reactor: Any, receiver: Any
) -> None:
    registration = write_registration(
        tmp_path, "bridge", receiver.url, initial_delay=0.05, max_delay=0.2
    )
    config = write_config(tmp_path, [registration])
    child, process, url = await run_daemon(reactor, tmp_path, config)
    try:
        assert await post_events(url, [event(n) for n in range(3)]) == [1, 2, 3]
        await receiver.wait_for_events(3)
        # the receiver goes away; events keep coming and are kept
        receiver.answer(503)
        await post_events(url, [event(n) for n in range(3, 10)])
        await receiver.wait_for_requests(len(receiver.requests) + 1)
    finally:
        process.signalProcess(signal.SIGTERM)
    await stopped_cleanly(child)

    receiver.answer(200)
    child, process, url = await run_daemon(reactor, tmp_path, config)
    try:
        await receiver.wait_for_events(10)
        assert receiver.event_ids == [f"$e{n}" for n in range(10)]
        accepted = [int(r.txn_id) for r in receiver.accepted]
        assert accepted == sorted(accepted)
        # the last answer reached the receiver; the daemon may still be taking it in
        for _ in range(1000):
            status = (await services(url))["bridge"]
            if status["state"] == "up":
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert (status["state"], status["stored_transactions"]) == ("up", 0)
    finally:
        process.signalProcess(signal.SIGTERM)
    await stopped_cleanly(child)


@pytest_twisted.ensureDeferred
async def test_sighup_adds_changes_and_removes_services_while_events_flow(
    tmp_path: Path, reactor: Any, receiver: Any
) -> None:
    other = await start_receiver(reactor)
    moved = await start_receiver(reactor)
    added = await start_receiver(reactor)
    a = write_registration(tmp_path, "a", receiver.url, users="@a_.*")
    b = write_registration(tmp_path, "b", other.url, users="@b_.*")
    config = write_config(tmp_path, [a, b])
    child, process, url = await run_daemon(reactor, tmp_path, config)
    try:
        await post_events(url, [event(1, sender="@a_1:hs"), event(2, sender="@b_2:hs")])
        await receiver.wait_for_events(1)
        await other.wait_for_events(1)
        # a moves to another url, b is removed, c is added
        write_registration(tmp_path, "a", moved.url, users="@a_.*")
        c = write_registration(tmp_path, "c", added.url, users="@c_.*")
        write_config(tmp_path, [a, c])
        process.signalProcess("HUP")
        await child.wait_for_output(b"1 added, 1 changed, 1 removed")
        await post_events(
            url,
            [event(3, sender="@a_3:hs"), event(4, sender="@b_4:hs"), event(5, sender="@c_5:hs")],
        )
        await moved.wait_for_events(1)
        await added.wait_for_events(1)
        assert moved.event_ids == ["$e3"]
        # ids go on across the change: a's first went to its old url
        (first,) = receiver.requests
        assert [int(r.txn_id) for r in moved.requests] == [int(first.txn_id) + 1]
        assert added.event_ids == ["$e5"]
        assert receiver.event_ids == ["$e1"]
        assert other.event_ids == ["$e2"]  # b, removed, receives nothing more
        states = await services(url)
        assert states["b"]["state"] == "orphaned"
    finally:
        process.signalProcess(signal.SIGTERM)
        for r in (other, moved, added):
            await stop_receiver(r)
    await stopped_cleanly(child)


def test_check_config_accepts_a_good_config(tmp_path: Path, capsys: Any) -> None:
    config = write_config(tmp_path, [write_registration(tmp_path, "a", "http://127.0.0.1:9")])
    assert cli.main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out
    assert "a: http://127.0.0.1:9" in out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"admin_token": ""}, "key 'admin_token': is empty"),
        ({"poll_interval": "fast"}, "key 'poll_interval': must be a positive number"),
        ({"listen": "tcp:nope"}, "key 'listen': is not a Twisted endpoint"),
        ({"colour": "blue"}, "key 'colour': is not a known key"),
        ({"app_service_config_files": ["missing.yaml"]}, "missing.yaml: cannot read it"),
        ({"admin_token": "${NOT_SET_ANYWHERE}"}, "environment variable NOT_SET_ANYWHERE"),
    ],
)
def test_check_config_names_the_problem(
    tmp_path: Path, capsys: Any, change: dict[str, Any], message: str
) -> None:
    config = write_config(tmp_path, [], **change)
    assert cli.main(["check-config", str(config)]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert str(config) in err or "missing.yaml" in err
    assert "Traceback" not in err


def test_check_config_reports_a_broken_registration(tmp_path: Path, capsys: Any) -> None:
    registration = write_registration(tmp_path, "a", "ftp://nowhere")
    config = write_config(tmp_path, [registration])
    assert cli.main(["check-config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{registration}: field 'url'" in err


def test_check_config_refuses_two_registrations_with_one_id(tmp_path: Path, capsys: Any) -> None:
    first = write_registration(tmp_path, "a", "http://127.0.0.1:9")
    second = tmp_path / "copy.yaml"
    second.write_text(first.read_text())
    assert cli.main(["check-config", str(write_config(tmp_path, [first, second]))]) == 1
    assert "both use the id 'a'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("tcp:8008:interface=127.0.0.1", "http://127.0.0.1:8008"),
        ("tcp:9000", "http://127.0.0.1:9000"),
        (r"tcp:9000:interface=\:\:1", "http://[::1]:9000"),
        ("unix:/run/delivery.sock", None),
    ],
)
def test_status_finds_the_daemon_from_its_listen_key(listen: str, url: str | None) -> None:
    assert cli.base_url(listen) == url


@pytest_twisted.ensureDeferred
async def test_delivery_status_reads_the_admin_api(
    tmp_path: Path, reactor: Any, receiver: Any, capsys: Any
) -> None:
    from twisted.internet.threads import deferToThread

    from .daemon_harness import start_daemon

    config = write_config(tmp_path, [write_registration(tmp_path, "bridge", receiver.url)])
    running = await start_daemon(config, reactor)
    try:
        await running.ingest([event(1)])
        await receiver.wait_for_events(1)
        # the command blocks on its request: run it off the reactor thread
        code = await deferToThread(
            cli.main, ["status", "--config", str(config), "--url", running.url]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert re.search(r"^bridge\s+up\s+0\s+\d", out, re.M), out
        assert ADMIN not in out
    finally:
        await running.daemon.stopService()
    code = await deferToThread(cli.main, ["status", "--config", str(config), "--url", running.url])
    assert code == 1
    assert "no daemon answers at" in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_delivery_run_runs_the_daemon(tmp_path: Path, reactor: Any, receiver: Any) -> None:
    config = write_config(tmp_path, [write_registration(tmp_path, "bridge", receiver.url)])
    child = DaemonProcess()
    command = str(Path(sys.executable).with_name("delivery"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = reactor.spawnProcess(
        child, command, [command, "run", "--config", str(config)], env=env, path=str(tmp_path)
    )
    try:
        port = await child.port
        await post_events(f"http://127.0.0.1:{port}", [event(1)])
        await receiver.wait_for_events(1)
    finally:
        process.signalProcess(signal.SIGTERM)
    await stopped_cleanly(child)


@pytest_twisted.ensureDeferred
async def test_the_quick_start_command_runs_the_daemon(
    tmp_path: Path, reactor: Any, receiver: Any
) -> None:
    root = Path(__file__).resolve().parent.parent
    registration = write_registration(tmp_path, "bridge", receiver.url)
    config = write_config(tmp_path, [registration], ingest_token="${DELIVERY_INGEST_TOKEN}")
    child = DaemonProcess()
    env = {**os.environ, "DELIVERY_INGEST_TOKEN": INGEST}
    env.pop("DELIVERY_ADMIN_TOKEN", None)
    script = str(root / "scripts/run")
    process = reactor.spawnProcess(child, script, [script, str(config)], env=env, path=str(root))
    try:
        port = await child.port
        await post_events(f"http://127.0.0.1:{port}", [event(1)])
        await receiver.wait_for_events(1)
        # the given ingest token and a made-up admin token, ready to paste
        export = f"export DELIVERY_INGEST_TOKEN={INGEST} DELIVERY_ADMIN_TOKEN="
        assert export.encode() in child.output
    finally:
        process.signalProcess(signal.SIGTERM)
    await stopped_cleanly(child)


@pytest_twisted.ensureDeferred
async def test_secrets_never_reach_the_log(tmp_path: Path, reactor: Any, receiver: Any) -> None:
    """Everything the daemon logged while things went wrong, grepped for every secret."""
    receiver.answer(401, body=b'{"errcode":"M_FORBIDDEN"}')
    registration = write_registration(
        tmp_path, "bridge", receiver.url, initial_delay=0.05, max_delay=0.1, probe_interval=0.05
    )
    config = write_config(tmp_path, [registration], log={"level": "debug"})
    child, process, url = await run_daemon(reactor, tmp_path, config)
    hs_token = "hs-secret-token"
    as_token = "as-bridge-secret"
    try:
        await post_events(url, [event(1)])
        await receiver.wait_for_requests(2)  # refused, retried
        for token in (None, "wrong", ADMIN):
            headers = auth(token) if token else None
            await treq.post(
                url + "/v1/events", json={"events": [event(2)]}, headers=headers, persistent=False
            )
        # a reload that fails, with the tokens in the broken file
        config.write_text(config.read_text() + f"bogus: {INGEST}\n")
        process.signalProcess("HUP")
        await child.wait_for_output(b"reload on SIGHUP failed")
        receiver.answer(200)
        await receiver.wait_for_events(1)
    finally:
        process.signalProcess(signal.SIGTERM)
    await stopped_cleanly(child)
    log = child.output.decode(errors="replace")
    assert "is DOWN" in log  # the failures were logged...
    for secret in (hs_token, as_token, INGEST, ADMIN):
        assert secret not in log, secret  # ...without a secret


def spawn(reactor: Any, folder: Path, argv: list[str]) -> tuple[DaemonProcess, Any]:
    child = DaemonProcess()
    child.port.addErrback(lambda _: None)  # some never listen
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = reactor.spawnProcess(child, argv[0], argv, env=env, path=str(folder))
    return child, process


@pytest_twisted.ensureDeferred
async def test_a_daemon_that_cannot_listen_exits_non_zero_with_one_line(
    tmp_path: Path, reactor: Any
) -> None:
    from twisted.internet.protocol import Factory

    taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    port = taken.getHost().port
    config = write_config(tmp_path, [], listen=f"tcp:{port}:interface=127.0.0.1")
    try:
        child, _ = spawn(
            reactor, tmp_path, [TWISTD, "--nodaemon", "--pidfile=", "delivery", "-c", str(config)]
        )
        ended = child.ended
        ended.addTimeout(30, reactor)
        how = await ended
    finally:
        await taken.stopListening()
    output = child.output.decode(errors="replace")
    assert how == (1, None), output
    lines = [line for line in output.splitlines() if "cannot listen" in line]
    assert len(lines) == 1, output
    assert f"cannot listen on tcp:{port}:interface=127.0.0.1 (key 'listen' of {config})" in lines[0]
    assert "Address already in use" in lines[0]
    assert "Traceback" not in output


@pytest_twisted.ensureDeferred
async def test_a_second_signal_while_stopping_is_no_traceback(
    tmp_path: Path, reactor: Any, receiver: Any
) -> None:
    # A request is in flight when the signals come: the receiver never answers it.
    receiver.answer(200, hang=True)
    config = write_config(tmp_path, [write_registration(tmp_path, "bridge", receiver.url)])
    child, process, url = await run_daemon(reactor, tmp_path, config)
    await post_events(url, [event(1)])
    await receiver.wait_for_requests(1)
    # Three signals at once: the first one handled stops the daemon, the others say so.
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        process.signalProcess(number)
    await child.wait_for_output(b"while stopping: already stopping")
    receiver.release()
    how = await child.ended
    output = child.output.decode(errors="replace")
    assert how in ((None, signal.SIGTERM), (None, signal.SIGINT), (0, None)), output
    assert output.count(", shutting down.") == 1, output
    assert "Server Shut Down." in output
    assert "Traceback" not in output
    assert "ReactorNotRunning" not in output
    assert "Unhandled" not in output


@pytest.mark.parametrize("command", ["twistd", "delivery run"])
def test_a_config_error_at_run_time_is_one_line_and_exit_1(tmp_path: Path, command: str) -> None:
    import subprocess

    config = write_config(tmp_path, [], poll_interval="fast")
    if command == "twistd":
        argv = [TWISTD, "--nodaemon", "--pidfile=", "delivery", "--config", str(config)]
    else:
        argv = [str(Path(sys.executable).with_name("delivery")), "run", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        argv, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"delivery: invalid configuration {config}: key 'poll_interval': must be a positive"
        " number, not 'fast'\n"
    )
