"""
The versioned schema, for every store. Dialect differences live here and only here.

A migration is a list of statements applied in one transaction together with the new
version number; they are applied in order at start-up, each once.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Dialect:
    name: str
    #: an integer primary key the database numbers itself, increasing
    serial_key: str
    #: raw bytes
    blob: str
    #: 64-bit integer
    bigint: str
    #: double precision float
    real: str


SQLITE = Dialect(
    name="sqlite",
    serial_key="INTEGER PRIMARY KEY AUTOINCREMENT",
    blob="BLOB",
    bigint="INTEGER",
    real="REAL",
)

POSTGRES = Dialect(
    name="postgres",
    serial_key="BIGSERIAL PRIMARY KEY",
    blob="BYTEA",
    bigint="BIGINT",
    real="DOUBLE PRECISION",
)


_MIGRATIONS: list[list[str]] = [
    # 1: the first schema
    [
        """
        CREATE TABLE events (
            stream_id {serial_key},
            event_id TEXT NOT NULL UNIQUE,
            sender TEXT,
            room_id TEXT,
            type TEXT,
            state_key TEXT,
            json {blob} NOT NULL,
            received_ts {real} NOT NULL
        )
        """,
        """
        CREATE TABLE sorter_position (
            lock INTEGER PRIMARY KEY CHECK (lock = 0),
            stream_id {bigint} NOT NULL
        )
        """,
        "INSERT INTO sorter_position (lock, stream_id) VALUES (0, 0)",
        """
        CREATE TABLE services (
            service_id TEXT PRIMARY KEY,
            state TEXT NOT NULL DEFAULT 'up',
            last_txn_id {bigint} NOT NULL DEFAULT 0,
            last_success_ts {real},
            last_error TEXT,
            failure_count INTEGER NOT NULL DEFAULT 0,
            next_retry_ts {real}
        )
        """,
        """
        CREATE TABLE service_queue (
            service_id TEXT NOT NULL,
            stream_id {bigint} NOT NULL,
            PRIMARY KEY (service_id, stream_id)
        )
        """,
        """
        CREATE TABLE transactions (
            service_id TEXT NOT NULL,
            txn_id {bigint} NOT NULL,
            body {blob} NOT NULL,
            event_count INTEGER NOT NULL,
            first_stream_id {bigint} NOT NULL,
            last_stream_id {bigint} NOT NULL,
            created_ts {real} NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            first_attempt_ts {real},
            last_attempt_ts {real},
            last_error TEXT,
            PRIMARY KEY (service_id, txn_id)
        )
        """,
    ],
    # 2: events a receiver rejected, kept for an operator to redrive or discard
    [
        """
        CREATE TABLE dead_letters (
            id {serial_key},
            service_id TEXT NOT NULL,
            stream_id {bigint} NOT NULL,
            event_id TEXT NOT NULL,
            json {blob} NOT NULL,
            txn_id {bigint} NOT NULL,
            status INTEGER,
            answer TEXT,
            created_ts {real} NOT NULL
        )
        """,
        "CREATE INDEX dead_letters_by_service ON dead_letters (service_id, stream_id)",
    ],
]

#: the version a fully migrated database has
SCHEMA_VERSION = len(_MIGRATIONS)


def migrations(dialect: Dialect, current: int) -> list[tuple[int, list[str]]]:
    """The migrations a database at version ``current`` still needs, in order."""
    fields = attrs.asdict(dialect)
    return [
        (version, [statement.format(**fields) for statement in _MIGRATIONS[version - 1]])
        for version in range(current + 1, SCHEMA_VERSION + 1)
    ]
