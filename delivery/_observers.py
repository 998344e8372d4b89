"""Fan-out to every :class:`IDeliveryObserver`, shielding the pipeline from their errors."""

from __future__ import annotations

from collections.abc import Mapping

from ._interfaces import IDeliveryObserver, SendResult
from ._log import Logger
from .records import StoredTransaction

log = Logger()


class Observers:
    """Calls every observer in turn; an observer that raises is logged and skipped."""

    def __init__(self) -> None:
        self._observers: list[IDeliveryObserver] = []

    def add(self, observer: IDeliveryObserver) -> None:
        self._observers.append(observer)

    def remove(self, observer: IDeliveryObserver) -> None:
        self._observers.remove(observer)

    def _tell(self, method: str, *args: object) -> None:
        for observer in list(self._observers):
            call = getattr(observer, method, None)
            if call is None:  # an observer written before this notification existed
                continue
            try:
                call(*args)
            except Exception:
                log.failure(
                    "observer {observer!r} failed in {method}", observer=observer, method=method
                )

    def state_changed(self, service_id: str, old: str, new: str, reason: str | None) -> None:
        self._tell("state_changed", service_id, old, new, reason)

    def transaction_done(self, service_id: str, txn: StoredTransaction, result: SendResult) -> None:
        self._tell("transaction_done", service_id, txn, result)

    def probe_done(self, service_id: str, result: SendResult) -> None:
        self._tell("probe_done", service_id, result)

    def events_ingested(self, count: int) -> None:
        self._tell("events_ingested", count)

    def events_routed(self, counts: Mapping[str, int]) -> None:
        self._tell("events_routed", counts)

    def dead_lettered(self, service_id: str, count: int, status: int | None) -> None:
        self._tell("dead_lettered", service_id, count, status)

    def housekept(self, table: str, count: int) -> None:
        self._tell("housekept", table, count)

    def lease_changed(self, lease: str, change: str) -> None:
        self._tell("lease_changed", lease, change)

    def write_refused(self, lease: str) -> None:
        self._tell("write_refused", lease)
