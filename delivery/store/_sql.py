"""
What the stores do, written once for every database.

Each operation is a generator that yields the statements it needs (``Query``, ``Insert``,
``Lock``, ``Notify``) and receives their results; a store runs it inside one database
transaction, on its own connection and in its own way (a thread for SQLite, an
asynchronous connection for PostgreSQL). Statements use ``?`` placeholders.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Generator, Sequence
from typing import Any, Literal, TypeVar

import attrs

from ..errors import DeliveryError
from ..events import Event, StoredEvent, transaction_body
from ..interest import RoutingFields
from ..records import (
    Attempt,
    DeadLetter,
    Fence,
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
    """
    One statement; its result is every row, the first row, the count of rows changed, or
    nothing (``none``: a store may send it with the next statement, a round trip less).
    """

    sql: str
    params: Sequence[Any] = ()
    fetch: Literal["all", "one", "count", "none"] = "all"


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
    payload: str = ""


@attrs.frozen
class Fenced:
    """
    The rest of the operation is a write under a lease: the database refuses it (the whole
    operation fails with :class:`~delivery.errors.FencedError`) unless the lease's epoch
    is still ``fence.epoch``, and a takeover of the lease waits until it has committed.
    """

    fence: Fence


Op = Query | Insert | Lock | Notify | Fenced
Steps = Generator[Op, Any, T]

#: lock keys (PostgreSQL advisory locks): ingest, so that stream ids commit in order; and
#: migrations, so that two processes starting together do not both migrate
INGEST_LOCK = 0x64656C69  # "deli"
MIGRATE_LOCK = 0x64656C6D  # "delm"
#: the channel that wakes sorters when events are ingested
EVENTS_CHANNEL = "delivery_events"
#: what the router says once it queued events for services (their ids, in JSON)
QUEUED_CHANNEL = "delivery_queued"
#: an operator's request for the node sending to a service (see :func:`ask`)
ASKED_CHANNEL = "delivery_asked"
#: a node gave leases back or left: the others look at their shares at once
RELEASED_CHANNEL = "delivery_released"
#: what :func:`ask` may ask for
ASKS = frozenset(("retry", "enable", "rewind"))

_TXN_COLUMNS = (
    "service_id, txn_id, body, event_count, first_stream_id, last_stream_id, created_ts,"
    " attempts, first_attempt_ts, last_attempt_ts, last_error, received_ts, stream_ids"
)
_INSERT_TXN = (
    "INSERT INTO transactions (service_id, txn_id, body, event_count, first_stream_id,"
    " last_stream_id, created_ts, received_ts, stream_ids) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
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
    event_ids = list(dict.fromkeys(e.event_id for e in events))
    # The highest position before the batch, and the ids whose payload housekeeping has
    # deleted within the dedupe window (resubmits), in one statement for a batch of up to
    # 500 ids (the row of the former has no id).
    first, rest = event_ids[:500], event_ids[500:]
    sql = "SELECT coalesce(max(stream_id), 0), NULL FROM events"
    if first:
        sql += (
            " UNION ALL SELECT stream_id, event_id FROM seen_events"
            f" WHERE event_id IN ({','.join('?' * len(first))})"
        )
    rows = yield Query(sql, first)
    after = next(position for position, event_id in rows if event_id is None)
    seen = {event_id: position for position, event_id in rows if event_id is not None}
    if rest:
        seen.update((yield from _stream_ids(rest, "seen_events")))
    yield Insert(
        "events",
        _EVENT_COLUMNS,
        _EVENT_TYPES,
        [
            (e.event_id, r.sender, r.room_id, r.type, r.state_key, e.json, now)
            for e in events
            if e.event_id not in seen
            for r in (e.routing,)
        ],
        conflict="ON CONFLICT (event_id) DO NOTHING",
    )
    ids = yield from _stream_ids([i for i in event_ids if i not in seen] if seen else event_ids)
    ids.update(seen)
    yield Notify(EVENTS_CHANNEL)
    return Ingested([ids[e.event_id] for e in events], after)


#: the columns ``_events`` reads, in its order
_STORED_COLUMNS = (
    "stream_id, event_id, sender, room_id, type, state_key, json, received_ts, replay_for"
)


def _events(rows: Sequence[Sequence[Any]]) -> list[StoredEvent]:
    return [
        StoredEvent(
            stream_id,
            Event(event_id, RoutingFields(*routing), bytes(json)),
            received_ts,
            replay_for,
        )
        for stream_id, event_id, *routing, json, received_ts, replay_for in rows
    ]


def events_after(position: int, limit: int) -> Steps[list[StoredEvent]]:
    rows = yield Query(
        f"SELECT {_STORED_COLUMNS} FROM events WHERE stream_id > ? ORDER BY stream_id LIMIT ?",
        (position, limit),
    )
    return _events(rows)


def sorter_position() -> Steps[int]:
    row = yield Query("SELECT stream_id FROM sorter_position", fetch="one")
    return int(row[0])


def newest_stream_id() -> Steps[int]:
    row = yield Query("SELECT MAX(stream_id) FROM events", fetch="one")
    return int(row[0]) if row and row[0] is not None else 0


def commit_sorted(
    position: int,
    queue: Sequence[tuple[str, int]],
    new_events: Sequence[StoredEvent],
    unwanted: Sequence[int] = (),
    fence: Fence | None = None,
    notify: bool = False,
) -> Steps[None]:
    """
    Store the sorter's progress: the queue rows of the events it routed, its position,
    and the events no service wanted deleted; with ``notify``, tell the other processes
    which services were queued events (their senders may be there). PostgreSQL serializes
    the commits of transactions that notify, so only a router with peers does.
    """
    yield from _fenced(fence)
    if unwanted:
        # Events no service wanted go at once, their ids kept for the dedupe window; under
        # the ingest lock, so that ingest never finds an id in neither table.
        yield Lock(INGEST_LOCK)
        for start in range(0, len(unwanted), 500):
            chunk = list(unwanted[start : start + 500])
            marks = ",".join("?" * len(chunk))
            yield Query(
                "INSERT INTO seen_events (event_id, stream_id, received_ts)"
                " SELECT event_id, stream_id, received_ts FROM events"
                f" WHERE stream_id IN ({marks}) AND replay_for IS NULL"
                " ON CONFLICT DO NOTHING",
                chunk,
                fetch="count",
            )
            yield Query(f"DELETE FROM events WHERE stream_id IN ({marks})", chunk, fetch="count")
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
        if notify:
            services = {service_id for service_id, _ in queue}
            yield Notify(QUEUED_CHANNEL, queued_payload(services))
    yield Query("UPDATE sorter_position SET stream_id = ?", (position,), fetch="none")


#: the longest payload a NOTIFY carries (PostgreSQL's limit is 8000 bytes)
_MAX_PAYLOAD = 7000


def queued_payload(service_ids: set[str]) -> str:
    """The services that were queued events, for :data:`QUEUED_CHANNEL` ("": maybe any)."""
    payload = json.dumps(sorted(service_ids), separators=(",", ":"))
    return payload if len(payload.encode()) <= _MAX_PAYLOAD else ""


def ask(service_id: str, action: str) -> Steps[None]:
    """
    Tell the process sending to the service (whichever it is) to do ``action`` (one of
    :data:`ASKS`). ``enable`` also makes a disabled service's recorded state
    ``recovering`` in the same transaction, so that a process that takes the service over
    meanwhile starts it enabled.
    """
    if action not in ASKS:
        raise ValueError(f"cannot ask for {action!r}: only {', '.join(sorted(ASKS))}")
    if action == "enable":
        yield Query(
            "UPDATE services SET state = 'recovering' WHERE service_id = ? AND state = 'disabled'",
            (service_id,),
            fetch="none",
        )
    yield Notify(ASKED_CHANNEL, asked_payload(service_id, action))


def asked_payload(service_id: str, action: str) -> str:
    """The payload of :data:`ASKED_CHANNEL` ("": maybe anything, of any service)."""
    payload = json.dumps({"service": service_id, "action": action}, separators=(",", ":"))
    return payload if len(payload.encode()) <= _MAX_PAYLOAD else ""


def asked(payload: str | None) -> tuple[str, str] | None:
    """What :func:`asked_payload` says (None: maybe anything, of any service)."""
    try:
        said = json.loads(payload) if payload else None
    except ValueError:
        return None
    if not isinstance(said, dict):
        return None
    service_id, action = said.get("service"), said.get("action")
    if not isinstance(service_id, str) or action not in ASKS:
        return None
    return service_id, action


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


def _fenced(fence: Fence | None) -> Steps[None]:
    """What follows is written under ``fence`` (nothing to check without one)."""
    if fence is not None:
        yield Fenced(fence)


def set_state(service_id: str, state: str, fence: Fence | None = None) -> Steps[None]:
    yield from _fenced(fence)
    yield Query(
        "UPDATE services SET state = ? WHERE service_id = ?", (state, service_id), fetch="none"
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


def purge_service(service_id: str) -> Steps[tuple[int, int, int]]:
    """
    Delete everything kept for a service: its queue, stored transactions, dead letters,
    delivery log and record. How many queued events, transactions and dead letters went.
    """
    events = yield Query(
        "DELETE FROM service_queue WHERE service_id = ?", (service_id,), fetch="count"
    )
    transactions = yield Query(
        "DELETE FROM transactions WHERE service_id = ?", (service_id,), fetch="count"
    )
    dead = yield Query(
        "DELETE FROM dead_letters WHERE service_id = ?", (service_id,), fetch="count"
    )
    yield Query("DELETE FROM attempts WHERE service_id = ?", (service_id,), fetch="none")
    # Its ids are never given out again, should it be registered again.
    yield Query(
        "UPDATE instance SET purged_txn_id = coalesce((SELECT last_txn_id FROM services"
        " WHERE service_id = ? AND last_txn_id > instance.purged_txn_id), purged_txn_id)",
        (service_id,),
        fetch="count",
    )
    yield Query("DELETE FROM services WHERE service_id = ?", (service_id,), fetch="count")
    return events, transactions, dead


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


def pack_ids(ids: Sequence[int]) -> bytes | None:
    """Stream positions as stored with a transaction: little-endian 64-bit integers."""
    return struct.pack(f"<{len(ids)}q", *ids) if ids else None


def unpack_ids(packed: bytes | memoryview | None) -> tuple[int, ...]:
    """The positions of ``pack_ids``; none for a transaction stored before they were kept."""
    if packed is None:
        return ()
    return struct.unpack(f"<{len(packed) // 8}q", packed)


def store_transaction(
    service_id: str,
    first_stream_id: int,
    last_stream_id: int,
    event_count: int,
    body: bytes,
    now: float,
    received_ts: Sequence[float],
    stream_ids: Sequence[int] = (),
    fence: Fence | None = None,
) -> Steps[int]:
    yield from _fenced(fence)
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
            pack_ids(stream_ids),
        ),
        fetch="none",
    )
    return txn_id


def transactions(service_id: str, after: int, limit: int) -> Steps[list[StoredTransaction]]:
    rows = yield Query(
        f"SELECT {_TXN_COLUMNS} FROM transactions WHERE service_id = ? AND txn_id > ?"
        " ORDER BY txn_id LIMIT ?",
        (service_id, after, limit),
    )
    return _transactions(rows)


def _transactions(rows: Sequence[Sequence[Any]]) -> list[StoredTransaction]:
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
            stream_ids=unpack_ids(row[12]),
        )
        for row in rows
    ]


def oldest_transaction(service_id: str) -> Steps[StoredTransaction | None]:
    """
    The stored transaction to send first: the one holding the earliest events. That is
    the one with the lowest id, except after a bisection that failed part-way: its parts
    get their ids as they are made, depth first, so a later half made early can have a
    lower id than the halves of the half before it, and must wait for them.
    """
    rows = yield Query(
        f"SELECT {_TXN_COLUMNS} FROM transactions WHERE service_id = ?"
        " ORDER BY first_stream_id, txn_id LIMIT 1",
        (service_id,),
    )
    found = _transactions(rows)
    return found[0] if found else None


def complete_transaction(
    service_id: str,
    txn_id: int,
    now: float,
    attempt: Attempt | None = None,
    fence: Fence | None = None,
) -> Steps[None]:
    yield from _fenced(fence)
    yield Query(
        "DELETE FROM transactions WHERE service_id = ? AND txn_id = ?",
        (service_id, txn_id),
        fetch="none",
    )
    yield Query(
        "UPDATE services SET last_success_ts = ?, failure_count = 0, next_retry_ts = NULL"
        " WHERE service_id = ?",
        (now, service_id),
        fetch="none",
    )
    yield from _log_attempt(attempt)


def record_failure(
    service_id: str,
    txn_id: int,
    attempt_ts: float,
    error: str,
    failure_count: int,
    next_retry_ts: float | None,
    attempt: Attempt | None = None,
    fence: Fence | None = None,
) -> Steps[None]:
    yield from _fenced(fence)
    yield Query(
        "UPDATE transactions SET attempts = attempts + 1,"
        " first_attempt_ts = COALESCE(first_attempt_ts, ?), last_attempt_ts = ?,"
        " last_error = ? WHERE service_id = ? AND txn_id = ?",
        (attempt_ts, attempt_ts, error, service_id, txn_id),
        fetch="none",
    )
    yield Query(
        "UPDATE services SET last_error = ?, failure_count = ?, next_retry_ts = ?"
        " WHERE service_id = ?",
        (error, failure_count, next_retry_ts, service_id),
        fetch="none",
    )
    yield from _log_attempt(attempt)


# -- rejected transactions: splitting them, and dead letters --


def _stream_ids(event_ids: Sequence[str], table: str = "events") -> Steps[dict[str, int]]:
    """The stream positions of events, by id (of those in ``table``)."""
    found: dict[str, int] = {}
    for start in range(0, len(event_ids), 500):
        chunk = list(event_ids[start : start + 500])
        marks = ",".join("?" * len(chunk))
        rows = yield Query(
            f"SELECT event_id, stream_id FROM {table} WHERE event_id IN ({marks})", chunk
        )
        found.update(rows)
    return found


def _positions(event_ids: Sequence[str], packed: bytes | memoryview | None) -> Steps[list[int]]:
    """
    The stream positions of a stored transaction's events (its ``event_ids``, in body
    order), in that order, from the positions stored with it; from the events' rows for a
    transaction stored before they were kept (retention keeps those rows while it is
    stored). By place, not by id: a replay's copy has the id of its original, and both
    may be in one transaction.
    """
    stored = unpack_ids(packed)
    if len(stored) == len(event_ids):
        return list(stored)
    found = yield from _stream_ids(list(event_ids))
    return [found[e] for e in event_ids]


def split_transaction(
    service_id: str,
    txn_id: int,
    parts: Sequence[Sequence[tuple[str, bytes]]],
    now: float,
    attempt: Attempt | None = None,
    fence: Fence | None = None,
) -> Steps[list[StoredTransaction]]:
    """
    Replace a stored transaction by several, in order, with new ids: each part is a list
    of ``(event_id, json)``, and the parts are its events, in order (each part keeps their
    ingest times). ``attempt``: the refused attempt that called for it, for the log.
    """
    yield from _fenced(fence)
    yield from _log_attempt(attempt)
    event_ids = [e for part in parts for e, _ in part]
    deleted = yield Query(
        "DELETE FROM transactions WHERE service_id = ? AND txn_id = ?"
        " RETURNING received_ts, stream_ids",
        (service_id, txn_id),
        fetch="one",
    )
    received = unpack_times(deleted[0] if deleted else None)
    positions = yield from _positions(event_ids, deleted[1] if deleted else None)
    made = []
    start = 0
    for part in parts:
        row = yield Query(
            "UPDATE services SET last_txn_id = last_txn_id + 1 WHERE service_id = ?"
            " RETURNING last_txn_id",
            (service_id,),
            fetch="one",
        )
        ids = positions[start : start + len(part)]
        txn = StoredTransaction(
            service_id,
            int(row[0]),
            transaction_body([j for _, j in part]),
            len(part),
            min(ids),
            max(ids),
            now,
            received_ts=received[start : start + len(part)],
            stream_ids=tuple(ids),
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
                pack_ids(txn.stream_ids),
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
    attempt: Attempt | None = None,
    fence: Fence | None = None,
) -> Steps[None]:
    """
    Set a rejected transaction's events aside as dead letters, and forget it.
    ``attempt``: the refused attempt, for the log.
    """
    yield from _fenced(fence)
    yield from _log_attempt(attempt)
    row = yield Query(
        "SELECT stream_ids FROM transactions WHERE service_id = ? AND txn_id = ?",
        (service_id, txn_id),
        fetch="one",
    )
    positions = yield from _positions([e for e, _ in events], row[0] if row else None)
    yield Insert(
        "dead_letters",
        ("service_id", "stream_id", "event_id", "json", "txn_id", "status", "answer", "created_ts"),
        ("text", "bigint", "text", "bytea", "bigint", "integer", "text", "float8"),
        [
            (service_id, position, e, j, txn_id, status, answer, now)
            for position, (e, j) in zip(positions, events, strict=True)
        ],
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


# -- the delivery log: one row per attempt to send a transaction --

_ATTEMPT_COLUMNS = "service_id, txn_id, ts, duration, event_count, status, outcome, error, resend"


def _log_attempt(attempt: Attempt | None) -> Steps[None]:
    """An attempt's row, written by the operation that records its outcome: no commit of its own."""
    if attempt is None:
        return
    yield Query(
        f"INSERT INTO attempts ({_ATTEMPT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            attempt.service_id,
            attempt.txn_id,
            attempt.ts,
            attempt.duration,
            attempt.event_count,
            attempt.status,
            attempt.outcome,
            attempt.error,
            int(attempt.resend),
        ),
        fetch="none",
    )


