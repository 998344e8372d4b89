"""
The ``scale-out`` benchmark (``benchmarks.bench_scale``): its CPU accounting from the text
of ``/proc``, when a cluster counts as settled, the failover's arrival from the receiver's
statistics, its measures, the load spread over the services, and real daemons started,
settled and stopped (or failing to start, with the end of their log).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from benchmarks._core import Config, make_events
from benchmarks.bench import PORTS, SCENARIOS, parse_args
from benchmarks.bench_load import encode_bodies, stamp
from benchmarks.bench_scale import (
    CLOCK_TICKS,
    SERVICES,
    CpuUse,
    DaemonProcess,
    Daemons,
    Failover,
    MachineTicks,
    Snapshot,
    Throughput,
    first_arrival_after,
    measures,
    parent_pid,
    process_ticks,
    service_id,
    settled,
    shares,
    spent,
    split,
    users,
    warnings,
    write_config,
)
from delivery import Registration
from delivery.interest import InterestIndex

# -- the scenario and its sizes --


def test_scale_out_is_a_scenario_with_a_port_per_service() -> None:
    assert "scale-out" in SCENARIOS
    assert PORTS["scale-out"] == SERVICES == 100
    assert parse_args(["scale-out", "--quick"]).scenarios == ["scale-out"]


def test_full_size_and_quick() -> None:
    common = {"runs": 1, "postgres": "", "workdir": Path(".")}
    full, quick = Config.sized(False, **common), Config.sized(True, **common)
    assert (full.scale_events, full.failover_kills, full.scale_lease_ttl) == (200_000, 10, 15.0)
    assert (quick.scale_events, quick.failover_kills, quick.scale_lease_ttl) == (6_000, 2, 3.0)
    assert (full.scale_handovers, quick.scale_handovers) == (2, 1)
    assert Config.sized(True, scale_events=900, **common).scale_events == 900


def test_the_events_are_split_evenly_over_the_load_processes() -> None:
    assert split(200_000, 3) == [66_667, 66_667, 66_666]
    assert split(6_000, 2) == [3_000, 3_000]
    assert split(5, 1) == [5]
    assert sum(split(200_001, 3)) == 200_001


# -- CPU accounting --

#: /proc/<pid>/stat of a process whose name holds spaces and parentheses
STAT = (
    "4242 (odd) name (x)) S 4100 4242 4100 34816 4242 4194304 1234 0 5 0 "
    "731 129 3 4 20 0 5 0 98765 123456789 4321 18446744073709551615 1 1 0 0 0 0 0 "
    "16781312 134235650 0 0 0 17 1 0 0 0 0 0\n"
)

#: /proc/stat of a machine of two cores (its first lines)
PROC_STAT = (
    "cpu  24465 3 8133 45754 1425 11 353 950 7 0\n"
    "cpu0 9105 0 3196 27564 151 0 77 466 0 0\n"
    "cpu1 15359 3 4936 18190 1273 11 275 484 7 0\n"
    "intr 1234567 0 9 0\n"
    "ctxt 7654321\n"
)


def test_a_process_cpu_is_utime_and_stime_whatever_its_name() -> None:
    assert process_ticks(STAT) == 731 + 129
    assert parent_pid(STAT) == 4100


def test_this_process_cpu_as_proc_has_it_and_as_os_times_has_it() -> None:
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # some CPU to count
        pass
    times = os.times()
    ticks = process_ticks(Path(f"/proc/{os.getpid()}/stat").read_text())
    assert ticks / CLOCK_TICKS == pytest.approx(times.user + times.system, abs=0.05)
    assert parent_pid(Path("/proc/self/stat").read_text()) == os.getppid()


def test_the_machine_is_busy_but_when_idle_or_waiting_for_io() -> None:
    machine = MachineTicks.parse(PROC_STAT)
    total = 24465 + 3 + 8133 + 45754 + 1425 + 11 + 353 + 950
    assert machine == MachineTicks(busy=total - 45754 - 1425, total=total, steal=950)
    real = MachineTicks.parse(Path("/proc/stat").read_text())
    assert 0 <= real.busy <= real.total
    with pytest.raises(ValueError, match="no line of every core"):
        MachineTicks.parse("intr 1 2 3\n")


def test_cpu_spent_by_processes_that_came_and_went() -> None:
    before = {10: 100, 11: 50, 12: 7}
    # 10 went on, 11 is gone (its share lost), 13 is new, 12 is another process now
    after = {10: 160, 13: 40, 12: 3}
    assert spent(before, after) == pytest.approx((60 + 40 + 3) / CLOCK_TICKS)
    assert spent({}, {}) == 0


def test_where_the_cpu_went_between_two_snapshots() -> None:
    hz = CLOCK_TICKS

    def snapshot(busy: int, total: int, daemons: dict[int, int], pg: dict[int, int]) -> Snapshot:
        return Snapshot(
            MachineTicks(busy, total, 0),
            {"daemons": daemons, "postgres": pg, "receiver": {9: hz}},
            1.0,
        )

    cores = os.cpu_count() or 1
    before = snapshot(0, 0, {1: 0, 2: hz}, {5: 0})
    # 10 s on every core: the daemons 3 and 4 s, PostgreSQL 5 s (a backend new since)
    after = snapshot(15 * hz, 10 * cores * hz, {1: 3 * hz, 2: 5 * hz}, {5: 2 * hz, 6: 3 * hz})
    cpu = CpuUse.between(before, after, [1, 2], events=20_000, load=0.5)
    assert cpu.seconds == pytest.approx(10)
    assert cpu.each_daemon_cpu == pytest.approx((3, 4))
    assert (cpu.daemons_cpu, cpu.postgres_cpu, cpu.receiver_cpu) == pytest.approx((7, 5, 0))
    assert cpu.machine_cpu == pytest.approx(15)
    assert cpu.busy == pytest.approx(15 / (10 * cores))
    assert cpu.rest_cpu == pytest.approx(15 - 7 - 5 - 0.5)
    assert cpu.other_cpu == pytest.approx(2.5)
    assert cpu.per_1k(cpu.daemons_cpu) == pytest.approx(350)  # ms per 1,000 events


def test_a_snapshot_of_this_machine() -> None:
    snap = Snapshot.take([os.getpid()])
    assert set(snap.groups) == {"daemons", "postgres", "receiver"}
    assert list(snap.groups["daemons"]) == [os.getpid()]
    assert snap.groups["receiver"] == {}  # no receiver started by this process


# -- the cluster settled --


def view(
    owners: Sequence[str | None], alive: dict[str, bool], router: str | None
) -> dict[str, Any]:
    """A ``GET /v1/cluster`` answer, as ``delivery.api.cluster_json`` makes it."""
    return {
        "node_id": next(iter(alive)),
        "lease_ttl": 3.0,
        "router": router,
        "nodes": [
            {"node_id": node, "alive": up, "leases": [], "router": node == router}
            for node, up in alive.items()
        ],
        "services": [
            {"service_id": service_id(k), "owner": owner, "epoch": 1, "expires_in": 2.0}
            for k, owner in enumerate(owners)
        ],
    }


THREE = {"vm:1": True, "vm:2": True, "vm:3": True}


def test_settled_when_every_node_holds_its_share() -> None:
    owners: Sequence[str | None] = ["vm:1"] * 34 + ["vm:2"] * 33 + ["vm:3"] * 33
    assert settled(view(owners, THREE, "vm:2"), list(THREE), 100)
    owners = ["vm:1"] * 34 + ["vm:2"] * 34 + ["vm:3"] * 32
    assert settled(view(owners, THREE, "vm:3"), list(THREE), 100)
    assert shares(view(owners, THREE, "vm:3")) == {"vm:1": 34, "vm:2": 34, "vm:3": 32}
    assert settled(view(["vm:1"] * 100, {"vm:1": True}, "vm:1"), ["vm:1"], 100)


@pytest.mark.parametrize(
    ("owners", "alive", "router"),
    [
        # the first to start took everything; the others have not taken their share yet
        (["vm:1"] * 100, THREE, "vm:1"),
        (["vm:1"] * 50 + ["vm:2"] * 50, THREE, "vm:1"),
        (["vm:1"] * 35 + ["vm:2"] * 33 + ["vm:3"] * 32, THREE, "vm:1"),
        # a service nobody holds (its lease expired or given back)
        (["vm:1"] * 34 + ["vm:2"] * 33 + ["vm:3"] * 32 + [None], THREE, "vm:1"),
        # services still held by a node killed (not yet taken over)
        (["vm:1"] * 34 + ["vm:2"] * 33 + ["vm:9"] * 33, {**THREE, "vm:9": False}, "vm:1"),
        # the router gone, or a node whose heartbeat is too old
        (["vm:1"] * 34 + ["vm:2"] * 33 + ["vm:3"] * 33, THREE, None),
        (["vm:1"] * 34 + ["vm:2"] * 33 + ["vm:3"] * 33, THREE, "vm:9"),
        (["vm:1"] * 34 + ["vm:2"] * 33 + ["vm:3"] * 33, {**THREE, "vm:3": False}, "vm:1"),
        # fewer services than registered
        (["vm:1"] * 34 + ["vm:2"] * 33 + ["vm:3"] * 32, THREE, "vm:1"),
    ],
    ids=[
        "one-took-all",
        "two-of-three",
        "over-share",
        "one-free",
        "held-by-the-dead",
        "no-router",
        "router-elsewhere",
        "not-alive",
        "missing",
    ],
)
def test_not_settled(
    owners: Sequence[str | None], alive: dict[str, bool], router: str | None
) -> None:
    assert not settled(view(owners, alive, router), list(THREE), 100)


def test_a_killed_node_still_listed_does_not_keep_it_from_settling() -> None:
    # vm:3 was killed and vm:4 started in its place; vm:3's heartbeat is recent still
    owners: Sequence[str | None] = ["vm:1"] * 34 + ["vm:2"] * 33 + ["vm:4"] * 33
    nodes = {**THREE, "vm:4": True}
    assert settled(view(owners, nodes, "vm:4"), ["vm:1", "vm:2", "vm:4"], 100)
    assert not settled(view(owners, nodes, "vm:4"), [], 100)


# -- the failover's arrival --


def stats_of(transactions: list[tuple[float, list[float]]]) -> dict[str, Any]:
    """What the benchmark receiver reports: each transaction's arrival and size, latencies."""
    return {
        "events": sum(len(made) for _, made in transactions),
        "arrivals": [[arrived, len(made)] for arrived, made in transactions],
        "latencies": [arrived - ts for arrived, made in transactions for ts in made],
    }


