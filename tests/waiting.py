"""Waiting in tests for something to happen, without sleeping."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred


class Conditions:
    """
    Deferreds that fire once their condition holds. The owner calls :meth:`check`
    whenever something changed; each wait fails with a TimeoutError after ``timeout``
    seconds of the real reactor, a safety net so that a broken pipeline fails a test
    instead of hanging it.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def wait_for(self, condition: Callable[[], bool], timeout: float = 15) -> Deferred[None]:
        from twisted.internet import reactor

        d: Deferred[None] = Deferred(self._forget)
        if condition():
            d.callback(None)
        else:
            self._waiting.append((condition, d))
            d.addTimeout(timeout, reactor)
        return d

    def _forget(self, d: Deferred[None]) -> None:
        self._waiting = [item for item in self._waiting if item[1] is not d]

    def check(self) -> None:
        for item in list(self._waiting):
            condition, d = item
            if condition():
                self._waiting.remove(item)
                d.callback(None)
