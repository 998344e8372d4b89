"""
The delivery log: one row per attempt to send a transaction, written with the write that
records the attempt's outcome, read newest first (``DeliveryService.attempts``, ``GET
/v1/services/{id}/attempts``, ``delivery attempts``) and pruned by the housekeeper
(``store.prune_attempts``). Every outcome against a real receiver on 127.0.0.1 (or a
ScriptedSender, for the clock), on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread

from delivery import Attempt, UnknownServiceError, cli
from delivery._interfaces import IStore
from delivery.store import _sql, open_store
from delivery.store._schema import SQLITE, migrations
from delivery.store.sqlite import drive
from delivery.testing import OK, ScriptedSender

from .daemon_harness import ADMIN, INGEST, Running, start_daemon, write_config, write_registration
from .harness import Recorder, event, make_service, registration, txn_id
from .receiver import HS_TOKEN

#: delivery options for a service that stays DOWN until the test retries it
SLOW: dict[str, Any] = {"initial_delay": 100, "max_delay": 1000, "jitter": 0, "probe": False}


def started(
    db_url: str,
    reactor: Any,
    url: str | None,
    senders: dict[str, Any] | None = None,
    clock: Clock | None = None,
    **options: Any,
) -> Any:
    """Service "a", for every event, started: ``(service, recorder, clock)``."""
    regs = [registration("a", url, users=".*", **options)]
    service, recorder, clock = make_service(
        open_store(db_url, reactor), regs, reactor, clock=clock or Clock(), senders=senders
    )
    service.startService()
    return service, recorder, clock


async def until(condition: Callable[[], bool], timeout: float = 15) -> None:
    """Wait (on the real reactor, 10 ms at a time) until ``condition()`` holds."""
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await deferLater(reactor, 0.01, lambda: None)


def row(attempt: Attempt) -> tuple[Any, ...]:
    """What a test compares of an attempt: all but its id and times."""
    return (
        attempt.txn_id,
        attempt.event_count,
        attempt.status,
        attempt.outcome,
        attempt.error,
        attempt.resend,
    )


# -- one row per attempt, for every outcome --


@pytest_twisted.ensureDeferred
async def test_an_acknowledged_transaction_is_one_row(db_url, reactor, receiver):
    service, recorder, clock = started(db_url, reactor, receiver.url)
    clock.advance(1000)
    try:
        await service.submit([event(n) for n in range(3)])
        await recorder.wait_for_acks(1)
        (attempt,) = await service.attempts("a")
        assert attempt == Attempt(
            service_id="a",
            txn_id=txn_id(service.store, 1),
            ts=1000.0,
            duration=0.0,
            event_count=3,
            status=200,
            outcome="ok",
            error=None,
            resend=False,
            id=attempt.id,
        )
        assert attempt.id > 0
        assert [r.txn_id for r in receiver.requests] == [str(attempt.txn_id)]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_the_start_and_duration_of_an_attempt_come_from_the_clock(db_url, reactor):
    clock = Clock()
    sender = ScriptedSender([OK], clock=clock, latency=2.5)
    service, recorder, _ = started(db_url, reactor, "http://127.0.0.1:1", {"a": sender}, clock)
    clock.advance(50)
    try:
        await service.submit([event(1)])
        await until(lambda: len(sender.transactions) == 1)
        clock.advance(1)
        clock.advance(1.5)  # the answer
        await recorder.wait_for_acks(1)
        (attempt,) = await service.attempts("a")
        assert (attempt.ts, attempt.duration) == (50.0, 2.5)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_failure_then_a_resend_of_the_same_transaction(db_url, reactor, receiver):
    receiver.then(503, body=b"busy")
    service, recorder, _ = started(db_url, reactor, receiver.url, **SLOW)
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1), event(2)])
        await down
        (failed,) = await service.attempts("a")
        first = txn_id(service.store, 1)
        assert row(failed) == (first, 2, 503, "failed", "HTTP 503: busy", False)
        up = recorder.wait_for_state("a", "up")
        await service.retry_now("a")
        await up
        await recorder.wait_for_acks(1)
        again, before = await service.attempts("a")
        assert before == failed
        assert row(again) == (first, 2, 200, "ok", None, True)
        assert again.id > failed.id  # newest first
        assert [r.txn_id for r in receiver.requests] == [str(first)] * 2
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_no_answer_has_no_status(db_url, reactor):
    service, recorder, _ = started(db_url, reactor, "http://127.0.0.1:1", **SLOW)
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        (attempt,) = await service.attempts("a")
        assert (attempt.status, attempt.outcome, attempt.resend) == (None, "failed", False)
        assert attempt.error == (await service.status("a")).last_error
        assert attempt.error
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_transaction_cut_off_by_a_stop_is_a_resend_after_the_restart(
    db_url, reactor, receiver
):
    receiver.then(hang=True)
    service, recorder, _ = started(db_url, reactor, receiver.url)
    try:
        await service.submit([event(1)])
        await receiver.wait_for(lambda: len(receiver.held) == 1)
    finally:
        await service.stopService()  # the request in flight is abandoned: nothing recorded
    service, recorder, _ = started(db_url, reactor, receiver.url)
    try:
        await recorder.wait_for_acks(1)
        (attempt,) = await service.attempts("a")
        assert row(attempt) == (txn_id(service.store, 1), 1, 200, "ok", None, True)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_transaction_too_large_is_split(db_url, reactor, receiver):
    receiver.then(413, body=b'{"errcode":"M_TOO_LARGE"}')
    service, recorder, _ = started(db_url, reactor, receiver.url, max_events=4)
    try:
        await service.submit([event(n) for n in range(4)])
        await recorder.wait_for_acks(2)
        one, two, three = (txn_id(service.store, n) for n in (1, 2, 3))
        assert [row(a) for a in await service.attempts("a")] == [
            (three, 2, 200, "ok", None, False),
            (two, 2, 200, "ok", None, False),
            (one, 4, 413, "split", 'HTTP 413: {"errcode":"M_TOO_LARGE"}', False),
        ]
        assert recorder.states == []  # never DOWN
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_single_event_too_large_is_rejected(db_url, reactor, receiver):
    receiver.refuse("$e1", 413)
    service, recorder, _ = started(db_url, reactor, receiver.url, max_events=2)
    try:
        await service.submit([event(0), event(1)])
        await recorder.wait_for(lambda: len(recorder.dead_letters) == 1)
        one, two, three = (txn_id(service.store, n) for n in (1, 2, 3))
        assert [row(a) for a in await service.attempts("a")] == [
            (three, 1, 413, "rejected", "HTTP 413: {}", False),
            (two, 1, 200, "ok", None, False),
            (one, 2, 413, "split", "HTTP 413: {}", False),
        ]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_refused_content_is_retried_then_bisected_to_a_dead_letter(db_url, reactor, receiver):
    receiver.refuse("$e1", 400, body=b'{"error":"bad event"}')
    service, recorder, clock = started(
        db_url,
        reactor,
        receiver.url,
        max_events=2,
        reject_attempts=2,
        probe=False,
        initial_delay=1,
        max_delay=1,
    )
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(0), event(1)])
        await down  # the first refusal: the receiver may be wrong for a while
        up = recorder.wait_for_state("a", "up")
        clock.advance(1.2)  # the second: bisected
        await up
        (letter,) = await service.dead_letters("a")
        assert letter.event_id == "$e1"
        one, two, three = (txn_id(service.store, n) for n in (1, 2, 3))
        refused = 'HTTP 400: {"error":"bad event"}'
        assert [row(a) for a in await service.attempts("a")] == [
            (three, 1, 400, "rejected", refused, False),
            (two, 1, 200, "ok", None, False),
            (one, 2, 400, "rejected", refused, True),
            (one, 2, 400, "failed", refused, False),
        ]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_service_gone_is_logged_and_its_transaction_resent_once_enabled(
    db_url, reactor, receiver
):
    receiver.then(410)
    service, recorder, _ = started(db_url, reactor, receiver.url)
    try:
        disabled = recorder.wait_for_state("a", "disabled")
        await service.submit([event(1)])
        await disabled
        (gone,) = await service.attempts("a")
        first = txn_id(service.store, 1)
        assert row(gone) == (first, 1, 410, "gone", "HTTP 410: {}", False)
        await service.enable("a")
        await recorder.wait_for_acks(1)
        assert [row(a) for a in await service.attempts("a")] == [
            (first, 1, 200, "ok", None, True),
            row(gone),
        ]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_our_tokens_echoed_by_a_receiver_are_not_kept_in_the_log(db_url, reactor, receiver):
    echo = "Authorization: Bearer hs-secret-token; as_token=as-a"
    body = (echo + " " + "x" * (300 - len(echo) - 10) + " hs-secret-token " + "y" * 50).encode()
    receiver.answer(500, body=body)
    service, recorder, _ = started(db_url, reactor, receiver.url, **SLOW)
    try:
        down = recorder.wait_for_state("a", "down")
        await service.submit([event(1)])
        await down
        (attempt,) = await service.attempts("a")
    finally:
        await service.stopService()
    assert attempt.error is not None
    assert attempt.error.startswith("HTTP 500: Authorization: Bearer <redacted>; as_token=")
    assert len(attempt.error) <= len("HTTP 500: ") + 300
    for secret in (HS_TOKEN, "hs-secret", "secret-token", "as_token=as-a"):
        assert secret not in attempt.error


# -- reading the log --


def logged(service_id: str, n: int, ts: float, outcome: str = "ok", **fields: Any) -> Attempt:
    """An attempt of transaction ``n`` at ``ts``."""
    ok = outcome == "ok"
    return Attempt(
        **{
            "service_id": service_id,
            "txn_id": n,
            "ts": ts,
            "duration": 0.25,
            "event_count": 1,
            "status": 200 if ok else 503,
            "outcome": outcome,
            "error": None if ok else "HTTP 503",
            "resend": False,
            **fields,
        }
    )


async def log(store: IStore, *attempts: Attempt) -> None:
    """Write attempts as the pipeline does: with what records their outcome."""
    for a in attempts:
        if a.outcome == "ok":
            await store.complete_transaction(a.service_id, a.txn_id, a.ts, attempt=a)
        else:
            await store.record_failure(
                a.service_id, a.txn_id, a.ts, a.error or "", 1, None, attempt=a
            )


@pytest_twisted.ensureDeferred
async def test_the_log_is_read_newest_first_by_pages_and_by_outcome(store):
    await log(
        store,
        *[logged("a", n, float(n), "ok" if n % 2 else "failed", resend=n > 4) for n in range(1, 8)],
        logged("b", 100, 3.5),
        logged("a", 8, 8.0, status=None, error="connection refused", outcome="failed"),
    )
    everything = await store.attempts("a", None, 100, None)
    assert [a.txn_id for a in everything] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert [a.id for a in everything] == sorted((a.id for a in everything), reverse=True)
    assert everything[1] == logged("a", 7, 7.0, resend=True, id=everything[1].id)
    assert everything[0] == logged(
        "a", 8, 8.0, "failed", status=None, error="connection refused", id=everything[0].id
    )
    page = await store.attempts("a", None, 3, None)
    assert page == everything[:3]
    assert await store.attempts("a", page[-1].id, 3, None) == everything[3:6]
    assert await store.attempts("a", everything[-1].id, 3, None) == []
    failed = await store.attempts("a", None, 100, "failed")
    assert [a.txn_id for a in failed] == [8, 6, 4, 2]
    assert [a.txn_id for a in await store.attempts("a", failed[1].id, 1, "failed")] == [4]
    assert [a.txn_id for a in await store.attempts("b", None, 100, None)] == [100]
    assert await store.attempts("c", None, 100, None) == []


@pytest_twisted.ensureDeferred
async def test_the_row_is_written_in_the_transaction_of_the_outcome(store):
    """An attempt the database refuses rolls back the failure it came with."""
    await store.ensure_services(["a"])
    stored = await store.store_transaction("a", 0, 0, 0, b'{"events":[]}', 1.0, ())
    bad = Attempt("a", stored, 2.0, 0.1, 0, 503, None, "HTTP 503", False)  # type: ignore[arg-type]
    with pytest.raises(Exception, match=r"(?i)null"):  # NOT NULL, each database in its words
        await store.record_failure("a", stored, 2.0, "HTTP 503", 1, None, attempt=bad)
    (txn,) = await store.transactions("a", 0, 10)
    assert (txn.attempts, txn.last_error) == (0, None)
    assert await store.attempts("a", None, 10, None) == []
    await store.record_failure("a", stored, 2.0, "HTTP 503", 1, None, attempt=logged("a", 1, 2.0))
    (txn,) = await store.transactions("a", 0, 10)
    assert txn.attempts == 1
    assert len(await store.attempts("a", None, 10, None)) == 1


@pytest_twisted.ensureDeferred
async def test_the_service_checks_what_it_is_asked(db_url, reactor):
    service, _, _ = started(db_url, reactor, None)
    try:
        await service.started()
        assert await service.attempts("a", before=5, limit=10, outcome="gone") == []
        with pytest.raises(UnknownServiceError):
            await service.attempts("nope")
        with pytest.raises(ValueError, match="one of ok, failed, split, rejected, gone, not 'x'"):
            await service.attempts("a", outcome="x")
        with pytest.raises(ValueError, match="limit must be at least 1"):
            await service.attempts("a", limit=0)
    finally:
        await service.stopService()


# -- pruning --


@pytest_twisted.ensureDeferred
async def test_prune_deletes_old_attempts_oldest_first_at_most_limit_at_a_time(store):
    await log(store, *[logged("a" if n % 3 else "b", n, float(n)) for n in range(1, 11)])
    assert await store.prune_attempts(0.5, 100, 100) == 0  # none that old
    assert await store.prune_attempts(7.5, 100, 3) == 3
    assert await store.prune_attempts(7.5, 100, 3) == 3
    assert await store.prune_attempts(7.5, 100, 3) == 1
    assert await store.prune_attempts(7.5, 100, 3) == 0
    left = await store.attempts("a", None, 100, None) + await store.attempts("b", None, 100, None)
    assert sorted(a.ts for a in left) == [8.0, 9.0, 10.0]


@pytest_twisted.ensureDeferred
async def test_prune_keeps_the_newest_attempts_of_each_service(store):
    # interleaved, as services' attempts are: a has 10, b 3 and c 6
    names = ["a", "c", "a", "b", "c", "a"] * 3 + ["a"]
    await log(store, *[logged(name, n, 100.0 + n) for n, name in enumerate(names)])
    kept = {s: [a.txn_id for a in await store.attempts(s, None, 4, None)] for s in "abc"}
    assert await store.prune_attempts(0.0, 4, 5) == 5  # at most limit
    assert await store.prune_attempts(0.0, 4, 5) == 3  # a's 6 and c's 2 beyond the newest 4
    assert await store.prune_attempts(0.0, 4, 5) == 0
    for service_id in "abc":
        left = await store.attempts(service_id, None, 100, None)
        assert [a.txn_id for a in left] == kept[service_id]


@pytest_twisted.ensureDeferred
async def test_prune_deletes_by_age_and_by_count_in_one_call(store):
    # b's 2 are old, a's 6 young: b goes by age, and a keeps its newest 3
    await log(store, *[logged("b", n, float(n)) for n in range(1, 3)])
    await log(store, *[logged("a", n, 10.0 + n) for n in range(1, 7)])
    assert await store.prune_attempts(2.5, 3, 4) == 4  # the limit counts both
    assert await store.prune_attempts(2.5, 3, 4) == 1
    assert await store.prune_attempts(2.5, 3, 4) == 0
    assert [a.txn_id for a in await store.attempts("a", None, 100, None)] == [6, 5, 4]
    assert await store.attempts("b", None, 100, None) == []


def test_prune_with_nothing_to_delete_reads_no_more_of_a_larger_table(tmp_path, reactor):
    """The work of a prune that finds nothing old and no service over its count is the
    same for 300 attempts as for 30,000: the table is never scanned."""

    def work(rows: int) -> int:
        path = tmp_path / f"{rows}.db"
        connection = sqlite3.connect(path)
        for _, statements in migrations(SQLITE, 0, 1):
            for statement in statements:
                connection.execute(statement)
        connection.executemany(
            "INSERT INTO attempts (service_id, txn_id, ts, duration, event_count, status,"
            " outcome, error, resend) VALUES (?, ?, ?, 0.1, 1, 200, 'ok', NULL, 0)",
            [(f"s{n % 3}", n, 1000.0 + n) for n in range(rows)],
        )
        steps = [0]

        def step() -> int:
            steps[0] += 1
            return 0

        connection.set_progress_handler(step, 10)
        deleted = drive(connection.cursor(), _sql.prune_attempts(999.0, 100_000, 1000))
        connection.close()
        assert deleted == 0
        return steps[0]

    small, large = work(300), work(30_000)
    assert large < small * 2 + 50, (small, large)


# -- the API and the command --


async def daemon_with_a_failure_then_a_success(
    tmp_path: Path, reactor: Any, receiver: Any
) -> tuple[Running, Path]:
    """A daemon whose service "a" failed once (503) and then delivered the same transaction."""
    receiver.then(503, body=b"busy")
    config = write_config(tmp_path, [write_registration(tmp_path, "a", receiver.url, **SLOW)])
    running = await start_daemon(config, reactor)
    recorder = Recorder()
    running.daemon.delivery.observe(recorder)
    down = recorder.wait_for_state("a", "down")
    await running.ingest([event(1)])
    await down
    status, _ = await running.request("POST", "/v1/services/a/retry")
    assert status == 200
    await recorder.wait_for_acks(1)
    return running, config


@pytest_twisted.ensureDeferred
async def test_the_api_pages_the_log_newest_first(tmp_path, reactor, receiver):
    running, _ = await daemon_with_a_failure_then_a_success(tmp_path, reactor, receiver)
    try:
        status, body = await running.request("GET", "/v1/services/a/attempts")
        assert status == 200, body
        assert body["next_before"] is None
        ok, failed = body["attempts"]
        first = txn_id(running.daemon.delivery.store, 1)
        assert set(ok) == {
            "id",
            "txn_id",
            "started",
            "duration",
            "events",
            "status",
            "outcome",
            "error",
            "resend",
        }
        assert (ok["txn_id"], ok["events"], ok["status"], ok["outcome"], ok["resend"]) == (
            first,
            1,
            200,
            "ok",
            True,
        )
        assert (failed["txn_id"], failed["status"], failed["outcome"], failed["error"]) == (
            first,
            503,
            "failed",
            "HTTP 503: busy",
        )
        assert failed["resend"] is False
        assert abs(failed["started"] - time.time()) < 60  # the daemon's clock: the time
        assert 0 <= failed["duration"] < 10
        status, page = await running.request("GET", "/v1/services/a/attempts?limit=1")
        assert (status, page) == (200, {"attempts": [ok], "next_before": ok["id"]})
        status, page = await running.request(
            "GET", f"/v1/services/a/attempts?limit=1&before={ok['id']}"
        )
        assert (status, page) == (200, {"attempts": [failed], "next_before": None})
        status, page = await running.request("GET", "/v1/services/a/attempts?outcome=failed")
        assert (status, page) == (200, {"attempts": [failed], "next_before": None})
        status, page = await running.request("GET", "/v1/services/a/attempts?outcome=split")
        assert (status, page) == (200, {"attempts": [], "next_before": None})
    finally:
        await running.daemon.stopService()


@pytest_twisted.ensureDeferred
async def test_the_api_takes_the_admin_token_a_known_service_and_good_parameters(
    tmp_path, reactor, receiver
):
    config = write_config(tmp_path, [write_registration(tmp_path, "a", receiver.url)])
    running = await start_daemon(config, reactor)
    try:
        for token in (None, INGEST, "nonsense"):
            status, body = await running.request("GET", "/v1/services/a/attempts", token=token)
            assert status == 401, body
        status, body = await running.request("GET", "/v1/services/nope/attempts")
        assert (status, body["errcode"]) == (404, "M_NOT_FOUND")
        for query in (
            "limit=0",
            "limit=1001",
            "limit=x",
            "before=0",
            "before=-1",
            "before=1.5",
            f"before={2**62 + 1}",
            "outcome=nope",
            "outcome=",
            "outcome=OK",
        ):
            status, body = await running.request("GET", f"/v1/services/a/attempts?{query}")
            assert (status, body["errcode"]) == (400, "M_INVALID_PARAM"), query
        assert "ok, failed, split, rejected, gone" in body["error"]
        status, body = await running.request(
            "GET", f"/v1/services/a/attempts?limit=1000&before={2**62}&outcome=gone"
        )
        assert (status, body) == (200, {"attempts": [], "next_before": None})
    finally:
        await running.daemon.stopService()


def _one_line(err: str) -> str:
    assert err.count("\n") == 1, err
    assert err.startswith("delivery: "), err
    assert "Traceback" not in err
    return err


@pytest_twisted.ensureDeferred
async def test_the_command_prints_the_log_of_a_running_daemon(tmp_path, reactor, receiver, capsys):
    running, config = await daemon_with_a_failure_then_a_success(tmp_path, reactor, receiver)

    async def command(*argv: str) -> tuple[int, str, str]:
        code = await deferToThread(cli.main, ["attempts", *argv, "--url", running.url])
        out, err = capsys.readouterr()
        return code, out, err

    try:
        table = await command("a", str(config))
        raw = await command("a", "-c", str(config), "--json")
        failed = await command("a", str(config), "--outcome", "failed")
        newest = await command("a", str(config), "--limit", "1")
        none = await command("a", str(config), "--outcome", "gone")
        unknown = await command("nope", str(config))
        (answer,) = [json.loads(raw[1])]
        older = await command("a", str(config), "--before", str(answer["attempts"][0]["id"]))
    finally:
        await running.daemon.stopService()
    code, out, err = table
    assert (code, err) == (0, "")
    heading, ok, fail = out.splitlines()
    assert re.fullmatch(
        r"time +txn id +events +status +outcome +duration +resend +error", heading
    ), heading
    first = txn_id(running.daemon.delivery.store, 1)
    when = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert re.fullmatch(rf"{when} +{first} +1 +200 +ok +\d+ ms +yes", ok), ok
    assert re.fullmatch(rf"{when} +{first} +1 +503 +failed +\d+ ms +no +HTTP 503: busy", fail)
    assert raw[0] == 0
    assert [a["outcome"] for a in answer["attempts"]] == ["ok", "failed"]
    assert answer["next_before"] is None
    assert failed[0] == 0
    assert failed[1].splitlines()[1:] == [fail]
    assert newest[0] == 0
    assert newest[1].splitlines()[1:] == [
        ok,
        f"(older attempts: --before {answer['attempts'][0]['id']})",
    ]
    assert older[1].splitlines()[1:] == [fail]
    assert none[:2] == (0, "a: no attempts logged with the outcome gone\n")
    code, out, err = unknown
    assert (code, out) == (1, "")
    assert _one_line(err) == "delivery: no application service with id 'nope' is registered\n"
    for _, out, err in (table, raw, failed, newest, none, unknown, older):
        assert ADMIN not in out + err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--limit", "0"], "argument --limit: must be a whole number from 1 to 1000"),
        (["--limit", "1001"], "argument --limit: must be a whole number from 1 to 1000"),
        (["--outcome", "lost"], "argument --outcome: invalid choice: 'lost'"),
        (["--before", "x"], "argument --before: must be the id of an attempt"),
        ([], None),
    ],
)
def test_a_bad_command_line_prints_the_usage(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "delivery.yaml").touch()
    if message is None:  # no service named
        argv, message = ["--json"], "the following arguments are required: SERVICE"
        full = ["attempts", *argv]
    else:
        full = ["attempts", "a", *argv]
    with pytest.raises(SystemExit) as exit:
        cli.main(full)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: delivery attempts [-h]"), err
    assert f"delivery attempts: error: {message}" in err


@pytest_twisted.ensureDeferred
async def test_the_command_says_plainly_that_the_admin_token_was_refused(
    tmp_path, reactor, receiver, capsys
):
    running = await start_daemon(write_config(tmp_path, []), reactor)
    (tmp_path / "client").mkdir()
    config = write_config(tmp_path / "client", [], admin_token=INGEST)
    try:
        code = await deferToThread(cli.main, ["attempts", "a", str(config), "--url", running.url])
    finally:
        await running.daemon.stopService()
    assert code == 1
    err = _one_line(capsys.readouterr().err)
    assert err == (
        f"delivery: the admin token was refused (HTTP 401): check admin_token in {config}\n"
    )
