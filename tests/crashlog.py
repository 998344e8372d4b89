"""
What the crash tests (``test_sigkill``, ``test_sigkill_housekeeping``, and ``tests.chaos``)
share: the receiver's log read as it grows, the checks of what it received, and the
plumbing of a child process killed and restarted against a receiver process.

The checks each return what is wrong, in words.
"""

from __future__ import annotations

import contextlib
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
from typing import IO, Any, ClassVar, Generic, Protocol, TypeVar, cast

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent
#: how often a crash test looks at the receiver's log and the child, seconds
POLL = 0.002
#: the receiver holds an answer at least this long when it means to (see receiver_process)
HELD = 0.05

Event = dict[str, Any]


class Namespaced(Protocol):
    """An application service of a crash test, as far as who wants what goes."""

    @property
    def id(self) -> str: ...

    @property
    def users(self) -> str | None: ...

    @property
    def rooms(self) -> str | None: ...


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

    @classmethod
    def of(cls, record: dict[str, Any]) -> Receipt:
        """The receipt of a ``txn`` line of the log."""
        fields = ("seq", "service", "txn", "sha256", "body", "delay")
        return cls(*(record[f] for f in fields))

    @property
    def events(self) -> list[Event]:
        return list(json.loads(self.body)["events"])


class ReceiverLog:
    """The receiver's log file, read as it grows."""

    def __init__(self, path: Path, index: dict[str, int], services: Iterable[str] = ()) -> None:
        self.path = path
        self._index = index
        self._offset = 0
        self._partial = b""
        #: every transaction request
        self.receipts: list[Receipt] = []
        #: pings and refused requests
        self.others: list[dict[str, Any]] = []
        #: the indices of the events each service received so far (of the requests
        #: :meth:`_took` counts)
        self.received: dict[str, set[int]] = {service: set() for service in services}

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
        receipt = Receipt.of(record)
        self.receipts.append(receipt)
        if self._took(record, receipt):
            got = self.received.setdefault(receipt.service, set())
            got.update(self._index.get(e["event_id"], -1) for e in receipt.events)

    def _took(self, record: dict[str, Any], receipt: Receipt) -> bool:
        """Whether the service took the events of this request (here: every request)."""
        return True

    def has_all(self, expected: dict[str, set[int]]) -> bool:
        """Whether every service has received every event it wants."""
        return all(wanted <= self.received.get(s, set()) for s, wanted in expected.items())


# -- who wants what: worked out here, not by delivery --


def wants(spec: Namespaced, event: Event) -> bool:
    """The Matrix namespace rule: a regex must match at the start (``re.match``)."""
    if spec.users is not None and re.match(spec.users, event["sender"]):
        return True
    return spec.rooms is not None and re.match(spec.rooms, event["room_id"]) is not None


def expected_events(events: Sequence[Event], services: Iterable[Namespaced]) -> dict[str, set[int]]:
    """The indices of the events each service must receive."""
    return {spec.id: {i for i, e in enumerate(events) if wants(spec, e)} for spec in services}


# -- the checks --


def check_refusals(others: Iterable[dict[str, Any]]) -> list[str]:
    """The receiver refused nothing (bad token, bad body, unknown path: not the AS API)."""
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


def check_new_txn_ids(receipts: Sequence[Receipt]) -> list[str]:
    """
    (4, for a cluster) Per service, transaction ids are strictly increasing in order of
    first receipt: a *new* id never comes after a higher one. A resend of an id received
    already may come late, after a newer transaction (a holder paused past its lease with
    the request already on the wire, or its retry timer due as it wakes): allowed here,
    the body being the same (:func:`check_resends`).
    """
    problems = []
    highest: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    for r in receipts:
        if (r.service, r.txn) in seen:
            continue
        seen.add((r.service, r.txn))
        txn, top = int(r.txn), highest.get(r.service, 0)
        if txn < top:
            problems.append(
                f"{r.service}: new txn {txn} arrived (log line {r.seq}) after txn {top}"
            )
        highest[r.service] = max(txn, top)
    return problems


def late_resends(receipts: Sequence[Receipt]) -> int:
    """How many requests resent a transaction id after a newer one of the same service."""
    count = 0
    highest: dict[str, int] = {}
    for r in receipts:
        txn, top = int(r.txn), highest.get(r.service, 0)
        count += txn < top
        highest[r.service] = max(txn, top)
    return count


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


