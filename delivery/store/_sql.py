"""
What the stores do, written once for every database.

Each operation is a generator that yields the statements it needs (``Query``, ``Insert``,
``Lock``, ``Notify``) and receives their results; a store runs it inside one database
transaction, on its own connection and in its own way (a thread for SQLite, an
asynchronous connection for PostgreSQL). Statements use ``?`` placeholders.
"""

from __future__ import annotations

import struct
from collections.abc import Generator, Sequence
from typing import Any, Literal, TypeVar

import attrs

from ..errors import DeliveryError
from ..events import Event, StoredEvent, transaction_body
from ..interest import RoutingFields
from ..records import (
    DeadLetter,
    Ingested,
    QueuedEvent,
    ServiceRecord,
    ServiceSummary,
    StoredTransaction,
)
from ._schema import SCHEMA_VERSION, Dialect, migrations, new_instance, txn_id_base

T = TypeVar("T")


@attrs.frozen
class Query:
    """One statement; its result is every row, the first row, or the count of rows changed."""

    sql: str
    params: Sequence[Any] = ()
    fetch: Literal["all", "one", "count"] = "all"


@attrs.frozen
class Insert:
    """Many rows into one table in one go; ``types`` are the columns' PostgreSQL types."""

    table: str
    columns: tuple[str, ...]
    types: tuple[str, ...]
    rows: Sequence[Sequence[Any]]
    conflict: str = ""


@attrs.frozen
class Lock:
    """Hold a database-wide lock until the transaction ends (nothing in SQLite: one writer)."""

    key: int


@attrs.frozen
class Notify:
    """Tell listeners, when the transaction commits (PostgreSQL's NOTIFY)."""

    channel: str


Op = Query | Insert | Lock | Notify
Steps = Generator[Op, Any, T]

#: lock keys (PostgreSQL advisory locks): ingest, so that stream ids commit in order; and
#: migrations, so that two processes starting together do not both migrate
INGEST_LOCK = 0x64656C69  # "deli"
MIGRATE_LOCK = 0x64656C6D  # "delm"
#: the channel that wakes sorters when events are ingested
EVENTS_CHANNEL = "delivery_events"

_TXN_COLUMNS = (
    "service_id, txn_id, body, event_count, first_stream_id, last_stream_id, created_ts,"
    " attempts, first_attempt_ts, last_attempt_ts, last_error, received_ts"
)
_INSERT_TXN = (
    "INSERT INTO transactions (service_id, txn_id, body, event_count, first_stream_id,"
    " last_stream_id, created_ts, received_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_EVENT_COLUMNS = ("event_id", "sender", "room_id", "type", "state_key", "json", "received_ts")
_EVENT_TYPES = ("text", "text", "text", "text", "text", "bytea", "float8")


class SchemaTooNewError(DeliveryError):
    """The database was written by a newer version of ``delivery``."""


def migrate(dialect: Dialect) -> Steps[int]:
    """Bring the schema up to date; the database's instance number (see ``_schema``)."""
    yield Lock(MIGRATE_LOCK)
    yield Query(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)", fetch="count"
    )
    row = yield Query("SELECT version FROM schema_version", fetch="one")
    if row is None:
        yield Query("INSERT INTO schema_version (version) VALUES (0)", fetch="count")
        current = 0
    else:
        current = row[0]
    if current > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"the database is at schema version {current}, newer than this version of "
            f"delivery knows ({SCHEMA_VERSION}): upgrade delivery"
        )
    for version, statements in migrations(dialect, current, new_instance()):
        for statement in statements:
            yield Query(statement, fetch="count")
        yield Query("UPDATE schema_version SET version = ?", (version,), fetch="count")
    return (yield from instance())


def instance() -> Steps[int]:
    row = yield Query("SELECT number FROM instance", fetch="one")
    return int(row[0])


# -- events and sorting --


