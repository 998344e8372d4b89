"""
The one backoff policy: how long to wait after a number of failures in a row.

Every wait of the project that grows with failures follows it: a DOWN service's retries
(the Recoverer, from the service's options), the start-up wait for an unavailable
database (the service) and PostgreSQL's reconnects (the store's connection pool).

Invariants: the wait before jitter doubles (``factor``) from ``initial_delay`` up to
``max_delay``; jitter moves it by a random ``±jitter`` fraction but never past
``max_delay``; a longer ``Retry-After`` is honoured up to ``max_delay``. The policy is a
value: the random generator is the caller's (injected, never the global ``random``).
"""

from __future__ import annotations

import random

import attrs

from .registration import DeliveryOptions


@attrs.frozen
class BackoffPolicy:
    """
    Waits that double from ``initial_delay`` up to ``max_delay``, each moved by a random
    ``±jitter`` fraction so that many services do not retry in step.
    """

    initial_delay: float = 1.0
    max_delay: float = 300.0
    factor: float = 2.0
    jitter: float = 0.2

    @classmethod
    def of(cls, options: DeliveryOptions) -> BackoffPolicy:
        return cls(options.initial_delay, options.max_delay, 2.0, options.jitter)

    def base(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row, before jitter."""
        exponent = min(max(failures - 1, 0), 64)
        return float(min(self.max_delay, self.initial_delay * self.factor**exponent))

    def delay(self, failures: int, rng: random.Random, retry_after: float | None = None) -> float:
        """
        The wait after ``failures`` failures in a row, never longer than ``max_delay``
        (at the cap the jitter only shortens it). A receiver's ``Retry-After`` is honoured
        when it asks for longer, up to ``max_delay``.
        """
        base = self.base(failures)
        low, high = base * (1 - self.jitter), min(base * (1 + self.jitter), self.max_delay)
        wait = rng.uniform(low, high)
        if retry_after is not None and retry_after > wait:
            wait = min(retry_after, self.max_delay)
        return wait
