"""Values the store reads and writes, and those the public API answers with."""

from __future__ import annotations

import attrs


@attrs.frozen
class Ingested:
    """
    What storing a batch of events gave: each event's stream position, in order, and the
    highest position stored before the batch. Positions above ``after``, up to the
    highest of ``stream_ids``, hold this batch's new events and nothing else.
    """

    stream_ids: list[int]
    after: int


@attrs.frozen
class QueuedEvent:
    """One event waiting in a service's queue: its stream position and JSON bytes."""

    stream_id: int
    json: bytes
    #: when the event was ingested (clock seconds)
    received_ts: float = 0.0


@attrs.frozen
class StoredTransaction:
    """
    A transaction as stored before it is first sent: resent with the same id and body.

    ``attempts`` counts failed attempts; the times are the reactor clock's seconds.
    """

    service_id: str
    txn_id: int
    body: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")
    event_count: int
    first_stream_id: int
    last_stream_id: int
    created_ts: float
    attempts: int = 0
    first_attempt_ts: float | None = None
    last_attempt_ts: float | None = None
    last_error: str | None = None
    #: when each of its events was ingested (clock seconds, in body order), for the
    #: end-to-end latency of every delivery, resends included; stored with it (empty only
    #: for a transaction stored before schema version 4)
    received_ts: tuple[float, ...] = attrs.field(default=(), repr=False)
    #: each event's stream position, in body order (empty only for a transaction stored
    #: before schema version 5)
    stream_ids: tuple[int, ...] = attrs.field(default=(), repr=False)


@attrs.frozen
class ServiceRecord:
    """What the store remembers of a service between runs."""

    service_id: str
    state: str
    last_txn_id: int
    last_success_ts: float | None
    last_error: str | None
    failure_count: int
    next_retry_ts: float | None


@attrs.frozen
class ServiceSummary:
    """What is pending for a service, read in one go for status reports."""

    queued_events: int
    stored_transactions: int
    oldest_pending_ts: float | None


@attrs.frozen
class DeadLetter:
    """An event a service rejected (HTTP 400, 413 or 422 on its own), set aside."""

    id: int
    service_id: str
    stream_id: int
    event_id: str
    json: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")
    txn_id: int
    status: int | None
    answer: str | None
    created_ts: float


#: what became of an attempt to send a transaction (:attr:`Attempt.outcome`)
OUTCOMES = ("ok", "failed", "split", "rejected", "gone")


@attrs.frozen
class Attempt:
    """
    One attempt to send a transaction, as the delivery log keeps it: one per request,
    never one per event, written in the database transaction that records its outcome.

    ``outcome`` is what the answer called for (the registration's ``actions``): ``ok``
    (a 2xx), ``failed`` (retried later: a 5xx, a timeout, a refused connection, 429,
    401/403, and a refusal of content while it has attempts left before it is bisected),
    ``split`` (too large, 413: halved), ``rejected`` (content refused, 400/422: bisected;
    or a single event refused, whatever the status, set aside as a dead letter) or
    ``gone`` (410: the service is disabled).

    ``resend`` is true when the transaction went again from the store: a recovering
    service resends what is stored, oldest first, with its id and body, which is every
    transaction whose last attempt failed, was cut off by a restart or a stop, or came
    before its service was disabled. A transaction stored just before a crash counts
    as a resend even if the crash came before its first request, since nothing records
    that a request began. A new transaction (cut from the queue, or half of one split
    or bisected) is not a resend.
    """

    service_id: str
    txn_id: int
    #: when the request started (clock seconds)
    ts: float
    #: seconds from the start of the request until its answer (or its failure)
    duration: float
    event_count: int
    #: the answer's HTTP status; None when no answer came (refused, reset, timed out)
    status: int | None
    #: one of :data:`OUTCOMES`
    outcome: str
    #: what went wrong, as the sender said it (tokens redacted, the answer's text cut
    #: short); None for ``ok``
    error: str | None
    resend: bool
    #: its number in the log, increasing (0 until it is stored)
    id: int = 0


@attrs.frozen
class ServiceStatus:
    """What :meth:`DeliveryService.status` reports about one application service."""

    service_id: str
    #: ``up``, ``down`` or ``recovering``
    state: str
    #: events routed to the service and not yet in a transaction
    queued_events: int
    #: transactions stored and not yet acknowledged by the receiver
    stored_transactions: int
    #: seconds since the oldest event still pending for the service arrived
    oldest_pending_age: float | None
    #: clock time of the last acknowledged transaction
    last_success: float | None
    #: why the last attempt failed (None once the service is UP again)
    last_error: str | None
    #: failed attempts in a row
    failure_count: int
    #: clock time of the next attempt, while DOWN
    next_retry: float | None
    #: the highest transaction id given out so far
    last_txn_id: int
    #: the node that sends to it (several daemons on one PostgreSQL): the holder of its
    #: lease while the lease is current; None when no one holds it, or without a cluster
    owner: str | None = None


@attrs.frozen
class ReloadResult:
    """The service ids a :meth:`DeliveryService.reload` added, changed and removed."""

    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]


@attrs.frozen
class PurgeResult:
    """What :meth:`DeliveryService.purge` deleted."""

    queued_events: int
    stored_transactions: int
    dead_letters: int = 0


@attrs.frozen
class ReplayResult:
    """What :meth:`DeliveryService.replay` queued again for one service."""

    #: events queued again: copies of the originals, delivered after everything queued before
    queued: int
    #: the stream positions of the first and the last original replayed (None: none was)
    first_stream_id: int | None
    last_stream_id: int | None
    #: part of the range may have been deleted by retention already, and so not replayed
    partly_deleted: bool


@attrs.frozen
class Fence:
    """
    A lease held (several daemons on one PostgreSQL): every write its holder makes under
    it carries it, and the database refuses the write once ``epoch`` is not the lease's
    current one.
    """

    #: ``router``, or ``service:`` and a service id
    lease: str
    epoch: int


@attrs.frozen
class NodeInfo:
    """One daemon of a cluster, as its heartbeat row says."""

    node_id: str
    host: str
    pid: int
    started_ts: float
    heartbeat_ts: float
    #: its heartbeat is younger than ``lease_ttl``
    alive: bool
    #: the process that beats for it (random at each start)
    incarnation: str = ""


@attrs.frozen
class LeaseInfo:
    """A lease: who holds it (a node id, None when free), at which epoch, until when."""

    name: str
    owner: str | None
    epoch: int
    expires_ts: float | None
    #: the holding process (see :attr:`NodeInfo.incarnation`)
    incarnation: str | None = None


@attrs.frozen
class ClusterView:
    """What :meth:`DeliveryService.cluster` reports: the nodes and what each holds."""

    #: this node's id
    node_id: str
    #: the clock's time when this was read
    now: float
    lease_ttl: float
    nodes: tuple[NodeInfo, ...]
    #: the node that routes events (holds a current ``router`` lease), if any
    router: str | None
    #: every service's lease, by service id
    services: tuple[tuple[str, LeaseInfo], ...]
