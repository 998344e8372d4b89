"""
The ``delivery`` command as a new user meets it: the shipped example, the configuration
given either way, usage on a bad command line, and ``status`` against a real daemon, one
that refuses the token and one that is not there.
"""

from __future__ import annotations

import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from delivery import cli

from .daemon_harness import ADMIN, INGEST, start_daemon, write_config, write_registration
from .harness import Recorder, event

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples/delivery.yaml"
TOKENS = ("DELIVERY_INGEST_TOKEN", "DELIVERY_ADMIN_TOKEN")


def _one_line(err: str) -> str:
    assert err.count("\n") == 1, err
    assert err.startswith("delivery: "), err
    assert "Traceback" not in err
    return err


# -- check-config and the shipped example --


def test_the_shipped_example_checks_cleanly_once_its_tokens_are_exported(
    monkeypatch: Any, capsys: Any
) -> None:
    monkeypatch.setenv("DELIVERY_INGEST_TOKEN", "an-ingest-token")
    monkeypatch.setenv("DELIVERY_ADMIN_TOKEN", "an-admin-token")
    assert cli.main(["check-config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert f"{EXAMPLE}: valid; database sqlite:///{ROOT}/examples/delivery.db" in out
    assert "telegram: http://127.0.0.1:29317, 2 namespace(s)" in out
    assert "an-ingest-token" not in out
    assert "an-admin-token" not in out


def test_the_shipped_example_names_every_unset_variable_and_how_to_set_it(
    monkeypatch: Any, capsys: Any
) -> None:
    for name in TOKENS:
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["check-config", str(EXAMPLE)]) == 1
    err = _one_line(capsys.readouterr().err)
    assert f"{EXAMPLE} uses the environment variables" in err
    assert "DELIVERY_INGEST_TOKEN" in err
    assert "DELIVERY_ADMIN_TOKEN" in err
    assert "export DELIVERY_ADMIN_TOKEN=... DELIVERY_INGEST_TOKEN=..." in err


def test_an_unset_variable_points_at_the_tokens_scripts_run_kept(
    tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    shutil.copytree(ROOT / "examples", tmp_path, dirs_exist_ok=True)
    (tmp_path / "delivery.tokens").write_text("export DELIVERY_ADMIN_TOKEN=kept\n")
    monkeypatch.setenv("DELIVERY_ADMIN_TOKEN", "set")
    monkeypatch.delenv("DELIVERY_INGEST_TOKEN", raising=False)
    config = tmp_path / "delivery.yaml"
    assert cli.main(["check-config", str(config)]) == 1
    err = _one_line(capsys.readouterr().err)
    assert "the environment variable DELIVERY_INGEST_TOKEN, which is not set here" in err
    assert f"`. {tmp_path / 'delivery.tokens'}`" in err


@pytest.mark.parametrize(
    "database",
    [
        "postgresql://delivery:pw-in-url@127.0.0.1:5432/delivery",
        "postgresql://delivery@127.0.0.1:5432/delivery?password=pw-in-url",
    ],
)
def test_check_config_never_prints_a_password(tmp_path: Path, capsys: Any, database: str) -> None:
    bridge = write_registration(tmp_path, "bridge", "http://bridge:pw-in-url@127.0.0.1:9")
    config = write_config(tmp_path, [bridge], database=database)
    assert cli.main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "database postgresql://delivery" in out
    assert "bridge: http://bridge:***@127.0.0.1:9" in out
    assert "pw-in-url" not in out


@pytest.mark.parametrize("command", ["check-config", "status", "cluster", "run"])
def test_every_command_takes_the_configuration_either_way(
    tmp_path: Path, monkeypatch: Any, capsys: Any, command: str
) -> None:
    seen: list[str] = []

    def run(path: str) -> int:
        seen.append(path)
        return 0

    monkeypatch.setattr(cli, "_check_config", seen.append)
    monkeypatch.setattr(cli, "_status", lambda path, *_: seen.append(path))
    monkeypatch.setattr(cli, "_cluster", lambda path, *_: seen.append(path))
    monkeypatch.setattr(cli, "_run", run)
    monkeypatch.chdir(tmp_path)
    Path("delivery.yaml").touch()
    for argv in (["a.yaml"], ["--config", "a.yaml"], ["-c", "a.yaml"], ["a.yaml", "-c", "a.yaml"]):
        assert cli.main([command, *argv]) == 0
    assert cli.main([command]) == 0
    assert seen == ["a.yaml"] * 4 + ["delivery.yaml"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
        (["check-config", "a.yaml", "b.yaml"], "unrecognized arguments: b.yaml"),
        (["run", "a.yaml", "--config", "b.yaml"], "two configurations given (a.yaml, b.yaml)"),
        (["status"], "no delivery.yaml in this folder: name the configuration, e.g. --config"),
        (["cluster", "a.yaml", "--limit"], "unrecognized arguments: --limit"),
    ],
)
def test_a_bad_command_line_prints_the_subcommands_usage(
    tmp_path: Path, monkeypatch: Any, capsys: Any, argv: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: delivery {argv[0]} [-h] [--config CONFIG]"), err
    assert f"delivery {argv[0]}: error: {message}" in err


# -- status --


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_status_says_when_no_daemon_answers(tmp_path: Path, capsys: Any) -> None:
    port = _free_port()
    config = write_config(tmp_path, [], listen=f"tcp:{port}:interface=127.0.0.1")
    assert cli.main(["status", str(config)]) == 1
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"delivery: no daemon answers at http://127.0.0.1:{port}: is it running?")


def test_status_needs_only_the_admin_token_from_the_environment(
    tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    config = write_config(
        tmp_path,
        [],
        listen=f"tcp:{_free_port()}:interface=127.0.0.1",
        ingest_token="${CLI_TEST_INGEST}",
        admin_token="${CLI_TEST_ADMIN}",
    )
    monkeypatch.delenv("CLI_TEST_INGEST", raising=False)
    monkeypatch.delenv("CLI_TEST_ADMIN", raising=False)
    assert cli.main(["status", str(config)]) == 1
    err = _one_line(capsys.readouterr().err)
    assert "uses the environment variable CLI_TEST_ADMIN, which is not set here" in err
    assert "CLI_TEST_INGEST" not in err
    monkeypatch.setenv("CLI_TEST_ADMIN", "set")
    assert cli.main(["status", str(config)]) == 1
    assert "no daemon answers" in _one_line(capsys.readouterr().err)


@pytest_twisted.ensureDeferred
async def test_status_shows_failures_next_retry_and_the_last_error(
    tmp_path: Path, reactor: Any, receiver: Any, capsys: Any
) -> None:
    receiver.answer(503, body=b"down for\nmaintenance")
    down = write_registration(
        tmp_path, "bridge", receiver.url, users="@b_.*", initial_delay=60, probe=False
    )
    well = write_registration(tmp_path, "healthy-bridge", None, users="@h_.*")
    config = write_config(tmp_path, [down, well])
    running = await start_daemon(config, reactor)
    recorder = Recorder()
    running.daemon.delivery.observe(recorder)
    try:
        went_down = recorder.wait_for_state("bridge", "down")
        await running.ingest([event(1, sender="@b_1:hs")])
        await went_down
        code = await deferToThread(cli.main, ["status", str(config), "--url", running.url])
        captured = capsys.readouterr()
        assert code == 0, captured.err
    finally:
        await running.daemon.stopService()
    lines = captured.out.splitlines()
    assert re.match(
        r"service +state +queued +stored +oldest +failures +next retry +last error$", lines[0]
    )
    (row,) = [line for line in lines if line.startswith("bridge ")]
    # ±20 % jitter on 60 s: the next attempt is 48 to 72 s away
    match = re.match(
        r"bridge +down +0 +1 +\d+s +1 +in (\d+s|1m\d\ds) \((\d\d:\d\d:\d\d)\) +HTTP 503", row
    )
    assert match, row
    wait = match.group(1)
    seconds = int(wait[:-1]) if wait[1] != "m" else 60 + int(wait[2:4])
    assert 45 <= seconds <= 72, row
    assert row.endswith("HTTP 503: down for maintenance")  # the error, on the row's line
    (healthy,) = [line for line in lines if line.startswith("healthy-bridge ")]
    assert re.match(r"healthy-bridge +up +0 +0 +- +0 +-$", healthy), healthy
    assert ADMIN not in captured.out


@pytest_twisted.ensureDeferred
async def test_status_says_plainly_that_the_admin_token_was_refused(
    tmp_path: Path, reactor: Any, monkeypatch: Any, capsys: Any
) -> None:
    running = await start_daemon(write_config(tmp_path, []), reactor)
    client = tmp_path / "client"
    client.mkdir()
    config = write_config(client, [], admin_token="${CLI_TEST_ADMIN}")
    monkeypatch.setenv("CLI_TEST_ADMIN", "not-the-admin-token")
    try:
        code = await deferToThread(cli.main, ["status", "-c", str(config), "--url", running.url])
        # the ingest token is no admin token either
        (tmp_path / "literal").mkdir()
        literal = write_config(tmp_path / "literal", [], admin_token=INGEST)
        code_literal = await deferToThread(cli.main, ["status", str(literal), "--url", running.url])
    finally:
        await running.daemon.stopService()
    assert (code, code_literal) == (1, 1)
    first, second = capsys.readouterr().err.splitlines()
    assert first == (
        "delivery: the admin token was refused (HTTP 401):"
        f" check CLI_TEST_ADMIN / admin_token in {config}"
    )
    assert second == (
        f"delivery: the admin token was refused (HTTP 401): check admin_token in {literal}"
    )
    for secret in ("not-the-admin-token", INGEST, ADMIN, "b'"):
        assert secret not in first + second


@pytest_twisted.ensureDeferred
async def test_status_against_something_else_is_one_line(
    tmp_path: Path, receiver: Any, capsys: Any
) -> None:
    config = write_config(tmp_path, [])
    code = await deferToThread(cli.main, ["status", str(config), "--url", receiver.url])
    assert code == 1
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"delivery: {receiver.url} answered HTTP 404: "), err
    assert "b'" not in err


# -- the formatting of times --

NOON = time.mktime((2026, 1, 15, 12, 0, 0, 0, 0, -1))


@pytest.mark.parametrize(
    ("when", "shown"),
    [
        (None, "-"),
        (NOON + 12.4, "in 12s (12:00:12)"),
        (NOON + 75, "in 1m15s (12:01:15)"),
        (NOON + 3 * 3600 + 7 * 60, "in 3h07m (15:07:00)"),
        (NOON + 2 * 86400 + 3600, "in 2d01h (2026-01-17 13:00:00)"),
        (NOON - 3, "now (11:59:57)"),
    ],
)
def test_the_next_retry_is_shown_from_now_and_by_the_clock(when: float | None, shown: str) -> None:
    assert cli.next_retry(when, NOON) == shown


# -- cluster, and the owner in status --


def test_check_config_names_the_cluster_node_and_refuses_one_on_sqlite(
    tmp_path: Path, capsys: Any
) -> None:
    database = "postgresql://delivery:pw-in-url@127.0.0.1:5432/delivery"
    config = write_config(
        tmp_path, [], database=database, cluster={"node_id": "node-7", "lease_ttl": 6}
    )
    assert cli.main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "  cluster node node-7, lease_ttl 6 s" in out
    assert "pw-in-url" not in out
    write_config(tmp_path, [], cluster={"node_id": "node-7"})
    assert cli.main(["check-config", str(config)]) == 1
    err = _one_line(capsys.readouterr().err)
    assert f"invalid configuration {config}: key 'cluster': SQLite is single-process" in err
    write_config(tmp_path, [], database=database, cluster={"lease_ttl": 1})
    assert cli.main(["check-config", str(config)]) == 1
    err = _one_line(capsys.readouterr().err)
    assert "key 'cluster.lease_ttl': must be a number of seconds >= 3, not 1" in err
    assert "pw-in-url" not in err


def test_status_shows_an_owner_column_only_when_some_service_has_an_owner() -> None:
    base = {"state": "up", "queued_events": 0, "stored_transactions": 0}
    alone = cli.status_table([{**base, "service_id": "a", "owner": None}], NOON)
    assert alone.splitlines()[0].split()[:3] == ["service", "state", "queued"]
    shared = cli.status_table(
        [
            {**base, "service_id": "a", "owner": "node-1"},
            {**base, "service_id": "b", "owner": None},
        ],
        NOON,
    ).splitlines()
    assert shared[0].split()[:4] == ["service", "state", "owner", "queued"]
    assert re.match(r"a +up +node-1 +0 +0 +- +0 +-$", shared[1]), shared[1]
    assert re.match(r"b +up +- +0 +0 +- +0 +-$", shared[2]), shared[2]


CLUSTER = {
    "node_id": "node-1",
    "lease_ttl": 15,
    "router": "node-1",
    "nodes": [
        {
            "node_id": "node-1",
            "host": "box1",
            "pid": 4242,
            "started": NOON - 3600,
            "heartbeat_age": 1.2,
            "alive": True,
            "leases": ["a", "b"],
            "router": True,
        },
        {
            "node_id": "node-2",
            "host": "box2",
            "pid": 17,
            "started": NOON - 60,
            "heartbeat_age": 75,
            "alive": False,
            "leases": [],
            "router": False,
        },
    ],
    "services": [
        {"service_id": "a", "owner": "node-1", "epoch": 3, "expires_in": 11.6},
        {"service_id": "b", "owner": "node-1", "epoch": 1, "expires_in": 9},
        {"service_id": "c", "owner": None, "epoch": 2, "expires_in": None},
    ],
}


def test_cluster_text_shows_the_nodes_and_who_sends_to_what() -> None:
    lines = cli.cluster_text(CLUSTER).splitlines()
    assert lines[0] == "node node-1 answered; lease_ttl 15s; router: node-1"
    assert lines[1] == ""
    assert re.match(r"node +host +pid +heartbeat +alive +router +services$", lines[2])
    assert re.match(r"node-1 +box1 +4242 +1s ago +yes +yes +2$", lines[3]), lines[3]
    assert re.match(r"node-2 +box2 +17 +1m15s ago +no +no +0$", lines[4]), lines[4]
    assert lines[5] == ""
    assert re.match(r"service +owner +epoch +expires in$", lines[6])
    assert re.match(r"a +node-1 +3 +12s$", lines[7]), lines[7]
    assert re.match(r"b +node-1 +1 +9s$", lines[8]), lines[8]
    assert re.match(r"c +- +2 +-$", lines[9]), lines[9]
    empty = cli.cluster_text({**CLUSTER, "router": None, "services": []})
    assert "router: none (no node holds the router lease)" in empty
    assert empty.endswith("\n(no services)\n")


@pytest_twisted.ensureDeferred
async def test_cluster_on_sqlite_says_there_is_no_cluster(
    tmp_path: Path, reactor: Any, capsys: Any
) -> None:
    config = write_config(tmp_path, [])
    running = await start_daemon(config, reactor)
    try:
        code = await deferToThread(cli.main, ["cluster", str(config), "--url", running.url])
    finally:
        await running.daemon.stopService()
    assert code == 1
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("delivery: this daemon is not part of a cluster: its database is SQLite")
    assert "use PostgreSQL to run several daemons" in err


def test_cluster_says_when_no_daemon_answers(tmp_path: Path, capsys: Any) -> None:
    port = _free_port()
    config = write_config(tmp_path, [], listen=f"tcp:{port}:interface=127.0.0.1")
    assert cli.main(["cluster", "-c", str(config)]) == 1
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"delivery: no daemon answers at http://127.0.0.1:{port}: is it running?")