def test_the_first_arrival_of_an_event_made_after_the_kill() -> None:
    kill = 1_700_000_100.0
    stats = stats_of(
        [
            (kill - 1.0, [kill - 1.1, kill - 1.05]),  # before the kill
            (kill + 1.2, [kill - 0.3, kill - 0.25]),  # resent by the new owner: made before
            (kill + 1.3, [kill - 0.02, kill + 0.03]),  # the first made after
            (kill + 1.4, [kill + 0.08]),
        ]
    )
    assert first_arrival_after(stats, kill) == pytest.approx(kill + 1.3)
    assert first_arrival_after(stats, kill - 2) == pytest.approx(kill - 1.0)
    assert first_arrival_after(stats, kill + 1) is None
    assert first_arrival_after(stats_of([]), kill) is None


def test_an_event_without_its_time_is_an_error() -> None:
    stats = stats_of([(10.0, [9.0, 9.5])])
    stats["latencies"].pop()
    with pytest.raises(ValueError, match="fewer latencies than events"):
        first_arrival_after(stats, 9.2)


# -- the measures --


def use(daemons: int, events: int, daemons_cpu: float) -> CpuUse:
    return CpuUse(
        daemons=daemons,
        events=events,
        seconds=10.0,
        daemons_cpu=daemons_cpu,
        postgres_cpu=4.0,
        load_cpu=0.5,
        receiver_cpu=1.0,
        bench_cpu=0.1,
        machine_cpu=19.0,
        steal_cpu=0.2,
        cores_cpu=20.0,
    )


