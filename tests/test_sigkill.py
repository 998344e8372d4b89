"""
Crash safety: kill -9 the delivery process at random moments while events flow.

A child process (``tests.crash_child``) runs a :class:`delivery.DeliveryService` against a
receiver process (``tests.receiver_process``) that serves three application services on
three ports. The test kills the child with SIGKILL a dozen times while 5,000 events are
submitted, restarting it each time from the last acknowledged event (or a little before
it, which submits stored events again), and then lets a last run finish. Then the
receiver must have every acknowledged event, in order per service, and every transaction
it received more than once must be a resend of the same transaction id with the same body.

Kills are spread over the stream (each waits until a random event has been acknowledged)
and land at moments chosen by progress: a few batches after that, right after a few more
transactions reached the receiver, right after the receiver began to hold an answer (the
child dies with a request in flight), or early in start-up (migrations, recovery).
Every random choice comes from a seed that is printed; ``DELIVERY_SIGKILL_SEED=<n>`` replays it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import attrs
import pytest

from .crash_child import SERVICES, ServiceSpec, make_event

COUNT = 5000
BATCH = 20
#: seconds between two submits: events keep flowing while the child delivers
PAUSE = 0.005
KILLS = 12
#: the receiver holds an answer at least this long when it means to (see receiver_process)
HELD = 0.05
#: how often the test looks at the receiver's log and the child, seconds
POLL = 0.002
ROOT = Path(__file__).resolve().parent.parent

Event = dict[str, Any]


# -- what the receiver logged --


@attrs.frozen
class Receipt:
    """One transaction request, as the receiver logged it when it arrived."""

    seq: int
    service: str
    txn: str
    sha256: str
    body: str
    delay: float = 0.0

    @property
    def events(self) -> list[Event]:
        return list(json.loads(self.body)["events"])


class ReceiverLog:
    """The receiver's log file, read as it grows."""

    def __init__(self, path: Path, index: dict[str, int]) -> None:
        self.path = path
        self._index = index
        self._offset = 0
        self._partial = b""
        self.receipts: list[Receipt] = []
        #: pings and refused requests
        self.others: list[dict[str, Any]] = []
        #: indices of the events each service received so far
        self.received: dict[str, set[int]] = {spec.id: set() for spec in SERVICES}

    def poll(self) -> None:
        """Read the lines appended since the last poll."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._add(json.loads(line))

    def _add(self, record: dict[str, Any]) -> None:
        if record["kind"] != "txn":
            self.others.append(record)
            return
        fields = ("seq", "service", "txn", "sha256", "body", "delay")
        receipt = Receipt(*(record[f] for f in fields))
        self.receipts.append(receipt)
        got = self.received.setdefault(receipt.service, set())
        got.update(self._index.get(e["event_id"], -1) for e in receipt.events)

    def has_all(self, expected: dict[str, set[int]]) -> bool:
        """Whether every service has received every event it wants."""
        return all(wanted <= self.received.get(s, set()) for s, wanted in expected.items())


# -- who wants what: worked out here, not by delivery --


def wants(spec: ServiceSpec, event: Event) -> bool:
    """The Matrix namespace rule: a regex must match at the start (``re.match``)."""
    if spec.users is not None and re.match(spec.users, event["sender"]):
        return True
    return spec.rooms is not None and re.match(spec.rooms, event["room_id"]) is not None


def expected_events(events: Sequence[Event]) -> dict[str, set[int]]:
    """The indices of the events each service must receive."""
    return {spec.id: {i for i, e in enumerate(events) if wants(spec, e)} for spec in SERVICES}


# -- the checks: each returns what is wrong, in words --


def check_refusals(others: Iterable[dict[str, Any]]) -> list[str]:
    """The receiver refused nothing (bad token, bad body, unknown path)."""
    return [f"the receiver refused a request: {r}" for r in others if r["kind"] == "error"]


def check_complete(
    receipts: Sequence[Receipt], expected: dict[str, set[int]], index: dict[str, int]
) -> list[str]:
    """(1) Each service received every event it wants, and no other."""
    problems = []
    for service, wanted in expected.items():
        got = {
            index.get(e["event_id"], -1) for r in receipts if r.service == service for e in r.events
        }
        if missing := sorted(wanted - got):
            problems.append(f"{service}: {len(missing)} events never arrived: {missing[:10]}")
        if extra := sorted(got - wanted):
            problems.append(f"{service}: received events it does not want: {extra[:10]}")
    return problems


def check_order(receipts: Sequence[Receipt], index: dict[str, int]) -> list[str]:
    """
    (2) Per service, the distinct transactions taken in txn id order carry strictly
    increasing events: stream order, and no event in two transactions.
    """
    problems = []
    for service in sorted({r.service for r in receipts}):
        first = {r.txn: r for r in reversed(receipts) if r.service == service}
        previous, previous_txn = -1, "none"
        for txn in sorted(first, key=int):
            for e in first[txn].events:
                n = index.get(e["event_id"], -1)
                if n <= previous:
                    problems.append(
                        f"{service}: txn {txn} carries event {n} after event {previous} "
                        f"(in txn {previous_txn})"
                    )
                previous, previous_txn = n, txn
    return problems


def check_resends(receipts: Sequence[Receipt]) -> list[str]:
    """(3) A transaction id received more than once had the very same body each time."""
    problems = []
    first: dict[tuple[str, str], Receipt] = {}
    for r in receipts:
        old = first.setdefault((r.service, r.txn), r)
        if (old.sha256, old.body) != (r.sha256, r.body):
            problems.append(
                f"{r.service}: txn {r.txn} came again with another body "
                f"(log lines {old.seq} and {r.seq})"
            )
    return problems


def check_txn_ids(receipts: Sequence[Receipt]) -> list[str]:
    """
    (4) Per service, transaction ids are strictly increasing in order of first receipt,
    and a resend never follows a newer transaction: the oldest is always resent first.
    """
    problems = []
    highest: dict[str, int] = {}
    for r in receipts:
        txn, top = int(r.txn), highest.get(r.service, 0)
        if txn < top:
            problems.append(f"{r.service}: txn {txn} arrived (log line {r.seq}) after txn {top}")
        highest[r.service] = max(txn, top)
    return problems


def check_content(
    receipts: Sequence[Receipt], events: Sequence[Event], index: dict[str, int]
) -> list[str]:
    """Every event arrived exactly as it was submitted."""
    return [
        f"{r.service}: txn {r.txn} carries an event never submitted: {e}"
        for r in receipts
        for e in r.events
        if e.get("event_id") not in index or e != events[index[e["event_id"]]]
    ]


def check_positions(acks: Iterable[tuple[int, list[int]]]) -> list[str]:
    """
    Submitting an acknowledged event again gave its first stream position (idempotent
    ingest, and nothing acknowledged was lost and stored anew); positions follow the
    order of submission.
    """
    problems = []
    positions: dict[int, int] = {}
    for last, batch in acks:
        for i, position in zip(range(last - len(batch) + 1, last + 1), batch, strict=True):
            first = positions.setdefault(i, position)
            if first != position:
                problems.append(f"event {i} was at position {first}, then at {position}")
    ordered = [positions[i] for i in sorted(positions)]
    if any(a >= b for a, b in itertools.pairwise(ordered)):
        problems.append("stream positions do not follow the order of submission")
    return problems


def check_child_logs(paths: Iterable[Path]) -> list[str]:
    """No run logged an error (a failure inside delivery, a traceback)."""
    bad = re.compile(r"#(error|critical|failure)\]|Traceback|Unhandled")
    return [
        f"{path.name}: {line}"
        for path in paths
        for line in path.read_text(errors="replace").splitlines()
        if bad.search(line)
    ]


def resends(receipts: Sequence[Receipt]) -> int:
    """How many requests repeated a transaction id the receiver had already."""
    return len(receipts) - len({(r.service, r.txn) for r in receipts})


# -- the processes --


class Child:
    """One run of ``tests.crash_child``; a thread reads the acknowledgements it prints."""

    def __init__(self, number: int, start: int, urls: str, db: str, logs: Path) -> None:
        self.number = number
        self.start = start
        self.stderr_path = logs / f"child-{number}.stderr"
        #: (index of the last event, stream positions) for each acknowledged batch
        self.acks: list[tuple[int, list[int]]] = []
        self.done = False
        self.started_at = time.monotonic()
        command = [
            *(sys.executable, "-m", "tests.crash_child", "--db", db, "--urls", urls),
            *("--start", str(start), "--count", str(COUNT)),
            *("--batch", str(BATCH), "--pause", str(PAUSE)),
        ]
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr
            )
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,))
        self._reader.daemon = True
        self._reader.start()

    def _read(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            if not line.endswith(b"\n"):
                break  # cut short by the kill
            word, *rest = line.decode().split()
            if word == "ACKED":
                self.acks.append((int(rest[0]), [int(p) for p in rest[1].split(",")]))
            elif word == "DONE":
                self.done = True

    @property
    def last_acked(self) -> int:
        return max((last for last, _ in self.acks), default=-1)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL; wait until it is gone and everything it printed is read."""
        if self.alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._close()

    def _close(self) -> None:
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def terminate(self, timeout: float = 10) -> int | None:
        """SIGTERM, a clean stop: its exit code, or None if it did not stop in time."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        self._close()
        return code

    def stderr_tail(self, lines: int = 30) -> str:
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])


def spawn_receiver(
    command: list[str], stderr: IO[bytes]
) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """A receiver process, and the port of each service (its first line of output)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(5)
        raise RuntimeError(f"the receiver did not start (exit code {process.returncode})")
    return process, json.loads(line)


