"""
Crash safety of housekeeping: kill -9 the delivery process while it deletes, on both stores.

A child process (``tests.housekeeping_child``) runs a :class:`delivery.DeliveryService`
whose housekeeping is aggressive (payloads kept 1 s, ids 5 s, 50 rows a batch, batches back
to back, a pass every 0.1 s) against a receiver process (``tests.housekeeping_receiver``)
with three services: ``up`` answers (with some answers delayed or held); ``down`` answers
503 until the test lets it recover (it is DOWN with a stored transaction and a growing
backlog, which housekeeping must keep); ``picky`` (``reject_attempts: 1``) refuses the
events of :func:`~tests.housekeeping_child.poisoned` on their own with 400, so they become
dead letters, which housekeeping must keep too. Some events no service wants: the sorter
deletes those as it routes them.

The test kills the child with SIGKILL ten times while events flow (and once more as the
dead letters are redriven, see below), restarting it from the last acknowledged event, a
little before it, or from the oldest event acknowledged less than 1.7 s before: by then
many of those have been deleted, and only their ids (kept 5 s, longer than a restart
takes) recognise them when they are submitted again.

Four kills aim at a housekeeping batch: the child prints ``HK BEGIN`` before it hands a
batch to the store and ``HK END`` once it has committed, and the thread that reads the
child's output kills it on the ``HK BEGIN`` of a batch (one of a pass that is deleting
rows, or of the pruning of ids and of the delivery log), at most 0.3 ms later. A kill
landed inside a batch when the child's last housekeeping line is an ``HK BEGIN``: the
batch was under way and the child never saw it commit. The summary says so for each
kill, and the test asserts that at least two did. The other kills: one deep in a
bisection of ``picky`` (the receiver has refused a transaction and one of its halves,
and a quarter has arrived), one while the receiver holds an answer, one during
start-up, one as an acknowledgement comes (the events are not routed yet; the next run
starts 1.5 s later, so that they are older than the retention when it starts), and two a
few acknowledgements or deliveries after a random event. ``down`` is let recover before
the last two runs, so that those kills land while its backlog drains and its payloads
become deletable.

After every kill, with the child dead, and every 50 ms while a child runs (except while
a kill is being aimed), the database is read directly, in one read transaction: every
event acknowledged and wanted by a service that has not accepted it yet is still held
for it (in its queue, one of its stored transactions, its dead letters, or not routed
yet), and every event held still has its row. After a kill, every event the killed run
stored and acknowledged less than 0.6 s before still has its row (the retention is 1 s).

After the last kill a last run submits the rest; once everything has been delivered,
housekeeping must have deleted every row except the dead letters' events, and the dead
letters are the refused events, as submitted. The receiver is then fixed (and holds
picky's answers 0.15 s, so that what it is sent stays stored a while), and a run
redrives the dead letters two at a time, each time about when a pass of housekeeping
begins (the pass looks at their events, as old as they are); it is killed a moment after
the last, and the next run delivers what is left, after which housekeeping deletes their
rows too. The receiver then has every acknowledged event, in the order of the stream per
service, every transaction received more than once was the same id with the same body,
and events submitted again kept their first stream position.

Every random choice comes from a seed that is printed; ``DELIVERY_SIGKILL_SEED=<n>``
replays it.
"""

from __future__ import annotations

import json
import random
import sqlite3
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import attrs
import psycopg2
import pytest

from . import crashlog
from .crashlog import Event, Receipt, resends
from .housekeeping_child import HOUSEKEEPING, SERVICES, make_event, poisoned

