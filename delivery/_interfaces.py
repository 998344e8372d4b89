"""The interfaces between the parts of ``delivery``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from .events import Event, StoredEvent
from .records import (
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


class IEventSource(Interface):
    """Where the sorter reads events from, in stream order."""

    def events_after(position: int, limit: int) -> Deferred[Sequence[StoredEvent]]:
        """
        Up to ``limit`` events with a stream position above ``position``, in increasing
        stream order. Positions are positive integers, strictly increasing.
        """


class IStore(IEventSource):
    """
    Everything the pipeline persists. Every method is one database transaction: it
    happens completely or not at all.
    """

    instance = Attribute(
        "The database's instance number, drawn at random when it was made, once open: a"
        " service's transaction ids are ``instance * 10**9 + n``, n = 1, 2, ..."
    )

    def open() -> Deferred[None]:
        """Connect and bring the schema up to date (versioned migrations)."""

    def health() -> str | None:
        """
        None while the database takes writes; else why it does not, in plain words ("the
        database cannot be written: disk full (/var/lib/delivery.db)"), from the write that
        failed so until one commits again, or because the store is not open. Each change
        of a write's outcome is logged once, by the store.
        """

    def close() -> Deferred[None]:
        """Release every connection."""

    def insert_events(events: Sequence[Event], now: float) -> Deferred[Ingested]:
        """
        Store a batch of events; their stream positions, in order. An event whose
        ``event_id`` is stored already is left alone and its first position returned.
        No other writer stores events between the highest position before the batch
        (``Ingested.after``) and the batch's own.
        """

    def sorter_position() -> Deferred[int]:
        """The stream position up to which events have been routed (0 at first)."""

    def newest_stream_id() -> Deferred[int]:
        """The stream position of the newest event stored (0 when there is none)."""

    def commit_sorted(
        position: int,
        queue: Sequence[tuple[str, int]],
        new_events: Sequence[StoredEvent],
        unwanted: Sequence[int] = (),
        fence: Fence | None = None,
        notify: bool = False,
    ) -> Deferred[None]:
        """
        Add ``(service_id, stream_id)`` rows to the service queues and move the sorter
        position to ``position``, atomically. ``new_events`` (from an outside event
        source) are stored at their own positions in the same transaction; the events at
        the positions ``unwanted`` (wanted by no service) are deleted, their ids kept for
        the dedupe window. Under ``fence`` (the router's lease); with ``notify``, other
        processes are told which services were queued events (see ``on_queued``).
        """

    def delete_events(
        after: int, limit: int, cutoff_ts: float, dedupe_cutoff_ts: float
    ) -> Deferred[tuple[int, int | None]]:
        """
        Housekeeping, one batch: delete up to ``limit`` events above position ``after``
        that the sorter is past, no queue row, stored transaction or dead letter needs,
        and that arrived before ``cutoff_ts``, keeping the ids of those that arrived after
        ``dedupe_cutoff_ts``. How many went, and the position to go on from (None: the
        pass is over).
        """

    def prune_seen(cutoff_ts: float, limit: int) -> Deferred[int]:
        """Forget up to ``limit`` ids of deleted events that arrived before ``cutoff_ts``."""

    def ensure_leases(names: Sequence[str]) -> Deferred[None]:
        """Several daemons: a row for each lease not known yet (free)."""

    def read_cluster(ttl: float, now: float) -> Deferred[tuple[list[NodeInfo], list[LeaseInfo]]]:
        """Every node (alive: a heartbeat younger than ``ttl``) and every lease."""

    def heartbeat(
        node: NodeInfo, incarnation: str, held: Sequence[str], now: float, ttl: float
    ) -> Deferred[tuple[dict[str, int], list[NodeInfo], list[LeaseInfo]]]:
        """
        This node's heartbeat and the renewal of the leases ``held``: those renewed (still
        this process's) with their epochs, every node and every lease.
        """

    def acquire_leases(
        owner: str,
        incarnation: str,
        names: Sequence[str],
        now: float,
        ttl: float,
        dead: Sequence[str] = (),
    ) -> Deferred[dict[str, int]]:
        """
        Take those of ``names`` that are free or expired, or held by a process of ``dead``
        (known to be gone), each at a new epoch.
        """

    def release_leases(incarnation: str, names: Sequence[str]) -> Deferred[None]:
        """Give back those of ``names`` this process holds; the other nodes are told."""

    def leave(node_id: str, incarnation: str, held: Sequence[str]) -> Deferred[None]:
        """
        This node stops: it gives back the leases it ``held`` and its heartbeat row goes,
        at once; the other nodes are told.
        """

    def on_released(callback: Callable[[], None]) -> None:
        """
        Call ``callback`` when another process gave leases back or left the cluster (or
        may have: the connection that listens is back), where the store can tell.
        """

    def free_pages() -> Deferred[int]:
        """Pages of the database file that hold nothing and can be given back (or 0)."""

    def reclaim_pages(pages: int) -> Deferred[int]:
        """Give up to ``pages`` free pages back to the file system; how many went."""

    def database_stats() -> Deferred[tuple[int, dict[str, int]]]:
        """The database's size in bytes, and the rows of its main tables."""

    def ensure_services(service_ids: Sequence[str]) -> Deferred[None]:
        """Create a record for each service not known yet."""

    def services(only: str | None = None) -> Deferred[dict[str, ServiceRecord]]:
        """Every service record by id; with ``only``, that service's record if there is one."""

    def queued(service_id: str, after: int, limit: int) -> Deferred[list[QueuedEvent]]:
        """The oldest ``limit`` queued events of a service above position ``after``."""

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
    ) -> Deferred[int]:
        """
        Store a transaction with the service's next id and take its events (the queued
        events of the service from ``first_stream_id`` to ``last_stream_id``) out of the
        queue; the new id. ``received_ts`` are its events' ingest times, in order: kept
        with it for the latency of a resend; ``stream_ids`` their positions, in order:
        kept so that the transaction can be split or set aside after its events' rows
        have been deleted.
        """

    def oldest_transaction(service_id: str) -> Deferred[StoredTransaction | None]:
        """The service's stored transaction with the lowest id, if any."""

    def transactions(service_id: str, after: int, limit: int) -> Deferred[list[StoredTransaction]]:
        """Stored transactions of a service with an id above ``after``, oldest first."""

    def complete_transaction(
        service_id: str,
        txn_id: int,
        now: float,
        attempt: Attempt | None = None,
        fence: Fence | None = None,
    ) -> Deferred[None]:
        """
        The receiver acknowledged the transaction: forget it, note the success (and
        ``attempt``, the delivery log's row for it, in the same transaction).
        """

    def record_failure(
        service_id: str,
        txn_id: int,
        attempt_ts: float,
        error: str,
        failure_count: int,
        next_retry_ts: float | None,
        attempt: Attempt | None = None,
        fence: Fence | None = None,
    ) -> Deferred[None]:
        """
        Note a failed attempt on the transaction and on the service (and ``attempt``, the
        delivery log's row for it, in the same transaction).
        """

    def set_state(service_id: str, state: str, fence: Fence | None = None) -> Deferred[None]:
        """Remember the service's state."""

    def summary(service_id: str) -> Deferred[ServiceSummary]:
        """What is pending for the service."""

    def summaries() -> Deferred[dict[str, ServiceSummary]]:
        """What is pending, for every service the store knows."""

    def sorter_lag() -> Deferred[tuple[int, float | None]]:
        """Events not routed yet, and when the oldest of them arrived."""

    def purge_service(service_id: str) -> Deferred[tuple[int, int, int]]:
        """Delete a service's queue, stored transactions and record; the counts deleted."""

    def ping() -> Deferred[None]:
        """Fails if the database does not answer."""

    def split_transaction(
        service_id: str,
        txn_id: int,
        parts: Sequence[Sequence[tuple[str, bytes]]],
        now: float,
        attempt: Attempt | None = None,
        fence: Fence | None = None,
    ) -> Deferred[list[StoredTransaction]]:
        """
        Replace a stored transaction by several with new ids, in order; each part is a
        list of ``(event_id, json)``. The new transactions. ``attempt``: the delivery
        log's row for the attempt that was refused, written in the same transaction.
        """

    def dead_letter(
        service_id: str,
        txn_id: int,
        events: Sequence[tuple[str, bytes]],
        status: int | None,
        answer: str | None,
        now: float,
        attempt: Attempt | None = None,
        fence: Fence | None = None,
    ) -> Deferred[None]:
        """
        Set a rejected transaction's events aside as dead letters and forget it.
        ``attempt``: the delivery log's row for the attempt that was refused, written in
        the same transaction.
        """

    def dead_letters(service_id: str, after: int, limit: int) -> Deferred[list[DeadLetter]]:
        """A service's dead letters with an id above ``after``, oldest first."""

    def redrive(service_id: str, ids: Sequence[int] | None) -> Deferred[int]:
        """Queue dead letters again (all, or those ids); how many."""

    def discard(service_id: str, ids: Sequence[int] | None) -> Deferred[int]:
        """Delete dead letters for good (all, or those ids); how many."""

    def dead_letter_counts() -> Deferred[dict[str, int]]:
        """How many dead letters each service has (services with none left out)."""

    def attempts(
        service_id: str, before: int | None, limit: int, outcome: str | None
    ) -> Deferred[list[Attempt]]:
        """
        The delivery log of a service: at most ``limit`` attempts, newest first (by id,
        descending), with an id below ``before`` (None: from the newest) and, unless
        ``outcome`` is None, that outcome.
        """

    def prune_attempts(cutoff_ts: float, per_service: int, limit: int) -> Deferred[int]:
        """
        Housekeeping of the delivery log: delete at most ``limit`` attempts, those older
        than ``cutoff_ts`` and, for each service, those beyond its newest
        ``per_service``; how many. Cheap when there is nothing to delete.
        """

    def on_new_events(callback: Callable[[], None]) -> None:
        """
        Have ``callback`` called when any process ingests events into this database, where
        the store can tell (PostgreSQL's NOTIFY); otherwise never.
        """

    def on_queued(callback: Callable[[list[str] | None], None]) -> None:
        """
        Call ``callback`` with the ids of the services another process queued events for
        (None: maybe any, as when the connection that listens is back), so that their
        senders here read their queues.
        """

    def ask(service_id: str, action: str) -> Deferred[None]:
        """
        Ask the process that sends to the service, whichever it is, to ``retry`` at once,
        ``enable`` it (a disabled service's recorded state also becomes ``recovering``, so
        that a process taking it over starts it enabled) or ``rewind`` (read its queue from
        the start: dead letters were redriven). Processes that listen hear it through
        ``on_asked``; a store no other process shares only records the ``enable``.
        """

    def on_asked(callback: Callable[[tuple[str, str] | None], None]) -> None:
        """
        Call ``callback`` with ``(service_id, action)`` for each :meth:`ask` of any process
        (None: maybe some were missed, as when the connection that listens is back).
        """

    # -- replay --

    def replay_originals(
        after: int, up_to: int, from_ts: float | None, to_ts: float | None, limit: int
    ) -> Deferred[list[StoredEvent]]:
        """
        Up to ``limit`` stored events, never a replay's copies, above position ``after``
        and up to ``up_to``, in stream order, that arrived from ``from_ts`` to ``to_ts``
        (None: no bound).
        """

    def insert_replay(
        service_id: str, originals: Sequence[StoredEvent], key: str, now: float
    ) -> Deferred[None]:
        """
        Store copies of ``originals`` for ``service_id`` alone (``replay_for``), at new
        stream positions after every event stored, in their order, with their JSON and an
        event id of their own made with ``key``, and wake the sorters, as ingest does.
        """

    def retention_mark() -> Deferred[tuple[int, float | None]]:
        """
        The highest stream position and the latest ingest time of an event retention
        deleted (0 and None while it has deleted none).
        """


@attrs.frozen
class SendResult:
    """
    The outcome of one request to a receiver.

    ``status`` is the HTTP status, or None when no answer came (connection refused or
    reset, timeout); ``error`` says what went wrong in words an operator can act on;
    ``retry_after`` is the receiver's ``Retry-After`` in seconds from now, if it gave one;
    ``body`` the start of an error answer (secrets of the service replaced);
    ``timed_out`` whether no complete answer came within the request's time.
    """

    ok: bool
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    duration: float = 0.0
    body: str | None = None
    timed_out: bool = False


class ISender(Interface):
    """Sends one service's transactions over its wire protocol."""

    def send(txn: StoredTransaction) -> Deferred[SendResult]:
        """Send a stored transaction. Never fails: the outcome is in the result."""

    def ping(transaction_id: str | None = None) -> Deferred[SendResult]:
        """
        Check whether the receiver answers at all (a probe, with no ``transaction_id``; an
        operator's ping may give one, passed on as the Matrix ping's).
        """


class IDeliveryObserver(Interface):
    """
    Told what the pipeline does, as it happens (for metrics, logs and tests). Methods are
    called in the reactor thread and must not block; an exception is logged and ignored.
    """

    def state_changed(service_id: str, old: str, new: str, reason: str | None) -> None:
        """The service went from state ``old`` to ``new`` (``reason``: the error, if any)."""

    def transaction_done(service_id: str, txn: StoredTransaction, result: SendResult) -> None:
        """An attempt to send ``txn`` ended with ``result``."""

    def probe_done(service_id: str, result: SendResult) -> None:
        """A probe of a DOWN service ended with ``result``."""

    def events_ingested(count: int) -> None:
        """``count`` new events were committed by ``submit()``."""

    def events_routed(counts: Mapping[str, int]) -> None:
        """The sorter put this many events into each service's queue."""

    def dead_lettered(service_id: str, count: int, status: int | None) -> None:
        """``count`` events the service refused were set aside as dead letters."""

    def housekept(table: str, count: int) -> None:
        """
        Housekeeping deleted ``count`` rows of ``table`` (``events``, ``seen_events``,
        ``attempts``). Optional: an observer without this method is not told.
        """

    def lease_changed(lease: str, change: str) -> None:
        """
        This node's hold on a lease (``router``, or ``service:`` and an id) changed:
        ``acquired``, ``released`` (given back), ``lost`` (taken by another node, or not
        renewed in time). Optional, as ``housekept``.
        """

    def write_refused(lease: str) -> None:
        """
        The database refused a write made under a lease this node no longer holds (its
        epoch is stale): nothing was written. Optional, as ``housekept``.
        """