def attempts(
    service_id: str, before: int | None, limit: int, outcome: str | None
) -> Steps[list[Attempt]]:
    """A service's attempts with an id below ``before`` (all: None), newest first."""
    where = ""
    params: list[Any] = [service_id]
    if before is not None:
        where += " AND id < ?"
        params.append(before)
    if outcome is not None:
        where += " AND outcome = ?"
        params.append(outcome)
    rows = yield Query(
        f"SELECT id, {_ATTEMPT_COLUMNS} FROM attempts WHERE service_id = ?{where}"
        " ORDER BY id DESC LIMIT ?",
        [*params, limit],
    )
    return [
        Attempt(
            service_id=r[1],
            txn_id=r[2],
            ts=r[3],
            duration=r[4],
            event_count=r[5],
            status=r[6],
            outcome=r[7],
            error=r[8],
            resend=bool(r[9]),
            id=r[0],
        )
        for r in rows
    ]


#: the oldest (or, ``order`` DESC and ``step`` <, the newest) attempt of each service, by a
#: skip scan of ``(service_id, id)``: one seek per service. Each step orders by both
#: columns, which only that index gives, so that PostgreSQL never walks the primary key
#: in search of a service's row.
_SERVICE_ENDS = (
    "WITH RECURSIVE s (id) AS ("
    " SELECT (SELECT id FROM attempts ORDER BY service_id{order}, id{order} LIMIT 1)"
    " UNION ALL"
    " SELECT (SELECT a.id FROM attempts a"
    " WHERE a.service_id {step} (SELECT b.service_id FROM attempts b WHERE b.id = s.id)"
    " ORDER BY a.service_id{order}, a.id{order} LIMIT 1)"
    " FROM s WHERE s.id IS NOT NULL)"
    " SELECT a.service_id, a.id FROM s JOIN attempts a ON a.id = s.id"
)


