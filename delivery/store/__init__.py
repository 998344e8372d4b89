"""
Stores: where ``delivery`` keeps events, queues, transactions and service state.

``open_store(url)`` picks the implementation from the URL. It connects and brings the
schema up to date when the store is opened: by :class:`delivery.DeliveryService` when it
starts, or by ``await store.open()``. ``redact_url(url)`` is how a database URL is
shown anywhere (logs, errors, output): with every password hidden.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from .._interfaces import IStore
from ..errors import (
    InvalidStoreURLError,
    StoreConfigurationError,
    StoreLockedError,
    StoreUnavailableError,
)
from ..records import QueuedEvent, ServiceRecord, ServiceSummary, StoredTransaction
from ._sql import SchemaTooNewError
from ._url import redact_url
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
    "StoreConfigurationError",
    "StoreLockedError",
    "StoreUnavailableError",
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
      libpq's parameters may follow (``?sslmode=require``).

    An operation that gets no answer within ``timeout`` seconds (None: no limit) fails as
    unavailable (:class:`StoreUnavailableError`): PostgreSQL abandons it with its
    connection; SQLite lets its thread finish it, so it may still take effect.

    :raises InvalidStoreURLError: for a URL no store understands.
    """
    try:
        parts = urlsplit(url)
    except ValueError as e:  # "Invalid IPv6 URL", say
        raise InvalidStoreURLError(
            f"database URL {redact_url(url)!r} cannot be read: {e}; write"
            " postgresql://user@host:5432/dbname or sqlite:///path.db"
        ) from None
    if parts.scheme == "sqlite":
        if parts.netloc:
            raise InvalidStoreURLError(
                f"database URL {redact_url(url)!r}: a SQLite URL has no host; write"
                " sqlite:///relative.db or sqlite:////absolute/path.db"
            )
        path = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
        if not path:
            raise InvalidStoreURLError(
                f"database URL {redact_url(url)!r} names no file; write sqlite:///delivery.db"
            )
        return SQLiteStore(path, reactor, timeout=timeout)
    if parts.scheme in ("postgresql", "postgres"):
        if not parts.path.strip("/"):
            raise InvalidStoreURLError(
                f"database URL {redact_url(url)!r} names no database; write "
                "postgresql://user@host:5432/dbname"
            )
        return PostgresStore(url, reactor, timeout=timeout)
    if not parts.scheme and "=" in url:
        raise InvalidStoreURLError(
            f"database {redact_url(url)!r} is a key/value connection string; write it as a"
            " URL: postgresql://user@host:5432/dbname?key=value"
        )
    raise InvalidStoreURLError(
        f"database URL {redact_url(url)!r}: unknown kind {parts.scheme!r}; use"
        " sqlite:///path.db or postgresql://user@host/dbname"
    )
