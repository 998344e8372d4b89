"""
Several daemons as operators run them (the installed twistd plugin, real processes) on one
database: on PostgreSQL a cluster that survives chaos and hands services over in time;
on SQLite a second daemon refused.

- Chaos (:class:`tests.cluster_chaos.ClusterChaos`, short; ``scripts/chaos --daemons 3``
  is the long one): three daemons, twenty services, the receiver failing at random, ingest
  round-robin through the daemons while random ones are killed, paused past their leases
  and stopped, and started again; nothing acknowledged is lost, order holds per service,
  every duplicate is a resend (same id, same body).
- Failover: once the holder of services stops on SIGTERM, they resume elsewhere within a
  second and a renewal period; once it is SIGKILLed, within ``lease_ttl``, a renewal period
  and a second.

Seeds are printed; ``DELIVERY_CHAOS_SEED=<n>`` replays one (as far as timing allows).
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .chaos import Daemon, parse_args
from .cluster_chaos import LEASE_TTL, ClusterChaos, Member, api
from .crashlog import Receipt, check_new_txn_ids, check_txn_ids, late_resends
from .daemon_harness import write_config, write_registration

RENEW = LEASE_TTL / 3


def seed() -> int:
    value = int(os.environ.get("DELIVERY_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"DELIVERY_CHAOS_SEED={value}")
    return value


@pytest.fixture
def cluster_run() -> Iterator[list[ClusterChaos]]:
    """The runs a test makes, closed (everything killed) after it."""
    runs: list[ClusterChaos] = []
    yield runs
    for run in runs:
        run.close()


def make_run(runs: list[ClusterChaos], folder: Path, *args: str) -> ClusterChaos:
    options = parse_args(["--daemons", "3", "--lease-ttl", str(LEASE_TTL), "-v", *args])
    run = ClusterChaos(options, folder)
    runs.append(run)
    return run


def explain(run: ClusterChaos, problems: Any) -> str:
    logs = "\n".join(f"  {d.log_path}" for d in run.runs)
    return (
        f"seed {run.options.seed}: problems:\n"
        + "\n".join(f"- {p}" for p in list(problems)[:40])
        + f"\ndaemon logs:\n{logs}"
    )


# -- chaos --


def test_three_daemons_on_one_postgres_lose_nothing_under_chaos(
    postgres_url: str, tmp_path: Path, cluster_run: list[ClusterChaos]
) -> None:
    began = time.monotonic()
    run = make_run(
        cluster_run,
        tmp_path,
        *("--services", "20", "--events", "2000", "--kills", "24", "--batch", "20"),
        *("--database", postgres_url, "--seed", str(seed()), "--timeout", "60"),
    )
    verdict = run.run()
    print(verdict.summary, f"({time.monotonic() - began:.1f} s)")
    assert verdict.ok, explain(run, verdict.problems)
    assert verdict.events == 2000
    assert verdict.lost == verdict.reordered == verdict.other_id == 0
    # every kind of disruption happened, and the ingest went through many daemons
    assert verdict.kills, verdict.summary
    assert verdict.pauses, verdict.summary
    assert verdict.stops, verdict.summary
    assert verdict.kills + verdict.pauses + verdict.stops >= 24
    assert len(run.ingester.by_url) >= 3, run.ingester.by_url


# -- failover --


def cluster_view(run: ClusterChaos) -> dict[str, Any]:
    for m in run.running():
        assert m.url is not None
        status, body = api(m.url, "/v1/cluster")
        if status == 200:
            assert isinstance(body, dict)
            return body
    raise AssertionError("no daemon answered GET /v1/cluster")


def settle(run: ClusterChaos, services: int) -> dict[str, Any]:
    """
    Wait until the running daemons share the services (each has an owner among them, none
    holds more than its share) and one of them routes; the cluster's view then.
    """
    view: dict[str, Any] = {}

    def settled() -> bool:
        nonlocal view
        view = cluster_view(run)
        pids = {m.pid for m in run.running()}
        live = {n["node_id"] for n in view["nodes"] if n["alive"] and n["pid"] in pids}
        share = -(-services // len(pids))
        return (
            len(live) == len(pids)
            and view["router"] in live
            and len(view["services"]) == services
            and all(s["owner"] in live for s in view["services"])
            and all(len(n["leases"]) <= share for n in view["nodes"] if n["node_id"] in live)
        )

    run.until(settled, "the services shared among the running daemons")
    return view


def failover(run: ClusterChaos, kind: str) -> tuple[list[str], dict[str, float], dict[str, float]]:
    """
    ``kind`` (``term`` or ``kill``) the daemon that routes, and holds services; then wait
    until each of its services receives a transaction from another daemon. Its services,
    and for each the seconds from the signal to the first transaction request received
    after the daemon was gone, and to the first carrying an event posted after the signal.
    """
    view = settle(run, len(run.specs))
    node = next(n for n in view["nodes"] if n["node_id"] == view["router"])
    victim: Member = next(m for m in run.running() if m.pid == node["pid"])
    assert node["node_id"] == f"{socket.gethostname()}:{victim.pid}"  # host:pid
    services = sorted(s["service_id"] for s in view["services"] if s["owner"] == node["node_id"])
    assert services, view
    assert victim.url is not None
    for service in services:  # a service's status names its owner too
        status, body = api(victim.url, f"/v1/services/{service}")
        assert status == 200, body
        assert body["owner"] == node["node_id"], body
    posted = run.ingester.posted
    signalled = time.monotonic()
    run.disrupt(victim, kind)
    run.until(lambda: victim.state == "down", "the daemon to be gone")
    gone = time.monotonic() - signalled
    run.pump(0.1)  # what it sent before it went has reached the receiver's log
    mark = len(run.log.receipts)
    resumed: dict[str, float] = {}
    fresh: dict[str, float] = {}

    def resumed_all() -> bool:
        now = time.monotonic() - signalled
        for r in run.log.receipts[mark:]:
            if r.service in services:
                resumed.setdefault(r.service, now)
                if any(run.index[e["event_id"]] > posted for e in r.events):
                    fresh.setdefault(r.service, now)
        return len(fresh) == len(services)

    run.pump(3 * LEASE_TTL + 10, resumed_all)
    print(
        f"{kind}: {victim!r} held router and {services}; gone after {gone:.2f} s; "
        f"resumed after {resumed}; new events after {fresh}"
    )
    return services, resumed, fresh


def test_services_fail_over_in_time_after_sigterm_and_sigkill(
    postgres_url: str, tmp_path: Path, cluster_run: list[ClusterChaos]
) -> None:
    services = 6
    run = make_run(
        cluster_run,
        tmp_path,
        *("--services", str(services), "--events", "4000", "--kills", "0"),
        *("--batch", "4", "--pace", "0.05", "--fail-rate", "0"),
        *("--database", postgres_url, "--seed", str(seed())),
    )
    run.restarting = False  # what stops stays stopped
    run.calm = True
    try:
        run.until(run.all_running, "every daemon listening")
        settle(run, services)
        run.ingester.start()
        run.until(
            lambda: all(run.log.received.get(s.id) for s in run.specs),
            "every service receiving",
        )
        # SIGTERM: the leases are given back at once, taken at the others' next tick.
        term_services, term_resumed, term_fresh = failover(run, "term")
        # SIGKILL: the leases expire (lease_ttl after their last renewal), then are taken.
        kill_services, kill_resumed, kill_fresh = failover(run, "kill")
        run.ingester.winding_down.set()
        run.until(run.ingester.done.is_set, "the ingest to wind down")
        run.until(run.delivered, "everything acknowledged delivered")
        run.pump(0.3)
    finally:
        run.ingester.stopping.set()
    run.stop_all()
    run.stop_receiver()
    verdict = run.verdict()
    print(verdict.summary)
    assert verdict.ok, explain(run, verdict.problems)
    term_bound = 1.0 + RENEW
    kill_bound = LEASE_TTL + RENEW + 1.0
    for name, got, wanted, bound in (
        ("SIGTERM", term_resumed, term_services, term_bound),
        ("SIGTERM, new events", term_fresh, term_services, term_bound),
        ("SIGKILL", kill_resumed, kill_services, kill_bound),
        ("SIGKILL, new events", kill_fresh, kill_services, kill_bound),
    ):
        assert sorted(got) == wanted, f"{name}: not every service resumed: {got}"
        late = {s: round(t, 2) for s, t in got.items() if t > bound}
        assert not late, f"{name}: services resumed after more than {bound:g} s: {late}"


# -- the cluster's check of transaction ids, fed made-up receipts --


def _receipts(*txns: int) -> list[Receipt]:
    return [
        Receipt(seq, "s0", str(txn), f"sha-{txn}", f"body-{txn}") for seq, txn in enumerate(txns, 1)
    ]


def test_a_late_resend_of_a_received_txn_is_allowed_in_a_cluster() -> None:
    receipts = _receipts(1, 2, 3, 2, 4, 3, 4)
    assert check_new_txn_ids(receipts) == []
    assert late_resends(receipts) == 2
    assert check_txn_ids(receipts)  # (one daemon alone: the oldest is always resent first)


def test_a_new_txn_id_lower_than_one_received_is_caught_in_a_cluster() -> None:
    assert check_new_txn_ids(_receipts(1, 3, 2)) == [
        "s0: new txn 2 arrived (log line 3) after txn 3"
    ]


# -- SQLite: one daemon at a time --


def test_a_second_daemon_on_one_sqlite_file_is_refused(tmp_path: Path) -> None:
    registration = write_registration(tmp_path, "s0", "http://127.0.0.1:1")
    config = write_config(tmp_path, [registration])
    first = Daemon(0, config, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while first.url() is None:
            assert first.alive(), first.tail()
            assert time.monotonic() < deadline, first.tail()
            time.sleep(0.05)
        second = Daemon(1, config, tmp_path)
        code = second.process.wait(30)
        output = second.log_path.read_text(errors="replace")
        assert code == 1, output
        assert "Traceback" not in output
        assert "Unhandled" not in output
        fatal = [line for line in output.splitlines() if "#critical]" in line]
        assert len(fatal) == 1, output
        database = tmp_path / "delivery.db"
        assert (
            f"delivery could not start: the SQLite database {database} is in use by another"
            f" delivery process (pid {first.process.pid})"
        ) in fatal[0], output
        assert fatal[0].endswith("; stopping"), output
        # the first one goes on as before, and stops cleanly
        assert first.alive()
        status, _ = api(first.url() or "", "/v1/services")
        assert status == 200
        assert first.terminate() in (0, -15), first.tail()
        assert "Server Shut Down." in first.log_path.read_text(errors="replace")
    finally:
        first.kill()
