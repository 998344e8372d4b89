"""
The versioned schema, for every store. Dialect differences live here and only here.

A migration is a list of statements applied in one transaction together with the new
version number; they are applied in order at start-up, each once.

Every database has an *instance number*, drawn at random when it is created (or when a
database made before there were instance numbers is migrated) and never changed. A
service's transaction ids are the instance's block, ``instance * TXN_ID_BLOCK``, plus a
count: ``services.last_txn_id`` holds the last id given out and starts at the block, so
ids grow per service as before, and a new database (a reset, a move from SQLite to
PostgreSQL, an embedded copy) gives out ids no receiver has seen from another one (two
databases share a number once in 9 million). ``instance.purged_txn_id`` is the highest id
a purged service had been given: a service registered later starts above it, so a
service purged and registered again never repeats an id either. Ids stay below 2**53,
which JSON readers hold exactly, for the first 7 * 10**12 transactions of a service (and
in their block for the first 10**9).
"""

from __future__ import annotations

import secrets

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
    #: what ends a CREATE TABLE whose primary key is the table (SQLite: no rowid)
    keyed: str
    #: statements of a migration only this database runs ("" elsewhere: skipped)
    fence_function: str = ""


SQLITE = Dialect(
    name="sqlite",
    serial_key="INTEGER PRIMARY KEY AUTOINCREMENT",
    blob="BLOB",
    bigint="INTEGER",
    real="REAL",
    keyed=" WITHOUT ROWID",
)

POSTGRES = Dialect(
    name="postgres",
    serial_key="BIGSERIAL PRIMARY KEY",
    blob="BYTEA",
    bigint="BIGINT",
    real="DOUBLE PRECISION",
    keyed="",
    # The fence of a write under a lease: takes a share lock on the lease's row (a
    # takeover, which updates it, waits for the write to commit, and a write waits for a
    # takeover and then finds the new epoch), and refuses the write if the epoch is stale.
    fence_function="""
        CREATE FUNCTION delivery_fence(lease TEXT, held BIGINT) RETURNS void AS $$
        BEGIN
            PERFORM 1 FROM leases WHERE name = lease AND epoch = held FOR SHARE;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'DL001',
                    MESSAGE = 'the lease ' || lease || ' is no longer held at epoch ' || held;
            END IF;
        END
        $$ LANGUAGE plpgsql
        """,
)


#: ids per instance: a service's ids are ``instance * TXN_ID_BLOCK + n``, n = 1, 2, ...
TXN_ID_BLOCK = 10**9
#: instance numbers are drawn from 1 up to (not including) this
MAX_INSTANCE = 9_000_000


def new_instance() -> int:
    """A fresh instance number, uniformly in ``[1, MAX_INSTANCE)``."""
    return 1 + secrets.randbelow(MAX_INSTANCE - 1)


def txn_id_base(instance: int) -> int:
    """The last transaction id of a service that has had none yet: the first is one more."""
    return instance * TXN_ID_BLOCK


# Statements are formatted with the dialect's fields, and with ``instance`` and
# ``txn_id_base``: the number a database being migrated gets, if it has none yet.
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
    # 3: the instance number, and every service's ids moved into its block (transactions
    # stored already keep their lower ids and go first, oldest first, as before)
    [
        """
        CREATE TABLE instance (
            lock INTEGER PRIMARY KEY CHECK (lock = 0),
            number {bigint} NOT NULL,
            purged_txn_id {bigint} NOT NULL DEFAULT 0
        )
        """,
        "INSERT INTO instance (lock, number) VALUES (0, {instance})",
        "UPDATE services SET last_txn_id = {txn_id_base} WHERE last_txn_id < {txn_id_base}",
    ],
    # 4: when each event of a stored transaction was ingested, for the latency of resent
    # events: the times packed as little-endian doubles, in body order (``_sql.pack_times``)
    [
        "ALTER TABLE transactions ADD COLUMN received_ts {blob}",
    ],
    # 5: housekeeping, the delivery log and replay.
    # - seen_events: the ids of events whose payload was deleted, with their first stream
    #   position, so that ingest stays idempotent for dedupe_window (events keeps the ids
    #   of the events it still holds: together they are every id seen in the window)
    # - transactions.stream_ids: each event's stream position, packed like received_ts,
    #   so that a stored transaction is split or dead-lettered without its events' rows
    # - events.replay_for: a copy of an event made by a replay, routed to that service
    #   alone (its event_id is a key of the copy's own, the JSON the original's)
    # - attempts: the delivery log, one row per attempt to send a transaction
    # - housekeeping: how far retention has deleted payloads (for replay's answer)
    [
        """
        CREATE TABLE seen_events (
            event_id TEXT PRIMARY KEY,
            stream_id {bigint} NOT NULL,
            received_ts {real} NOT NULL
        ){keyed}
        """,
        "CREATE INDEX seen_events_by_time ON seen_events (received_ts)",
        "ALTER TABLE transactions ADD COLUMN stream_ids {blob}",
        "ALTER TABLE events ADD COLUMN replay_for TEXT",
        "CREATE INDEX dead_letters_by_stream ON dead_letters (stream_id)",
        """
        CREATE TABLE attempts (
            id {serial_key},
            service_id TEXT NOT NULL,
            txn_id {bigint} NOT NULL,
            ts {real} NOT NULL,
            duration {real} NOT NULL,
            event_count INTEGER NOT NULL,
            status INTEGER,
            outcome TEXT NOT NULL,
            error TEXT,
            resend INTEGER NOT NULL
        )
        """,
        "CREATE INDEX attempts_by_service ON attempts (service_id, id)",
        """
        CREATE TABLE housekeeping (
            lock INTEGER PRIMARY KEY CHECK (lock = 0),
            deleted_stream_id {bigint} NOT NULL DEFAULT 0,
            deleted_ts {real}
        )
        """,
        "INSERT INTO housekeeping (lock) VALUES (0)",
    ],
    # 6: several daemons on one database
    # - nodes: each daemon's heartbeat
    # - leases: ``router`` and ``service:ID``, each with its holder (a node, and the
    #   incarnation: the process that holds it), an epoch and an expiry
    [
        """
        CREATE TABLE nodes (
            node_id TEXT PRIMARY KEY,
            incarnation TEXT NOT NULL,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_ts {real} NOT NULL,
            heartbeat_ts {real} NOT NULL
        ){keyed}
        """,
        """
        CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            owner TEXT,
            incarnation TEXT,
            epoch {bigint} NOT NULL DEFAULT 0,
            expires_ts {real}
        ){keyed}
        """,
        "INSERT INTO leases (name) VALUES ('router')",
        "{fence_function}",
    ],
]

#: the version a fully migrated database has
SCHEMA_VERSION = len(_MIGRATIONS)


def migrations(dialect: Dialect, current: int, instance: int) -> list[tuple[int, list[str]]]:
    """
    The migrations a database at version ``current`` still needs, in order; ``instance``
    is the number it gets if it has none yet.
    """
    fields = {**attrs.asdict(dialect), "instance": instance, "txn_id_base": txn_id_base(instance)}
    return [
        (
            version,
            [
                text
                for statement in _MIGRATIONS[version - 1]
                if (text := statement.format(**fields)).strip()
            ],
        )
        for version in range(current + 1, SCHEMA_VERSION + 1)
    ]