def insert_events(events: Sequence[Event], now: float) -> Steps[Ingested]:
    # Stream ids are given out and committed in one order: the sorter never finds a lower
    # id committed after a higher one it has routed already.
    yield Lock(INGEST_LOCK)
    (after,) = yield Query("SELECT coalesce(max(stream_id), 0) FROM events", fetch="one")
    yield Insert(
        "events",
        _EVENT_COLUMNS,
        _EVENT_TYPES,
        [
            (e.event_id, r.sender, r.room_id, r.type, r.state_key, e.json, now)
            for e in events
            for r in (e.routing,)
        ],
        conflict="ON CONFLICT (event_id) DO NOTHING",
    )
    ids = yield from _stream_ids(list(dict.fromkeys(e.event_id for e in events)))
    yield Notify(EVENTS_CHANNEL)
    return Ingested([ids[e.event_id] for e in events], after)


def _events(rows: Sequence[Sequence[Any]]) -> list[StoredEvent]:
    return [
        StoredEvent(
            stream_id,
            Event(event_id, RoutingFields(sender, room_id, type_, state_key), bytes(json)),
            received_ts,
        )
        for stream_id, event_id, sender, room_id, type_, state_key, json, received_ts in rows
    ]


def events_after(position: int, limit: int) -> Steps[list[StoredEvent]]:
    rows = yield Query(
        "SELECT stream_id, event_id, sender, room_id, type, state_key, json, received_ts"
        " FROM events WHERE stream_id > ? ORDER BY stream_id LIMIT ?",
        (position, limit),
    )
    return _events(rows)


def sorter_position() -> Steps[int]:
    row = yield Query("SELECT stream_id FROM sorter_position", fetch="one")
    return int(row[0])


def commit_sorted(
    position: int, queue: Sequence[tuple[str, int]], new_events: Sequence[StoredEvent]
) -> Steps[None]:
    if new_events:
        yield Insert(
            "events",
            ("stream_id", *_EVENT_COLUMNS),
            ("bigint", *_EVENT_TYPES),
            [
                (
                    s.stream_id,
                    e.event_id,
                    r.sender,
                    r.room_id,
                    r.type,
                    r.state_key,
                    e.json,
                    s.received_ts,
                )
                for s in new_events
                for e in (s.event,)
                for r in (e.routing,)
            ],
            conflict="ON CONFLICT DO NOTHING",
        )
    if queue:
        yield Insert("service_queue", ("service_id", "stream_id"), ("text", "bigint"), queue)
    yield Query("UPDATE sorter_position SET stream_id = ?", (position,), fetch="count")


def sorter_lag() -> Steps[tuple[int, float | None]]:
    row = yield Query(
        "SELECT COUNT(*), MIN(received_ts) FROM events"
        " WHERE stream_id > (SELECT stream_id FROM sorter_position)",
        fetch="one",
    )
    return int(row[0]), row[1]


# -- services --


def ensure_services(service_ids: Sequence[str]) -> Steps[None]:
    if service_ids:
        # A new service's ids start in the database's block, above any purged service's.
        row = yield Query("SELECT number, purged_txn_id FROM instance", fetch="one")
        base = max(txn_id_base(int(row[0])), int(row[1]))
        yield Insert(
            "services",
            ("service_id", "last_txn_id"),
            ("text", "bigint"),
            [(s, base) for s in service_ids],
            conflict="ON CONFLICT DO NOTHING",
        )


def services(only: str | None = None) -> Steps[dict[str, ServiceRecord]]:
    where, params = ("", ()) if only is None else (" WHERE service_id = ?", (only,))
    rows = yield Query(
        "SELECT service_id, state, last_txn_id, last_success_ts, last_error,"
        f" failure_count, next_retry_ts FROM services{where}",
        params,
    )
    return {row[0]: ServiceRecord(*row) for row in rows}


def set_state(service_id: str, state: str) -> Steps[None]:
    yield Query(
        "UPDATE services SET state = ? WHERE service_id = ?", (state, service_id), fetch="count"
    )


