"""
A database that cannot be written (a full disk, read-only): the write fails with
StoreUnavailableError in plain words, the store's health says so, the log says so once,
nothing acknowledged is lost, and once the database can be written again the next write
succeeds and the health is good. Each for real: a full tmpfs (when this process may mount
one), SQLite's page limit, SQLite's read-only mode, a read-only PostgreSQL database.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import LogLevel

from delivery.errors import StoreUnavailableError
from delivery.events import prepare
from delivery.store import SQLiteStore, open_store

from .harness import event
from .test_postgres_outage import Log, _answers, logged, make_read_only

__all__ = ["logged"]  # the fixture


async def _writes_fail_plainly_and_heal(
    store: Any,
    logged: Log,
    unwritable: Callable[[], Awaitable[None]],
    writable: Callable[[], Awaitable[None]],
    problem: str,
) -> None:
    """What every way of making ``store`` unwritable must do (``problem``: its words)."""
    assert (await store.insert_events(prepare([event(1)]), 1.0)).stream_ids == [1]
    assert store.health() is None
    await unwritable()
    batch = prepare([event(n, content={"body": "x" * 2000}) for n in range(2, 60)])
    for _ in range(3):
        with pytest.raises(StoreUnavailableError) as info:
            await store.insert_events(batch, 2.0)
        assert str(info.value) == f"the database cannot be written: {problem}"
        assert store.health() == str(info.value)
    # what was acknowledged is there, and reads work
    assert [e.event.event_id for e in await store.events_after(0, 100)] == ["$e1"]
    assert logged.count(LogLevel.error, "the database cannot be written") == 1
    assert logged.tracebacks() == []
    await writable()
    assert (await store.insert_events(batch, 3.0)).stream_ids == list(range(2, 60))
    assert store.health() is None
    assert logged.count(LogLevel.info, "the database can be written again") == 1
    assert [e.event.event_id for e in await store.events_after(0, 100)] == [
        f"$e{n}" for n in range(1, 60)
    ]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a 1 MiB tmpfs of its own (skipped where mounting is not allowed)."""
    where = tmp_path / "disk"
    where.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@pytest_twisted.ensureDeferred
async def test_a_full_disk_fails_writes_plainly_and_they_work_once_space_is_freed(
    tiny_disk: Path, reactor: Any, logged: Log
) -> None:
    path = tiny_disk / "delivery.db"
    store = SQLiteStore(str(path), reactor)
    await store.open()
    filler = tiny_disk / "filler"

    async def fill() -> None:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass  # ENOSPC: the disk is full
        finally:
            os.close(fd)

    async def free() -> None:
        filler.unlink()

    try:
        await _writes_fail_plainly_and_heal(store, logged, fill, free, f"disk full ({path})")
    finally:
        await store.close()


def _pragma(store: SQLiteStore, pragma: str) -> Any:
    """Set a pragma on the store's own connection (one connection: the one it writes with)."""
    assert store._pool is not None
    return store._pool.runWithConnection(lambda connection: connection.execute(pragma))


@pytest_twisted.ensureDeferred
async def test_sqlites_page_limit_is_a_full_disk_too(
    tmp_path: Path, reactor: Any, logged: Log
) -> None:
    path = tmp_path / "delivery.db"
    store = SQLiteStore(str(path), reactor)
    await store.open()

    async def limit() -> None:
        await store._pool.runWithConnection(  # type: ignore[union-attr]
            lambda c: c.execute(
                f"PRAGMA max_page_count = {c.execute('PRAGMA page_count').fetchone()[0]}"
            )
        )

    async def unlimit() -> None:
        await _pragma(store, "PRAGMA max_page_count = 1073741823")

    try:
        await _writes_fail_plainly_and_heal(store, logged, limit, unlimit, f"disk full ({path})")
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_read_only_sqlite_database_fails_writes_plainly(
    tmp_path: Path, reactor: Any, logged: Log
) -> None:
    path = tmp_path / "delivery.db"
    store = SQLiteStore(str(path), reactor)
    await store.open()

    async def read_only() -> None:
        await _pragma(store, "PRAGMA query_only = ON")

    async def read_write() -> None:
        await _pragma(store, "PRAGMA query_only = OFF")

    try:
        await _writes_fail_plainly_and_heal(
            store, logged, read_only, read_write, f"read-only ({path})"
        )
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_read_only_postgresql_database_fails_writes_plainly(
    postgres_url: str, reactor: Any, logged: Log
) -> None:
    store = open_store(postgres_url, reactor)
    await store.open()

    async def read_only(on: bool = True) -> None:
        await make_read_only(postgres_url, on)
        await _answers(reactor, store)

    async def read_write() -> None:
        await read_only(on=False)

    try:
        await _writes_fail_plainly_and_heal(
            store,
            logged,
            read_only,
            read_write,
            f"read-only ({postgres_url})",
        )
    finally:
        await store.close()
