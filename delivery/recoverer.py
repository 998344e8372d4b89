"""
The Recoverer: what happens to a service that is DOWN.

It waits with exponential backoff (with jitter, honouring ``Retry-After``), probes the
receiver meanwhile, and ends the wait early when a probe is answered or an operator asks
to retry now. Then the service is RECOVERING and sending resumes through the ``resume``
callable it was given (the TransactionMaker's ``kick``): what is sent while recovering
is the TransactionMaker's business. The Recoverer knows nothing of the maker.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ._backoff import BackoffPolicy
from ._interfaces import IStore, SendResult
from ._log import Logger
from ._observers import Observers
from ._state import ServiceHandle, State, Wait
from .errors import FencedError, StoreUnavailableError
from .records import Attempt, StoredTransaction

log = Logger()


#: answers to a probe from a receiver that is there but does not implement the ping
#: (several SDKs answer 404; a plain web server 405 or 501)
PING_UNKNOWN = frozenset({404, 405, 501})

#: how often the log reminds that a service is still down
DOWN_REMINDER = 900.0


def probe_reached(result: SendResult) -> bool:
    """
    Whether a probe's answer shows the receiver is back: a 2xx, or an answer saying the
    ping itself is unknown. Anything else (a redirect, a refusal of our token, rate
    limiting, a server error) is what a transaction would get too: the wait goes on.
    """
    status = result.status
    return status is not None and (200 <= status < 300 or status in PING_UNKNOWN)


class Recoverer:
    def __init__(
        self,
        store: IStore,
        resume: Callable[[ServiceHandle], None],
        clock: IReactorTime,
        observers: Observers,
        rng: random.Random | None = None,
    ) -> None:
        """
        :param resume: starts sending for a service again (it is RECOVERING, or UP).
        """
        self._store = store
        self._resume = resume
        self._clock = clock
        self._observers = observers
        self._rng = rng or random.Random()
        self._stopped = False

    # -- entering states (called by the service's machine) --

    def enter_down(
        self,
        handle: ServiceHandle,
        old: State,
        result: SendResult,
        txn: StoredTransaction | None,
        attempt: Attempt | None = None,
    ) -> Wait:
        """
        Wait, with backoff and probes, and record the failure: on the transaction, on the
        service and (``attempt``) in the delivery log, in one write.
        """
        options = handle.registration.options
        now = self._clock.seconds()
        handle.failure_count += 1
        handle.last_error = result.error
        delay = BackoffPolicy.of(options).delay(handle.failure_count, self._rng, result.retry_after)
        # A retry that a probe started failed: the probe's answer did not mean the
        # receiver takes transactions, so the wait it cut short goes on, unprobed.
        resume, handle.interrupted_until = handle.interrupted_until, None
        probe = options.probe and txn is not None and resume is None
        if resume is not None:
            delay = max(resume - now, 0.0)
        wait = Wait(until=now + delay)
        handle.next_retry_ts = wait.until
        self._log_down(handle, old, result, delay, now)
        self._persist(handle, State.DOWN)
        if txn is not None:
            failures, next_retry = handle.failure_count, handle.next_retry_ts
            self._background(
                handle,
                lambda: self._store.record_failure(
                    handle.id,
                    txn.txn_id,
                    now,
                    result.error or "failed",
                    failures,
                    next_retry,
                    attempt=attempt,
                    fence=handle.fence,
                ),
            )
        if not (self._stopped or handle.retired):
            wait.retry_call = self._clock.callLater(delay, self._wait_over, handle, wait)
            # Probe only a receiver that failed (a transaction was sent): that it answers
            # says nothing of the database or the bug that failed otherwise, and ending
            # the wait at every probe would retry those without backoff.
            if probe and options.probe_interval < delay:
                wait.probe_call = self._clock.callLater(
                    options.probe_interval, self._probe, handle, wait
                )
        # Observers last: they may run arbitrary code that expects the new state complete
        # (what they ask of the machine runs once this transition is over).
        self._observers.state_changed(handle.id, str(old), str(State.DOWN), result.error)
        return wait

    def _log_down(
        self, handle: ServiceHandle, old: State, result: SendResult, delay: float, now: float
    ) -> None:
        """One line when a service goes down, then a reminder every :data:`DOWN_REMINDER`."""
        if old is State.UP or handle.down_logged_ts is None:
            handle.down_logged_ts = now
            log.warn(
                "{service} is DOWN: {error}; events are kept and retried in {delay:.1f} s",
                service=handle.id,
                error=result.error,
                delay=delay,
            )
        elif now - handle.down_logged_ts >= DOWN_REMINDER:
            handle.down_logged_ts = now
            log.warn(
                "{service} is still DOWN after {failures} failed attempts: {error}; next retry"
                " in {delay:.1f} s",
                service=handle.id,
                failures=handle.failure_count,
                error=result.error,
                delay=delay,
            )
        else:
            log.debug(
                "{service}: retry failed: {error}; next in {delay:.1f} s",
                service=handle.id,
                error=result.error,
                delay=delay,
            )

    def enter_recovering(self, handle: ServiceHandle, old: State) -> None:
        handle.next_retry_ts = None
        handle.replayed = False
        log.debug("{service} is RECOVERING: resending stored transactions", service=handle.id)
        self._persist(handle, State.RECOVERING)
        self._observers.state_changed(handle.id, str(old), str(State.RECOVERING), None)

    def enter_up(self, handle: ServiceHandle) -> None:
        failures, handle.failure_count = handle.failure_count, 0
        handle.last_error = None
        handle.interrupted_until = handle.down_logged_ts = None
        log.info(
            "{service} is UP again after {failures} failed attempt(s); backlog drained",
            service=handle.id,
            failures=failures,
        )
        self._persist(handle, State.UP)
        self._observers.state_changed(handle.id, str(State.RECOVERING), str(State.UP), None)

    def enter_disabled(
        self,
        handle: ServiceHandle,
        old: State,
        result: SendResult,
        txn: StoredTransaction,
        attempt: Attempt | None = None,
    ) -> None:
        """Stop sending until an operator enables it; record the failure as DOWN does."""
        handle.last_error = result.error
        handle.interrupted_until = None
        log.warn(
            "{service} is DISABLED (was {old}): {error}; events keep queueing and nothing is"
            " sent until an operator enables it (POST /v1/services/{service}/enable)",
            service=handle.id,
            old=str(old),
            error=result.error,
        )
        self._persist(handle, State.DISABLED)
        now = self._clock.seconds()
        self._background(
            handle,
            lambda: self._store.record_failure(
                handle.id,
                txn.txn_id,
                now,
                result.error or "gone",
                handle.failure_count,
                None,
                attempt=attempt,
                fence=handle.fence,
            ),
        )
        self._observers.state_changed(handle.id, str(old), str(State.DISABLED), result.error)

    def enable(self, handle: ServiceHandle) -> None:
        """Send to a DISABLED service again: what it has stored goes first."""
        if handle.state is State.DISABLED:
            log.info("{service}: enabled by an operator", service=handle.id)
            handle.machine.enable()
            self._resume(handle)

    # -- ending the wait --

    def retry_now(self, handle: ServiceHandle) -> None:
        """End the wait of a DOWN service at once."""
        if handle.state is State.DOWN:
            log.info("{service}: retry requested", service=handle.id)
            handle.interrupted_until = None
        self._retry(handle)

    def _retry(self, handle: ServiceHandle) -> None:
        """
        End the wait: the service is RECOVERING, and its loop resends. The loop starts once
        the machine is in its new state, not from inside the transition: what the loop
        reports (a failure may come at once, the database being away) is a transition of
        its own then, rather than one the machine would postpone and run against a state
        that has moved on meanwhile.
        """
        handle.machine.retry()
        self._resume(handle)

    def _wait_over(self, handle: ServiceHandle, wait: Wait) -> None:
        wait.retry_call = None
        if not wait.over:
            self._retry(handle)

    def _probe(self, handle: ServiceHandle, wait: Wait) -> None:
        wait.probe_call = None
        wait.probing = handle.sender.ping()
        wait.probing.addCallback(self._probed, handle, wait)

    def _probed(self, result: SendResult, handle: ServiceHandle, wait: Wait) -> None:
        wait.probing = None
        if wait.over or self._stopped or handle.retired:
            return
        if probe_reached(result):
            log.info(
                "{service} answered a probe (HTTP {status}): retrying now",
                service=handle.id,
                status=result.status,
            )
            handle.interrupted_until = wait.until
            self._retry(handle)
        else:
            interval = handle.registration.options.probe_interval
            if wait.until is not None and wait.until - self._clock.seconds() > interval:
                wait.probe_call = self._clock.callLater(interval, self._probe, handle, wait)
        self._observers.probe_done(handle.id, result)

    # -- start and stop --

    def resume(self, handle: ServiceHandle) -> None:
        """
        At start-up, a service with stored transactions (its machine built in DOWN) is
        recovered first, at once, whatever state was recorded.
        """
        self._retry(handle)

    def stop(self, handles: list[ServiceHandle]) -> None:
        """Cancel every wait and probe of these services (all of them, when stopping)."""
        for handle in handles:
            handle.machine.halt()

    def stop_all(self, handles: list[ServiceHandle]) -> None:
        self._stopped = True
        self.stop(handles)

    # -- persistence --

    def record_state(self, handle: ServiceHandle, state: State) -> None:
        """Remember a service's state in the store, in order with its other records."""
        self._persist(handle, state)

    def _persist(self, handle: ServiceHandle, state: State) -> None:
        self._background(
            handle, lambda: self._store.set_state(handle.id, str(state), fence=handle.fence)
        )

    def _background(self, handle: ServiceHandle, write: Callable[[], Deferred[None]]) -> None:
        """
        Record something about a service without waiting for it: one write at a time per
        service, in order, so that the last one written is the last one made.
        """

        def done(failure: Failure) -> None:
            if failure.check(FencedError):
                log.info("{service}: {error}", service=handle.id, error=failure.value)
                handle.refused(getattr(failure.value, "lease", ""))
            elif failure.check(StoreUnavailableError):
                # The store has warned of the outage: this is only one of its consequences.
                log.info(
                    "could not record the state of {service}: {error}",
                    service=handle.id,
                    error=failure.getErrorMessage(),
                )
            else:
                log.failure("could not record the state of {service}", failure, service=handle.id)

        previous = handle.persisting if handle.persisting is not None else succeed(None)
        handle.persisting = previous.addBoth(lambda _: write()).addErrback(done)