def _oldest_received(oldest: int | None) -> Steps[float | None]:
    if oldest is None:
        return None
    row = yield Query("SELECT received_ts FROM events WHERE stream_id = ?", (oldest,), fetch="one")
    return row[0] if row else None


def summary(service_id: str) -> Steps[ServiceSummary]:
    queued, oldest_queued = yield Query(
        "SELECT COUNT(*), MIN(stream_id) FROM service_queue WHERE service_id = ?",
        (service_id,),
        fetch="one",
    )
    stored, oldest_stored = yield Query(
        "SELECT COUNT(*), MIN(first_stream_id) FROM transactions WHERE service_id = ?",
        (service_id,),
        fetch="one",
    )
    oldest = min((s for s in (oldest_queued, oldest_stored) if s is not None), default=None)
    return ServiceSummary(queued, stored, (yield from _oldest_received(oldest)))


def summaries() -> Steps[dict[str, ServiceSummary]]:
    rows = yield Query(
        "SELECT s.service_id,"
        " (SELECT COUNT(*) FROM service_queue q WHERE q.service_id = s.service_id),"
        " (SELECT MIN(stream_id) FROM service_queue q WHERE q.service_id = s.service_id),"
        " (SELECT COUNT(*) FROM transactions t WHERE t.service_id = s.service_id),"
        " (SELECT MIN(first_stream_id) FROM transactions t WHERE t.service_id = s.service_id)"
        " FROM services s"
    )
    result = {}
    for service_id, queued, oldest_queued, stored, oldest_stored in rows:
        oldest = min((x for x in (oldest_queued, oldest_stored) if x is not None), default=None)
        result[service_id] = ServiceSummary(queued, stored, (yield from _oldest_received(oldest)))
    return result


def purge_service(service_id: str) -> Steps[tuple[int, int]]:
    events = yield Query(
        "DELETE FROM service_queue WHERE service_id = ?", (service_id,), fetch="count"
    )
    transactions = yield Query(
        "DELETE FROM transactions WHERE service_id = ?", (service_id,), fetch="count"
    )
    # Its ids are never given out again, should it be registered again.
    yield Query(
        "UPDATE instance SET purged_txn_id = coalesce((SELECT last_txn_id FROM services"
        " WHERE service_id = ? AND last_txn_id > instance.purged_txn_id), purged_txn_id)",
        (service_id,),
        fetch="count",
    )
    yield Query("DELETE FROM services WHERE service_id = ?", (service_id,), fetch="count")
    return events, transactions


def ping() -> Steps[None]:
    yield Query("SELECT 1", fetch="one")


# -- queues and transactions --


def queued(service_id: str, after: int, limit: int) -> Steps[list[QueuedEvent]]:
    rows = yield Query(
        "SELECT q.stream_id, e.json, e.received_ts FROM service_queue q"
        " JOIN events e ON e.stream_id = q.stream_id"
        " WHERE q.service_id = ? AND q.stream_id > ? ORDER BY q.stream_id LIMIT ?",
        (service_id, after, limit),
    )
    return [QueuedEvent(stream_id, bytes(json), ts) for stream_id, json, ts in rows]


def pack_times(times: Sequence[float]) -> bytes:
    """Times as stored with a transaction: little-endian doubles, one for each event."""
    return struct.pack(f"<{len(times)}d", *times)


def unpack_times(packed: bytes | memoryview | None) -> tuple[float, ...]:
    """The times of ``pack_times``; none for a transaction stored before they were kept."""
    if packed is None:
        return ()
    return struct.unpack(f"<{len(packed) // 8}d", packed)