COUNT = 2400
BATCH = 20
#: seconds between two submits: events flow for several retention periods
PAUSE = 0.04
KILLS = 10
#: the down service may recover from the run before this kill on
RECOVER_BEFORE = KILLS - 2
#: a run submits again only events acknowledged this recently: some of them deleted
#: already (older than the retention), all inside the child's dedupe window of 5 s once
#: the run has started and submits them
RESUBMIT_WITHIN = 1.7
#: after a kill as an acknowledgement comes, the next run starts this much later: events
#: not routed yet are older than the retention when housekeeping first sees them
DOWNTIME = HOUSEKEEPING.retention + 0.5
#: events acknowledged less than this before a kill are younger than the retention (an
#: event's arrival time is taken a moment before its acknowledgement)
YOUNG = HOUSEKEEPING.retention - 0.4
#: how often it checks the database while a child runs (except while it aims a kill)
LIVE_EVERY = 0.05
#: once fixed, picky holds its answers this long: the redriven events stay in stored
#: transactions long enough for a check of the database to see whether they kept their rows
FIXED_DELAY = 3 * LIVE_EVERY
PICKY = "picky"
DOWN = "down"


# -- what the receiver logged --


class ReceiverLog(crashlog.ReceiverLog):
    """The receiver's log file, read as it grows: every transaction request, and its answer."""

    def __init__(self, path: Path, index: dict[str, int], services: Sequence[str] = ()) -> None:
        super().__init__(path, index, services)
        #: the answer to each transaction request (refused or not), by the receipt's seq
        self.status: dict[int, int] = {}

    @property
    def accepted(self) -> dict[str, set[int]]:
        """The indices of the events each service accepted (answered 200) so far."""
        return self.received

    def _took(self, record: dict[str, Any], receipt: Receipt) -> bool:
        self.status[receipt.seq] = record["status"]
        return bool(record["status"] == 200)

    def ok(self, after: int = 0) -> list[Receipt]:
        """The transactions accepted, those logged after line ``after``."""
        return [r for r in self.receipts if r.seq > after and self.status[r.seq] == 200]


def check_arrival(receipts: Sequence[Receipt], index: dict[str, int]) -> list[str]:
    """
    Per service, the accepted transactions taken in the order they first arrived carry
    strictly increasing events: stream order, and no event in two transactions. (A
    resend of a transaction accepted already is the same transaction: it is skipped.)
    """
    problems = []
    previous: dict[str, tuple[int, str]] = {}
    seen: set[tuple[str, str]] = set()
    for r in receipts:
        if (r.service, r.txn) in seen:
            continue
        seen.add((r.service, r.txn))
        for e in r.events:
            n = index.get(e["event_id"], -1)
            last, last_txn = previous.get(r.service, (-1, "none"))
            if n <= last:
                problems.append(
                    f"{r.service}: txn {r.txn} (log line {r.seq}) brought event {n} after event"
                    f" {last} (in txn {last_txn})"
                )
            previous[r.service] = (n, r.txn)
    return problems


# -- the database, read directly while no child runs (or beside the last ones) --


@attrs.frozen
class DeadRow:
    service_id: str
    stream_id: int
    event_id: str
    json: bytes
    status: int | None


@attrs.frozen
class Snapshot:
    """What the database holds, as far as housekeeping goes."""

    sorter_position: int
    #: the positions of the events whose rows are kept
    events: frozenset[int]
    #: each service's queue
    queue: dict[str, set[int]]
    #: the positions of the events of each service's stored transactions
    transactions: dict[str, set[int]]
    dead: list[DeadRow]
    #: the ids kept of deleted events
    seen: frozenset[str]
    attempts: int

    def held(self, service_id: str) -> set[int]:
        """The positions the database holds for a service: queued, stored, set aside."""
        return (
            self.queue.get(service_id, set())
            | self.transactions.get(service_id, set())
            | {d.stream_id for d in self.dead if d.service_id == service_id}
        )


def unpack_ids(packed: Any) -> set[int]:
    """The positions packed with a stored transaction (little-endian 64-bit integers)."""
    data = bytes(packed or b"")
    return set(struct.unpack(f"<{len(data) // 8}q", data))


def connect(db_url: str) -> Any:
    """
    A read-only DB-API connection to the test's database, whose reads all see one state
    of it: one read transaction (on PostgreSQL a killed child's last COMMIT may still land
    while the test reads).
    """
    if db_url.startswith("sqlite:///"):
        path = db_url[len("sqlite:///") :]
        connection = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, timeout=10, isolation_level=None
        )
        connection.execute("BEGIN")
        return connection
    connection = psycopg2.connect(db_url, connect_timeout=5)
    connection.set_session(isolation_level="REPEATABLE READ", readonly=True)
    return connection