def test_the_measures_of_a_run() -> None:
    throughput = [
        Throughput(n, 1000.0 * n, use(n, 10_000, 12.0), 1.0, {}, None, 9.0, 0.0, 0)
        for n in (1, 2, 3)
    ]
    failovers = [
        Failover("SIGKILL", service_id(k), "vm:1", False, seconds, 0.01, 2.0)
        for k, seconds in enumerate([3.0, 1.0, 4.5, 2.0])
    ] + [Failover("SIGTERM", "scale9", "vm:2", True, 1.5, 0.3, 2.0)]
    found = measures(throughput, failovers)
    value = {m.name: m.value for m in found}
    unit = {m.name: m.unit for m in found}
    assert [m.name for m in found][:3] == ["1 daemon", "2 daemons", "3 daemons"]
    assert (value["3 daemons"], unit["3 daemons"]) == (3000.0, "events/s")
    assert value["CPU/1k (2)"] == pytest.approx(1200.0)  # ms per 1,000 events
    assert value["PG CPU/1k (1)"] == pytest.approx(400.0)
    assert value["load CPU/1k (3)"] == pytest.approx(50.0)
    assert value["rest CPU/1k (3)"] == pytest.approx(250.0)
    assert {unit[f"{kind} ({n})"] for kind in ("CPU/1k", "rest CPU/1k") for n in (1, 2, 3)} == {
        "ms/1k events"
    }
    assert value["cores busy (1)"] == pytest.approx(95.0)
    assert unit["cores busy (1)"] == "%"
    assert (value["failover p50"], value["failover max"]) == (2.5, 4.5)
    assert (value["handover (SIGTERM)"], unit["handover (SIGTERM)"]) == (1.5, "s")
    assert len(found) == 3 * 6 + 3


