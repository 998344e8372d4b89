"""
Chaos: the daemon, as operators run it, killed with SIGKILL again and again while events
flow in and its receivers fail at random. ``scripts/chaos`` runs :func:`main`.

It starts the receiver (``tests.chaos_receiver``: one port per service, failing at random,
logging every request before answering it) and the daemon (the installed twistd plugin:
``twistd --nodaemon --pidfile= delivery --config FILE``) as processes. A thread ingests a
fixed stream of events through ``POST /v1/events`` with the ingest token, batch after
batch; an event counts as acknowledged only once a 200 answer for its batch came back, and
a batch that got no such answer (the daemon was dead, or answered 503) is sent again, as
are, now and then after a kill, a few acknowledged ones (ingest is idempotent by
``event_id``). The daemon is killed at random moments ``--kills`` times and started again
each time: early in its start-up, right after an acknowledgement, right after a few more
transactions reached the receiver, or while the receiver holds an answer. With
``--restart-postgres`` the PostgreSQL server is restarted a few times too.

Then it waits, at most ``--timeout`` seconds, until every acknowledged event reached every
service that wants it, stops everything, and checks the receiver's log:

- no acknowledged event lost: each reached every interested service (a 2xx answer), and
  nothing reached a service that does not want it;
- order: per service, transactions in id order carry events in stream order;
- every duplicate (a transaction that reached the receiver again after a 2xx) is a resend
  with the same id and the very same body; no event came in two transactions;
- transaction ids only grow; every event arrived as it was submitted; submitting an event
  again gave its first stream position; the daemon logged no error, never exited by
  itself (when it does, it is started again, as a supervisor would) and stopped cleanly.

It prints one line, ``kills=12 events=5000 lost=0 reordered=0 duplicates=37 (same-id)``,
and exits 0 only if nothing is wrong; otherwise the problems follow, one a line, and the
work folder (configuration, logs) is kept. The checks are those of ``tests.test_sigkill``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from .crash_child import ServiceSpec
from .crashlog import (
    Receipt,
    ReceiverLog,
    check_child_logs,
    check_complete,
    check_content,
    check_order,
    check_positions,
    check_refusals,
    check_resends,
    check_txn_ids,
    spawn_receiver,
    stop_process,
    wants,
)
from .daemon_harness import INGEST, write_config, write_registration

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))
LISTENING = re.compile(r"HTTP API listening on 127\.0\.0\.1:(\d+)")
#: seconds between two looks at the processes and the logs
POLL = 0.005
#: the longest one stage of a run may take before the run gives up
STAGE = 60.0
#: batches the ingester steps back, now and then, after a kill
BACK = 3

Event = dict[str, Any]


# -- the services and the events --


def service_specs(count: int) -> list[ServiceSpec]:
    """``s0`` wants every event; ``s<i>`` the events of senders ``@u<i>_...``."""
    sizes = (50, 10, 25)
    return [
        ServiceSpec(f"s{i}", users=f"@u{i}_" if i else ".*", max_events=sizes[i % len(sizes)])
        for i in range(count)
    ]


def make_event(index: int, services: int) -> Event:
    """Event ``index`` of the stream; its sender picks which services want it."""
    user = (index * 7 + index // 3) % (services + 1)
    return {
        "event_id": f"$chaos{index}:hs",
        "type": "m.room.message",
        "sender": f"@u{user}_{index % 5}:hs",
        "room_id": f"!r{index % 3}:hs",
        "content": {"body": f"event {index}" + " é" * (index % 3), "n": index},
    }


# -- the receiver's log --


class ChaosLog(ReceiverLog):
    """The receiver's log: every transaction request, and those answered 2xx apart."""

    def __init__(self, path: Path, index: dict[str, int]) -> None:
        super().__init__(path, index)
        #: requests answered with a success, in order (a resend again each time)
        self.accepted: list[Receipt] = []
        self.answers: Counter[str] = Counter()
        #: for each request, whether the receiver holds its answer a while (or for ever)
        self.held: list[bool] = []

    def _add(self, record: dict[str, Any]) -> None:
        answer = record.get("answer", record["kind"])
        self.answers[re.sub(r"slow \S+ s", "slow", answer)] += 1
        super()._add(record)

    def _took(self, record: dict[str, Any], receipt: Receipt) -> bool:
        """Whether the request was answered with a success (only those count as received)."""
        self.held.append(receipt.delay >= 0.05 or record["answer"].startswith("hang"))
        if record["accepts"]:
            self.accepted.append(receipt)
        return bool(record["accepts"])


