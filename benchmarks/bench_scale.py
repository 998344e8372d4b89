"""
The ``scale-out`` benchmark (``benchmarks.bench``): 1, 2 and 3 daemons on one PostgreSQL.

100 services, each with a port of the benchmark receiver of its own and a user namespace
of its own (``@bridge{k}_.*:example\\.org``, the users ``make_events(..., senders=100)`` and
``bench_load --senders 100`` send from), so every event is wanted by exactly one service
and the events spread evenly over the 100. For each number of daemons ``n`` (1, 2, 3):

- a scratch PostgreSQL database, one configuration folder (the registrations and a
  ``delivery.yaml`` with ``cluster: {lease_ttl: ...}``, ``log: {level: warn}``), and ``n``
  daemons as processes of their own, the installed twistd plugin (``twistd --nodaemon
  delivery``), each in a folder of its own (its pid file, its log) and on a free port of
  127.0.0.1 (``listen`` reads it from the environment); their node ids are the default,
  ``host:pid``;
- once each answers (``GET /health``), the cluster must settle (``GET /v1/cluster``,
  every 100 ms): every daemon alive, the router and every service held by one of them,
  each holding its share (at most ``ceil(100 / n)``, see :func:`settled`);
- then one load process (:mod:`benchmarks.bench_load`, 4 requests in flight) per daemon,
  each offering ``scale_events / n`` events to its own daemon, all beginning at the same
  moment (``--start-at``, once each has encoded its bodies): events/s end to end, from
  that moment to the last arrival at the receiver;
- over the same interval, CPU: the daemons' (``utime + stime`` of ``/proc/<pid>/stat``),
  PostgreSQL's (every process whose ``/proc/<pid>/comm`` starts with ``postgres``; one that
  exits meanwhile takes its share with it, one that starts is counted from zero), the load
  processes' (each reports its own: ``--cpu``), the receiver's and this process's, each
  in CPU milliseconds per 1,000 events; and how busy the machine's cores were
  (``/proc/stat``: all but idle and iowait, steal included, as a share of every core's
  time). The daemons,
  PostgreSQL, the loads and the receiver share the same cores: when ``cores busy`` is near
  100 % the cores are the limit, not the design, and a daemon more only divides them.

After the throughput of 3 daemons, on the same database: ``failover_kills`` times, one
service (another each time) is given a trickle of events (2 every 50 ms, posted to a daemon
that does not send to it), its owner (``/v1/cluster``) is SIGKILLed, and the time from
the kill to the first arrival of an event submitted after the owner was gone (so sent by
its new owner) is noted; the killed daemon is started again (a new process: a new node id)
and the cluster must settle again before the next kill. The same for ``scale_handovers``
clean stops (SIGTERM; the time counts from the signal, the events from the owner's exit).

What to expect of the failover: on another host, a dead node's leases are taken once they
expire, ``lease_ttl`` after their last renewal, at the next renewal of a survivor (every
``lease_ttl / 3``): between ``lease_ttl`` and about ``4/3 lease_ttl``. All these daemons
run on one host, where a survivor sees that the holder's process is gone (its pid no
longer exists) and takes its leases at once at its next renewal: between 0 and about
``lease_ttl / 3``, plus the resend. A clean stop gives the leases back and tells the
others, which take them at once. ``--quick`` uses ``lease_ttl`` 3 s (the least allowed),
full size 15 s (the default).

Measures: ``1 daemon``, ``2 daemons``, ``3 daemons`` (events/s); ``CPU/1k (n)`` (the
daemons'), ``PG CPU/1k (n)``, ``load CPU/1k (n)`` (CPU ms per 1,000 events);
``cores busy (n)`` (%); ``failover p50``, ``failover max`` and ``handover (SIGTERM)`` (the
median; s). The series (``series.scale-out`` of the JSON) has the arrivals of 3 daemons,
the whole CPU account of each ``n`` (each daemon's share too), every failover, how long
each settling took and the warnings and errors of the daemons' logs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import attrs
import treq
from twisted.internet import defer, protocol, task
from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.error import ProcessTerminated
from twisted.python.failure import Failure

from ._core import (
    BATCH,
    INGEST_TOKEN,
    ROOT,
    Config,
    Measure,
    Receiver,
    Run,
    Series,
    make_events,
    registration_dict,
    scratch_postgres,
)

#: services, and the numbers of daemons run
SERVICES = 100
DAEMONS = (1, 2, 3)
ADMIN_TOKEN = "bench-admin-token"
#: the twistd of this virtualenv (the installed plugin)
TWISTD = str(Path(sys.executable).with_name("twistd"))
#: the environment variable the configuration's ``listen`` takes the port from
PORT_VARIABLE = "DELIVERY_BENCH_PORT"
#: seconds a daemon may take to answer after its start, and to stop after SIGTERM
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
#: seconds between two looks at a daemon's API while waiting for it
POLL = 0.1
#: the trickle of a failover: events per request, seconds between requests
TRICKLE_BATCH = 2
TRICKLE_EVERY = 0.05
#: clock ticks a second, the unit of ``/proc``'s CPU times
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: lines of a daemon's log kept for the report (warnings and errors), at most
LOG_LINES = 200


def lead(events: int) -> float:
    """Seconds between starting the load processes and their beginning together."""
    return 2.0 + events / 100_000


def service_id(k: int) -> str:
    return f"scale{k}"


def users(k: int) -> str:
    """The namespace of service ``k``: the users ``@bridge{k}_...`` (see ``make_events``)."""
    return rf"@bridge{k}_.*:example\.org"


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` as even as can be (the first ones one more)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# -- CPU accounting --


def process_ticks(stat: str) -> int:
    """``utime + stime`` (clock ticks) of a process, from the text of ``/proc/<pid>/stat``."""
    # the name, in parentheses, may hold spaces and parentheses: the fields follow the last
    fields = stat[stat.rindex(")") + 1 :].split()
    # fields[0] is the state, field 3 of proc(5); utime and stime are fields 14 and 15
    return int(fields[11]) + int(fields[12])


def parent_pid(stat: str) -> int:
    return int(stat[stat.rindex(")") + 1 :].split()[1])


@attrs.frozen
class MachineTicks:
    """Every core's clock ticks so far (``/proc/stat``): busy, all, and stolen of those busy."""

    busy: int
    total: int
    steal: int

    @classmethod
    def parse(cls, stat: str) -> MachineTicks:
        """From the text of ``/proc/stat``: busy is all but idle and iowait (steal included)."""
        for line in stat.splitlines():
            if line.startswith("cpu "):
                # user nice system idle iowait irq softirq steal (guest is counted in user)
                values = [int(v) for v in line.split()[1:9]]
                total = sum(values)
                return cls(total - values[3] - values[4], total, values[7])
        raise ValueError("no line of every core (cpu) in /proc/stat")


