"""
Chaos on a cluster: several daemons on one PostgreSQL database, disrupted at random while
events flow in through all of them. ``scripts/chaos --daemons 3`` runs :class:`ClusterChaos`
(through :func:`tests.chaos.main`); ``tests.test_cluster_processes`` runs a short one.

As :mod:`tests.chaos` (the same receiver failing at random, the same services and event
stream, the same checks), but:

- ``--daemons`` daemons (the installed twistd plugin) share one configuration: one
  PostgreSQL database and a ``cluster:`` section with a small ``lease_ttl``; each is a
  node of its own (its node id is ``host:pid``);
- the ingester posts its batches round-robin to the daemons that are running, and a batch
  not acknowledged goes again to the next one (ingest is idempotent by ``event_id``);
- ``--kills`` disruptions hit random running daemons, one always left running: SIGKILL
  (started again after a moment, and now and then killed again early in its start-up),
  SIGSTOP (SIGCONT after longer than ``lease_ttl``: its leases expired and went to others
  meanwhile, and it must not use them when it wakes) and SIGTERM (a clean stop that gives
  its leases back; started again after);
- the order of transaction ids is checked by :func:`tests.crashlog.check_new_txn_ids`: a
  late resend of a transaction received already (same id, same body) may follow a newer
  one, as a paused holder wakes; a new id lower than one received is still a problem.

At the end every daemon runs again, everything acknowledged must be delivered, and every
daemon must stop cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

from .chaos import STAGE, Chaos, Daemon, Event, GaveUp, Ingester, Verdict, judge
from .crashlog import check_new_txn_ids, late_resends, stop_process
from .daemon_harness import ADMIN

#: the default ``cluster.lease_ttl`` of the daemons, seconds (the smallest allowed)
LEASE_TTL = 3.0
#: seconds between two disruptions (uniform between these)
GAP = (0.3, 1.5)
#: the kinds of disruption, and how often (relative weights)
DISRUPTIONS = {"kill": 4, "pause": 3, "term": 2}
#: the share of starts killed again early in their start-up
STARTUP_KILLS = 0.15
#: the share of disruptions that wait first for the receiver to hold an answer
AIMED = 0.3
#: the share that wait for an ingest request in flight, and hit the daemon it went to
AIMED_INGEST = 0.3
#: how long the ingester waits for one answer, seconds (a paused daemon never answers)
INGEST_TIMEOUT = 3.0
#: how long a daemon may take to stop on SIGTERM, seconds
STOP_TIMEOUT = 20.0
#: seconds between two looks at the processes and the logs
TICK = 0.01

ADMIN_URL = os.environ.get(
    "DELIVERY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def cluster_pace(options: argparse.Namespace) -> float:
    """A pause between batches that spreads the ingest over the disruptions."""
    seconds = max(2.0, options.kills * sum(GAP) / 2)
    return float(seconds / max(1.0, options.events / options.batch))


def scratch_database(admin_url: str = ADMIN_URL) -> tuple[str, Callable[[bool], None]]:
    """
    A fresh database on the server of ``admin_url`` (``DELIVERY_TEST_POSTGRES``): its URL,
    and what to call at the end (with True: drop it; False: keep it and say so).
    """
    import psycopg2

    name = f"delivery_chaos_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(admin_url, connect_timeout=5)
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
    finally:
        admin.close()
    url = urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))

    def done(drop: bool) -> None:
        if not drop:
            print(f"chaos: the database is kept: {url}", file=sys.stderr)
            return
        admin = psycopg2.connect(admin_url, connect_timeout=5)
        admin.autocommit = True
        try:
            with admin.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            admin.close()

    return url, done


def api(url: str, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """``GET path`` of a daemon's API (``host:port``) with the admin token: status, JSON."""
    host, port = url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {ADMIN}"})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, body


# -- the ingester --


class ClusterIngester(Ingester):
    """
    Posts the events, batch after batch, round-robin to the running daemons (``urls()``),
    until every one is acknowledged; a batch not acknowledged goes to the next daemon.
    """

    def __init__(
        self,
        events: Sequence[Event],
        rng: random.Random,
        batch: int,
        pause: float,
        urls: Callable[[], Sequence[str]],
        timeout: float = INGEST_TIMEOUT,
    ) -> None:
        super().__init__(events, rng, batch, pause)
        self.urls = urls
        self.timeout = timeout
        #: acknowledged batches by daemon
        self.by_url: Counter[str] = Counter()
        #: stop once everything posted so far is acknowledged
        self.winding_down = threading.Event()
        self._turn = 0

    def _wound_down(self, failing: bool) -> bool:
        return self.winding_down.is_set() and not failing and self.acked >= self.posted

    def _destination(self) -> str | None:
        urls = list(self.urls())
        if not urls:
            return None
        self._turn += 1
        return urls[(self._turn - 1) % len(urls)]

    def _acknowledged(self, url: str) -> None:
        self.by_url[url] += 1


