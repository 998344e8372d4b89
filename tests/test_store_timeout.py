"""
SQLite operations are bounded in time, and none is left unanswered: one that gets no
answer within the store's timeout (a frozen filesystem, a lock held by another program)
fails as unavailable while its thread finishes on its own; one asked for as the store
closes fails at once. Timed on a Clock: only the thread's work runs in real time.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from delivery.errors import StoreUnavailableError
from delivery.events import prepare
from delivery.store import SQLiteStore, open_store

from .harness import event
from .test_postgres import until


def test_open_store_gives_sqlite_the_timeout() -> None:
    store = open_store("sqlite:///delivery.db", timeout=2.5)
    assert isinstance(store, SQLiteStore)
    assert store.timeout == 2.5


@pytest_twisted.ensureDeferred
async def test_an_operation_left_unanswered_fails_and_one_not_begun_never_runs(
    tmp_path: Path, reactor: Any
) -> None:
    path = tmp_path / "delivery.db"
    clock = Clock()
    store = SQLiteStore(str(path), reactor, timeout=5.0, clock=clock)
    await store.open()
    # Another program holds the write lock: the store's thread waits for it.
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        on_the_thread = store.insert_events(prepare([event(1)]), 1.0)
        await until(reactor, lambda: store._running and not store._waiting, "the group to start")
        waiting = store.insert_events(prepare([event(2)]), 1.0)
        clock.advance(4.9)
        assert not on_the_thread.called
        clock.advance(0.1)
        for answer in (on_the_thread, waiting):
            with pytest.raises(StoreUnavailableError, match=r"did not answer within 5 s"):
                await answer
    finally:
        blocker.rollback()
        blocker.close()
    # The thread went on: what it was doing took effect; what had not begun never runs.
    assert await store.sorter_position() == 0
    assert [e.event.event_id for e in await store.events_after(0, 10)] == ["$e1"]
    # A producer that retries after the 503 loses nothing and duplicates nothing.
    again = await store.insert_events(prepare([event(1), event(2)]), 2.0)
    assert again.stream_ids[0] == 1
    assert again.after == 1  # $e2 is new
    assert [e.event.event_id for e in await store.events_after(0, 10)] == ["$e1", "$e2"]
    await store.close()


@pytest_twisted.ensureDeferred
async def test_an_operation_asked_for_as_the_store_closes_fails_at_once(
    tmp_path: Path, reactor: Any
) -> None:
    store = SQLiteStore(str(tmp_path / "delivery.db"), reactor)
    await store.open()
    asked = store.sorter_position()  # its group would start at the reactor's next turn
    await store.close()
    asked.addTimeout(5, reactor)  # (so that it fails, rather than hangs, if never answered)
    with pytest.raises(StoreUnavailableError, match="was closed before the operation ran"):
        await asked
