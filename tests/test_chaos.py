"""
``scripts/chaos``, short: the installed daemon killed with SIGKILL 20 times while 3,000
events flow in through its API and three receivers fail at random, on SQLite and on
PostgreSQL; and its checks, fed made-up logs, catch what they should.

Every random choice comes from a seed that is printed; ``DELIVERY_CHAOS_SEED=<n>`` replays
it (``scripts/chaos --seed <n> -v`` too).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .chaos import ChaosLog, Verdict, judge, make_event, service_specs
from .chaos_receiver import record
from .daemon_harness import write_config, write_registration
from .faults import Fault, Seen, answer, hang, ok, slow
from .receiver_process import TXN_PREFIX

ROOT = Path(__file__).resolve().parent.parent
KILLS = 20
EVENTS = 3000
SUMMARY = re.compile(
    rf"^kills={KILLS} events={EVENTS} lost=0 reordered=0 duplicates=\d+ \(same-id\)$", re.M
)


def test_chaos_on_the_installed_daemon(db_url: str) -> None:
    seed = int(os.environ.get("DELIVERY_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"DELIVERY_CHAOS_SEED={seed}")
    command = [
        *(sys.executable, str(ROOT / "scripts" / "chaos"), "--seed", str(seed)),
        *("--kills", str(KILLS), "--events", str(EVENTS), "--services", "3"),
        *("--database", db_url, "--timeout", "60", "--verbose"),
    ]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    output = f"seed {seed}:\n{result.stdout}\n{result.stderr[-6000:]}"
    assert result.returncode == 0, output
    assert SUMMARY.search(result.stdout), output
    assert "problem:" not in result.stderr, output


# -- the checks catch what they should --

SPECS = service_specs(1)  # s0 wants every event
COUNT = 6
EVENTS_MADE_UP = [make_event(i, 1) for i in range(COUNT)]
#: every event acknowledged, in two batches
ACKS = [(2, [1, 2, 3]), (5, [4, 5, 6])]


def _line(seq: int, txn: int, indices: Sequence[int], fault: Fault, body: bytes | None) -> str:
    if body is None:
        body = json.dumps({"events": [EVENTS_MADE_UP[i] for i in indices]}).encode()
    seen = Seen(seq, "txn", "PUT", f"{TXN_PREFIX}{txn}", str(txn), body, {}, 0.0, fault, 0)
    return json.dumps({"seq": seq, **record("s0", seen)})


def _judge(
    tmp_path: Path,
    *requests: tuple[int, Sequence[int]] | tuple[int, Sequence[int], Fault],
    acks: Sequence[tuple[int, list[int]]] = ACKS,
    bodies: dict[int, bytes] | None = None,
) -> Verdict:
    """What the chaos checks say of a receiver log with these (txn, events[, answer])."""
    path = tmp_path / "receiver.log"
    lines = []
    for seq, (txn, indices, *fault) in enumerate(requests, 1):
        lines.append(_line(seq, txn, indices, fault[0] if fault else ok(), (bodies or {}).get(seq)))
    path.write_text("".join(line + "\n" for line in lines))
    log = ChaosLog(path, {e["event_id"]: i for i, e in enumerate(EVENTS_MADE_UP)})
    log.poll()
    return judge(events=EVENTS_MADE_UP, specs=SPECS, log=log, acks=acks, kills=3)


def test_the_checks_pass_a_good_log(tmp_path: Path) -> None:
    verdict = _judge(
        tmp_path,
        (1, [0, 1], answer(503)),  # failed: sent again, not a duplicate
        (1, [0, 1], hang()),
        (1, [0, 1]),
        (2, [2, 3, 4], slow(3)),  # accepted, but the sender gave up: sent again
        (2, [2, 3, 4]),
        (3, [5]),
    )
    assert verdict.problems == ()
    assert verdict.summary == "kills=3 events=6 lost=0 reordered=0 duplicates=1 (same-id)"


def test_the_checks_catch_a_lost_event(tmp_path: Path) -> None:
    # event 5 only ever got a 500
    verdict = _judge(tmp_path, (1, [0, 1]), (2, [2, 3, 4]), (3, [5], answer(500)))
    assert verdict.lost == 1
    assert verdict.summary.startswith("kills=3 events=6 lost=1 ")
    assert any("1 events never arrived: [5]" in p for p in verdict.problems), verdict.problems


def test_the_checks_catch_a_reordered_event(tmp_path: Path) -> None:
    verdict = _judge(tmp_path, (1, [0, 1]), (2, [3, 2, 4]), (3, [5]))
    assert verdict.reordered == 1
    assert "reordered=1" in verdict.summary
    assert any("carries event 2 after event 3" in p for p in verdict.problems), verdict.problems


def test_the_checks_catch_a_resend_with_another_body(tmp_path: Path) -> None:
    changed = json.dumps({"events": [EVENTS_MADE_UP[2], EVENTS_MADE_UP[3]]}).encode()
    verdict = _judge(
        tmp_path,
        (1, [0, 1]),
        (2, [2, 3, 4]),
        (2, [2, 3, 4]),
        (3, [5]),
        bodies={3: changed},
    )
    assert any("txn 2 came again with another body" in p for p in verdict.problems), (
        verdict.problems
    )


def test_the_checks_catch_an_event_in_two_transactions(tmp_path: Path) -> None:
    verdict = _judge(tmp_path, (1, [0, 1]), (2, [1, 2, 3, 4]), (3, [5]))
    assert verdict.summary.endswith("duplicates=0 (1 with another id)")
    assert verdict.problems


def test_the_checks_catch_an_event_that_was_never_acknowledged(tmp_path: Path) -> None:
    verdict = _judge(tmp_path, (1, [0, 1]), (2, [2, 3, 4]), acks=[(2, [1, 2, 3])])
    assert "only 3 of 6 events were acknowledged" in verdict.problems


def test_the_checks_catch_a_changed_stream_position(tmp_path: Path) -> None:
    acks = [*ACKS, (5, [4, 5, 7])]  # event 5 submitted again got another position
    verdict = _judge(tmp_path, (1, [0, 1]), (2, [2, 3, 4]), (3, [5]), acks=acks)
    assert any("event 5 was at position 6, then at 7" in p for p in verdict.problems)


# -- found by chaos --


def test_a_daemon_that_cannot_start_exits_non_zero(tmp_path: Path) -> None:
    registration = write_registration(tmp_path, "a", "http://127.0.0.1:9")
    # nothing listens on port 1: the store cannot open
    config = write_config(
        tmp_path,
        [registration],
        database="postgresql://postgres@127.0.0.1:1/nothing",
        start_timeout=1,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    twistd = str(Path(sys.executable).with_name("twistd"))
    result = subprocess.run(
        [twistd, "--nodaemon", "--pidfile=", "delivery", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert "delivery could not start" in output
    assert "trying again" in output  # it did try for start_timeout first
    assert result.returncode != 0