#: a database a run was killed in before it made its tables (migrations are one transaction)
EMPTY = Snapshot(0, frozenset(), {}, {}, [], frozenset(), 0)


def snapshot(db_url: str, seen: bool = True) -> Snapshot:
    """What the database holds now, read in one transaction (``seen``: the ids kept too)."""
    sqlite = db_url.startswith("sqlite:///")
    if sqlite and not Path(db_url[len("sqlite:///") :]).exists():
        return EMPTY
    connection = connect(db_url)
    try:
        cursor = connection.cursor()

        def rows(sql: str) -> list[tuple[Any, ...]]:
            cursor.execute(sql)
            return list(cursor.fetchall())

        tables = (
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'housekeeping'"
            if sqlite
            else "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'housekeeping'"
        )
        if not rows(tables)[0][0]:
            return EMPTY
        queue: dict[str, set[int]] = {}
        for service_id, stream_id in rows("SELECT service_id, stream_id FROM service_queue"):
            queue.setdefault(service_id, set()).add(int(stream_id))
        transactions: dict[str, set[int]] = {}
        for service_id, packed in rows("SELECT service_id, stream_ids FROM transactions"):
            transactions.setdefault(service_id, set()).update(unpack_ids(packed))
        dead = [
            DeadRow(s, int(p), e, bytes(j), status)
            for s, p, e, j, status in rows(
                "SELECT service_id, stream_id, event_id, json, status FROM dead_letters ORDER BY id"
            )
        ]
        return Snapshot(
            sorter_position=int(rows("SELECT stream_id FROM sorter_position")[0][0]),
            events=frozenset(int(p) for (p,) in rows("SELECT stream_id FROM events")),
            queue=queue,
            transactions=transactions,
            dead=dead,
            seen=frozenset(e for (e,) in rows("SELECT event_id FROM seen_events") if seen),
            attempts=int(rows("SELECT COUNT(*) FROM attempts")[0][0]),
        )
    finally:
        connection.close()


def count_rows(db_url: str, table: str) -> int:
    """The rows of ``table`` (of a database that has its tables)."""
    connection = connect(db_url)
    try:
        cursor = connection.cursor()
        cursor.execute(f"SELECT COUNT(*) FROM {table}")
        return int(cursor.fetchone()[0])
    finally:
        connection.close()


def check_kept(
    snap: Snapshot,
    positions: dict[int, int],
    expected: dict[str, set[int]],
    accepted: dict[str, set[int]],
) -> list[str]:
    """
    Nothing acknowledged is lost and nothing needed is deleted: every acknowledged event a
    service wants and has not accepted yet is held for it (queued, in one of its stored
    transactions, a dead letter of its own, or not routed yet); every event held has its
    row (the queue and a redrive read it, a split or a dead letter of an old transaction
    looks it up); and every acknowledged event the sorter is not past yet has its row.
    """
    problems = []
    for service, wanted in expected.items():
        held = snap.held(service)
        for i in sorted(wanted - accepted.get(service, set())):
            position = positions.get(i)
            if position is None:
                continue  # never acknowledged
            if position not in held and position <= snap.sorter_position:
                problems.append(
                    f"{service}: event {i} (position {position}) was acknowledged and never"
                    " delivered, and the database no longer holds it for the service"
                )
        for position in sorted(held - snap.events):
            problems.append(
                f"{service}: the row of the event at position {position} was deleted while"
                " the service still needs it"
            )
    for i, position in sorted(positions.items()):
        if position > snap.sorter_position and position not in snap.events:
            problems.append(f"event {i} (position {position}) was deleted before it was routed")
    return problems