def start_receiver(log: Path, seed: int, stderr: IO[bytes]) -> tuple[subprocess.Popen[bytes], str]:
    """The receiver process, and the ``a=URL,b=URL,...`` of its ports."""
    process, ports = spawn_receiver(
        [
            *(sys.executable, "-m", "tests.receiver_process", "--log", str(log)),
            *("--services", ",".join(s.id for s in SERVICES), "--seed", str(seed)),
        ],
        stderr,
    )
    return process, ",".join(f"{s}=http://127.0.0.1:{p}" for s, p in ports.items())


@attrs.frozen
class Kill:
    """Where things stood when one kill landed."""

    run: int
    kind: str
    #: seconds since that run started
    after: float
    acked: int
    receipts: int


class CrashRun:
    """The receiver, the children one after another, and what they did."""

    def __init__(self, tmp_path: Path, seed: int, db_url: str) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.tmp_path = tmp_path
        self.events = [make_event(i) for i in range(COUNT)]
        self.index = {e["event_id"]: i for i, e in enumerate(self.events)}
        self.expected = expected_events(self.events)
        self.log = ReceiverLog(tmp_path / "receiver.log", self.index)
        self.db = db_url
        self.acked = -1
        self.kills: list[Kill] = []
        self.children: list[Child] = []
        self._receiver_stderr = (tmp_path / "receiver.stderr").open("wb")
        self.receiver, self.urls = start_receiver(
            self.log.path, self.rng.randrange(2**32), self._receiver_stderr
        )

    def close(self) -> None:
        """Kill whatever still runs."""
        for child in self.children:
            child.kill()
        if self.receiver.poll() is None:
            self.receiver.kill()
            self.receiver.wait()
        if self.receiver.stdout is not None:
            self.receiver.stdout.close()
        self._receiver_stderr.close()

    def stop_receiver(self) -> None:
        self.receiver.send_signal(signal.SIGTERM)
        self.receiver.wait(10)
        self.log.poll()

    # -- children --

    def start_child(self) -> Child:
        """The next run: from the last acknowledged event, or a little before it."""
        back = self.rng.choice([0, 0, self.rng.randint(1, 3 * BATCH)])
        start = max(0, self.acked + 1 - back)
        child = Child(len(self.children), start, self.urls, self.db, self.tmp_path)
        self.children.append(child)
        return child

    def wait(self, child: Child, condition: Callable[[], bool], timeout: float) -> bool:
        """
        Poll until ``condition()`` holds (True) or ``timeout`` seconds pass (False); fail
        the test if the child exits by itself.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.log.poll()
            if condition():
                return True
            if not child.alive():
                child.kill()
                pytest.fail(
                    f"seed {self.seed}: run {child.number} exited by itself with code "
                    f"{child.process.returncode}:\n{child.stderr_tail()}"
                )
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL)

    def pause(self, child: Child, seconds: float) -> None:
        self.wait(child, lambda: False, seconds)

    def idle(self, child: Child) -> bool:
        """Whether the child has nothing left to do: all submitted, all delivered."""
        return child.done and self.log.has_all(self.expected)

    def kill(self, child: Child, kind: str) -> None:
        child.kill()
        self.log.poll()
        self.acked = max(self.acked, child.last_acked)
        after = round(time.monotonic() - child.started_at, 3)
        self.kills.append(Kill(child.number, kind, after, self.acked, len(self.log.receipts)))

    def run_until_kill(self, kind: str, target: int) -> None:
        """
        Start a child; once event ``target`` is acknowledged, kill it at a moment of the
        given kind (``startup`` kills do not wait for the target).
        """
        child = self.start_child()
        rng = self.rng
        if kind == "startup":
            self.pause(child, rng.uniform(0.02, 0.4))
            self.kill(child, kind)
            return
        self.wait(child, lambda: child.last_acked >= target or child.done, 20)
        if kind == "acks":
            acks = len(child.acks) + rng.randint(0, 5)
            self.wait(child, lambda: len(child.acks) >= acks or child.done, 5)
            self.pause(child, rng.uniform(0, 0.01))
        elif kind == "receipts":
            receipts = len(self.log.receipts) + rng.randint(1, 8)
            self.wait(child, lambda: len(self.log.receipts) >= receipts or self.idle(child), 5)
            self.pause(child, rng.uniform(0, 0.005))
        elif kind == "held":
            seen = len(self.log.receipts)

            def held() -> bool:
                return any(r.delay >= HELD for r in self.log.receipts[seen:]) or self.idle(child)

            self.wait(child, held, 5)
        else:
            raise ValueError(f"unknown kind of kill {kind!r}")
        self.kill(child, kind)

    def finish(self, timeout: float = 60, quiet: float = 10) -> Child:
        """
        The last run: it submits the rest; wait until every event has arrived, at most
        ``timeout`` seconds, or ``quiet`` seconds without news once all is submitted.
        """
        child = self.start_child()
        deadline = time.monotonic() + timeout
        while not self.idle(child):
            left = deadline - time.monotonic()
            news = self.wait(child, self._news(child), min(quiet, left))
            if not news and (child.done or left <= quiet):
                pytest.fail(
                    f"seed {self.seed}: the last run did not deliver everything: "
                    f"{self.missing()}\n{child.stderr_tail()}"
                )
        # A moment more, to catch anything that should not come.
        self.pause(child, 0.2)
        self.acked = max(self.acked, child.last_acked)
        return child

    def _news(self, child: Child) -> Callable[[], bool]:
        """A condition: the child is idle, or another transaction reached the receiver."""
        seen = len(self.log.receipts)
        return lambda: self.idle(child) or len(self.log.receipts) > seen

    def missing(self) -> str:
        """What each service still lacks, in words."""
        lacks = {s: sorted(wanted - self.log.received[s]) for s, wanted in self.expected.items()}
        return "; ".join(f"{s} lacks {len(m)} events {m[:5]}" for s, m in lacks.items())

    # -- verdict --

    def problems(self) -> list[str]:
        receipts = self.log.receipts
        return [
            *check_refusals(self.log.others),
            *check_complete(receipts, self.expected, self.index),
            *check_order(receipts, self.index),
            *check_resends(receipts),
            *check_txn_ids(receipts),
            *check_content(receipts, self.events, self.index),
            *check_positions(ack for child in self.children for ack in child.acks),
            *check_child_logs(child.stderr_path for child in self.children),
        ]

    def summary(self, seconds: float) -> str:
        receipts = self.log.receipts
        lines = [
            f"seed {self.seed}: {len(self.kills)} kills, {len(self.children)} runs, "
            f"{len(receipts)} transaction requests, {resends(receipts)} resends, "
            f"{seconds:.1f} s"
        ]
        lines += [f"  {kill}" for kill in self.kills]
        return "\n".join(lines)


def kill_plan(rng: random.Random) -> list[tuple[str, int]]:
    """
    ``KILLS`` kills in order, each as (kind, event to wait for): every kind at least once
    and three with a request in flight, their targets spread over the stream.
    """
    kinds = ["held", "held", "held", "startup", "acks", "receipts"]
    others = rng.choices(["acks", "receipts", "held", "startup"], [3, 3, 1, 1], k=KILLS - 6)
    kinds += others
    rng.shuffle(kinds)
    return list(zip(kinds, sorted(rng.sample(range(COUNT), KILLS)), strict=True))


@pytest.fixture
def crash_run(tmp_path: Path, db_url: str) -> Iterator[CrashRun]:
    seed = int(os.environ.get("DELIVERY_SIGKILL_SEED") or random.SystemRandom().randrange(2**32))
    print(f"DELIVERY_SIGKILL_SEED={seed}")
    run = CrashRun(tmp_path, seed, db_url)
    try:
        yield run
    finally:
        run.close()


def test_sigkill_loses_nothing(crash_run: CrashRun) -> None:
    run = crash_run
    began = time.monotonic()
    for kind, target in kill_plan(run.rng):
        run.run_until_kill(kind, target)
    last = run.finish()
    code = last.terminate()
    run.stop_receiver()
    summary = run.summary(time.monotonic() - began)
    print(summary)

    problems = run.problems()
    assert not problems, f"{summary}\n" + "\n".join(problems[:30])
    assert run.acked == COUNT - 1, summary
    assert len(run.kills) >= 10, summary
    # Three kills landed while the receiver held an answer: the transaction came again.
    assert resends(run.log.receipts) >= 1, f"{summary}\nno kill landed with a request in flight"
    assert code == 0, f"{summary}\nthe last run did not stop cleanly:\n{last.stderr_tail()}"


# -- the checks catch what they should --


def _receipt(seq: int, service: str, txn: int, indices: Sequence[int]) -> Receipt:
    body = json.dumps({"events": [make_event(i) for i in indices]})
    return Receipt(seq, service, str(txn), hashlib.sha256(body.encode()).hexdigest(), body)


def _log(*txns: tuple[int, Sequence[int]]) -> list[Receipt]:
    return [_receipt(seq, "c", txn, indices) for seq, (txn, indices) in enumerate(txns)]


GOOD = _log((1, [0, 1]), (2, [2, 3]), (2, [2, 3]), (3, [4]))


def _all_checks(receipts: Sequence[Receipt]) -> list[str]:
    events = [make_event(i) for i in range(5)]
    index = {e["event_id"]: i for i, e in enumerate(events)}
    return [
        *check_complete(receipts, {"c": set(range(5))}, index),
        *check_order(receipts, index),
        *check_resends(receipts),
        *check_txn_ids(receipts),
        *check_content(receipts, events, index),
    ]


def test_checks_pass_a_good_log() -> None:
    assert _all_checks(GOOD) == []


@pytest.mark.parametrize(
    ("receipts", "complaint"),
    [
        pytest.param(_log((1, [0, 1]), (2, [2, 3])), "never arrived", id="lost"),
        pytest.param(_log((1, [0, 1]), (2, [3, 2]), (3, [4])), "after event 3", id="reordered"),
        pytest.param(_log((1, [0, 1]), (3, [4]), (2, [2, 3])), "after txn 3", id="txn-order"),
        pytest.param(
            _log((1, [0, 1]), (2, [2, 3]), (2, [2]), (3, [4])), "another body", id="new-body"
        ),
        pytest.param(_log((1, [0, 1]), (2, [2, 3]), (3, [3, 4])), "carries event 3", id="two-txns"),
        pytest.param(
            _log((1, [0, 1]), (2, [2, 3]), (3, [4]), (2, [2, 3])), "after txn 3", id="late-resend"
        ),
        pytest.param(
            [*GOOD, attrs.evolve(GOOD[0], body=GOOD[0].body.replace("message", "massage"))],
            "never submitted",
            id="altered",
        ),
    ],
)
def test_checks_catch(receipts: list[Receipt], complaint: str) -> None:
    problems = _all_checks(receipts)
    assert any(complaint in p for p in problems), problems


def test_positions_must_not_change() -> None:
    assert check_positions([(1, [1, 2]), (3, [3, 4]), (3, [3, 4])]) == []
    assert check_positions([(1, [1, 2]), (3, [3, 4]), (3, [3, 7])]) != []
    assert check_positions([(1, [1, 5]), (3, [3, 4])]) != []