# -- the daemons --


class Member:
    """One place in the cluster: the daemon running there now (one run after another)."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.daemon: Daemon | None = None
        #: down, starting, running (listening), paused (SIGSTOP), stopping (SIGTERM sent)
        self.state = "down"
        self.url: str | None = None
        #: when the next step is due: start (down), SIGCONT (paused), give up (stopping)
        self.due: float | None = 0.0
        #: kill it then if it is still starting
        self.kill_at: float | None = None
        #: when it was paused
        self.paused_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.daemon.process.pid if self.daemon is not None else None

    def __repr__(self) -> str:
        run = self.daemon.number if self.daemon is not None else "-"
        return f"daemon {self.slot} (run {run}, pid {self.pid}, {self.state})"


@attrs.frozen
class ClusterVerdict(Verdict):
    daemons: int = 1
    pauses: int = 0
    stops: int = 0
    #: resends of a transaction after a newer one of the same service (allowed)
    late: int = 0

    @property
    def summary(self) -> str:
        kind = "same-id" if not self.other_id else f"{self.other_id} with another id"
        return (
            f"daemons={self.daemons} kills={self.kills} pauses={self.pauses} "
            f"stops={self.stops} events={self.events} lost={self.lost} "
            f"reordered={self.reordered} duplicates={self.duplicates} ({kind}) "
            f"late-resends={self.late}"
        )


class ClusterChaos(Chaos):
    """See the module's documentation; :meth:`run` is the whole run."""

    def __init__(self, options: argparse.Namespace, folder: Path) -> None:
        self.lease_ttl = float(getattr(options, "lease_ttl", LEASE_TTL))
        super().__init__(options, folder)
        pause = options.pace if options.pace is not None else cluster_pace(options)
        self.ingester: ClusterIngester = ClusterIngester(
            self.events, random.Random(self.rng.random()), options.batch, pause, self.live_urls
        )
        self.members = [Member(i) for i in range(options.daemons)]
        #: disruptions done, by kind
        self.counts: Counter[str] = Counter()
        #: start again what stops (as a supervisor would)
        self.restarting = True
        #: no more kills early in a start-up
        self.calm = False
        self._urls: list[str] = []

    def config_extra(self) -> dict[str, Any]:
        return {"cluster": {"lease_ttl": self.lease_ttl}}

    def say(self, text: str) -> None:
        """As the chaos run says it, with the time of day (to read the daemons' logs by)."""
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}"
        super().say(f"{stamp} {text}")

    def live_urls(self) -> list[str]:
        """The APIs of the daemons running (listening, not paused, not stopping)."""
        return self._urls

    def _refresh(self) -> None:
        self._urls = [m.url for m in self.members if m.state == "running" and m.url]

    def running(self) -> list[Member]:
        return [m for m in self.members if m.state == "running"]

    def all_running(self) -> bool:
        return all(m.state == "running" for m in self.members)

    def all_down(self) -> bool:
        return all(m.state == "down" for m in self.members)

    # -- watching --

    def step(self) -> None:
        """One look at the receiver's log and the daemons; whatever is due, done."""
        self.log.poll()
        now = time.monotonic()
        for m in self.members:
            d = m.daemon
            if d is not None and m.state in ("starting", "running") and not d.alive():
                self.problems.append(
                    f"{m!r} exited by itself with code {d.process.returncode}:\n{d.tail()}"
                )
                self.say(self.problems[-1].splitlines()[0])
                self._down(m, now + 0.5)
            elif d is not None and m.state == "stopping":
                if not d.alive():
                    self._stopped(m, d)
                    self._down(m, now + self.rng.uniform(0, 1.0))
                elif m.due is not None and now >= m.due:
                    self.problems.append(
                        f"{m!r} did not stop within {STOP_TIMEOUT:g} s of SIGTERM:\n{d.tail()}"
                    )
                    d.kill()
                    self._down(m, now + 0.5)
            if m.state == "starting" and d is not None:
                m.url = d.url()
                if m.url is not None:
                    m.state = "running"
                    m.kill_at = None
                    self.say(f"{m!r} listening after {now - d.started_at:.2f} s")
                elif m.kill_at is not None and now >= m.kill_at:
                    d.kill()
                    self.counts["kill"] += 1
                    self.say(f"{m!r} killed in its start-up after {now - d.started_at:.2f} s")
                    self._down(m, now + self.rng.uniform(0, 1.0))
            if m.state == "down" and m.due is not None and now >= m.due:
                self._start(m, now)
            elif m.state == "paused" and m.due is not None and now >= m.due and d is not None:
                os.kill(d.process.pid, signal.SIGCONT)
                m.state = "running"
                self.say(f"{m!r} continued after {now - m.paused_at:.2f} s")
        self._refresh()

    def _stopped(self, m: Member, d: Daemon) -> None:
        """A daemon sent SIGTERM has exited: it must have stopped cleanly."""
        code = d.process.returncode
        output = d.log_path.read_text(errors="replace")
        # twistd ends itself with the signal it got
        if code not in (0, -signal.SIGTERM) or "Server Shut Down." not in output:
            self.problems.append(
                f"{m!r} did not stop cleanly on SIGTERM (exit code {code}):\n{d.tail()}"
            )
        self.say(f"{m!r} stopped with code {code}")

    def _down(self, m: Member, restart_at: float) -> None:
        m.state = "down"
        m.url = None
        m.kill_at = None
        m.due = restart_at if self.restarting else None
        self._refresh()

    def _start(self, m: Member, now: float) -> None:
        m.daemon = self.start()
        m.state = "starting"
        m.url = None
        m.due = None
        early = not self.calm and self.rng.random() < STARTUP_KILLS
        m.kill_at = now + self.rng.uniform(0.2, 1.0) if early else None
        self.say(f"{m!r} starting")

    def pump(self, seconds: float, until: Callable[[], bool] = lambda: False) -> bool:
        """:meth:`step` until ``until()`` (True) or ``seconds`` pass (False)."""
        deadline = time.monotonic() + seconds
        while True:
            self.step()
            if until():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(TICK)

    def until(self, condition: Callable[[], bool], what: str) -> None:
        """Pump until ``condition()``; give the run up if that takes over a stage."""
        if not self.pump(STAGE, condition):
            raise GaveUp(f"{what} did not happen in {STAGE:g} s")

    # -- disrupting --

    def disrupt(self, m: Member, kind: str) -> None:
        """SIGKILL (``kill``), SIGSTOP (``pause``) or SIGTERM (``term``) the daemon of ``m``."""
        d = m.daemon
        assert d is not None
        now = time.monotonic()
        self.counts[kind] += 1
        self.log.poll()
        self.say(
            f"{kind} {m!r} after {now - d.started_at:.2f} s: {self.ingester.acked + 1} events "
            f"acknowledged, {len(self.log.receipts)} requests"
        )
        if kind == "kill":
            d.kill()
            self._down(m, now + self.rng.uniform(0, 1.5))
        elif kind == "pause":
            os.kill(d.process.pid, signal.SIGSTOP)
            m.state = "paused"
            m.paused_at = now
            m.due = now + self.lease_ttl + self.rng.uniform(0.3, 1.5)
        elif kind == "term":
            self._terminate(m, d, now)
        else:
            raise ValueError(f"unknown disruption {kind!r}")
        self._refresh()

    def _terminate(self, m: Member, d: Daemon, now: float) -> None:
        d.process.send_signal(signal.SIGTERM)
        m.state = "stopping"
        m.due = now + STOP_TIMEOUT
        self._refresh()

    def _holding(self, seen: int) -> Callable[[], bool]:
        """Whether the receiver holds the answer to a request after the first ``seen``."""
        return lambda: any(self.log.held[seen:])

    def ingesting(self) -> Member | None:
        """The running daemon an ingest request is in flight to, if any."""
        url = self.ingester.in_flight
        return next((m for m in self.running() if url is not None and m.url == url), None)

    def disrupt_one(self, kind: str, target: Member | None = None) -> None:
        """
        A disruption of the kind to ``target`` if it still runs, else to a random running
        daemon; never to the last one running.
        """
        running = self.running()
        assert len(running) >= 2
        self.disrupt(target if target in running else self.rng.choice(running), kind)

    def plan(self) -> list[tuple[str, int, str | None]]:
        """Each disruption's kind: each kind once at least, then at random; shuffled."""
        count = self.options.kills
        kinds = list(DISRUPTIONS)[:count]
        kinds += self.rng.choices(list(DISRUPTIONS), list(DISRUPTIONS.values()), k=count)
        kinds = kinds[:count]
        self.rng.shuffle(kinds)
        return [(kind, 0, None) for kind in kinds]

    def stop_all(self) -> None:
        """SIGTERM to every daemon (SIGCONT first if paused); each must stop cleanly."""
        self.restarting = False
        self.calm = True
        for m in self.members:
            if m.state == "paused" and m.daemon is not None:
                os.kill(m.daemon.process.pid, signal.SIGCONT)
                m.state = "running"
            if m.state in ("starting", "running") and m.daemon is not None:
                self._terminate(m, m.daemon, time.monotonic())
            elif m.state == "down":
                m.due = None
        if not self.pump(STOP_TIMEOUT + 5, self.all_down):
            self.problems.append(f"not every daemon stopped: {self.members}")

    # -- the run --

    def run(self) -> ClusterVerdict:
        began = time.monotonic()
        rng = self.rng
        self.say(
            f"seed {self.options.seed}, {len(self.members)} daemons, lease_ttl "
            f"{self.lease_ttl:g} s, database {self.options.database}"
        )
        try:
            self.until(self.all_running, "every daemon listening")
            self.ingester.start()
            for kind, _, _ in self.plan():
                self.pump(rng.uniform(*GAP))
                self.until(lambda: len(self.running()) >= 2, "two daemons running")
                aim = rng.random()
                target = None
                if aim < AIMED:  # while the receiver holds an answer
                    self.pump(2.0, self._holding(len(self.log.receipts)))
                elif aim < AIMED + AIMED_INGEST and not self.ingester.done.is_set():
                    # the daemon an ingest request is in flight to
                    self.pump(2.0, lambda: self.ingesting() is not None)
                    target = self.ingesting()
                self.until(lambda: len(self.running()) >= 2, "two daemons running")
                self.disrupt_one(kind, target)
            self.calm = True
            self.finish_cluster()
        except GaveUp as e:
            self.problems.append(str(e))
        finally:
            self.ingester.stopping.set()
        self.stop_all()
        self.stop_receiver()
        verdict = self.verdict()
        self.say(
            f"{time.monotonic() - began:.1f} s, {len(self.runs)} runs, "
            f"{len(self.log.receipts)} transaction requests, {self.ingester.failed} ingest "
            f"retries, acknowledged batches by daemon: "
            f"{sorted(self.ingester.by_url.values(), reverse=True)}; answers (pings too): "
            + ", ".join(f"{n} {a}" for a, n in self.log.answers.most_common())
        )
        return verdict

    def finish_cluster(self) -> None:
        """The rest of the events, every daemon running again, everything delivered."""
        progress = [time.monotonic(), self.ingester.acked]

        def ingested() -> bool:
            if self.ingester.acked != progress[1]:
                progress[:] = [time.monotonic(), self.ingester.acked]
            elif time.monotonic() - progress[0] > STAGE:
                raise GaveUp(f"the ingest made no progress in {STAGE:g} s")
            return self.ingester.done.is_set()

        self.pump(float("inf"), ingested)
        now = time.monotonic()
        for m in self.members:
            m.kill_at = None
            if m.state == "down":
                m.due = now
        self.until(self.all_running, "every daemon running again")
        if not self.pump(self.options.timeout, self.delivered):
            self.problems.append(
                f"not everything was delivered within --timeout {self.options.timeout:g} s"
            )
        self.pump(0.5)  # anything that should not come

    def verdict(self) -> ClusterVerdict:
        events = self.events
        if self.ingester.winding_down.is_set():  # stopped early on purpose
            events = events[: self.ingester.acked + 1]
        v = judge(
            events=events,
            specs=self.specs,
            log=self.log,
            acks=self.ingester.acks,
            kills=self.counts["kill"],
            daemon_logs=[d.log_path for d in self.runs],
            more=self.problems,
            txn_ids=check_new_txn_ids,
        )
        return ClusterVerdict(
            **attrs.asdict(v, recurse=False),
            daemons=len(self.members),
            pauses=self.counts["pause"],
            stops=self.counts["term"],
            late=late_resends(self.log.receipts),
        )

    def close(self) -> None:
        self.ingester.stopping.set()
        for daemon in self.runs:
            daemon.kill()
        stop_process(self.receiver, self._receiver_stderr)
        if self.ingester.ident is not None:
            self.ingester.join(15)
