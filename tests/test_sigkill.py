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
import json
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import attrs
import pytest

from . import crashlog
from .crash_child import SERVICES, make_event
from .crashlog import Event, Receipt, resends

COUNT = 5000
BATCH = 20
#: seconds between two submits: events keep flowing while the child delivers
PAUSE = 0.005
KILLS = 12


# -- the processes --


class Child(crashlog.Child):
    """One run of ``tests.crash_child``; a thread reads the acknowledgements it prints."""

    module = "tests.crash_child"
    count = COUNT
    batch = BATCH
    pause = PAUSE


class CrashRun(crashlog.CrashRun[Child, crashlog.Kill]):
    """The receiver (``tests.receiver_process``), the children one after another."""

    count = COUNT
    services = SERVICES

    def event(self, index: int) -> Event:
        return make_event(index)

    def receiver_command(self, seed: int) -> list[str]:
        return [
            *(sys.executable, "-m", "tests.receiver_process", "--log", str(self.log.path)),
            *("--services", ",".join(s.id for s in SERVICES), "--seed", str(seed)),
        ]

    def start_child(self) -> Child:
        """The next run: from the last acknowledged event, or a little before it."""
        back = self.rng.choice([0, 0, self.rng.randint(1, 3 * BATCH)])
        start = max(0, self.acked + 1 - back)
        child = Child(len(self.children), start, self.urls, self.db, self.tmp_path)
        self.children.append(child)
        return child

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

    # -- verdict --

    def problems(self) -> list[str]:
        receipts = self.log.receipts
        return [
            *crashlog.check_refusals(self.log.others),
            *crashlog.check_complete(receipts, self.expected, self.index),
            *crashlog.check_order(receipts, self.index),
            *crashlog.check_resends(receipts),
            *crashlog.check_txn_ids(receipts),
            *crashlog.check_content(receipts, self.events, self.index),
            *crashlog.check_positions(
                (last, batch) for child in self.children for last, batch, _ in child.acks
            ),
            *crashlog.check_child_logs(child.stderr_path for child in self.children),
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
    return crashlog.spread(rng, kinds, COUNT)


@pytest.fixture
def crash_run(tmp_path: Path, db_url: str) -> Iterator[CrashRun]:
    with crashlog.crash_run(CrashRun, tmp_path, db_url) as run:
        yield run


def test_sigkill_loses_nothing(crash_run: CrashRun) -> None:
    run = crash_run
    began = time.monotonic()
    run.run_plan(kill_plan(run.rng))
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
        *crashlog.check_complete(receipts, {"c": set(range(5))}, index),
        *crashlog.check_order(receipts, index),
        *crashlog.check_resends(receipts),
        *crashlog.check_txn_ids(receipts),
        *crashlog.check_content(receipts, events, index),
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
    assert crashlog.check_positions([(1, [1, 2]), (3, [3, 4]), (3, [3, 4])]) == []
    assert crashlog.check_positions([(1, [1, 2]), (3, [3, 4]), (3, [3, 7])]) != []
    assert crashlog.check_positions([(1, [1, 5]), (3, [3, 4])]) != []
