"""
The embedded default store: one SQLite file, WAL, ``synchronous=FULL``, one connection.

Every method is one SQLite transaction, run on the connection's own thread through
``twisted.enterprise.adbapi``; a commit is on disk before its Deferred fires.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from .._interfaces import IStore
from ..events import Event, StoredEvent
from ..interest import RoutingFields
from ..records import QueuedEvent, ServiceRecord, ServiceSummary, StoredTransaction
from ._schema import SCHEMA_VERSION, SQLITE, migrations

T = TypeVar("T")

# SQLite's limit on host parameters in one statement is 32766; stay far below it.
_CHUNK = 500

_TXN_COLUMNS = (
    "service_id, txn_id, body, event_count, first_stream_id, last_stream_id, created_ts, "
    "attempts, first_attempt_ts, last_attempt_ts, last_error"
)


class SchemaTooNewError(Exception):
    """The database was written by a newer version of ``delivery``."""


def _setup(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA busy_timeout = 10000")


def _events(rows: Sequence[Sequence[Any]]) -> list[StoredEvent]:
    return [
        StoredEvent(
            stream_id,
            Event(event_id, RoutingFields(sender, room_id, type_, state_key), bytes(json)),
            received_ts,
        )
        for stream_id, event_id, sender, room_id, type_, state_key, json, received_ts in rows
    ]


@implementer(IStore)
class SQLiteStore:
    """The store in one SQLite file at ``path``."""

    def __init__(self, path: str, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.path = path
        self._reactor = reactor
        self._pool: adbapi.ConnectionPool | None = None

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path!r}>"

    # -- plumbing --

    def _run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``fn(cursor, *args)`` in one transaction on the connection's thread."""
        if self._pool is None:
            raise RuntimeError(f"{self!r} is not open: call open() first")

        def interaction(txn: Any, *args: Any) -> T:
            txn.execute("BEGIN IMMEDIATE")
            return fn(txn, *args)

        d: Deferred[T] = self._pool.runInteraction(interaction, *args)
        return d

    def open(self) -> Deferred[None]:
        if self._pool is None:
            self._pool = adbapi.ConnectionPool(
                "sqlite3",
                self.path,
                check_same_thread=False,
                isolation_level=None,
                cp_min=1,
                cp_max=1,
                cp_openfun=_setup,
                cp_reactor=self._reactor,
            )
        return self._run(self._migrate)

    @staticmethod
    def _migrate(txn: Any) -> None:
        txn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        txn.execute("SELECT version FROM schema_version")
        row = txn.fetchone()
        if row is None:
            txn.execute("INSERT INTO schema_version (version) VALUES (0)")
            current = 0
        else:
            current = row[0]
        if current > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"the database is at schema version {current}, newer than this version of "
                f"delivery knows ({SCHEMA_VERSION}): upgrade delivery"
            )
        for version, statements in migrations(SQLITE, current):
            for statement in statements:
                txn.execute(statement)
            txn.execute("UPDATE schema_version SET version = ?", (version,))

    def close(self) -> Deferred[None]:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        return succeed(None)

    # -- events and sorting --

    def insert_events(self, events: Sequence[Event], now: float) -> Deferred[list[int]]:
        return self._run(self._insert_events, events, now)

    @staticmethod
    def _insert_events(txn: Any, events: Sequence[Event], now: float) -> list[int]:
        txn.executemany(
            "INSERT INTO events (event_id, sender, room_id, type, state_key, json, received_ts)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
            [
                (e.event_id, r.sender, r.room_id, r.type, r.state_key, e.json, now)
                for e in events
                for r in (e.routing,)
            ],
        )
        ids: dict[str, int] = {}
        unique = list(dict.fromkeys(e.event_id for e in events))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            txn.execute(
                "SELECT event_id, stream_id FROM events WHERE event_id IN "
                f"({','.join('?' * len(chunk))})",
                chunk,
            )
            ids.update(txn.fetchall())
        return [ids[e.event_id] for e in events]

    def events_after(self, position: int, limit: int) -> Deferred[Sequence[StoredEvent]]:
        return self._run(self._events_after, position, limit)

    @staticmethod
    def _events_after(txn: Any, position: int, limit: int) -> list[StoredEvent]:
        txn.execute(
            "SELECT stream_id, event_id, sender, room_id, type, state_key, json, received_ts"
            " FROM events WHERE stream_id > ? ORDER BY stream_id LIMIT ?",
            (position, limit),
        )
        return _events(txn.fetchall())

    def sorter_position(self) -> Deferred[int]:
        return self._run(self._sorter_position)

    @staticmethod
    def _sorter_position(txn: Any) -> int:
        txn.execute("SELECT stream_id FROM sorter_position")
        return int(txn.fetchone()[0])

    def commit_sorted(
        self,
        position: int,
        queue: Sequence[tuple[str, int]],
        new_events: Sequence[StoredEvent] = (),
    ) -> Deferred[None]:
        return self._run(self._commit_sorted, position, queue, new_events)

    @staticmethod
    def _commit_sorted(
        txn: Any,
        position: int,
        queue: Sequence[tuple[str, int]],
        new_events: Sequence[StoredEvent],
    ) -> None:
        if new_events:
            txn.executemany(
                "INSERT INTO events (stream_id, event_id, sender, room_id, type, state_key,"
                " json, received_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
            )
        txn.executemany("INSERT INTO service_queue (service_id, stream_id) VALUES (?, ?)", queue)
        txn.execute("UPDATE sorter_position SET stream_id = ?", (position,))

    # -- services --

    def ensure_services(self, service_ids: Sequence[str]) -> Deferred[None]:
        return self._run(self._ensure_services, service_ids)

    @staticmethod
    def _ensure_services(txn: Any, service_ids: Sequence[str]) -> None:
        txn.executemany(
            "INSERT INTO services (service_id) VALUES (?) ON CONFLICT DO NOTHING",
            [(s,) for s in service_ids],
        )

    def services(self) -> Deferred[dict[str, ServiceRecord]]:
        return self._run(self._services)

    @staticmethod
    def _services(txn: Any) -> dict[str, ServiceRecord]:
        txn.execute(
            "SELECT service_id, state, last_txn_id, last_success_ts, last_error,"
            " failure_count, next_retry_ts FROM services"
        )
        return {row[0]: ServiceRecord(*row) for row in txn.fetchall()}

    def set_state(self, service_id: str, state: str) -> Deferred[None]:
        return self._run(self._set_state, service_id, state)

    @staticmethod
    def _set_state(txn: Any, service_id: str, state: str) -> None:
        txn.execute("UPDATE services SET state = ? WHERE service_id = ?", (state, service_id))

    def summary(self, service_id: str) -> Deferred[ServiceSummary]:
        return self._run(self._summary, service_id)

    @staticmethod
    def _summary(txn: Any, service_id: str) -> ServiceSummary:
        txn.execute(
            "SELECT COUNT(*), MIN(stream_id) FROM service_queue WHERE service_id = ?",
            (service_id,),
        )
        queued, oldest_queued = txn.fetchone()
        txn.execute(
            "SELECT COUNT(*), MIN(first_stream_id) FROM transactions WHERE service_id = ?",
            (service_id,),
        )
        stored, oldest_stored = txn.fetchone()
        oldest = min((s for s in (oldest_queued, oldest_stored) if s is not None), default=None)
        oldest_ts = None
        if oldest is not None:
            txn.execute("SELECT received_ts FROM events WHERE stream_id = ?", (oldest,))
            row = txn.fetchone()
            oldest_ts = row[0] if row else None
        return ServiceSummary(queued, stored, oldest_ts)

    def summaries(self) -> Deferred[dict[str, ServiceSummary]]:
        return self._run(self._summaries)

    @staticmethod
    def _summaries(txn: Any) -> dict[str, ServiceSummary]:
        txn.execute(
            "SELECT s.service_id,"
            " (SELECT COUNT(*) FROM service_queue q WHERE q.service_id = s.service_id),"
            " (SELECT MIN(stream_id) FROM service_queue q WHERE q.service_id = s.service_id),"
            " (SELECT COUNT(*) FROM transactions t WHERE t.service_id = s.service_id),"
            " (SELECT MIN(first_stream_id) FROM transactions t"
            "  WHERE t.service_id = s.service_id)"
            " FROM services s"
        )
        rows = txn.fetchall()
        result = {}
        for service_id, queued, oldest_queued, stored, oldest_stored in rows:
            oldest = min((x for x in (oldest_queued, oldest_stored) if x is not None), default=None)
            oldest_ts = None
            if oldest is not None:
                txn.execute("SELECT received_ts FROM events WHERE stream_id = ?", (oldest,))
                row = txn.fetchone()
                oldest_ts = row[0] if row else None
            result[service_id] = ServiceSummary(queued, stored, oldest_ts)
        return result

    def sorter_lag(self) -> Deferred[tuple[int, float | None]]:
        return self._run(self._sorter_lag)

    @staticmethod
    def _sorter_lag(txn: Any) -> tuple[int, float | None]:
        txn.execute(
            "SELECT COUNT(*), MIN(received_ts) FROM events"
            " WHERE stream_id > (SELECT stream_id FROM sorter_position)"
        )
        count, oldest = txn.fetchone()
        return int(count), oldest

    def purge_service(self, service_id: str) -> Deferred[tuple[int, int]]:
        return self._run(self._purge_service, service_id)

    @staticmethod
    def _purge_service(txn: Any, service_id: str) -> tuple[int, int]:
        txn.execute("DELETE FROM service_queue WHERE service_id = ?", (service_id,))
        events = txn.rowcount
        txn.execute("DELETE FROM transactions WHERE service_id = ?", (service_id,))
        transactions = txn.rowcount
        txn.execute("DELETE FROM services WHERE service_id = ?", (service_id,))
        return events, transactions

    def ping(self) -> Deferred[None]:
        return self._run(self._ping)

    @staticmethod
    def _ping(txn: Any) -> None:
        txn.execute("SELECT 1")
        txn.fetchone()

    # -- queues and transactions --

    def queued(self, service_id: str, after: int, limit: int) -> Deferred[list[QueuedEvent]]:
        return self._run(self._queued, service_id, after, limit)

    @staticmethod
    def _queued(txn: Any, service_id: str, after: int, limit: int) -> list[QueuedEvent]:
        txn.execute(
            "SELECT q.stream_id, e.json, e.received_ts FROM service_queue q"
            " JOIN events e ON e.stream_id = q.stream_id"
            " WHERE q.service_id = ? AND q.stream_id > ? ORDER BY q.stream_id LIMIT ?",
            (service_id, after, limit),
        )
        return [QueuedEvent(stream_id, bytes(json), ts) for stream_id, json, ts in txn.fetchall()]

    def store_transaction(
        self,
        service_id: str,
        first_stream_id: int,
        last_stream_id: int,
        event_count: int,
        body: bytes,
        now: float,
    ) -> Deferred[int]:
        return self._run(
            self._store_transaction,
            service_id,
            first_stream_id,
            last_stream_id,
            event_count,
            body,
            now,
        )

    @staticmethod
    def _store_transaction(
        txn: Any,
        service_id: str,
        first_stream_id: int,
        last_stream_id: int,
        event_count: int,
        body: bytes,
        now: float,
    ) -> int:
        txn.execute(
            "UPDATE services SET last_txn_id = last_txn_id + 1 WHERE service_id = ?"
            " RETURNING last_txn_id",
            (service_id,),
        )
        row = txn.fetchone()
        if row is None:
            raise KeyError(f"no service record for {service_id!r}")
        txn_id = int(row[0])
        txn.execute(
            "DELETE FROM service_queue WHERE service_id = ? AND stream_id BETWEEN ? AND ?",
            (service_id, first_stream_id, last_stream_id),
        )
        if txn.rowcount != event_count:
            # The pool's window no longer matches the queue: refuse rather than lose events.
            raise RuntimeError(
                f"queue of {service_id!r} has {txn.rowcount} events from {first_stream_id} to "
                f"{last_stream_id}, expected {event_count}"
            )
        txn.execute(
            "INSERT INTO transactions (service_id, txn_id, body, event_count,"
            " first_stream_id, last_stream_id, created_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (service_id, txn_id, body, event_count, first_stream_id, last_stream_id, now),
        )
        return txn_id

    def oldest_transaction(self, service_id: str) -> Deferred[StoredTransaction | None]:
        return self._run(self._oldest_transaction, service_id)

    @classmethod
    def _oldest_transaction(cls, txn: Any, service_id: str) -> StoredTransaction | None:
        found = cls._transactions(txn, service_id, 0, 1)
        return found[0] if found else None

    def transactions(
        self, service_id: str, after: int, limit: int
    ) -> Deferred[list[StoredTransaction]]:
        return self._run(self._transactions, service_id, after, limit)

    @staticmethod
    def _transactions(txn: Any, service_id: str, after: int, limit: int) -> list[StoredTransaction]:
        txn.execute(
            f"SELECT {_TXN_COLUMNS} FROM transactions WHERE service_id = ? AND txn_id > ?"
            " ORDER BY txn_id LIMIT ?",
            (service_id, after, limit),
        )
        return [
            StoredTransaction(row[0], row[1], bytes(row[2]), *row[3:]) for row in txn.fetchall()
        ]

    def complete_transaction(self, service_id: str, txn_id: int, now: float) -> Deferred[None]:
        return self._run(self._complete_transaction, service_id, txn_id, now)

    @staticmethod
    def _complete_transaction(txn: Any, service_id: str, txn_id: int, now: float) -> None:
        txn.execute(
            "DELETE FROM transactions WHERE service_id = ? AND txn_id = ?", (service_id, txn_id)
        )
        txn.execute(
            "UPDATE services SET last_success_ts = ?, failure_count = 0, next_retry_ts = NULL"
            " WHERE service_id = ?",
            (now, service_id),
        )

    def record_failure(
        self,
        service_id: str,
        txn_id: int,
        attempt_ts: float,
        error: str,
        failure_count: int,
        next_retry_ts: float | None,
    ) -> Deferred[None]:
        return self._run(
            self._record_failure,
            service_id,
            txn_id,
            attempt_ts,
            error,
            failure_count,
            next_retry_ts,
        )

    @staticmethod
    def _record_failure(
        txn: Any,
        service_id: str,
        txn_id: int,
        attempt_ts: float,
        error: str,
        failure_count: int,
        next_retry_ts: float | None,
    ) -> None:
        txn.execute(
            "UPDATE transactions SET attempts = attempts + 1,"
            " first_attempt_ts = COALESCE(first_attempt_ts, ?), last_attempt_ts = ?,"
            " last_error = ? WHERE service_id = ? AND txn_id = ?",
            (attempt_ts, attempt_ts, error, service_id, txn_id),
        )
        txn.execute(
            "UPDATE services SET last_error = ?, failure_count = ?, next_retry_ts = ?"
            " WHERE service_id = ?",
            (error, failure_count, next_retry_ts, service_id),
        )
