"""
The TransactionMaker: cuts each service's pending events into numbered transactions,
stores each one (id and exact body) before sending it, and forgets it only after a 2xx.

Each service has at most one loop, and so at most one request in flight: transactions
reach a receiver in order. A transaction answered 2xx is deleted while the next one is
cut and stored; the next is sent only once that deletion has committed, so a crash never
resends an older transaction after a newer one reached the receiver. The loop sends while
the service is UP; while it is RECOVERING it resends the stored transactions, oldest first
with their own ids and bodies, then full batches from the queue, and declares the service
caught up when neither is left; when a send fails the service goes DOWN and the loop ends
until the Recoverer resumes it.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ._interfaces import IStore, SendResult
from ._log import Logger
from ._observers import Observers
from ._state import ServiceHandle, State
from .errors import FencedError, StoreUnavailableError
from .events import split_body, transaction_body
from .pool import EventPool
from .records import Attempt, StoredTransaction

log = Logger()

#: the delivery log's outcome of an attempt, by what its answer called for
_OUTCOMES = {
    "ok": "ok",
    "retry": "failed",
    "split": "split",
    "reject": "rejected",
    "disable": "gone",
}


class TransactionMaker:
    def __init__(
        self,
        store: IStore,
        pool: EventPool,
        clock: IReactorTime,
        observers: Observers,
    ) -> None:
        self._store = store
        self._pool = pool
        self._clock = clock
        self._observers = observers
        self._stopped = False

    def kick(self, handle: ServiceHandle) -> None:
        """Make sure the service's loop looks for work (events arrived, state changed)."""
        handle.wanted = True
        if handle.retired or self._stopped:
            return
        if handle.loop is None and handle.state in (State.UP, State.RECOVERING):
            loop = Deferred.fromCoroutine(self._run(handle))
            if not loop.called:  # a loop that found nothing to do may end before it returns
                handle.loop = loop

    async def _run(self, handle: ServiceHandle) -> None:
        crashed = False
        try:
            while not (self._stopped or handle.retired):
                txn: StoredTransaction | None
                resend = False
                if handle.state is State.RECOVERING:
                    if not handle.replayed:  # else it may still be the oldest stored
                        await self._completed(handle)
                    txn = await self.next_transaction(handle)
                    if txn is None:
                        handle.machine.caught_up()
                        continue
                    # Still replaying: this one is the oldest stored, sent again.
                    resend = not handle.replayed
                elif handle.state is State.UP:
                    handle.wanted = False
                    txn = await self.cut(handle)
                    if txn is None:
                        # Events that come while the last deletion commits are looked for.
                        await self._completed(handle)
                        if handle.wanted:
                            continue
                        break
                else:
                    break
                if not await self.deliver(handle, txn, resend=resend):
                    break
            await self._completed(handle)
        except Exception:
            crashed = True
            self._crashed(handle, Failure())
        finally:
            handle.loop = None
            if handle.completing is not None:  # the loop crashed first: recovery resends it
                handle.completing.addErrback(lambda _: None)
                handle.completing = None
        if (
            not crashed
            and handle.state is State.RECOVERING
            and not (self._stopped or handle.retired)
        ):
            # Retried while the loop was ending: start it again. (A loop that crashed has
            # handed the service to the recovery path, which starts it again after a wait.)
            self.kick(handle)

    def _crashed(self, handle: ServiceHandle, failure: Failure) -> None:
        """
        Something other than the receiver failed (the database, a bug). Start over from
        what the database says, through the usual DOWN/recovery path.
        """
        if failure.check(FencedError):
            # another node holds the service now: nothing was written, nothing more is
            log.info("{service}: {error}; stopped here", service=handle.id, error=failure.value)
            handle.refused(getattr(failure.value, "lease", ""))
            return
        if failure.check(StoreUnavailableError):
            error = failure.getErrorMessage()
        else:
            log.failure("delivery to {service} failed unexpectedly", failure, service=handle.id)
            kind = getattr(failure.type, "__name__", "error")
            error = f"internal error: {kind}: {failure.getErrorMessage()}"
        self._pool.reset(handle.id)
        if handle.state is not State.DOWN and not (self._stopped or handle.retired):
            handle.machine.failed(SendResult(ok=False, error=error), None)

    async def next_transaction(self, handle: ServiceHandle) -> StoredTransaction | None:
        """
        What a RECOVERING service sends next: the oldest stored transaction, else a full
        batch cut from the queue, else None (it is caught up). Once none is stored, none is
        looked for again while the service stays RECOVERING: only this loop stores
        transactions for it meanwhile, and sends them itself.
        """
        if not handle.replayed:
            await handle.recorded()  # its attempts, as the last failure recorded them
            txn = await self._store.oldest_transaction(handle.id)
            if txn is not None:
                return txn
            handle.replayed = True
        return await self.cut(handle, full_only=True)

    async def cut(self, handle: ServiceHandle, full_only: bool = False) -> StoredTransaction | None:
        """
        Store the service's next transaction from its pending events, or return None if
        there is nothing to send (with ``full_only``: not a full batch).
        """
        options = handle.registration.options
        events = await self._pool.batch(handle.id, options.max_events, options.max_bytes, full_only)
        if not events:
            return None
        body = transaction_body([e.json for e in events])
        now = self._clock.seconds()
        first, last = events[0].stream_id, events[-1].stream_id
        received = tuple(e.received_ts for e in events)
        positions = tuple(e.stream_id for e in events)
        txn_id = await self._store.store_transaction(
            handle.id, first, last, len(events), body, now, received, positions, fence=handle.fence
        )
        self._pool.remove(handle.id, len(events))
        return StoredTransaction(
            handle.id,
            txn_id,
            body,
            len(events),
            first,
            last,
            now,
            received_ts=received,
            stream_ids=positions,
        )

    async def deliver(
        self,
        handle: ServiceHandle,
        txn: StoredTransaction,
        bisecting: bool = False,
        resend: bool = False,
    ) -> bool:
        """
        Send a stored transaction. On a 2xx forget it and return True. Otherwise do what
        the answer calls for (:meth:`DeliveryOptions.action_for`): halve a transaction too
        large (413) and send the halves; bisect one whose content is rejected (400, 422)
        to set the events refused aside as dead letters, and send the rest; for anything
        else mark the service DOWN (or DISABLED, for 410) and return False.

        The attempt goes in the delivery log (an :class:`Attempt`, ``resend`` as given:
        the transaction came from the store) with the write that records its outcome:
        the deletion, the failure, the split or the dead letter. An answer that comes
        once the service is stopping is recorded nowhere: the transaction is sent again.
        """
        # The one answered before it is forgotten first: after a crash the oldest stored
        # transaction is resent, and it must not be older than one the receiver has seen.
        await self._completed(handle)
        if self._stopped or handle.retired:
            return False
        start = self._clock.seconds()
        handle.in_flight = handle.sender.send(txn)
        try:
            result = await handle.in_flight
        finally:
            handle.in_flight = None
        if self._stopped or handle.retired:
            return False
        options = handle.registration.options
        action = "ok" if result.ok else options.action_for(result.status)
        if action == "reject" and not bisecting and txn.attempts + 1 < options.reject_attempts:
            action = "retry"  # the receiver may be wrong for a while: give it a few tries
        attempt = Attempt(
            service_id=handle.id,
            txn_id=txn.txn_id,
            ts=start,
            duration=max(0.0, self._clock.seconds() - start),
            event_count=txn.event_count,
            status=result.status,
            outcome=_OUTCOMES[action],
            error=None if result.ok else result.error,
            resend=resend,
        )
        if result.ok:
            assert handle.completing is None  # waited for before this was sent
            handle.completing = Deferred.fromCoroutine(self._complete(handle, txn, result, attempt))
            return True
        self._observers.transaction_done(handle.id, txn, result)
        if action in ("split", "reject"):
            return await self._divide(handle, txn, result, action == "reject", attempt)
        if action == "disable":
            handle.machine.disable(result, txn, attempt)
        else:
            handle.machine.failed(result, txn, attempt)
        return False

    async def _complete(
        self, handle: ServiceHandle, txn: StoredTransaction, result: SendResult, attempt: Attempt
    ) -> None:
        """Delete a transaction answered 2xx (in the background, until the next send)."""
        await self._store.complete_transaction(
            handle.id, txn.txn_id, self._clock.seconds(), attempt=attempt, fence=handle.fence
        )
        self._observers.transaction_done(handle.id, txn, result)

    async def _completed(self, handle: ServiceHandle) -> None:
        """Wait for the deletion of the last transaction answered 2xx; raise if it failed."""
        completing, handle.completing = handle.completing, None
        if completing is not None:
            await completing

    async def _divide(
        self,
        handle: ServiceHandle,
        txn: StoredTransaction,
        result: SendResult,
        bisecting: bool,
        attempt: Attempt,
    ) -> bool:
        """
        Replace a refused transaction by its two halves (new ids, order kept) and send them;
        a single event refused on its own becomes a dead letter (its attempt ``rejected``,
        whatever the answer).
        """
        events = split_body(txn.body)
        now = self._clock.seconds()
        if len(events) == 1:
            answer = (result.error or "")[:2000]
            await self._store.dead_letter(
                handle.id,
                txn.txn_id,
                events,
                result.status,
                answer,
                now,
                attempt=attrs.evolve(attempt, outcome="rejected"),
                fence=handle.fence,
            )
            log.warn(
                "{service} refused event {event_id} on its own ({error}): set aside as a"
                " dead letter",
                service=handle.id,
                event_id=events[0][0],
                error=result.error,
            )
            self._observers.dead_lettered(handle.id, 1, result.status)
            return True
        half = len(events) // 2
        parts = await self._store.split_transaction(
            handle.id,
            txn.txn_id,
            [events[:half], events[half:]],
            now,
            attempt=attempt,
            fence=handle.fence,
        )
        for part in parts:
            if not await self.deliver(handle, part, bisecting):
                return False
        return True

    async def stop(self, handles: list[ServiceHandle]) -> None:
        """Stop every loop; a request in flight is abandoned (its transaction stays stored)."""
        self._stopped = True
        for handle in handles:
            if handle.in_flight is not None:
                handle.in_flight.cancel()
        for handle in handles:
            if handle.loop is not None:
                await handle.loop