# -- the verdict --


@attrs.frozen
class Verdict:
    kills: int
    events: int
    lost: int
    reordered: int
    duplicates: int
    #: events that reached a service in two different transactions
    other_id: int
    problems: tuple[str, ...]

    @property
    def summary(self) -> str:
        kind = "same-id" if not self.other_id else f"{self.other_id} with another id"
        return (
            f"kills={self.kills} events={self.events} lost={self.lost} "
            f"reordered={self.reordered} duplicates={self.duplicates} ({kind})"
        )

    @property
    def ok(self) -> bool:
        return not self.problems


def tally(accepted: Sequence[Receipt], index: dict[str, int]) -> tuple[int, int, int]:
    """
    (duplicates, other_id, reordered) among the accepted requests: requests that repeat a
    transaction id already accepted; events that came again in another transaction; events
    that came after a later one (in transaction id order).
    """
    duplicates = len(accepted) - len({(r.service, r.txn) for r in accepted})
    other_id = reordered = 0
    for service in sorted({r.service for r in accepted}):
        first = {r.txn: r for r in reversed(accepted) if r.service == service}
        seen: set[int] = set()
        top = -1
        for txn in sorted(first, key=int):
            for e in first[txn].events:
                n = index.get(e["event_id"], -1)
                if n in seen:
                    other_id += 1
                elif n < top:
                    reordered += 1
                seen.add(n)
                top = max(top, n)
    return duplicates, other_id, reordered


def judge(
    *,
    events: Sequence[Event],
    specs: Sequence[ServiceSpec],
    log: ChaosLog,
    acks: Sequence[tuple[int, list[int]]],
    kills: int,
    daemon_logs: Sequence[Path] = (),
    more: Sequence[str] = (),
    txn_ids: Callable[[Sequence[Receipt]], list[str]] = check_txn_ids,
) -> Verdict:
    """
    Everything the receiver logged, against what was acknowledged; ``more`` problems.
    ``txn_ids`` checks the order of transaction ids (a cluster allows late resends).
    """
    index = {e["event_id"]: i for i, e in enumerate(events)}
    acked = {i for last, batch in acks for i in range(last - len(batch) + 1, last + 1)}
    expected = {s.id: {i for i in acked if wants(s, events[i])} for s in specs}
    lost = sum(len(wanted - log.received.get(s, set())) for s, wanted in expected.items())
    duplicates, other_id, reordered = tally(log.accepted, index)
    receipts = log.receipts
    problems = [
        *more,
        *check_refusals(log.others),
        *check_complete(log.accepted, expected, index),
        *check_order(receipts, index),
        *check_resends(receipts),
        *txn_ids(receipts),
        *check_content(receipts, events, index),
        *check_positions(acks),
        *check_child_logs(daemon_logs),
    ]
    if len(acked) < len(events):
        problems.insert(0, f"only {len(acked)} of {len(events)} events were acknowledged")
    return Verdict(kills, len(acked), lost, reordered, duplicates, other_id, tuple(problems))


# -- the ingester --