def test_no_failover_measures_without_failovers() -> None:
    throughput = [Throughput(1, 900.0, use(1, 1000, 1.0), 1.0, {}, None, 1.0, 0.0, 0)]
    assert [m.name for m in measures(throughput, [])][-1] == "cores busy (1)"


# -- the load, spread over the services --


def test_every_event_of_the_load_is_wanted_by_exactly_one_service() -> None:
    registrations = [
        Registration.from_dict(
            {
                "id": service_id(k),
                "url": f"http://127.0.0.1:{9000 + k}",
                "as_token": "a",
                "hs_token": "h",
                "sender_localpart": "bot",
                "namespaces": {"users": [{"regex": users(k), "exclusive": True}]},
            }
        )
        for k in range(SERVICES)
    ]
    index = InterestIndex(registrations)
    bodies = encode_bodies("scale0-3-1", 1050, 100, senders=SERVICES)
    events = [e for body in bodies for e in json.loads(stamp(body, 1.5))["events"]]
    assert len(events) == 1050
    wanted: Counter[str] = Counter()
    for event in events:
        (service,) = index.users(event["sender"])
        wanted[service] += 1
    assert set(wanted.values()) == {10, 11}  # 1,050 over 100 services
    # as make_events has them, but for the time stamped when sent
    made = make_events("scale0-3-1", 0, 1050, senders=SERVICES)
    assert [e["sender"] for e in events] == [e["sender"] for e in made]
    assert [e["event_id"] for e in events] == [e["event_id"] for e in made]


def test_the_default_load_is_from_one_user() -> None:
    (body,) = encode_bodies("load", 3, 100)
    events = json.loads(stamp(body, 2.5))["events"]
    assert {e["sender"] for e in events} == {"@bench_user:example.org"}
    assert [e["content"]["ts"] for e in events] == [2.5, 2.5, 2.5]


# -- real daemons --


@pytest_twisted.ensureDeferred
async def test_two_daemons_settle_on_their_share_and_stop(
    reactor: Any, tmp_path: Path, postgres_url: str
) -> None:
    urls = [f"http://127.0.0.1:{10_000 + k}" for k in range(SERVICES)]  # nothing is sent
    config = write_config(tmp_path / "cluster", urls, postgres_url, 3.0)
    daemons = Daemons(reactor, config, 3.0)
    try:
        await daemons.start(2)
        assert await daemons.settle() < daemons.settle_timeout
        cluster = await daemons.view()
        assert shares(cluster) == {d.node_id: 50 for d in daemons.live}
        assert cluster["router"] in {d.node_id for d in daemons.live}
    finally:
        await daemons.stop()
    assert all(not d.child.alive for d in daemons.started)
    assert daemons.warnings() == []


@pytest_twisted.ensureDeferred
async def test_a_daemon_that_cannot_start_says_why(reactor: Any, tmp_path: Path) -> None:
    config = tmp_path / "delivery.yaml"
    config.write_text(json.dumps({"database": "sqlite:///x.db", "no_such_key": 1}))
    daemon = DaemonProcess.start(reactor, config, tmp_path / "daemon-1")
    with pytest.raises(RuntimeError) as info:
        await daemon.ready(reactor, timeout=30)
    message = str(info.value)
    assert "daemon-1" in message
    assert "ended before its API answered" in message
    assert "exit code 1" in message
    assert "no_such_key" in message  # the end of its log


LOG = """\
2026-12-02T18:41:30+0000 [-] Loading /work/main/twisted/plugins/delivery_plugin.py...
2026-12-02T18:41:38+0000 [delivery.api#critical] answering b'GET' b'/health' failed
\tTraceback (most recent call last):
\t  File "/work/main/delivery/api.py", line 300, in render
\tbuiltins.RuntimeError: not open
2026-12-02T18:41:39+0000 [delivery.service#info] started
2026-12-02T18:41:44+0000 [delivery.cluster#warn] cluster: leases not renewed in time; stopped using
2026-12-02T18:41:50+0000 [-] Main loop terminated.
"""


def test_the_warnings_of_a_log_with_their_tracebacks() -> None:
    lines = LOG.splitlines()
    assert warnings(LOG) == [lines[1], lines[2], lines[3], lines[4], lines[6]]
    assert warnings(lines[0] + "\n" + lines[5]) == []
