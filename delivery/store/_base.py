"""
The store interface implemented once over the operations of ``_sql``, and the store's
health: ``health()`` is None while the database takes writes, and says why not (disk full,
read-only, ...) from the write that failed for that reason until one commits again. Each
change is logged once, in plain words, however many operations fail meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

from .._log import Logger
from ..errors import StoreUnavailableError
from ..events import Event, StoredEvent
from ..records import (
    Attempt,
    DeadLetter,
    Fence,
    Ingested,
    LeaseInfo,
    NodeInfo,
    QueuedEvent,
    ServiceRecord,
    ServiceSummary,
    StoredTransaction,
)
from . import _leases, _retention, _sql
from ._schema import Dialect

T = TypeVar("T")

log = Logger()


class GeneratorStore:
    """
    Every :class:`~delivery.IStore` method as one run of an ``_sql`` operation. A store
    says how to run one (:meth:`_run`: in one transaction) and how to connect.
    """

    dialect: Dialect
    #: the database's instance number, once open: its transaction ids are
    #: ``instance * 10**9 + n`` (see ``_schema``)
    instance: int = 0

    #: why the database cannot be written, while it cannot
    _problem: str | None = None

    def _migrated(self, instance: int) -> None:
        self.instance = instance

    def health(self) -> str | None:
        if not self._is_open():
            return "the database is not open (the service is starting, or stopped)"
        return self._problem

    def _is_open(self) -> bool:
        raise NotImplementedError

    def _cannot_write(self, problem: str) -> StoreUnavailableError:
        """A write failed because of ``problem``: the error for its caller."""
        message = f"the database cannot be written: {problem}"
        if message != self._problem:
            log.error(
                "the database cannot be written: {problem}; ingest answers 503 and deliveries"
                " wait until a write works again",
                problem=problem,
            )
            self._problem = message
        return StoreUnavailableError(message)

    def _written(self) -> None:
        """A write committed."""
        if self._problem is not None:
            log.info("the database can be written again ({was})", was=self._problem)
            self._problem = None

    def _run(self, operation: Callable[..., _sql.Steps[T]], *args: Any) -> Deferred[T]:
        raise NotImplementedError

    def on_new_events(self, callback: Callable[[], None]) -> None:
        """Only PostgreSQL can tell of other processes' events; elsewhere nothing to do."""

    def on_queued(self, callback: Callable[[list[str] | None], None]) -> None:
        """Only PostgreSQL can tell of other processes' routing; elsewhere nothing to do."""

    def on_asked(self, callback: Callable[[tuple[str, str] | None], None]) -> None:
        """Only PostgreSQL carries requests between processes; elsewhere nothing to do."""

    def on_released(self, callback: Callable[[], None]) -> None:
        """Only PostgreSQL has several processes share leases; elsewhere nothing to do."""

    def ask(self, service_id: str, action: str) -> Deferred[None]:
        return self._run(_sql.ask, service_id, action)

    def insert_events(self, events: Sequence[Event], now: float) -> Deferred[Ingested]:
        return self._run(_sql.insert_events, events, now)

    def events_after(self, position: int, limit: int) -> Deferred[Sequence[StoredEvent]]:
        d: Deferred[Sequence[StoredEvent]] = self._run(_sql.events_after, position, limit)
        return d

    def sorter_position(self) -> Deferred[int]:
        return self._run(_sql.sorter_position)

    def newest_stream_id(self) -> Deferred[int]:
        return self._run(_sql.newest_stream_id)

    def commit_sorted(
        self,
        position: int,
        queue: Sequence[tuple[str, int]],
        new_events: Sequence[StoredEvent] = (),
        unwanted: Sequence[int] = (),
        fence: Fence | None = None,
        notify: bool = False,
    ) -> Deferred[None]:
        return self._run(_sql.commit_sorted, position, queue, new_events, unwanted, fence, notify)

    def delete_events(
        self, after: int, limit: int, cutoff_ts: float, dedupe_cutoff_ts: float
    ) -> Deferred[tuple[int, int | None]]:
        return self._run(_retention.delete_events, after, limit, cutoff_ts, dedupe_cutoff_ts)

    def prune_seen(self, cutoff_ts: float, limit: int) -> Deferred[int]:
        return self._run(_retention.prune_seen, cutoff_ts, limit)

    # -- several daemons: heartbeats and leases --

    def ensure_leases(self, names: Sequence[str]) -> Deferred[None]:
        return self._run(_leases.ensure_leases, names)

    def read_cluster(
        self, ttl: float, now: float
    ) -> Deferred[tuple[list[NodeInfo], list[LeaseInfo]]]:
        return self._run(_leases.read_cluster, ttl, now)

    def heartbeat(
        self, node: NodeInfo, incarnation: str, held: Sequence[str], now: float, ttl: float
    ) -> Deferred[tuple[dict[str, int], list[NodeInfo], list[LeaseInfo]]]:
        return self._run(_leases.heartbeat, node, incarnation, held, now, ttl)

    def acquire_leases(
        self,
        owner: str,
        incarnation: str,
        names: Sequence[str],
        now: float,
        ttl: float,
        dead: Sequence[str] = (),
    ) -> Deferred[dict[str, int]]:
        return self._run(_leases.acquire_leases, owner, incarnation, names, now, ttl, dead)

    def release_leases(self, incarnation: str, names: Sequence[str]) -> Deferred[None]:
        return self._run(_leases.release_leases, incarnation, names)

    def leave(self, node_id: str, incarnation: str, held: Sequence[str]) -> Deferred[None]:
        return self._run(_leases.leave, node_id, incarnation, held)

    def free_pages(self) -> Deferred[int]:
        return self._run(_retention.free_pages, self.dialect)

    def reclaim_pages(self, pages: int) -> Deferred[int]:
        return self._run(_retention.reclaim_pages, self.dialect, pages)

    def database_stats(self) -> Deferred[tuple[int, dict[str, int]]]:
        return self._run(_retention.database_stats, self.dialect)

    def sorter_lag(self) -> Deferred[tuple[int, float | None]]:
        return self._run(_sql.sorter_lag)

    def ensure_services(self, service_ids: Sequence[str]) -> Deferred[None]:
        return self._run(_sql.ensure_services, service_ids)

    def services(self, only: str | None = None) -> Deferred[dict[str, ServiceRecord]]:
        return self._run(_sql.services, only)

    def set_state(self, service_id: str, state: str, fence: Fence | None = None) -> Deferred[None]:
        return self._run(_sql.set_state, service_id, state, fence)

    def summary(self, service_id: str) -> Deferred[ServiceSummary]:
        return self._run(_sql.summary, service_id)

    def summaries(self) -> Deferred[dict[str, ServiceSummary]]:
        return self._run(_sql.summaries)

    def purge_service(self, service_id: str) -> Deferred[tuple[int, int, int]]:
        return self._run(_sql.purge_service, service_id)

    def ping(self) -> Deferred[None]:
        return self._run(_sql.ping)

    def queued(self, service_id: str, after: int, limit: int) -> Deferred[list[QueuedEvent]]:
        return self._run(_sql.queued, service_id, after, limit)

    def store_transaction(
        self,
        service_id: str,
        first_stream_id: int,
        last_stream_id: int,
        event_count: int,
        body: bytes,
        now: float,
        received_ts: Sequence[float],
        stream_ids: Sequence[int] = (),
        fence: Fence | None = None,
    ) -> Deferred[int]:
        return self._run(
            _sql.store_transaction,
            service_id,
            first_stream_id,
            last_stream_id,
            event_count,
            body,
            now,
            received_ts,
            stream_ids,
            fence,
        )

    def oldest_transaction(self, service_id: str) -> Deferred[StoredTransaction | None]:
        return self._run(_sql.oldest_transaction, service_id)

    def transactions(
        self, service_id: str, after: int, limit: int
    ) -> Deferred[list[StoredTransaction]]:
        return self._run(_sql.transactions, service_id, after, limit)

    def complete_transaction(
        self,
        service_id: str,
        txn_id: int,
        now: float,
        attempt: Attempt | None = None,
        fence: Fence | None = None,
    ) -> Deferred[None]:
        return self._run(_sql.complete_transaction, service_id, txn_id, now, attempt, fence)

    def record_failure(
        self,
        service_id: str,
        txn_id: int,
        attempt_ts: float,
        error: str,
        failure_count: int,
        next_retry_ts: float | None,
        attempt: Attempt | None = None,
        fence: Fence | None = None,
    ) -> Deferred[None]:
        return self._run(
            _sql.record_failure,
            service_id,
            txn_id,
            attempt_ts,
            error,
            failure_count,
            next_retry_ts,
            attempt,
            fence,
        )

    def split_transaction(
        self,
        service_id: str,
        txn_id: int,
        parts: Sequence[Sequence[tuple[str, bytes]]],
        now: float,
        attempt: Attempt | None = None,
        fence: Fence | None = None,
    ) -> Deferred[list[StoredTransaction]]:
        return self._run(_sql.split_transaction, service_id, txn_id, parts, now, attempt, fence)

    def dead_letter(
        self,
        service_id: str,
        txn_id: int,
        events: Sequence[tuple[str, bytes]],
        status: int | None,
        answer: str | None,
        now: float,
        attempt: Attempt | None = None,
        fence: Fence | None = None,
    ) -> Deferred[None]:
        return self._run(
            _sql.dead_letter, service_id, txn_id, events, status, answer, now, attempt, fence
        )

    def dead_letters(self, service_id: str, after: int, limit: int) -> Deferred[list[DeadLetter]]:
        return self._run(_sql.dead_letters, service_id, after, limit)

    def redrive(self, service_id: str, ids: Sequence[int] | None) -> Deferred[int]:
        return self._run(_sql.redrive, service_id, ids)

    def discard(self, service_id: str, ids: Sequence[int] | None) -> Deferred[int]:
        return self._run(_sql.discard, service_id, ids)

    def dead_letter_counts(self) -> Deferred[dict[str, int]]:
        return self._run(_sql.dead_letter_counts)

    def attempts(
        self, service_id: str, before: int | None, limit: int, outcome: str | None
    ) -> Deferred[list[Attempt]]:
        return self._run(_sql.attempts, service_id, before, limit, outcome)

    def prune_attempts(self, cutoff_ts: float, per_service: int, limit: int) -> Deferred[int]:
        return self._run(_sql.prune_attempts, cutoff_ts, per_service, limit)

    # -- replay --

    def replay_originals(
        self, after: int, up_to: int, from_ts: float | None, to_ts: float | None, limit: int
    ) -> Deferred[list[StoredEvent]]:
        return self._run(_sql.replay_originals, after, up_to, from_ts, to_ts, limit)

    def insert_replay(
        self, service_id: str, originals: Sequence[StoredEvent], key: str, now: float
    ) -> Deferred[None]:
        return self._run(_sql.insert_replay, service_id, originals, key, now)

    def retention_mark(self) -> Deferred[tuple[int, float | None]]:
        return self._run(_sql.retention_mark)