class Ingester(threading.Thread):
    """Posts the events, batch after batch, until every one is acknowledged."""

    def __init__(
        self, events: Sequence[Event], rng: random.Random, batch: int, pause: float
    ) -> None:
        super().__init__(daemon=True)
        self.events = events
        self.rng = rng
        self.batch = batch
        #: seconds between two batches, so that events keep coming while kills land
        self.pause = pause
        #: the daemon's API, None while it is not running
        self.url: str | None = None
        #: (index of the last event, stream positions) for each acknowledged batch
        self.acks: list[tuple[int, list[int]]] = []
        self.acked = -1
        #: the highest event index posted so far (acknowledged or not)
        self.posted = -1
        #: seconds a request may take
        self.timeout = 10.0
        #: the daemon a request is in flight to, if any
        self.in_flight: str | None = None
        #: batches that were not acknowledged (and sent again)
        self.failed = 0
        self.done = threading.Event()
        self.stopping = threading.Event()

    def _wound_down(self, failing: bool) -> bool:
        """Whether to stop before the next batch (a subclass may stop early)."""
        return False

    def run(self) -> None:
        #: where the acknowledged batches began, and where the next one begins
        starts = [0]
        size = 0  # of the batch being sent: the same until it is acknowledged
        failing = False
        while starts[-1] < len(self.events) and not self.stopping.is_set():
            if self._wound_down(failing):
                break
            first = starts[-1]
            size = size or self.rng.randint(1, 2 * self.batch)
            batch = self.events[first : first + size]
            self.posted = max(self.posted, first + len(batch) - 1)
            positions = self._post(batch)
            if positions is None:
                self.failed += 1
                if not failing and self.rng.random() < 0.3:
                    # After a kill, now and then, submit a few acknowledged batches again.
                    del starts[-self.rng.randint(1, BACK) :]
                    starts = starts or [0]
                    size = 0
                failing = True
                time.sleep(0.01)
                continue
            failing = False
            size = 0
            last = first + len(batch) - 1
            self.acks.append((last, positions))
            self.acked = max(self.acked, last)
            starts.append(last + 1)
            if self.pause:
                time.sleep(self.rng.uniform(0, 2 * self.pause))
        self.done.set()

    def _destination(self) -> str | None:
        """The daemon the next batch goes to (None: none is running)."""
        return self.url

    def _acknowledged(self, url: str) -> None:
        """A batch posted to ``url`` was acknowledged."""

    def _post(self, batch: Sequence[Event]) -> list[int] | None:
        """The stream positions, or None if the batch was not acknowledged."""
        url = self._destination()
        if url is None:
            return None
        host, port = url.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=self.timeout)
        self.in_flight = url
        try:
            connection.request(
                "POST",
                "/v1/events",
                json.dumps({"events": list(batch)}),
                {"Authorization": f"Bearer {INGEST}", "Content-Type": "application/json"},
            )
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            self.in_flight = None
            connection.close()
        if response.status != 200:
            return None
        self._acknowledged(url)
        return list(json.loads(body)["stream_ids"])


# -- the processes --


