"""
Prometheus metrics, in a registry of their own so that an embedder can merge or ignore
them. Counters and histograms move as things happen (this is an IDeliveryObserver);
gauges of what is pending are read from the store when scraped.

The end-to-end latency holds every event acknowledged, those resent after an outage or
a restart included: a transaction's events' ingest times are stored with it.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ._interfaces import IDeliveryObserver, SendResult
from ._state import State
from .cluster import ROUTER
from .records import StoredTransaction
from .service import ORPHANED, DeliveryService

STATES = [str(s) for s in State] + [ORPHANED]

_SEND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900,
    3600,
)  # fmt: skip


def outcome(result: SendResult) -> str:
    """A short label for a send's result: ``success``, ``http_503``, ``error``."""
    if result.ok:
        return "success"
    if result.status is not None:
        return f"http_{result.status}"
    return "error"


@implementer(IDeliveryObserver)
class Metrics:
    """The metrics of one DeliveryService."""

    def __init__(self, clock: IReactorTime, registry: CollectorRegistry | None = None) -> None:
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry()
        #: whether the gauges of the whole database are in the registry (on a cluster,
        #: only the router's are)
        self._reporting_database = True
        r = self.registry
        self.ingested = Counter(
            "delivery_events_ingested",
            "Events committed by submit or POST /v1/events.",
            registry=r,
        )
        self.routed = Counter(
            "delivery_events_routed",
            "Events put into a service's queue.",
            ["service"],
            registry=r,
        )
        self.transactions = Counter(
            "delivery_transactions",
            "Transaction send attempts, by outcome (success, http_<status>, error).",
            ["service", "outcome"],
            registry=r,
        )
        self.delivered = Counter(
            "delivery_events_delivered",
            "Events acknowledged by a service.",
            ["service"],
            registry=r,
        )
        self.send_duration = Histogram(
            "delivery_send_duration_seconds",
            "Time from sending a transaction to its complete answer.",
            ["service"],
            buckets=_SEND_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "delivery_end_to_end_latency_seconds",
            "Time from an event's ingest to the 2xx of the transaction that delivered it.",
            ["service"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.probes = Counter(
            "delivery_probes",
            "Probes of DOWN services, by outcome.",
            ["service", "outcome"],
            registry=r,
        )
        self.state = Gauge(
            "delivery_service_state",
            "1 for the state each service is in, 0 for the others.",
            ["service", "state"],
            registry=r,
        )
        self.queued = Gauge(
            "delivery_queued_events",
            "Events queued for a service, not yet in a transaction.",
            ["service"],
            registry=r,
        )
        self.stored = Gauge(
            "delivery_stored_transactions",
            "Transactions stored and not yet acknowledged.",
            ["service"],
            registry=r,
        )
        self.oldest = Gauge(
            "delivery_oldest_pending_age_seconds",
            "Age of the oldest event not yet acknowledged by the service (0 if none).",
            ["service"],
            registry=r,
        )
        self.dead_lettered_total = Counter(
            "delivery_dead_letters_set_aside",
            "Events a service refused on their own, set aside as dead letters.",
            ["service", "status"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "delivery_dead_letters",
            "Dead letters waiting for an operator.",
            ["service"],
            registry=r,
        )
        self.too_old = Gauge(
            "delivery_pending_age_exceeded",
            "1 while a service's oldest pending event is older than its max_pending_age.",
            ["service"],
            registry=r,
        )
        self.lag_events = Gauge(
            "delivery_sorter_lag_events", "Events ingested and not yet routed.", registry=r
        )
        self.lag_seconds = Gauge(
            "delivery_sorter_lag_seconds",
            "Age of the oldest event not yet routed (0 if none).",
            registry=r,
        )
        self.housekeeping_deleted = Counter(
            "delivery_housekeeping_deleted",
            "Rows housekeeping deleted (events: payloads no one needs any more; seen_events:"
            " ids past the dedupe window; attempts: delivery-log rows).",
            ["table"],
            registry=r,
        )
        self.database_size = Gauge(
            "delivery_database_size_bytes",
            "The database's size (SQLite: the file's pages, free ones included), as the last"
            " housekeeping pass found it.",
            registry=r,
        )
        self.database_rows = Gauge(
            "delivery_database_rows",
            "Rows kept per table (PostgreSQL: its statistics' estimate), as the last"
            " housekeeping pass found them.",
            ["table"],
            registry=r,
        )
        self.leases_held = Gauge(
            "delivery_leases_held",
            "Leases this daemon holds (several daemons on one PostgreSQL), by kind: router"
            " (it routes the events) or service (it sends to that many services).",
            ["kind"],
            registry=r,
        )
        self.lease_changes = Counter(
            "delivery_lease_changes",
            "Leases this daemon acquired, released, or lost (not renewed in time: it stopped"
            " using them).",
            ["lease", "change"],
            registry=r,
        )
        self.writes_refused = Counter(
            "delivery_writes_refused",
            "Writes the database refused because this daemon's lease was no longer current"
            " (another daemon had taken it over).",
            ["lease"],
            registry=r,
        )
        self.cluster_nodes = Gauge(
            "delivery_cluster_nodes",
            "Daemons of the cluster whose heartbeat is current, this one included.",
            registry=r,
        )

    # -- IDeliveryObserver --

    def state_changed(self, service_id: str, old: str, new: str, reason: str | None) -> None:
        self._set_state(service_id, new)

    def transaction_done(self, service_id: str, txn: StoredTransaction, result: SendResult) -> None:
        self.transactions.labels(service_id, outcome(result)).inc()
        self.send_duration.labels(service_id).observe(result.duration)
        if result.ok:
            self.delivered.labels(service_id).inc(txn.event_count)
            now = self.clock.seconds()
            latency = self.latency.labels(service_id)
            for received in txn.received_ts:
                latency.observe(max(0.0, now - received))

    def probe_done(self, service_id: str, result: SendResult) -> None:
        self.probes.labels(service_id, outcome(result)).inc()

    def dead_lettered(self, service_id: str, count: int, status: int | None) -> None:
        self.dead_lettered_total.labels(service_id, str(status)).inc(count)

    def events_ingested(self, count: int) -> None:
        self.ingested.inc(count)

    def events_routed(self, counts: Mapping[str, int]) -> None:
        for service_id, count in counts.items():
            self.routed.labels(service_id).inc(count)

    def housekept(self, table: str, count: int) -> None:
        self.housekeeping_deleted.labels(table).inc(count)

    def lease_changed(self, lease: str, change: str) -> None:
        self.lease_changes.labels(lease, change).inc()

    def write_refused(self, lease: str) -> None:
        self.writes_refused.labels(lease).inc()

    # -- scraping --

    def _set_state(self, service_id: str, state: str) -> None:
        for name in STATES:
            self.state.labels(service_id, name).set(1 if name == state else 0)

    async def render(self, service: DeliveryService) -> bytes:
        """Bring the gauges up to date from the store, and render the text format."""
        now = self.clock.seconds()
        summaries = await service.store.summaries()
        here = service.services_here
        if here is not None:
            # On a cluster each service is reported by the node that sends to it, and what
            # concerns the whole database by the router: a sum over the nodes counts once.
            summaries = {i: summary for i, summary in summaries.items() if i in here}
        for service_id, summary in summaries.items():
            self.queued.labels(service_id).set(summary.queued_events)
            self.stored.labels(service_id).set(summary.stored_transactions)
            oldest = summary.oldest_pending_ts
            self.oldest.labels(service_id).set(0 if oldest is None else max(0.0, now - oldest))
            self._set_state(service_id, service.state_of(service_id))
        too_old = await service.pending_too_long()
        for registration in service.registrations.values():
            if registration.options.max_pending_age is not None and registration.id in summaries:
                self.too_old.labels(registration.id).set(1 if registration.id in too_old else 0)
        dead = await service.store.dead_letter_counts()
        for service_id in summaries:
            self.dead_letters.labels(service_id).set(dead.get(service_id, 0))
        for gauge in (self.queued, self.stored, self.oldest, self.dead_letters, self.too_old):
            for labels in _label_sets(gauge):
                if labels[0] not in summaries:  # purged, or sent to by another node
                    gauge.remove(*labels)
        for labels in _label_sets(self.state):
            if labels[0] not in summaries:
                self.state.remove(*labels)
        self._report_database(service.routes_here)
        stats = service.database_stats
        if stats is not None:
            size, rows = stats
            self.database_size.set(size)
            for table, count in rows.items():
                self.database_rows.labels(table).set(count)
        view = await service.cluster()
        if view is not None:  # (SQLite: no cluster, none of these)
            held = service.leases_held
            self.leases_held.labels("router").set(1 if ROUTER in held else 0)
            self.leases_held.labels("service").set(len(held - {ROUTER}))
            self.cluster_nodes.set(sum(1 for node in view.nodes if node.alive))
        lag, oldest_unrouted = await service.store.sorter_lag()
        self.lag_events.set(lag)
        self.lag_seconds.set(0 if oldest_unrouted is None else max(0.0, now - oldest_unrouted))
        return generate_latest(self.registry)

    def _report_database(self, routes_here: bool) -> None:
        """Report what concerns the whole database here, or not (another node does)."""
        if routes_here == self._reporting_database:
            return
        for gauge in (self.lag_events, self.lag_seconds, self.database_size, self.database_rows):
            if routes_here:
                self.registry.register(gauge)
            else:
                self.registry.unregister(gauge)
        self._reporting_database = routes_here


def _label_sets(gauge: Gauge) -> list[tuple[str, ...]]:
    # prometheus_client has no public way to list a metric's children
    return [tuple(labels) for labels in gauge._metrics]