def read_stat(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None  # gone, or not ours to read


def ticks_of(pids: Iterable[int]) -> dict[int, int]:
    """The CPU ticks of each process of ``pids`` that can be read."""
    found = {}
    for pid in pids:
        stat = read_stat(pid)
        if stat is not None:
            found[pid] = process_ticks(stat)
    return found


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def postgres_pids() -> list[int]:
    """The processes of the PostgreSQL server (their ``comm`` starts with ``postgres``)."""
    found = []
    for pid in all_pids():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("postgres"):
            found.append(pid)
    return found


def children_running(module: str) -> list[int]:
    """This process's children that run ``module`` (``-m module``)."""
    found = []
    for pid in all_pids():
        stat = read_stat(pid)
        if stat is None or parent_pid(stat) != os.getpid():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if module.encode() in argv:
            found.append(pid)
    return found


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system


@attrs.frozen
class Snapshot:
    """The CPU spent so far: the machine's, each process's of each group, this process's."""

    machine: MachineTicks
    groups: dict[str, dict[int, int]]
    own: float

    @classmethod
    def take(cls, daemons: Iterable[int]) -> Snapshot:
        return cls(
            MachineTicks.parse(Path("/proc/stat").read_text()),
            {
                "daemons": ticks_of(daemons),
                "postgres": ticks_of(postgres_pids()),
                "receiver": ticks_of(children_running("benchmarks.bench_receiver")),
            },
            own_cpu(),
        )


def spent(before: Mapping[int, int], after: Mapping[int, int]) -> float:
    """
    CPU seconds the processes of ``after`` spent since ``before``: one new since counts
    from zero (as does a pid used again by another process), one gone is not counted.
    """
    ticks = 0
    for pid, now in after.items():
        then = before.get(pid, 0)
        ticks += now - then if now >= then else now
    return ticks / CLOCK_TICKS


@attrs.frozen
class CpuUse:
    """Where the CPU went while ``events`` went through ``daemons`` daemons (seconds)."""

    daemons: int
    events: int
    #: wall-clock seconds of the interval
    seconds: float
    daemons_cpu: float
    postgres_cpu: float
    load_cpu: float
    receiver_cpu: float
    bench_cpu: float
    #: every core's busy seconds, those stolen by the hypervisor included
    machine_cpu: float
    steal_cpu: float
    #: cores' time in all (cores x seconds)
    cores_cpu: float
    #: each daemon's own, in the order they were started
    each_daemon_cpu: tuple[float, ...] = ()

    @classmethod
    def between(
        cls, before: Snapshot, after: Snapshot, daemons: Sequence[int], events: int, load: float
    ) -> CpuUse:
        """From two snapshots; ``daemons``' pids and the load processes' own report."""
        machine = after.machine
        first = before.machine
        seconds = (machine.total - first.total) / CLOCK_TICKS / (os.cpu_count() or 1)
        groups = {name: spent(before.groups[name], after.groups[name]) for name in after.groups}
        each = tuple(
            spent(
                {p: t for p, t in before.groups["daemons"].items() if p == pid},
                {p: t for p, t in after.groups["daemons"].items() if p == pid},
            )
            for pid in daemons
        )
        return cls(
            daemons=len(daemons),
            events=events,
            seconds=seconds,
            daemons_cpu=groups["daemons"],
            postgres_cpu=groups["postgres"],
            load_cpu=load,
            receiver_cpu=groups["receiver"],
            bench_cpu=after.own - before.own,
            machine_cpu=(machine.busy - first.busy) / CLOCK_TICKS,
            steal_cpu=(machine.steal - first.steal) / CLOCK_TICKS,
            cores_cpu=(machine.total - first.total) / CLOCK_TICKS,
            each_daemon_cpu=each,
        )

    def per_1k(self, seconds: float) -> float:
        """CPU seconds in milliseconds per 1,000 events (microseconds per event)."""
        return 1_000_000 * seconds / self.events

    #: the share of all the cores' time that was busy
    busy: float = attrs.field(init=False)
    #: the cores' busy seconds of neither the daemons, PostgreSQL nor the load: the
    #: receiver, this process, the hypervisor's steal and whatever else ran meanwhile
    rest_cpu: float = attrs.field(init=False)
    #: the cores' busy seconds of none of the processes counted (steal included)
    other_cpu: float = attrs.field(init=False)

    @busy.default
    def _busy(self) -> float:
        return self.machine_cpu / self.cores_cpu if self.cores_cpu else 0.0

    @rest_cpu.default
    def _rest(self) -> float:
        return self.machine_cpu - self.daemons_cpu - self.postgres_cpu - self.load_cpu

    @other_cpu.default
    def _other(self) -> float:
        return self.rest_cpu - self.receiver_cpu - self.bench_cpu


# -- the cluster --


def settled(view: Mapping[str, Any], expected: Collection[str], services: int) -> bool:
    """
    Whether the cluster as ``GET /v1/cluster`` shows it (``view``) has settled on the nodes
    ``expected``: each of them alive, the router one of them, each of the ``services``
    services held by one of them, and each holding its share: at most
    ``ceil(services / nodes)``, and so at least what the others leave.
    """
    if not expected:
        return False
    alive = {n["node_id"] for n in view["nodes"] if n["alive"]}
    if not set(expected) <= alive or view["router"] not in expected:
        return False
    owners = Counter(s["owner"] for s in view["services"])
    if len(view["services"]) != services or sum(owners[n] for n in expected) != services:
        return False
    share = math.ceil(services / len(expected))
    least = services - share * (len(expected) - 1)
    return all(least <= owners[n] <= share for n in expected)


def shares(view: Mapping[str, Any]) -> dict[str, int]:
    """How many services each node holds (None: held by none)."""
    return dict(Counter(str(s["owner"]) for s in view["services"]))


def owner_of(view: Mapping[str, Any], service: str) -> str:
    for s in view["services"]:
        if s["service_id"] == service and s["owner"] is not None:
            return str(s["owner"])
    raise RuntimeError(f"no node holds {service}: {shares(view)}")


def first_arrival_after(stats: Mapping[str, Any], since: float) -> float | None:
    """
    When the first event made after ``since`` arrived, from the receiver's statistics:
    each transaction's arrival time and size (``arrivals``) and, in the same order, each
    event's latency (its arrival less its ``content.ts``, when it was made; every event
    here has one), so every event's ``ts`` is known again.
    """
    latencies = iter(stats["latencies"])
    for arrived, count in stats["arrivals"]:
        made = [arrived - latency for latency in islice(latencies, count)]
        if len(made) != count:
            raise ValueError("fewer latencies than events: an event without content.ts")
        if any(ts > since for ts in made):
            return float(arrived)
    return None


def free_port() -> int:
    """A port of 127.0.0.1 free now (the daemon binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Child(protocol.ProcessProtocol):
    """
    A process of ours: its output into a file (``log``) or kept (``out``, ``err``); when it
    ended and how.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid = 0
        self.out = b""
        self.err = b""
        self.log: Path | None = None
        self.ended_at: float | None = None
        self.code: int | None = None
        self.signal: int | None = None
        self._waiting: list[Deferred[None]] = []

    @classmethod
    def spawn(
        cls,
        reactor: Any,
        name: str,
        argv: Sequence[str],
        cwd: Path,
        env: Mapping[str, str],
        log: Path | None = None,
    ) -> Child:
        child = cls(name)
        if log is None:
            transport = reactor.spawnProcess(child, argv[0], list(argv), dict(env), str(cwd))
        else:
            child.log = log
            with log.open("wb") as out, open(os.devnull, "rb") as nothing:
                # the child's standard input from /dev/null, its output into the log
                fds: dict[int, int | str] = {0: nothing.fileno(), 1: out.fileno(), 2: out.fileno()}
                transport = reactor.spawnProcess(
                    child, argv[0], list(argv), dict(env), str(cwd), childFDs=fds
                )
        child.pid = int(transport.pid)
        return child

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended_at = time.time()
        if isinstance(reason.value, ProcessTerminated):
            self.code, self.signal = reason.value.exitCode, reason.value.signal
        else:
            self.code = 0
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    @property
    def alive(self) -> bool:
        return self.ended_at is None

    def ended(self) -> Deferred[None]:
        """Fires once the process has ended (and been reaped)."""
        if not self.alive:
            return defer.succeed(None)
        waiting: Deferred[None] = Deferred()
        self._waiting.append(waiting)
        return waiting

    def kill(self, number: int) -> None:
        """Send the signal ``number``, if the process still runs."""
        if self.alive:
            os.kill(self.pid, number)

    async def stop(self, reactor: Any, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, and SIGKILL if it has not ended ``timeout`` seconds later."""
        if not self.alive:
            return
        self.kill(signal.SIGTERM)
        try:
            await self.ended().addTimeout(timeout, reactor)
        except defer.TimeoutError:
            self.kill(signal.SIGKILL)
            await self.ended()

    @property
    def exit(self) -> str:
        if self.alive:
            return "running"
        return f"signal {self.signal}" if self.signal is not None else f"exit code {self.code}"

    def tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log is not None else ""
        text += self.err.decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


async def gather(waiting: Sequence[Deferred[Any]]) -> list[Any]:
    """Every result, or the first failure itself (not a FirstError)."""
    try:
        return list(await gatherResults(list(waiting), consumeErrors=True))
    except FirstError as e:
        e.subFailure.raiseException()
        raise  # (raiseException raises)


def bearer(token: str) -> dict[bytes | str, bytes | str]:
    return {"Authorization": f"Bearer {token}"}


class DaemonProcess:
    """One daemon: ``twistd --nodaemon delivery``, in a folder of its own, on a port of its own."""

    def __init__(self, child: Child, folder: Path, port: int) -> None:
        self.child = child
        self.folder = folder
        self.url = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls, reactor: Any, config: Path, folder: Path) -> DaemonProcess:
        folder.mkdir(parents=True)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env[PORT_VARIABLE] = str(port)
        argv = [TWISTD, "--nodaemon", f"--pidfile={folder / 'twistd.pid'}"]
        argv += ["delivery", "--config", str(config)]
        child = Child.spawn(reactor, folder.name, argv, folder, env, log=folder / "daemon.log")
        return cls(child, folder, port)

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def node_id(self) -> str:
        """Its node id: the default, ``host:pid``."""
        return f"{socket.gethostname()}:{self.pid}"

    def problem(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"the daemon {self.folder.name} (pid {self.pid}, {self.child.exit}) {what}; the end"
            f" of its log ({self.folder / 'daemon.log'}):\n{self.child.tail()}"
        )

    async def ready(self, reactor: Any, timeout: float = START_TIMEOUT) -> None:
        """Once its API answers ``GET /health`` with 200; a clear error if it ends first."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.child.alive:
                raise self.problem("ended before its API answered")
            try:
                response = await treq.get(f"{self.url}/health", timeout=5, persistent=False)
                await response.content()
                if response.code == 200:
                    return
            except Exception:  # not listening yet, or busy starting: ask again
                pass
            if time.monotonic() >= deadline:
                raise self.problem(f"did not answer GET /health within {timeout:g} s")
            await task.deferLater(reactor, POLL)

    async def get(self, path: str) -> Any:
        """``GET path`` with the admin token; its JSON."""
        response = await treq.get(
            f"{self.url}{path}", headers=bearer(ADMIN_TOKEN), timeout=10, persistent=False
        )
        body = await response.content()
        if response.code != 200:
            raise self.problem(f"answered GET {path} with {response.code}: {body[:200]!r}")
        return json.loads(body)

    def warnings(self) -> list[str]:
        """The lines of its log that warn or tell of an error, with their tracebacks."""
        try:
            text = self.folder.joinpath("daemon.log").read_text(errors="replace")
        except OSError:
            return []
        return [f"{self.folder.parent.name}/{self.folder.name}: {line}" for line in warnings(text)]


def warnings(log: str) -> list[str]:
    """The lines of a daemon's log at ``warn`` or above, each with what follows indented."""
    marks = ("#warn]", "#error]", "#critical]")
    found: list[str] = []
    keeping = False
    for line in log.splitlines():
        keeping = any(m in line for m in marks) or (keeping and line[:1] in ("\t", " "))
        if keeping:
            found.append(line)
    return found


class Daemons:
    """The daemons of one configuration, on one database: started, replaced, stopped."""

    def __init__(self, reactor: Any, config: Path, lease_ttl: float) -> None:
        self._reactor = reactor
        self._config = config
        self.lease_ttl = lease_ttl
        #: those running, in the order they were started
        self.live: list[DaemonProcess] = []
        #: every one started
        self.started: list[DaemonProcess] = []

    def _start(self) -> DaemonProcess:
        folder = self._config.parent / f"daemon-{len(self.started) + 1}"
        daemon = DaemonProcess.start(self._reactor, self._config, folder)
        self.live.append(daemon)
        self.started.append(daemon)
        return daemon

    async def start(self, count: int) -> None:
        """``count`` daemons, started at once; done once each answers."""
        new = [self._start() for _ in range(count)]
        await gather([Deferred.fromCoroutine(d.ready(self._reactor)) for d in new])

    def check(self) -> None:
        for daemon in self.live:
            if not daemon.child.alive:
                raise daemon.problem("ended by itself")

    async def view(self) -> Any:
        """``GET /v1/cluster`` of the first daemon running."""
        self.check()
        return await self.live[0].get("/v1/cluster")

    @property
    def settle_timeout(self) -> float:
        return 4 * self.lease_ttl + 30

    async def settle(self) -> float:
        """Seconds until the cluster has settled on the daemons running (see :func:`settled`)."""
        began = time.monotonic()
        expected = [d.node_id for d in self.live]
        while True:
            view = await self.view()
            if settled(view, expected, SERVICES):
                return time.monotonic() - began
            if time.monotonic() - began > self.settle_timeout:
                raise RuntimeError(
                    f"the cluster did not settle on {expected} within {self.settle_timeout:g} s:"
                    f" services held {shares(view)}, router {view['router']}, nodes "
                    + ", ".join(f"{n['node_id']} alive={n['alive']}" for n in view["nodes"])
                )
            await task.deferLater(self._reactor, POLL)

    def by_node(self, node_id: str) -> DaemonProcess:
        for daemon in self.live:
            if daemon.node_id == node_id:
                return daemon
        raise RuntimeError(f"{node_id} is none of the daemons running")

    async def replace(self, gone: DaemonProcess) -> None:
        """Start another in the place of ``gone`` (ended); done once it answers."""
        self.live.remove(gone)
        await self._start().ready(self._reactor)

    async def stop(self) -> None:
        """SIGTERM to every one (SIGKILL to those that do not stop in time)."""
        await gather([Deferred.fromCoroutine(d.child.stop(self._reactor)) for d in self.started])

    def warnings(self) -> list[str]:
        return [line for d in self.started for line in d.warnings()]


def write_config(folder: Path, urls: Sequence[str], database: str, lease_ttl: float) -> Path:
    """The registrations (one per receiver port) and a ``delivery.yaml`` using them."""
    folder.mkdir(parents=True)
    names = []
    for k, url in enumerate(urls):
        data = registration_dict(url, service_id(k), users=users(k))
        name = f"{service_id(k)}.yaml"
        (folder / name).write_text(json.dumps(data))  # (JSON is YAML)
        names.append(name)
    config = {
        "database": database,
        "listen": f"tcp:${{{PORT_VARIABLE}}}:interface=127.0.0.1",
        "ingest_token": INGEST_TOKEN,
        "admin_token": ADMIN_TOKEN,
        "app_service_config_files": names,
        "log": {"level": "warn"},
        "cluster": {"lease_ttl": lease_ttl},
        # a request must end within two thirds of lease_ttl (10 s, the default, at 15 s)
        "defaults": {"request_timeout": min(10.0, 2 * lease_ttl / 3)},
    }
    path = folder / "delivery.yaml"
    path.write_text(json.dumps(config))
    return path


# -- the load --


def start_load(reactor: Any, url: str, events: int, prefix: str, start_at: float) -> Child:
    """A :mod:`benchmarks.bench_load` process, beginning at ``start_at``."""
    argv = [sys.executable, "-m", "benchmarks.bench_load"]
    argv += ["--url", url, "--token", INGEST_TOKEN, "--events", str(events)]
    argv += ["--batch", str(BATCH), "--prefix", prefix, "--senders", str(SERVICES)]
    argv += ["--start-at", repr(start_at), "--cpu"]
    return Child.spawn(reactor, argv[0], argv, ROOT, os.environ)


async def load_report(load: Child) -> dict[str, Any]:
    """What a load process reports when it ends; a clear error if it failed."""
    await load.ended()
    if load.code != 0 or load.signal is not None:
        err = load.err.decode(errors="replace").strip()
        raise RuntimeError(f"a load process failed ({load.exit}): {err}")
    report: dict[str, Any] = json.loads(load.out.decode().strip().splitlines()[-1])
    return report


async def arrived(reactor: Any, receiver: Receiver, count: int, timeout: float) -> dict[str, Any]:
    """The receiver's statistics once ``count`` events have arrived; an error after ``timeout``."""
    waiting = Deferred.fromCoroutine(receiver.wait_for(count))
    try:
        return await waiting.addTimeout(timeout, reactor)
    except defer.TimeoutError:
        stats = await receiver.stats()
        raise RuntimeError(
            f"{stats['events']} of {count} events arrived within {timeout:g} s"
        ) from None


@attrs.frozen
class Throughput:
    """What one number of daemons did."""

    daemons: int
    rate: float
    cpu: CpuUse
    #: seconds the cluster took to settle after its daemons answered
    settle_seconds: float
    #: services held by each node, and which one routed
    shares: dict[str, int]
    router: str | None
    #: seconds from the beginning to the last load's last answer (every event accepted)
    accepted_seconds: float
    #: the latest load process began this long after the agreed moment (s)
    late: float
    retries: int
    #: when the load began (``time.time()``, to read the daemons' logs by)
    began: float = 0.0


async def offer(
    reactor: Any, config: Config, receiver: Receiver, daemons: Daemons, run: int
) -> tuple[Throughput, dict[str, Any], float]:
    """
    ``scale_events`` offered, a load process per daemon, end to end; the figures, the
    receiver's statistics and the moment the load began.
    """
    n = len(daemons.live)
    total = config.scale_events
    await receiver.reset()
    settle = await daemons.settle()
    view = await daemons.view()
    start_at = time.time() + lead(total)
    loads: list[Child] = []
    try:
        for j, (daemon, events) in enumerate(zip(daemons.live, split(total, n), strict=True)):
            loads.append(start_load(reactor, daemon.url, events, f"scale{run}-{n}-{j}", start_at))
        await task.deferLater(reactor, max(0.0, start_at - time.time()))
        pids = [d.pid for d in daemons.live]
        before = Snapshot.take(pids)
        reports = await gather([Deferred.fromCoroutine(load_report(load)) for load in loads])
        stats = await arrived(reactor, receiver, total, 120 + total / 100)
        after = Snapshot.take(pids)
    finally:
        await gather([Deferred.fromCoroutine(load.stop(reactor)) for load in loads])
    daemons.check()
    start = min(r["started"] for r in reports)
    cpu = CpuUse.between(before, after, pids, total, sum(r["cpu"] for r in reports))
    figures = Throughput(
        daemons=n,
        rate=total / (stats["last_arrival"] - start),
        cpu=cpu,
        settle_seconds=settle,
        shares=shares(view),
        router=view["router"],
        accepted_seconds=max(r["finished"] for r in reports) - start,
        late=max(r["started"] for r in reports) - start_at,
        retries=sum(r["retries"] for r in reports),
        began=start,
    )
    return figures, stats, start


# -- failover --


class Trickle:
    """``TRICKLE_BATCH`` events for one service every ``TRICKLE_EVERY`` s, posted to ``url``."""

    def __init__(self, reactor: Any, url: str, k: int, prefix: str) -> None:
        self._url = f"{url}/v1/events"
        self._k = k
        self._prefix = prefix
        self._loop = task.LoopingCall(self._post)
        self._loop.clock = reactor
        self._running: Deferred[Any] | None = None
        self.sent = 0
        self.refused = 0

    def start(self) -> None:
        self._running = self._loop.start(TRICKLE_EVERY, now=True)

    def _post(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._send())

    async def _send(self) -> None:
        # every event from a user of service k: the numbers k, k + 100, k + 200, ...
        events = [
            make_events(self._prefix, self._k + SERVICES * (self.sent + m), 1, senders=SERVICES)[0]
            for m in range(TRICKLE_BATCH)
        ]
        response = await treq.post(
            self._url,
            json={"events": events},
            headers=bearer(INGEST_TOKEN),
            timeout=10,
            persistent=False,  # (a connection kept idle may be closed by the daemon meanwhile)
        )
        body = await response.content()
        if response.code == 200:
            self.sent += TRICKLE_BATCH
        elif response.code in (429, 503):
            self.refused += 1
        else:
            raise RuntimeError(f"POST {self._url} answered {response.code}: {body[:200]!r}")

    async def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._running is not None:
            await self._running


async def arrival_after(reactor: Any, receiver: Receiver, since: float, timeout: float) -> float:
    """When the first event made after ``since`` arrived (waiting for it at most ``timeout``)."""
    deadline = time.time() + timeout
    seen = 0
    while True:
        try:
            stats = await arrived(reactor, receiver, seen + 1, max(0.0, deadline - time.time()))
        except RuntimeError:
            raise RuntimeError(
                f"no event made after the owner was gone arrived within {timeout:g} s"
            ) from None
        when = first_arrival_after(stats, since)
        if when is not None:
            return when
        seen = stats["events"]


@attrs.frozen
class Failover:
    """One owner stopped: how long its service went without deliveries."""

    signal: str
    service: str
    owner: str
    #: the owner routed the events too
    router: bool
    #: from the signal to the first arrival of an event made after the owner had ended
    seconds: float
    #: from the signal to the owner's end
    ended: float
    #: from starting its successor to the cluster settled again
    settle_seconds: float
    #: when the signal was sent (``time.time()``, to read the daemons' logs by)
    at: float = 0.0


async def fail_over(
    reactor: Any, daemons: Daemons, receiver: Receiver, k: int, number: int, prefix: str
) -> Failover:
    """Stop the owner of service ``k`` with signal ``number`` while it gets a trickle."""
    service = service_id(k)
    view = await daemons.view()
    owner = daemons.by_node(owner_of(view, service))
    target = next(d for d in daemons.live if d is not owner)
    timeout = 4 * daemons.lease_ttl + 30
    await receiver.reset()
    trickle = Trickle(reactor, target.url, k, prefix)
    trickle.start()
    try:
        await arrival_after(reactor, receiver, time.time(), timeout)  # it flows
        signalled = time.time()
        owner.child.kill(number)
        try:
            await owner.child.ended().addTimeout(STOP_TIMEOUT, reactor)
        except defer.TimeoutError:
            raise owner.problem(
                f"did not end within {STOP_TIMEOUT:g} s of signal {number}"
            ) from None
        assert owner.child.ended_at is not None
        resumed = await arrival_after(reactor, receiver, owner.child.ended_at, timeout)
    finally:
        await trickle.stop()
    began = time.monotonic()
    await daemons.replace(owner)
    await daemons.settle()
    return Failover(
        signal=signal.Signals(number).name,
        service=service,
        owner=owner.node_id,
        router=view["router"] == owner.node_id,
        seconds=resumed - signalled,
        ended=owner.child.ended_at - signalled,
        settle_seconds=time.monotonic() - began,
        at=signalled,
    )


# -- the scenario --


@attrs.define
class ScaleSeries(Series):
    """The arrivals of 3 daemons' run, and everything else the run saw."""

    throughput: list[Throughput] = attrs.Factory(list)
    failovers: list[Failover] = attrs.Factory(list)
    #: the warnings and errors of the daemons' logs (the first LOG_LINES)
    log: list[str] = attrs.Factory(list)


def daemons_label(n: int) -> str:
    return f"{n} daemon{'' if n == 1 else 's'}"


def measures(throughput: Sequence[Throughput], failovers: Sequence[Failover]) -> list[Measure]:
    """The measures of a run, grouped by kind, each kind for 1, 2 and 3 daemons."""
    per_1k = "ms/1k events"
    found = [Measure(daemons_label(t.daemons), t.rate, "events/s") for t in throughput]
    spent = {
        "CPU/1k": [t.cpu.daemons_cpu for t in throughput],
        "PG CPU/1k": [t.cpu.postgres_cpu for t in throughput],
        "load CPU/1k": [t.cpu.load_cpu for t in throughput],
        "rest CPU/1k": [t.cpu.rest_cpu for t in throughput],
    }
    for name, seconds in spent.items():
        found += [
            Measure(f"{name} ({t.daemons})", t.cpu.per_1k(cpu), per_1k)
            for t, cpu in zip(throughput, seconds, strict=True)
        ]
    found += [Measure(f"cores busy ({t.daemons})", 100 * t.cpu.busy, "%") for t in throughput]
    kills = [f.seconds for f in failovers if f.signal == "SIGKILL"]
    terms = [f.seconds for f in failovers if f.signal == "SIGTERM"]
    if kills:
        found.append(Measure("failover p50", statistics.median(kills), "s"))
        found.append(Measure("failover max", max(kills), "s"))
    if terms:
        found.append(Measure("handover (SIGTERM)", statistics.median(terms), "s"))
    return found


async def scale_out(reactor: Any, config: Config, receiver: Receiver, run: int) -> Run:
    if len(receiver.urls) < SERVICES:
        raise RuntimeError(f"scale-out needs {SERVICES} receiver ports, not {len(receiver.urls)}")
    series = ScaleSeries()
    steps = len(DAEMONS) + config.failover_kills + config.scale_handovers
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if config.progress is not None:
            config.progress.update(done, steps)

    for n in DAEMONS:
        folder = config.workdir / f"scale-{run}" / f"{n}-daemons"
        name = f"delivery_bench_scale_{os.getpid()}_{run}_{n}"
        with scratch_postgres(config.postgres, name) as database:
            path = write_config(folder, receiver.urls, database, config.scale_lease_ttl)
            daemons = Daemons(reactor, path, config.scale_lease_ttl)
            try:
                await daemons.start(n)
                figures, stats, start = await offer(reactor, config, receiver, daemons, run)
                series.throughput.append(figures)
                step()
                if n == DAEMONS[-1]:
                    series.arrivals = Series.of(stats, start).arrivals
                    kinds = [signal.SIGKILL] * config.failover_kills
                    kinds += [signal.SIGTERM] * config.scale_handovers
                    for j, number in enumerate(kinds):
                        k = (11 + 37 * j) % SERVICES  # another service each time
                        prefix = f"trickle{run}-{j}"
                        failover = await fail_over(reactor, daemons, receiver, k, number, prefix)
                        series.failovers.append(failover)
                        step()
            finally:
                await daemons.stop()
                series.log += daemons.warnings()
    series.log = series.log[:LOG_LINES]
    return Run(measures(series.throughput, series.failovers), series)