def store_transaction(
    service_id: str,
    first_stream_id: int,
    last_stream_id: int,
    event_count: int,
    body: bytes,
    now: float,
    received_ts: Sequence[float],
) -> Steps[int]:
    row = yield Query(
        "UPDATE services SET last_txn_id = last_txn_id + 1 WHERE service_id = ?"
        " RETURNING last_txn_id",
        (service_id,),
        fetch="one",
    )
    if row is None:
        raise KeyError(f"no service record for {service_id!r}")
    txn_id = int(row[0])
    deleted = yield Query(
        "DELETE FROM service_queue WHERE service_id = ? AND stream_id BETWEEN ? AND ?",
        (service_id, first_stream_id, last_stream_id),
        fetch="count",
    )
    if deleted != event_count:
        # The pool's window no longer matches the queue: refuse rather than lose events.
        raise RuntimeError(
            f"queue of {service_id!r} has {deleted} events from {first_stream_id} to "
            f"{last_stream_id}, expected {event_count}"
        )
    yield Query(
        _INSERT_TXN,
        (
            service_id,
            txn_id,
            body,
            event_count,
            first_stream_id,
            last_stream_id,
            now,
            pack_times(received_ts),
        ),
        fetch="count",
    )
    return txn_id


def transactions(service_id: str, after: int, limit: int) -> Steps[list[StoredTransaction]]:
    rows = yield Query(
        f"SELECT {_TXN_COLUMNS} FROM transactions WHERE service_id = ? AND txn_id > ?"
        " ORDER BY txn_id LIMIT ?",
        (service_id, after, limit),
    )
    return [
        StoredTransaction(
            row[0],
            row[1],
            bytes(row[2]),
            event_count=row[3],
            first_stream_id=row[4],
            last_stream_id=row[5],
            created_ts=row[6],
            attempts=row[7],
            first_attempt_ts=row[8],
            last_attempt_ts=row[9],
            last_error=row[10],
            received_ts=unpack_times(row[11]),
        )
        for row in rows
    ]


def oldest_transaction(service_id: str) -> Steps[StoredTransaction | None]:
    found = yield from transactions(service_id, 0, 1)
    return found[0] if found else None


def complete_transaction(service_id: str, txn_id: int, now: float) -> Steps[None]:
    yield Query(
        "DELETE FROM transactions WHERE service_id = ? AND txn_id = ?",
        (service_id, txn_id),
        fetch="count",
    )
    yield Query(
        "UPDATE services SET last_success_ts = ?, failure_count = 0, next_retry_ts = NULL"
        " WHERE service_id = ?",
        (now, service_id),
        fetch="count",
    )


def record_failure(
    service_id: str,
    txn_id: int,
    attempt_ts: float,
    error: str,
    failure_count: int,
    next_retry_ts: float | None,
) -> Steps[None]:
    yield Query(
        "UPDATE transactions SET attempts = attempts + 1,"
        " first_attempt_ts = COALESCE(first_attempt_ts, ?), last_attempt_ts = ?,"
        " last_error = ? WHERE service_id = ? AND txn_id = ?",
        (attempt_ts, attempt_ts, error, service_id, txn_id),
        fetch="count",
    )
    yield Query(
        "UPDATE services SET last_error = ?, failure_count = ?, next_retry_ts = ?"
        " WHERE service_id = ?",
        (error, failure_count, next_retry_ts, service_id),
        fetch="count",
    )


# -- rejected transactions: splitting them, and dead letters --


def _stream_ids(event_ids: Sequence[str]) -> Steps[dict[str, int]]:
    """The stream positions of events, by id."""
    found: dict[str, int] = {}
    for start in range(0, len(event_ids), 500):
        chunk = list(event_ids[start : start + 500])
        marks = ",".join("?" * len(chunk))
        rows = yield Query(
            f"SELECT event_id, stream_id FROM events WHERE event_id IN ({marks})", chunk
        )
        found.update(rows)
    return found