@pytest_twisted.ensureDeferred
async def test_cluster_and_status_on_postgres_show_the_node_and_its_leases(
    tmp_path: Path, reactor: Any, receiver: Any, postgres_url: str, capsys: Any
) -> None:
    bridge = write_registration(tmp_path, "bridge", receiver.url)
    config = write_config(
        tmp_path, [bridge], database=postgres_url, cluster={"node_id": "node-one"}
    )
    running = await start_daemon(config, reactor)
    try:
        for _ in range(200):  # the lone node takes every lease
            if running.daemon.delivery.leases_held >= {"router", "service:bridge"}:
                break
            await deferToThread(time.sleep, 0.05)
        argv = [str(config), "--url", running.url]
        cluster_code = await deferToThread(cli.main, ["cluster", *argv])
        cluster_out = capsys.readouterr()
        json_code = await deferToThread(cli.main, ["cluster", *argv, "--json"])
        json_out = capsys.readouterr()
        status_code = await deferToThread(cli.main, ["status", *argv])
        status_out = capsys.readouterr()
    finally:
        await running.daemon.stopService()
    assert (cluster_code, json_code, status_code) == (0, 0, 0), (
        cluster_out.err + json_out.err + status_out.err
    )
    lines = cluster_out.out.splitlines()
    assert lines[0] == "node node-one answered; lease_ttl 15s; router: node-one"
    (node,) = [line for line in lines if line.startswith("node-one ")]
    assert re.match(r"node-one +\S+ +\d+ +\d+s ago +yes +yes +1$", node), node
    (lease,) = [line for line in lines if line.startswith("bridge ")]
    assert re.match(r"bridge +node-one +\d+ +\d+s$", lease), lease
    assert '"node_id": "node-one"' in json_out.out
    header, row = status_out.out.splitlines()
    assert header.split()[:3] == ["service", "state", "owner"]
    assert re.match(r"bridge +up +node-one ", row), row
    assert ADMIN not in cluster_out.out + json_out.out + status_out.out
