"""
Fixtures shared by the suite. Every test that takes ``db_url`` or ``store`` runs twice: on
a fresh SQLite file and on a fresh PostgreSQL database (one created for the test and
dropped after it).

PostgreSQL: ``DELIVERY_TEST_POSTGRES`` is a URL of a database on a server where the tests
may create databases (default ``postgresql://postgres@127.0.0.1:5432/postgres``). When the
server cannot be reached the PostgreSQL half is skipped, unless
``DELIVERY_REQUIRE_POSTGRES=1`` (as in CI): then it is an error.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import pytest_twisted

from delivery._interfaces import IStore
from delivery.store import open_store

from .faults import faulty_receiver  # noqa: F401  (the fixture, for every test)
from .receiver import Receiver, start_receiver, stop_receiver

POSTGRES_ADMIN_URL = os.environ.get(
    "DELIVERY_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_POSTGRES = os.environ.get("DELIVERY_REQUIRE_POSTGRES") == "1"
_postgres_problem: list[str] = []


@pytest.fixture(scope="session")
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _admin() -> Any:
    connection = psycopg2.connect(POSTGRES_ADMIN_URL, connect_timeout=5)
    connection.autocommit = True
    return connection


def postgres_database() -> Iterator[str]:
    """A fresh, empty database for one test; its URL."""
    if _postgres_problem and not REQUIRE_POSTGRES:
        pytest.skip(_postgres_problem[0])
    try:
        admin = _admin()
    except psycopg2.Error as e:
        problem = f"no PostgreSQL at {POSTGRES_ADMIN_URL}: {str(e).strip()}"
        if REQUIRE_POSTGRES:
            pytest.fail(f"{problem} (DELIVERY_REQUIRE_POSTGRES=1)")
        _postgres_problem.append(problem)
        pytest.skip(problem)
    name = f"delivery_test_{uuid.uuid4().hex[:16]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(POSTGRES_ADMIN_URL)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'delivery.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from postgres_database()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'delivery.db'}"
    else:
        yield from postgres_database()


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
