"""
Stores: where ``delivery`` keeps events, queues, transactions and service state.

``open_store(url)`` picks the implementation from the URL. It connects and brings the
schema up to date when the store is opened: by :class:`delivery.DeliveryService` when it
starts, or by ``await store.open()``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from .._interfaces import IStore
from ..errors import InvalidStoreURLError
from ..records import QueuedEvent, ServiceRecord, ServiceSummary, StoredTransaction
from ._sql import SchemaTooNewError
from .postgres import PostgresStore
from .sqlite import SQLiteStore

__all__ = [
    "IStore",
    "PostgresStore",
    "QueuedEvent",
    "SQLiteStore",
    "SchemaTooNewError",
    "ServiceRecord",
    "ServiceSummary",
    "StoredTransaction",
    "open_store",
    "redact_url",
]


def open_store(url: str, reactor: Any = None, timeout: float | None = 60.0) -> IStore:
    """
    The store a URL names.

    - ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``: SQLite, the
      embedded default.
    - ``postgresql://user:password@host:port/database`` (or ``postgres://``): PostgreSQL;
      libpq's parameters may follow (``?sslmode=require``). An operation the server does
      not answer within ``timeout`` seconds (None: no limit) is abandoned and fails as
      unavailable. (SQLite runs in this process: it waits up to 10 s for its file's lock.)

    :raises InvalidStoreURLError: for a URL no store understands.
    """
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if parts.netloc:
            raise InvalidStoreURLError(
                f"database URL {url!r}: a SQLite URL has no host; write sqlite:///relative.db "
                "or sqlite:////absolute/path.db"
            )
        path = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
        if not path:
            raise InvalidStoreURLError(
                f"database URL {url!r} names no file; write sqlite:///delivery.db"
            )
        return SQLiteStore(path, reactor)
    if parts.scheme in ("postgresql", "postgres"):
        if not parts.path.strip("/"):
            raise InvalidStoreURLError(
                f"database URL {redact_url(url)!r} names no database; write "
                "postgresql://user@host:5432/dbname"
            )
        return PostgresStore(url, reactor, timeout=timeout)
    raise InvalidStoreURLError(
        f"database URL {redact_url(url)!r}: unknown kind {parts.scheme!r}; use"
        " sqlite:///path.db or postgresql://user@host/dbname"
    )


def redact_url(url: str) -> str:
    """A database URL fit for a log line or an error: its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)
