from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from delivery._interfaces import IStore
from delivery.store import open_store

from .receiver import Receiver, start_receiver, stop_receiver


@pytest.fixture(scope="session")
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'delivery.db'}"


@pytest_twisted.async_yield_fixture
async def store(db_url: str, reactor: Any) -> AsyncIterator[IStore]:
    s = open_store(db_url, reactor)
    await s.open()
    yield s
    await s.close()


@pytest_twisted.async_yield_fixture
async def receiver(reactor: Any) -> AsyncIterator[Receiver]:
    r = await start_receiver(reactor)
    yield r
    await stop_receiver(r)