def stop_process(process: subprocess.Popen[bytes], stderr: IO[bytes]) -> None:
    """Kill a receiver process if it still runs, and close its pipe and its stderr file."""
    if process.poll() is None:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()
    stderr.close()


class Child:
    """
    One run of a crash test's child process (``module``); a thread reads the
    acknowledgements it prints. Subclasses set what they need of their own before
    calling ``__init__``: the reader thread starts there.
    """

    module: ClassVar[str]
    count: ClassVar[int]
    batch: ClassVar[int]
    pause: ClassVar[float]

    def __init__(
        self, number: int, start: int, urls: str, db: str, logs: Path, **extra: str
    ) -> None:
        self.number = number
        self.start = start
        self.stderr_path = logs / f"child-{number}.stderr"
        #: (index of the last event, stream positions, when) for each acknowledged batch
        self.acks: list[tuple[int, list[int], float]] = []
        self.done = False
        self.started_at = time.monotonic()
        #: held while the child is signalled or reaped: a thread never signals a reaped pid
        self._signalling = threading.Lock()
        #: the reader thread killed it (not an exit of its own)
        self.killed_by_reader = False
        command = [
            *(sys.executable, "-m", self.module, "--db", db, "--urls", urls),
            *("--start", str(start), "--count", str(self.count)),
            *("--batch", str(self.batch), "--pause", str(self.pause)),
        ]
        for option, value in extra.items():
            command += [f"--{option}", value]
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr
            )
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,))
        self._reader.daemon = True
        self._reader.start()

    def _read(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not line.endswith(b"\n"):
            return  # cut short by the kill
        word, *rest = line.decode().split()
        if word == "ACKED":
            positions = [int(p) for p in rest[1].split(",")]
            self.acks.append((int(rest[0]), positions, time.monotonic()))
        elif word == "DONE":
            self.done = True
        self._heard(word, rest)

    def _heard(self, word: str, rest: list[str]) -> None:
        """A line the child printed, once read (here: nothing more to do)."""

    @property
    def last_acked(self) -> int:
        return max((ack[0] for ack in self.acks), default=-1)

    def alive(self) -> bool:
        return self.process.poll() is None

    def _signal(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL; wait until it is gone and everything it printed is read."""
        with self._signalling:
            if self.alive():
                self._signal()
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


@attrs.frozen
class Kill:
    """Where things stood when one kill landed."""

    run: int
    kind: str
    #: seconds since that run started
    after: float
    acked: int
    receipts: int


ChildT = TypeVar("ChildT", bound=Child)
KillT = TypeVar("KillT", bound=Kill)


class CrashRun(Generic[ChildT, KillT]):
    """
    The receiver, the children one after another, and what they did. A subclass says
    which services, events, receiver and children (:meth:`start_child`) it has.
    """

    count: ClassVar[int]
    services: ClassVar[Sequence[Namespaced]]
    log_class: ClassVar[type[ReceiverLog]] = ReceiverLog

    def __init__(self, tmp_path: Path, seed: int, db_url: str) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.tmp_path = tmp_path
        self.events = [self.event(i) for i in range(self.count)]
        self.index = {e["event_id"]: i for i, e in enumerate(self.events)}
        self.expected = expected_events(self.events, self.services)
        self.log = self.log_class(
            tmp_path / "receiver.log", self.index, (s.id for s in self.services)
        )
        self.db = db_url
        self.acked = -1
        self.kills: list[KillT] = []
        self.children: list[ChildT] = []
        self._receiver_stderr = (tmp_path / "receiver.stderr").open("wb")
        self.receiver, ports = spawn_receiver(
            self.receiver_command(self.rng.randrange(2**32)), self._receiver_stderr
        )
        self.urls = ",".join(f"{s}=http://127.0.0.1:{p}" for s, p in ports.items())

    def event(self, index: int) -> Event:
        """Event number ``index`` of the stream."""
        raise NotImplementedError

    def receiver_command(self, seed: int) -> list[str]:
        """The command line of the receiver process, its delays chosen by ``seed``."""
        raise NotImplementedError

    def start_child(self) -> ChildT:
        raise NotImplementedError

    def close(self) -> None:
        """Kill whatever still runs."""
        for child in self.children:
            child.kill()
        stop_process(self.receiver, self._receiver_stderr)

    def stop_receiver(self) -> None:
        self.receiver.send_signal(signal.SIGTERM)
        self.receiver.wait(10)
        self.log.poll()

    # -- waiting --

    def wait(
        self, child: ChildT, condition: Callable[[], bool], timeout: float, live: bool = False
    ) -> bool:
        """
        Poll until ``condition()`` holds (True) or ``timeout`` seconds pass (False); fail
        the test if the child exits by itself. ``live``: :meth:`check_live` as it runs,
        every ``live_every`` seconds.
        """
        deadline = time.monotonic() + timeout
        next_check = 0.0
        while True:
            if live and time.monotonic() >= next_check and child.alive():
                self.check_live(child)
                next_check = time.monotonic() + self.live_every
            self.log.poll()
            if condition():
                return True
            if not child.alive() and not child.killed_by_reader:
                child.kill()
                pytest.fail(
                    f"seed {self.seed}: run {child.number} exited by itself with code "
                    f"{child.process.returncode}:\n{child.stderr_tail()}"
                )
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL)

    #: how often :meth:`wait` calls :meth:`check_live` when asked to
    live_every: ClassVar[float] = 0.05

    def check_live(self, child: ChildT) -> None:
        """Check what can be checked while the child runs (here: nothing)."""

    def pause(self, child: ChildT, seconds: float) -> None:
        self.wait(child, lambda: False, seconds)

    def deliverable(self) -> dict[str, set[int]]:
        """What each service is to receive by the end (here: every event it wants)."""
        return self.expected

    def idle(self, child: ChildT) -> bool:
        """Whether the child has nothing left to do: all submitted, all delivered."""
        return child.done and self.log.has_all(self.deliverable())

    def missing(self) -> str:
        """What each service still lacks, in words."""
        lacks = {
            s: sorted(wanted - self.log.received[s]) for s, wanted in self.deliverable().items()
        }
        return "; ".join(f"{s} lacks {len(m)} events {m[:5]}" for s, m in lacks.items())

    # -- killing --

    def kill(self, child: ChildT, kind: str) -> None:
        child.kill()
        self.log.poll()
        self.acked = max(self.acked, child.last_acked)
        after = round(time.monotonic() - child.started_at, 3)
        self.kills.append(self.landed(child, kind, after))

    def landed(self, child: ChildT, kind: str, after: float) -> KillT:
        """
        Where things stand as a kill has landed ``after`` seconds into the run (a subclass
        with a :class:`Kill` of its own says more).
        """
        return cast(KillT, Kill(child.number, kind, after, self.acked, len(self.log.receipts)))

    def run_plan(self, plan: Iterable[tuple[str, int]]) -> None:
        """:meth:`run_until_kill` for each (kind, target) of the plan, in order."""
        for kind, target in plan:
            self.run_until_kill(kind, target)

    def run_until_kill(self, kind: str, target: int) -> None:
        """
        Start a child; once event ``target`` is acknowledged, kill it at a moment of the
        given kind (``startup`` kills do not wait for the target).
        """
        child = self.start_child()
        if kind == "startup":
            self.pause(child, self.rng.uniform(0.02, 0.4))
            self.kill(child, kind)
            return
        self.wait(child, lambda: child.last_acked >= target or child.done, 20, live=True)
        self.aim(child, kind)
        self.kill(child, kind)

    def aim(self, child: ChildT, kind: str) -> None:
        """Wait for the moment of a kill of the given kind."""
        rng = self.rng
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


def spread(rng: random.Random, kinds: Sequence[str], count: int) -> list[tuple[str, int]]:
    """Each kind of kill in order, with an event to wait for: spread over ``count`` events."""
    return list(zip(kinds, sorted(rng.sample(range(count), len(kinds))), strict=True))


RunT = TypeVar("RunT", bound=CrashRun[Any, Any])


@contextlib.contextmanager
def crash_run(cls: type[RunT], tmp_path: Path, db_url: str) -> Iterator[RunT]:
    """
    A run of ``cls``, its seed from ``DELIVERY_SIGKILL_SEED`` or chosen at random (and
    printed); killed at the end.
    """
    seed = int(os.environ.get("DELIVERY_SIGKILL_SEED") or random.SystemRandom().randrange(2**32))
    print(f"DELIVERY_SIGKILL_SEED={seed}")
    run = cls(tmp_path, seed, db_url)
    try:
        yield run
    finally:
        run.close()