def check_young(
    snap: Snapshot, child: Child, positions: dict[int, int], expected: dict[str, set[int]]
) -> list[str]:
    """
    Housekeeping keeps a payload for the retention: an event a service wants that the run
    just killed stored and acknowledged less than ``YOUNG`` seconds before it was killed
    still has its row.
    """
    if child.killed_at is None:
        return []
    wanted = set().union(*expected.values())
    problems = []
    for last, batch, at in child.acks:
        if child.killed_at - at > YOUNG:
            continue
        for i in range(max(last - len(batch) + 1, child.fresh), last + 1):
            if i in wanted and positions.get(i) not in snap.events:
                problems.append(
                    f"event {i} (position {positions.get(i)}) was deleted less than"
                    f" {HOUSEKEEPING.retention:g} s after it arrived"
                )
    return problems


def check_dead_letters(snap: Snapshot, events: Sequence[Event], index: dict[str, int]) -> list[str]:
    """The dead letters are the poisoned events ``picky`` wants, each once, as submitted."""
    wanted = {i for i in crashlog.expected_events(events, SERVICES)[PICKY] if poisoned(i)}
    problems = []
    got = [index.get(d.event_id, -1) for d in snap.dead]
    if sorted(got) != sorted(wanted):
        problems.append(
            f"the dead letters are not the events picky refuses: missing"
            f" {sorted(wanted - set(got))[:10]}, unexpected {sorted(set(got) - wanted)[:10]}"
            f", twice {sorted(i for i in set(got) if got.count(i) > 1)[:10]}"
        )
    for d in snap.dead:
        i = index.get(d.event_id, -1)
        if d.service_id != PICKY or d.status != 400:
            problems.append(f"dead letter of {d.event_id}: {d.service_id}, status {d.status}")
        if i >= 0 and json.loads(d.json) != events[i]:
            problems.append(f"dead letter of {d.event_id}: not the event submitted")
        if d.stream_id not in snap.events:
            problems.append(f"dead letter of {d.event_id}: its event's row was deleted")
    return problems


# -- the processes --


class Child(crashlog.Child):
    """
    One run of ``tests.housekeeping_child``; a thread reads what it prints, and kills it
    as a housekeeping batch begins or an acknowledgement comes when armed to.
    """

    module = "tests.housekeeping_child"
    count = COUNT
    batch = BATCH
    pause = PAUSE

    def __init__(
        self, number: int, start: int, fresh: int, urls: str, db: str, logs: Path, **extra: str
    ) -> None:
        #: the events from this one on were stored first by this run, when it acknowledges
        #: them (before it, it submits again what earlier runs stored, acknowledged or not)
        self.fresh = fresh
        #: what it printed, kept for a look after a failure
        self.stdout_path = logs / f"child-{number}.stdout"
        self.redriven: int | None = None
        #: the housekeeping lines it printed: ("BEGIN" | "END", operation, rows deleted)
        self.housekeeping: list[tuple[str, str, int]] = []
        #: when armed: (what to kill it on: the operations of batches, or ACKED; seconds
        #: to wait first)
        self._armed: tuple[tuple[str, ...], float] | None = None
        #: rows the last batch of each operation deleted
        self._last_deleted: dict[str, int] = {}
        #: when it was sent SIGKILL
        self.killed_at: float | None = None
        super().__init__(number, start, urls, db, logs, **extra)

    def _read(self, stdout: IO[bytes]) -> None:
        with self.stdout_path.open("wb") as copy:
            for line in stdout:
                copy.write(line)
                self._line(line)

    def _heard(self, word: str, rest: list[str]) -> None:
        if word == "ACKED":
            if int(rest[0]) >= self.fresh:  # events stored for the first time
                self._maybe_kill(word)
        elif word == "REDRIVEN":
            self.redriven = int(rest[0])
            self._maybe_kill(word)
        elif word == "HK":
            deleted = int(rest[2]) if rest[0] == "END" else 0
            self.housekeeping.append((rest[0], rest[1], deleted))
            if rest[0] == "END":
                self._last_deleted[rest[1]] = deleted
            else:
                self._maybe_kill(rest[1])

    def _maybe_kill(self, what: str) -> None:
        """
        Kill the child now if armed for ``what`` has just come: the batch of an operation
        has begun, a batch of events stored for the first time was acknowledged
        (``ACKED``), or the dead letters were redriven (``REDRIVEN``).
        """
        armed = self._armed
        if armed is None or what not in armed[0]:
            return
        # a batch of a pass that is deleting rows: the one before it deleted some
        if what == "delete_events" and not self._last_deleted.get(what):
            return
        self._armed = None
        if armed[1]:
            time.sleep(armed[1])
        with self._signalling:
            if self.process.returncode is None:
                self.killed_by_reader = True
                self._signal()

    def _signal(self) -> None:
        self.killed_at = time.monotonic()
        super()._signal()

    def arm(self, what: tuple[str, ...], delay: float = 0.0) -> None:
        """
        Kill the child ``delay`` seconds after the next batch of the operations ``what``
        begins (or ``ACKED`` or ``REDRIVEN`` comes).
        """
        self._armed = (what, delay)

    def in_batch(self) -> str | None:
        """The operation of the batch under way when it stopped, if one was."""
        if self.housekeeping and self.housekeeping[-1][0] == "BEGIN":
            return self.housekeeping[-1][1]
        return None

    def deleted(self, operation: str) -> int:
        return sum(n for kind, op, n in self.housekeeping if kind == "END" and op == operation)

    def kill(self) -> None:
        """SIGKILL; wait until it is gone and everything it printed is read."""
        self._armed = None
        super().kill()