class Daemon:
    """One run of the daemon: ``twistd --nodaemon delivery``, its output in a file."""

    def __init__(self, number: int, config: Path, folder: Path) -> None:
        self.number = number
        self.log_path = folder / f"daemon-{number}.log"
        self.started_at = time.monotonic()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        command = [TWISTD, "--nodaemon", "--pidfile=", "delivery", "--config", str(config)]
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def url(self) -> str | None:
        """The API's URL once the daemon says it listens."""
        match = LISTENING.search(self.log_path.read_text(errors="replace"))
        return f"127.0.0.1:{match.group(1)}" if match else None

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def terminate(self) -> int | None:
        """SIGTERM: the exit code of a clean stop, or None if it did not stop in 20 s."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_receiver(
    folder: Path, specs: Sequence[ServiceSpec], options: argparse.Namespace, stderr: IO[bytes]
) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    command = [
        *(sys.executable, "-m", "tests.chaos_receiver", "--log", str(folder / "receiver.log")),
        *("--services", ",".join(s.id for s in specs), "--seed", str(options.seed)),
        *("--fail-rate", str(options.fail_rate), "--timeout", str(REQUEST_TIMEOUT)),
    ]
    return spawn_receiver(command, stderr)


def restart_postgres() -> None:
    """Restart the real PostgreSQL server (every cluster named ``main``)."""
    for version in sorted(os.listdir("/etc/postgresql")):
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
            check=True,
            capture_output=True,
            timeout=120,
        )


# -- the run --

REQUEST_TIMEOUT = 2.0
KINDS = ("startup", "acked", "receipts", "held")


def default_pace(options: argparse.Namespace) -> float:
    """A pause between batches that spreads the ingest over about half a second a kill."""
    return float(max(2.0, 0.5 * options.kills) / max(1.0, options.events / options.batch))


class GaveUp(Exception):
    """A stage took too long: the run cannot go on."""


class Died(Exception):
    """The daemon exited by itself; a supervisor would start it again, and so do we."""


class Chaos:
    def __init__(self, options: argparse.Namespace, folder: Path) -> None:
        self.options = options
        self.folder = folder
        self.rng = random.Random(options.seed)
        self.specs = service_specs(options.services)
        self.events = [make_event(i, options.services) for i in range(options.events)]
        self.index = {e["event_id"]: i for i, e in enumerate(self.events)}
        self.log = ChaosLog(folder / "receiver.log", self.index)
        #: the events each service wants, and how many of them (from the first) it has
        self._wanted = {
            s.id: [i for i, e in enumerate(self.events) if wants(s, e)] for s in self.specs
        }
        self._delivered = dict.fromkeys(self._wanted, 0)
        self.runs: list[Daemon] = []
        self.kills = 0
        self.postgres_restarts = 0
        self.problems: list[str] = []
        pause = options.pace if options.pace is not None else default_pace(options)
        self.ingester = Ingester(
            self.events, random.Random(self.rng.random()), options.batch, pause
        )
        self._receiver_stderr = (folder / "receiver.stderr").open("wb")
        self.receiver, ports = start_receiver(folder, self.specs, options, self._receiver_stderr)
        registrations = [
            write_registration(
                folder,
                spec.id,
                f"http://127.0.0.1:{ports[spec.id]}",
                users=spec.users or ".*",
                max_events=spec.max_events,
                initial_delay=0.05,
                max_delay=0.5,
                probe_interval=0.1,
                request_timeout=REQUEST_TIMEOUT,
            )
            for spec in self.specs
        ]
        self.config = write_config(
            folder, registrations, database=options.database, **self.config_extra()
        )

    def config_extra(self) -> dict[str, Any]:
        """More keys of the daemon's configuration (here: none)."""
        return {}

    def say(self, text: str) -> None:
        if self.options.verbose:
            print(f"chaos: {text}", file=sys.stderr, flush=True)

    # -- waiting --

    def wait(self, daemon: Daemon | None, condition: Callable[[], bool], timeout: float) -> bool:
        """Poll until ``condition()`` (True) or ``timeout`` seconds (False)."""
        deadline = time.monotonic() + timeout
        while True:
            self.log.poll()
            if daemon is not None:
                if self.ingester.url is None and daemon.alive():
                    self.ingester.url = daemon.url()
                if not daemon.alive():
                    raise Died(
                        f"run {daemon.number} exited by itself with code "
                        f"{daemon.process.returncode}:\n{daemon.tail()}"
                    )
            if condition():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL)

    def must(self, daemon: Daemon, condition: Callable[[], bool], what: str) -> None:
        if not self.wait(daemon, condition, STAGE):
            raise GaveUp(f"run {daemon.number}: {what} did not happen in {STAGE:g} s")

    def delivered(self) -> bool:
        """Every acknowledged event reached every service that wants it."""
        acked = self.ingester.acked
        for service, wanted in self._wanted.items():
            got = self.log.received.get(service, set())
            n = self._delivered[service]
            while n < len(wanted) and wanted[n] in got:
                n += 1
            self._delivered[service] = n
            if n < len(wanted) and wanted[n] <= acked:
                return False
        return True

    def idle(self) -> bool:
        """Nothing left to do: every event acknowledged and delivered."""
        return self.ingester.done.is_set() and self.delivered()

    # -- one run of the daemon, until it is killed --

    def start(self) -> Daemon:
        daemon = Daemon(len(self.runs), self.config, self.folder)
        self.runs.append(daemon)
        return daemon

    def kill(self, daemon: Daemon, kind: str) -> None:
        self.ingester.url = None
        daemon.kill()
        self.kills += 1
        self.log.poll()
        self.say(
            f"kill {self.kills} ({kind}) after {time.monotonic() - daemon.started_at:.2f} s: "
            f"{self.ingester.acked + 1} events acknowledged, {len(self.log.receipts)} requests"
        )

    def run_until_kill(self, kind: str, target: int, restart: str | None) -> None:
        """
        Start the daemon; kill it at a moment of the given kind, once event ``target`` is
        acknowledged (``startup`` kills do not wait for it). ``restart`` PostgreSQL at
        ``startup`` (once the API listens) or ``busy`` (once ``target`` is acknowledged).
        """
        rng = self.rng
        daemon = self.start()
        if kind == "startup":
            self.wait(daemon, lambda: False, rng.uniform(0.2, 1.0))
            self.kill(daemon, kind)
            return
        self.must(daemon, lambda: self.ingester.url is not None, "listening")
        if restart == "startup":
            self.restart_postgres()
        ingested = self.ingester.done.is_set
        self.must(daemon, lambda: self.ingester.acked >= target or ingested(), "ingesting")
        if restart == "busy":
            self.restart_postgres()
        if kind == "acked":
            acks = len(self.ingester.acks) + rng.randint(0, 5)
            self.wait(daemon, lambda: len(self.ingester.acks) >= acks or ingested(), 5)
            self.wait(daemon, lambda: False, rng.uniform(0, 0.02))
        elif kind == "receipts":
            receipts = len(self.log.receipts) + rng.randint(1, 6)
            self.wait(daemon, lambda: len(self.log.receipts) >= receipts or self.idle(), 5)
            self.wait(daemon, lambda: False, rng.uniform(0, 0.005))
        else:  # held: the receiver has just taken a request it answers late, or never
            seen = len(self.log.receipts)
            self.wait(daemon, lambda: any(self.log.held[seen:]) or self.idle(), 5)
        self.kill(daemon, kind)

    def restart_postgres(self) -> None:
        self.say("restarting PostgreSQL")
        restart_postgres()
        self.postgres_restarts += 1

    def plan(self) -> list[tuple[str, int, str | None]]:
        """
        Each kill: its kind, the event to wait for, and when to restart PostgreSQL first
        (if at all): the kinds in turn, shuffled; the targets spread over the stream.
        """
        count = self.options.kills
        kinds = [KINDS[i % len(KINDS)] for i in range(count)]
        self.rng.shuffle(kinds)
        targets = sorted(self.rng.choices(range(len(self.events)), k=count))
        restarts: dict[int, str] = {}
        if self.options.restart_postgres:
            busy = [i for i, kind in enumerate(kinds) if kind != "startup"]
            chosen = self.rng.sample(busy, min(3, len(busy)))
            restarts = {i: "startup" if n == 0 else "busy" for n, i in enumerate(chosen)}
        return [
            (k, t, restarts.get(i)) for i, (k, t) in enumerate(zip(kinds, targets, strict=True))
        ]

    def died(self, e: Died) -> None:
        self.ingester.url = None
        self.problems.append(str(e))
        self.say(str(e).splitlines()[0])

    def finish(self, attempts: int = 3) -> Daemon | None:
        """The last run: the rest of the events, and everything delivered."""
        for _ in range(attempts):
            last = self.start()
            try:
                self.must(last, lambda: self.ingester.url is not None, "listening")
                self.must(last, self.ingester.done.is_set, "ingesting the rest")
                if not self.wait(last, self.delivered, self.options.timeout):
                    self.problems.append(
                        f"not everything was delivered within --timeout {self.options.timeout:g} s"
                    )
                self.wait(last, lambda: False, 0.2)  # anything that should not come
                return last
            except Died as e:
                self.died(e)
        return None

    def run(self) -> Verdict:
        began = time.monotonic()
        self.say(f"seed {self.options.seed}, database {self.options.database}")
        self.ingester.start()
        last: Daemon | None = None
        try:
            for kind, target, restart in self.plan():
                try:
                    self.run_until_kill(kind, target, restart)
                except Died as e:
                    self.died(e)
            last = self.finish()
        except GaveUp as e:
            self.problems.append(str(e))
        finally:
            self.ingester.stopping.set()
            self.ingester.url = None
        if last is not None and last.alive():
            code = last.terminate()
            output = last.log_path.read_text(errors="replace")
            # twistd ends itself with the signal it got
            if code not in (0, -signal.SIGTERM) or "Server Shut Down." not in output:
                self.problems.append(
                    f"the last run did not stop cleanly on SIGTERM (exit code {code}):\n"
                    f"{last.tail()}"
                )
        self.stop_receiver()
        verdict = judge(
            events=self.events,
            specs=self.specs,
            log=self.log,
            acks=self.ingester.acks,
            kills=self.kills,
            daemon_logs=[d.log_path for d in self.runs],
            more=self.problems,
        )
        self.say(
            f"{time.monotonic() - began:.1f} s, {len(self.runs)} runs, "
            f"{len(self.log.receipts)} transaction requests, {self.ingester.failed} ingest "
            f"retries, {self.postgres_restarts} PostgreSQL restarts; answers (pings too): "
            + ", ".join(f"{n} {a}" for a, n in self.log.answers.most_common())
        )
        return verdict

    def stop_receiver(self) -> None:
        if self.receiver.poll() is None:
            self.receiver.send_signal(signal.SIGTERM)
            try:
                self.receiver.wait(10)
            except subprocess.TimeoutExpired:
                self.receiver.kill()
                self.receiver.wait()
        self.log.poll()

    def close(self) -> None:
        self.ingester.stopping.set()
        for daemon in self.runs:
            daemon.kill()
        stop_process(self.receiver, self._receiver_stderr)
        self.ingester.join(15)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/chaos",
        description="SIGKILL the delivery daemon at random while events flow and receivers "
        "fail, then check that nothing acknowledged was lost, reordered or changed.",
    )
    parser.add_argument("--kills", type=int, default=20, help="how many SIGKILLs (20)")
    parser.add_argument("--events", type=int, default=5000, help="events to ingest (5000)")
    parser.add_argument("--services", type=int, default=3, help="application services (3)")
    parser.add_argument(
        "--database", help="database URL (default: a SQLite file in a temporary folder)"
    )
    parser.add_argument(
        "--restart-postgres",
        action="store_true",
        help="restart the PostgreSQL server (pg_ctlcluster) a few times during the run; "
        "only with a postgresql:// database",
    )
    parser.add_argument("--seed", type=int, help="seed of every random choice (random)")
    parser.add_argument(
        "--fail-rate", type=float, default=0.1, help="share of requests the receiver fails (0.1)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait at the end for everything to be delivered (60)",
    )
    parser.add_argument("--batch", type=int, default=20, help="mean events per ingest (20)")
    parser.add_argument(
        "--pace",
        type=float,
        help="mean seconds between two ingest requests (default: the ingest lasts about "
        "half a second a kill)",
    )
    parser.add_argument(
        "--daemons",
        type=int,
        default=1,
        help="daemons sharing one PostgreSQL database (1); with more than one, a cluster: "
        "events are ingested through all of them, and --kills disruptions (SIGKILL, "
        "SIGSTOP then SIGCONT after longer than --lease-ttl, SIGTERM, each followed by a "
        "restart) hit random daemons, at least one always running (tests/cluster_chaos.py); "
        "without --database, a fresh database on DELIVERY_TEST_POSTGRES, dropped after",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=3.0,
        help="with --daemons: the daemons' cluster.lease_ttl, seconds, 3 or more (3)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="say what happens")
    options = parser.parse_args(argv)
    if options.seed is None:
        options.seed = random.SystemRandom().randrange(2**32)
    if options.daemons < 1:
        parser.error("--daemons must be 1 or more")
    if options.daemons > 1:
        if options.database is not None and not options.database.startswith("postgresql://"):
            parser.error("--daemons needs a postgresql:// --database (SQLite has one daemon)")
        if options.restart_postgres:
            parser.error("--restart-postgres runs with one daemon only")
        if not options.lease_ttl >= 3:
            parser.error("--lease-ttl must be 3 seconds or more")
    if options.restart_postgres and not (options.database or "").startswith("postgresql://"):
        parser.error("--restart-postgres needs --database postgresql://...")
    if options.kills < 0 or options.events < 1 or options.services < 1:
        parser.error("--kills must be 0 or more, --events and --services 1 or more")
    if not 0 <= options.fail_rate <= 1:
        parser.error("--fail-rate is a share: from 0 to 1")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    folder = Path(tempfile.mkdtemp(prefix="delivery-chaos-"))
    scratch: Callable[[bool], None] | None = None  # drops a database made for the run
    if options.database is None and options.daemons > 1:
        from .cluster_chaos import scratch_database

        options.database, scratch = scratch_database()
    if options.database is None:
        options.database = f"sqlite:///{folder / 'delivery.db'}"
    print(f"chaos: seed {options.seed}; replay with --seed {options.seed}", file=sys.stderr)
    if options.daemons > 1:
        from .cluster_chaos import ClusterChaos

        chaos: Chaos = ClusterChaos(options, folder)
    else:
        chaos = Chaos(options, folder)
    verdict: Verdict | None = None
    try:
        verdict = chaos.run()
    finally:
        chaos.close()
        if scratch is not None:
            scratch(verdict is not None and verdict.ok and not options.keep)
    print(verdict.summary, flush=True)
    for problem in verdict.problems[:50]:
        print(f"problem: {problem}", file=sys.stderr)
    if len(verdict.problems) > 50:
        print(f"problem: ... and {len(verdict.problems) - 50} more", file=sys.stderr)
    if verdict.ok and not options.keep:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"chaos: the work folder is kept: {folder}", file=sys.stderr)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