def split_transaction(
    service_id: str, txn_id: int, parts: Sequence[Sequence[tuple[str, bytes]]], now: float
) -> Steps[list[StoredTransaction]]:
    """
    Replace a stored transaction by several, in order, with new ids: each part is a list
    of ``(event_id, json)``, and the parts are its events, in order (each part keeps their
    ingest times).
    """
    positions = yield from _stream_ids([e for part in parts for e, _ in part])
    deleted = yield Query(
        "DELETE FROM transactions WHERE service_id = ? AND txn_id = ? RETURNING received_ts",
        (service_id, txn_id),
        fetch="one",
    )
    received = unpack_times(deleted[0] if deleted else None)
    made = []
    start = 0
    for part in parts:
        row = yield Query(
            "UPDATE services SET last_txn_id = last_txn_id + 1 WHERE service_id = ?"
            " RETURNING last_txn_id",
            (service_id,),
            fetch="one",
        )
        ids = [positions[e] for e, _ in part]
        txn = StoredTransaction(
            service_id,
            int(row[0]),
            transaction_body([j for _, j in part]),
            len(part),
            min(ids),
            max(ids),
            now,
            received_ts=received[start : start + len(part)],
        )
        start += len(part)
        yield Query(
            _INSERT_TXN,
            (
                service_id,
                txn.txn_id,
                txn.body,
                txn.event_count,
                txn.first_stream_id,
                txn.last_stream_id,
                now,
                pack_times(txn.received_ts),
            ),
            fetch="count",
        )
        made.append(txn)
    return made


def dead_letter(
    service_id: str,
    txn_id: int,
    events: Sequence[tuple[str, bytes]],
    status: int | None,
    answer: str | None,
    now: float,
) -> Steps[None]:
    """Set a rejected transaction's events aside as dead letters, and forget it."""
    positions = yield from _stream_ids([e for e, _ in events])
    yield Insert(
        "dead_letters",
        ("service_id", "stream_id", "event_id", "json", "txn_id", "status", "answer", "created_ts"),
        ("text", "bigint", "text", "bytea", "bigint", "integer", "text", "float8"),
        [(service_id, positions[e], e, j, txn_id, status, answer, now) for e, j in events],
    )
    yield Query(
        "DELETE FROM transactions WHERE service_id = ? AND txn_id = ?",
        (service_id, txn_id),
        fetch="count",
    )


def dead_letters(service_id: str, after: int, limit: int) -> Steps[list[DeadLetter]]:
    rows = yield Query(
        "SELECT id, service_id, stream_id, event_id, json, txn_id, status, answer, created_ts"
        " FROM dead_letters WHERE service_id = ? AND id > ? ORDER BY id LIMIT ?",
        (service_id, after, limit),
    )
    return [DeadLetter(r[0], r[1], r[2], r[3], bytes(r[4]), *r[5:]) for r in rows]


def _chosen(ids: Sequence[int] | None) -> tuple[str, list[int]]:
    if ids is None:
        return "", []
    return f" AND id IN ({','.join('?' * len(ids))})", list(ids)


def redrive(service_id: str, ids: Sequence[int] | None) -> Steps[int]:
    """Put dead letters (all, or those with these ids) back in the queue; how many."""
    where, params = _chosen(ids)
    rows = yield Query(
        f"SELECT id, stream_id FROM dead_letters WHERE service_id = ?{where}",
        [service_id, *params],
    )
    if rows:
        yield Insert(
            "service_queue",
            ("service_id", "stream_id"),
            ("text", "bigint"),
            [(service_id, stream_id) for _, stream_id in rows],
            conflict="ON CONFLICT DO NOTHING",
        )
        yield Query(
            f"DELETE FROM dead_letters WHERE service_id = ?{where}",
            [service_id, *params],
            fetch="count",
        )
    return len(rows)


def discard(service_id: str, ids: Sequence[int] | None) -> Steps[int]:
    """Delete dead letters (all, or those with these ids) for good; how many."""
    where, params = _chosen(ids)
    count = yield Query(
        f"DELETE FROM dead_letters WHERE service_id = ?{where}",
        [service_id, *params],
        fetch="count",
    )
    return int(count)


def dead_letter_counts() -> Steps[dict[str, int]]:
    rows = yield Query("SELECT service_id, COUNT(*) FROM dead_letters GROUP BY service_id")
    return {service_id: int(count) for service_id, count in rows}