@attrs.frozen
class Kill(crashlog.Kill):
    """Where things stood when one kill landed, in the database too."""

    #: the housekeeping batch under way when it landed, if one was
    in_batch: str | None
    #: rows in events, and events acknowledged so far
    rows: int
    ingested: int
    #: events acknowledged that the sorter had not routed yet
    unrouted: int


class CrashRun(crashlog.CrashRun[Child, Kill]):
    """The receiver, the children one after another, and what they did."""

    count = COUNT
    services = SERVICES
    log_class = ReceiverLog
    live_every = LIVE_EVERY
    log: ReceiverLog

    def __init__(self, tmp_path: Path, seed: int, db_url: str) -> None:
        self.recover_file = tmp_path / "recovered"
        self.fixed_file = tmp_path / "fixed"
        super().__init__(tmp_path, seed, db_url)
        #: the events some service wants
        self.wanted = set().union(*self.expected.values())
        #: the events some service wants submitted again whose ids only ``seen_events``
        #: still held: housekeeping had deleted them
        self.resubmitted_deleted = 0
        self.resubmitted = 0
        self.last_snapshot: Snapshot | None = None
        #: wait DOWNTIME before the next run
        self.downtime = False
        #: the events' rows last counted
        self.rows = -1
        #: how often the database was checked while a child ran
        self.live_checks = 0

    def event(self, index: int) -> Event:
        return make_event(index)

    def receiver_command(self, seed: int) -> list[str]:
        return [
            *(sys.executable, "-m", "tests.housekeeping_receiver"),
            *("--log", str(self.log.path), "--seed", str(seed)),
            *("--services", ",".join(s.id for s in SERVICES)),
            *("--down", DOWN, "--recover", str(self.recover_file)),
            *("--picky", PICKY, "--fixed", str(self.fixed_file)),
            *("--fixed-delay", str(FIXED_DELAY)),
        ]

    # -- what was acknowledged --

    def positions(self) -> dict[int, int]:
        """The first stream position of every event acknowledged so far."""
        found: dict[int, int] = {}
        for child in self.children:
            for last, batch, _ in child.acks:
                for i, position in zip(range(last - len(batch) + 1, last + 1), batch, strict=True):
                    found.setdefault(i, position)
        return found

    def first_acked(self) -> dict[int, float]:
        """When each event acknowledged so far was acknowledged first."""
        found: dict[int, float] = {}
        for child in self.children:
            for last, batch, at in child.acks:
                for i in range(last - len(batch) + 1, last + 1):
                    found.setdefault(i, at)
        return found

    # -- children --

    def start_child(self, **extra: str) -> Child:
        """
        The next run: from the last acknowledged event, a little before it, or from the
        oldest event acknowledged less than ``RESUBMIT_WITHIN`` seconds ago (never before
        it).
        """
        if self.downtime:
            time.sleep(DOWNTIME)
            self.downtime = False
        back = self.rng.choice([0, self.rng.randint(1, 3 * BATCH), self.acked + 1])
        recent = time.monotonic() - RESUBMIT_WITHIN
        first = self.first_acked()
        oldest_recent = min((i for i, at in first.items() if at >= recent), default=self.acked + 1)
        start = max(0, self.acked + 1 - back, oldest_recent)
        if self.last_snapshot is not None:
            seen = self.last_snapshot.seen
            again = range(start, self.acked + 1)
            self.resubmitted += len(again)
            self.resubmitted_deleted += sum(
                self.events[i]["event_id"] in seen and i in self.wanted for i in again
            )
        fresh = self.acked + 1 + BATCH
        extra.setdefault("again", str(self.acked + 1))
        child = Child(len(self.children), start, fresh, self.urls, self.db, self.tmp_path, **extra)
        self.children.append(child)
        return child

    def check_live(self, child: Child) -> None:
        """
        :func:`check_kept` on the database as a running child leaves it: every state it
        commits holds what it must. (What was acknowledged is taken before the database
        is read, what the receiver accepted after: each is as recent as the other needs.)
        """
        positions = self.positions()
        snap = snapshot(self.db, seen=False)
        self.log.poll()
        self.live_checks += 1
        problems = check_kept(snap, positions, self.expected, self.log.accepted)
        if problems:
            pytest.fail(
                f"seed {self.seed}: while run {child.number} ran"
                f" ({time.monotonic() - child.started_at:.3f} s in):\n" + "\n".join(problems[:30])
            )

    def deliverable(self) -> dict[str, set[int]]:
        """What each service accepts while ``picky`` refuses the poisoned events."""
        if self.fixed_file.exists():
            return self.expected
        return {
            s: {i for i in wanted if not (s == PICKY and poisoned(i))}
            for s, wanted in self.expected.items()
        }

    def landed(self, child: Child, kind: str, after: float) -> Kill:
        positions = self.positions()
        snap = self.last_snapshot = snapshot(self.db)
        return Kill(
            child.number,
            kind,
            after,
            self.acked,
            len(self.log.receipts),
            child.in_batch(),
            len(snap.events),
            len(positions),
            sum(p > snap.sorter_position for p in positions.values()),
        )

    def kill(self, child: Child, kind: str) -> None:
        """Kill the child, and check the database it leaves."""
        super().kill(child, kind)
        assert self.last_snapshot is not None
        snap, positions = self.last_snapshot, self.positions()
        problems = check_kept(snap, positions, self.expected, self.log.accepted)
        problems += check_young(snap, child, positions, self.expected)
        if problems:
            pytest.fail(
                f"seed {self.seed}: after kill {len(self.kills)} ({self.kills[-1]}):\n"
                + "\n".join(problems[:30])
            )

    def run_until_kill(self, kind: str, target: int) -> None:
        """The down service recovers from the run before kill ``RECOVER_BEFORE`` on."""
        if len(self.kills) == RECOVER_BEFORE:
            self.recover_file.touch()
        super().run_until_kill(kind, target)

    def aim(self, child: Child, kind: str) -> None:
        rng = self.rng
        if kind == "ingest":
            child.arm(("ACKED",))
            self.wait(child, lambda: not child.alive(), 5)
            self.downtime = True
        elif kind in ("batch", "prune"):
            operations = ("delete_events",) if kind == "batch" else ("prune_seen", "prune_attempts")
            child.arm(operations, rng.choice([0.0, rng.uniform(0, 0.0003)]))
            self.wait(child, lambda: not child.alive(), 5)
        elif kind == "bisect":
            seen = len(self.log.receipts)

            def refused(r: Receipt) -> bool:
                return self.log.status[r.seq] == 400 and len(r.events) > 1

            def halving() -> bool:
                # deep in a bisection: picky refused a transaction, then one of its halves,
                # and a half of that half has arrived (the halves' siblings are stored)
                ours = [r for r in self.log.receipts[seen:] if r.service == PICKY]
                return any(
                    refused(x) and refused(a) and len(x.events) > len(a.events) > len(b.events)
                    for x, a, b in zip(ours, ours[1:], ours[2:], strict=False)
                ) or self.idle(child)

            self.wait(child, halving, 5)
        else:
            super().aim(child, kind)

    def settle(
        self, child: Child, condition: Callable[[], bool], what: str, timeout: float
    ) -> None:
        """
        Wait until ``condition()`` holds, at most ``timeout`` seconds, or fail saying what;
        check the database meanwhile.
        """
        if not self.wait(child, condition, timeout, live=True):
            pytest.fail(
                f"seed {self.seed}: run {child.number}: {what} after {timeout} s "
                f"({self.rows} events' rows): {self.missing()}\n{child.stderr_tail()}"
            )

    def rows_left(self, count: int) -> Callable[[], bool]:
        """
        A condition: the database keeps exactly ``count`` events' rows (read every 0.1 s;
        ``self.rows`` is the last count read).
        """
        next_read = [0.0]

        def condition() -> bool:
            if time.monotonic() < next_read[0]:
                return False
            next_read[0] = time.monotonic() + 0.1
            self.rows = count_rows(self.db, "events")
            return self.rows == count

        return condition

    def summary(self, seconds: float) -> str:
        receipts = self.log.receipts
        deleted = {
            op: sum(child.deleted(op) for child in self.children)
            for op in ("delete_events", "prune_seen", "prune_attempts")
        }
        lines = [
            f"seed {self.seed}: {len(self.kills)} kills "
            f"({sum(k.in_batch is not None for k in self.kills)} inside a housekeeping batch), "
            f"{len(self.children)} runs, {len(receipts)} transaction requests, "
            f"{resends(receipts)} resends, {self.live_checks} checks of the database while a "
            f"run ran, {self.resubmitted} events submitted again "
            f"({self.resubmitted_deleted} of them deleted by housekeeping already), "
            f"deleted {deleted}, "
            f"{seconds:.1f} s"
        ]
        lines += [f"  {kill}" for kill in self.kills]
        return "\n".join(lines)


