"""Fan-out to every :class:`IDeliveryObserver`, shielding the pipeline from their errors."""

from __future__ import annotations

from twisted.logger import Logger

from ._interfaces import IDeliveryObserver, SendResult
from .records import StoredTransaction

log = Logger()


class Observers:
    def __init__(self) -> None:
        self._observers: list[IDeliveryObserver] = []

    def add(self, observer: IDeliveryObserver) -> None:
        self._observers.append(observer)

    def remove(self, observer: IDeliveryObserver) -> None:
        self._observers.remove(observer)

    def state_changed(self, service_id: str, old: str, new: str, reason: str | None) -> None:
        for observer in list(self._observers):
            try:
                observer.state_changed(service_id, old, new, reason)
            except Exception:
                log.failure("observer {observer!r} failed on a state change", observer=observer)

    def transaction_done(self, service_id: str, txn: StoredTransaction, result: SendResult) -> None:
        for observer in list(self._observers):
            try:
                observer.transaction_done(service_id, txn, result)
            except Exception:
                log.failure("observer {observer!r} failed on a transaction", observer=observer)

    def probe_done(self, service_id: str, result: SendResult) -> None:
        for observer in list(self._observers):
            try:
                observer.probe_done(service_id, result)
            except Exception:
                log.failure("observer {observer!r} failed on a probe", observer=observer)
