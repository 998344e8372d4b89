"""
One SQLite file, one store: a second store on the same file, in this process or in
another, is refused while the first is open, and may open once it is closed or its
process is dead (the kernel drops the lock with the process, even under SIGKILL).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from delivery.errors import StoreConfigurationError, StoreLockedError
from delivery.store import SQLiteStore, open_store

#: a process that opens the store at argv[1], says "open" (or why not, exiting 3), and
#: keeps it open until its stdin closes
HOLDER = textwrap.dedent(
    """
    import sys
    from twisted.internet import defer, task
    from delivery.errors import StoreLockedError
    from delivery.store import SQLiteStore

    async def main(reactor):
        store = SQLiteStore(sys.argv[1], reactor)
        try:
            await store.open()
        except StoreLockedError as e:
            print(e, flush=True)
            raise SystemExit(3)
        print("open", flush=True)
        await task.deferLater(reactor, 3600, lambda: None)

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    """
)


def _holder(path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest_twisted.ensureDeferred
async def test_a_second_store_on_the_file_is_refused_until_the_first_closes(
    tmp_path: Path, reactor: Any, holders: list[subprocess.Popen[str]]
) -> None:
    path = tmp_path / "delivery.db"
    first = open_store(f"sqlite:///{path}", reactor)
    await first.open()
    # in this process (by another name for the same file, too)
    os.symlink(path, tmp_path / "link.db")
    for url in (f"sqlite:///{path}", f"sqlite:///{tmp_path / 'link.db'}"):
        second = open_store(url, reactor)
        with pytest.raises(StoreLockedError, match="in use by another store in this process"):
            await second.open()
        await second.close()
    # in another process
    refused = _holder(path)
    holders.append(refused)
    (line,) = refused.stdout.readlines()  # type: ignore[union-attr]
    assert refused.wait() == 3
    assert line.strip() == (
        f"the SQLite database {path} is in use by another delivery process (pid {os.getpid()}),"
        f" which holds {path}.lock: stop it first, or give each one a database of its own"
    )
    # the first still works, and once it is closed another may open
    assert await first.sorter_position() == 0
    await first.close()
    again = _holder(path)
    holders.append(again)
    assert again.stdout.readline() == "open\n"  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_the_lock_dies_with_a_killed_process(
    tmp_path: Path, reactor: Any, holders: list[subprocess.Popen[str]]
) -> None:
    path = tmp_path / "delivery.db"
    holder = _holder(path)
    holders.append(holder)
    assert holder.stdout.readline() == "open\n"  # type: ignore[union-attr]
    store = SQLiteStore(str(path), reactor)
    with pytest.raises(StoreLockedError, match=rf"another delivery process \(pid {holder.pid}\)"):
        await store.open()
    holder.send_signal(signal.SIGKILL)
    assert holder.wait() == -signal.SIGKILL
    await store.open()
    assert await store.sorter_position() == 0
    await store.close()


@pytest_twisted.ensureDeferred
async def test_a_database_in_a_missing_directory_is_one_clear_error(
    tmp_path: Path, reactor: Any
) -> None:
    store = SQLiteStore(str(tmp_path / "missing" / "delivery.db"), reactor)
    with pytest.raises(StoreConfigurationError, match="check that its directory exists"):
        await store.open()
    await store.close()