def kill_plan(rng: random.Random) -> list[tuple[str, int]]:
    """
    ``KILLS`` kills in order, each as (kind, event to wait for): four in a housekeeping
    batch, one deep in a bisection, one with a request in flight, one in start-up, one as
    an acknowledgement comes (the next run starts ``DOWNTIME`` later), two a few
    acknowledgements or deliveries after their event.
    """
    kinds = ["batch", "batch", "batch", "prune", "bisect", "held", "startup", "ingest"]
    kinds += ["acks", "receipts"]
    rng.shuffle(kinds)
    # while down is down, with a kill after it: events routed late to its queue stay there
    early = rng.randrange(RECOVER_BEFORE - 1)
    late = kinds.index("ingest")
    if late > early:
        kinds[early], kinds[late] = kinds[late], kinds[early]
    return crashlog.spread(rng, kinds, COUNT)


@pytest.fixture
def crash_run(tmp_path: Path, db_url: str) -> Iterator[CrashRun]:
    with crashlog.crash_run(CrashRun, tmp_path, db_url) as run:
        yield run


def test_sigkill_during_housekeeping_loses_nothing(crash_run: CrashRun) -> None:
    run = crash_run
    began = time.monotonic()
    run.run_plan(kill_plan(run.rng))
    summary = run.summary(time.monotonic() - began)

    # The last run submits the rest and delivers everything but the dead letters; then
    # housekeeping deletes every row but theirs.
    run.recover_file.touch()
    last = run.start_child()
    run.settle(last, lambda: run.idle(last), "not everything was delivered", 30)
    dead = len([i for i in run.expected[PICKY] if poisoned(i)])
    kept = f"the events' rows did not come down to the {dead} dead letters' events"
    run.settle(last, run.rows_left(dead), kept, 10)
    code = last.terminate()
    assert code == 0, f"{summary}\nthe last run did not stop cleanly:\n{last.stderr_tail()}"
    run.acked = max(run.acked, last.last_acked)
    assert run.acked == COUNT - 1, summary
    positions = run.positions()
    snap = snapshot(run.db)
    problems = [
        *check_kept(snap, positions, run.expected, run.log.accepted),
        *check_dead_letters(snap, run.events, run.index),
    ]
    assert not problems, f"{summary}\n" + "\n".join(problems[:30])
    assert (snap.queue, snap.transactions) == ({}, {}), summary

    # The receiver is fixed, and a run redrives the dead letters (its first housekeeping
    # pass under way): it is killed as they go out again, and they must be held with their
    # rows. The next run delivers them, and their rows go too.
    run.log.poll()
    before_redrive = max((r.seq for r in run.log.receipts), default=0)
    run.fixed_file.touch()
    redrive = run.start_child(redrive=PICKY, seed=str(run.rng.randrange(2**32)))
    redrive.arm(("REDRIVEN",), run.rng.uniform(0.002, 0.03))
    run.settle(redrive, lambda: not redrive.alive(), "the dead letters were not redriven", 15)
    run.kill(redrive, "redrive")
    last = run.start_child()
    run.settle(last, lambda: run.idle(last), "the dead letters were not delivered", 15)
    run.settle(last, run.rows_left(0), "the redriven events' rows were not deleted", 10)
    code = last.terminate()
    assert code == 0, f"{summary}\nthe last run did not stop cleanly:\n{last.stderr_tail()}"
    run.stop_receiver()
    summary = run.summary(time.monotonic() - began)
    print(summary)

    receipts = run.log.receipts
    accepted = run.log.ok()
    redriven = run.log.ok(before_redrive)
    final = snapshot(run.db)
    problems = [
        *crashlog.check_refusals(run.log.others),
        *crashlog.check_complete(accepted, run.expected, run.index),
        *check_arrival([r for r in accepted if r.seq <= before_redrive], run.index),
        *check_arrival(redriven, run.index),
        # (bisecting gives both halves their ids at once, and sends the first half's own
        # halves before the second: picky's ids do not grow in the order they arrive)
        *crashlog.check_order([r for r in accepted if r.service != PICKY], run.index),
        *crashlog.check_txn_ids([r for r in receipts if r.service != PICKY]),
        *crashlog.check_resends(receipts),
        *crashlog.check_content(accepted, run.events, run.index),
        *crashlog.check_positions((last, batch) for c in run.children for last, batch, _ in c.acks),
        *crashlog.check_child_logs(child.stderr_path for child in run.children),
        *check_kept(final, run.positions(), run.expected, run.log.accepted),
    ]
    assert not problems, f"{summary}\n" + "\n".join(problems[:30])
    assert redrive.redriven == dead, summary
    assert {r.service for r in redriven} == {PICKY}, summary
    again = {(r.service, r.txn): r for r in redriven}.values()  # (each transaction once)
    assert sorted(run.index[e["event_id"]] for r in again for e in r.events) == sorted(
        i for i in run.expected[PICKY] if poisoned(i)
    ), summary
    assert (final.events, final.queue, final.transactions, final.dead) == (
        frozenset(),
        {},
        {},
        [],
    ), summary
    # Housekeeping did its work while the child was being killed: payloads, ids and the
    # delivery log were deleted, and the kills left fewer rows than events acknowledged.
    assert sum(c.deleted("delete_events") for c in run.children) > 0, summary
    assert sum(c.deleted("prune_seen") for c in run.children) > 0, summary
    assert sum(c.deleted("prune_attempts") for c in run.children) > 0, summary
    assert any(k.rows < k.ingested for k in run.kills), summary
    assert len(run.kills) == KILLS + 1, summary
    # How we know kills landed in a housekeeping batch: the run's last housekeeping line
    # was the HK BEGIN of a batch whose HK END it never printed.
    assert sum(k.in_batch is not None for k in run.kills) >= 2, summary
    assert resends(receipts) >= 1, f"{summary}\nno transaction was ever resent"