def prune_attempts(cutoff_ts: float, per_service: int, limit: int) -> Steps[int]:
    """
    Delete at most ``limit`` attempts: those older than ``cutoff_ts``, then, for each
    service, those beyond its newest ``per_service``; how many.

    Only the two indexes are read, never the whole table. First the primary key, from the
    oldest id: ids grow with time, so the old rows are the lowest ids, and the oldest row
    says whether there are any; the deletion stops at the first young row (a row older
    than one before it, a long request that ended late, goes in a later call). Then
    ``(service_id, id)``: a skip scan finds each service's oldest and newest id, one seek
    per service (:data:`_SERVICE_ENDS`). A service whose ids span no more than
    ``per_service`` cannot hold more rows than that and is left alone; for another one,
    its newest ``per_service`` index entries are walked to the first row beyond them, and
    that row and those before it go, oldest first.
    """
    deleted = 0
    oldest = yield Query("SELECT ts FROM attempts ORDER BY id LIMIT 1", fetch="one")
    if oldest is not None and oldest[0] < cutoff_ts:
        rows = yield Query("SELECT id, ts FROM attempts ORDER BY id LIMIT ?", (limit,))
        last = None
        for id_, ts in rows:
            if ts >= cutoff_ts:
                break
            last = id_
        if last is not None:
            deleted += yield Query(
                "DELETE FROM attempts WHERE id <= ? AND ts < ?", (last, cutoff_ts), fetch="count"
            )
    if deleted >= limit:
        return deleted
    oldest_ids = yield Query(_SERVICE_ENDS.format(order="", step=">"))
    newest_ids = dict((yield Query(_SERVICE_ENDS.format(order=" DESC", step="<"))))
    for service_id, first in oldest_ids:
        if newest_ids.get(service_id, first) - first + 1 <= per_service:
            continue
        beyond = yield Query(
            "SELECT id FROM attempts WHERE service_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?",
            (service_id, per_service),
            fetch="one",
        )
        if beyond is None:
            continue
        # that row and those before it, oldest first, as many as the limit leaves
        upto = yield Query(
            "SELECT id FROM attempts WHERE service_id = ? AND id <= ? ORDER BY id LIMIT 1 OFFSET ?",
            (service_id, beyond[0], limit - deleted - 1),
            fetch="one",
        )
        deleted += yield Query(
            "DELETE FROM attempts WHERE service_id = ? AND id BETWEEN ? AND ?",
            (service_id, first, beyond[0] if upto is None else upto[0]),
            fetch="count",
        )
        if deleted >= limit:
            break
    return deleted


# -- replay: copies of retained events, queued again for one service --


def replay_originals(
    after: int, up_to: int, from_ts: float | None, to_ts: float | None, limit: int
) -> Steps[list[StoredEvent]]:
    """
    Up to ``limit`` stored events (originals, never a replay's copies) above position
    ``after`` and up to ``up_to``, in stream order, that arrived from ``from_ts`` to
    ``to_ts`` (None: no bound). No index has the arrival time: the positions are scanned
    in order and the times filtered.
    """
    where = ""
    params: list[float] = [after, up_to]
    if from_ts is not None:
        where += " AND received_ts >= ?"
        params.append(from_ts)
    if to_ts is not None:
        where += " AND received_ts <= ?"
        params.append(to_ts)
    rows = yield Query(
        f"SELECT {_STORED_COLUMNS} FROM events WHERE stream_id > ? AND stream_id <= ?"
        f" AND replay_for IS NULL{where} ORDER BY stream_id LIMIT ?",
        [*params, limit],
    )
    return _events(rows)


def insert_replay(
    service_id: str, originals: Sequence[StoredEvent], key: str, now: float
) -> Steps[None]:
    """
    Store a copy of each of ``originals`` for ``service_id`` alone (``replay_for``), at
    new stream positions after every event stored so far, in their order: the original's
    JSON and routing fields, arrived ``now``, with an event id of its own that no producer
    sends, ``replay:{key}:{original position}`` (``key`` is drawn at random for each
    replay). Under the ingest lock, as ``insert_events``: stream ids commit in order.
    """
    yield Lock(INGEST_LOCK)
    yield Insert(
        "events",
        (*_EVENT_COLUMNS, "replay_for"),
        (*_EVENT_TYPES, "text"),
        [
            (
                f"replay:{key}:{s.stream_id}",
                r.sender,
                r.room_id,
                r.type,
                r.state_key,
                s.event.json,
                now,
                service_id,
            )
            for s in originals
            for r in (s.event.routing,)
        ],
    )
    yield Notify(EVENTS_CHANNEL)


def retention_mark() -> Steps[tuple[int, float | None]]:
    """
    How far retention has deleted events: the highest stream position and the latest
    ingest time of one it deleted (0 and None while it has deleted none).
    """
    row = yield Query("SELECT deleted_stream_id, deleted_ts FROM housekeeping", fetch="one")
    return (int(row[0]), row[1]) if row is not None else (0, None)
