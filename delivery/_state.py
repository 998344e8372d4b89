"""
The state of one application service, as an automat machine.

::

    UP ──failed──▶ DOWN ──retry (wait over, probe answered, retry now)──▶ RECOVERING
     ▲                ▲                                                        │
     │                └─────────────────────────failed─────────────────────────┤
     └──────────────────────────────caught_up──────────────────────────────────┘
    UP, RECOVERING ──disable (HTTP 410)──▶ DISABLED ──enable (an operator)──▶ RECOVERING

UP: the TransactionMaker cuts and sends as events arrive. DOWN: nothing is sent; the
Recoverer waits (backoff, probes). The wait (its retry timer, its probe timer, the probe in
flight) is the data of the DOWN state: made on entering it, cancelled by every transition
that leaves it, and by ``halt`` when the service stops being delivered here. RECOVERING: the
TransactionMaker resends the stored transactions, oldest first, then full batches, then
declares the service caught up.
DISABLED: the receiver said it is gone; events keep queueing, nothing is sent, until an
operator enables the service again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol

import attrs
from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from ._interfaces import ISender, SendResult
from .records import Attempt, Fence, StoredTransaction
from .registration import Registration


class State(str, enum.Enum):
    UP = "up"
    DOWN = "down"
    RECOVERING = "recovering"
    DISABLED = "disabled"

    def __str__(self) -> str:
        return self.value


class ServiceMachine(Protocol):
    def failed(
        self, result: SendResult, txn: StoredTransaction | None, attempt: Attempt | None = None
    ) -> None:
        """
        A send of ``txn`` failed (or the pipeline did, with no ``txn``): wait. ``attempt``
        is the send's row in the delivery log, written with the failure.
        """

    def retry(self) -> None:
        """The wait is over (backoff elapsed, probe answered, or retry now)."""

    def caught_up(self) -> None:
        """Recovery resent everything stored and drained the backlog."""

    def disable(
        self, result: SendResult, txn: StoredTransaction, attempt: Attempt | None = None
    ) -> None:
        """
        The receiver answered that the service is gone for good (HTTP 410). ``attempt``
        is the send's row in the delivery log, written with the failure.
        """

    def enable(self) -> None:
        """An operator wants a disabled service sent to again."""

    def halt(self) -> None:
        """The service stops being delivered here: a DOWN service's wait is cancelled."""


@attrs.define(eq=False)
class Wait:
    """The data of the DOWN state: what the service waits on until it is retried."""

    #: when the wait ends by itself (None: it is not timed)
    until: float | None = None
    retry_call: IDelayedCall | None = None
    probe_call: IDelayedCall | None = None
    probing: Deferred[SendResult] | None = None
    #: the service has left DOWN (or was halted): nothing of this wait may act any more
    over: bool = False

    def cancel(self) -> None:
        self.over = True
        for call in (self.retry_call, self.probe_call):
            if call is not None and call.active():
                call.cancel()
        self.retry_call = self.probe_call = None
        if self.probing is not None:
            probing, self.probing = self.probing, None
            probing.cancel()


class StateEffects(Protocol):
    """What happens on entering each state (the Recoverer): timers, records, the log."""

    def enter_down(
        self,
        handle: ServiceHandle,
        old: State,
        result: SendResult,
        txn: StoredTransaction | None,
        attempt: Attempt | None = None,
    ) -> Wait:
        """Record the failure and start waiting: the wait returned is the DOWN state's."""

    def enter_recovering(self, handle: ServiceHandle, old: State) -> None: ...

    def enter_up(self, handle: ServiceHandle) -> None: ...

    def enter_disabled(
        self,
        handle: ServiceHandle,
        old: State,
        result: SendResult,
        txn: StoredTransaction,
        attempt: Attempt | None = None,
    ) -> None: ...


@attrs.define(eq=False)
class ServiceHandle:
    """Everything the pipeline keeps in memory about one service while it runs."""

    registration: Registration
    sender: ISender
    #: what entering a state does
    effects: StateEffects
    #: the current state; the machine moves it
    state: State = State.UP
    #: the service's state machine, acting on this handle
    machine: ServiceMachine = attrs.field(init=False)
    #: failed attempts in a row (0 when UP)
    failure_count: int = 0
    last_error: str | None = None
    #: when a DOWN service is retried next, as reported (the timer is its Wait's)
    next_retry_ts: float | None = None
    #: the one loop that sends for this service, while it runs
    loop: Deferred[None] | None = None
    #: the request in flight, while there is one
    in_flight: Deferred[SendResult] | None = None
    #: the deletion of the last transaction answered 2xx, while it is being committed
    completing: Deferred[None] | None = None
    #: recovering, every stored transaction has been resent: only new ones are cut
    replayed: bool = False
    #: events arrived since the loop last looked
    wanted: bool = False
    #: while a retry that a probe started runs: when the wait it cut short would have
    #: ended (if the retry fails, the service waits until then, without probing)
    interrupted_until: float | None = None
    #: when the log last said that the service is down (a reminder follows now and then)
    down_logged_ts: float | None = None
    #: removed from the registrations: nothing more is sent
    retired: bool = False
    #: the last of the writes recording this service's state, in order
    persisting: Deferred[None] | None = None
    #: the lease every write for it is made under (several daemons), or None
    fence: Fence | None = None
    #: told when the database refused a write under ``fence`` (another node has it)
    on_refused: Callable[[str], None] | None = None

    def __attrs_post_init__(self) -> None:
        if self.state is State.DOWN:
            # Built DOWN (transactions are stored): not waiting on anything yet; it is
            # resumed at once, or halted.
            self.machine = _Machine(self, _down, lambda machine, handle: Wait())
        else:
            self.machine = _Machine(self, _STATES[self.state])

    @property
    def id(self) -> str:
        return self.registration.id

    def refused(self, lease: str) -> None:
        """A write under its lease was refused: nothing more is sent from here."""
        self.retired = True
        if self.on_refused is not None:
            self.on_refused(lease)

    async def recorded(self) -> None:
        """Wait until the writes recording the service's state are done, however they end."""
        while self.persisting is not None:
            pending = self.persisting
            await _observe(pending)
            if self.persisting is pending:
                break


def _wait(
    machine: ServiceMachine,
    handle: ServiceHandle,
    result: SendResult,
    txn: StoredTransaction | None,
    attempt: Attempt | None = None,
) -> Wait:
    """Entering DOWN: the effects start the wait, which the state keeps."""
    old, handle.state = handle.state, State.DOWN
    return handle.effects.enter_down(handle, old, result, txn, attempt)


_builder = TypeMachineBuilder(ServiceMachine, ServiceHandle)
_up = _builder.state("up")
_down = _builder.state("down", _wait)
_recovering = _builder.state("recovering")
_disabled = _builder.state("disabled")

_up.upon(ServiceMachine.failed).to(_down).returns(None)
_recovering.upon(ServiceMachine.failed).to(_down).returns(None)


@_down.upon(ServiceMachine.retry).to(_recovering)
def _retry(machine: ServiceMachine, handle: ServiceHandle, wait: Wait) -> None:
    wait.cancel()
    handle.state = State.RECOVERING
    handle.effects.enter_recovering(handle, State.DOWN)


@_down.upon(ServiceMachine.halt).loop()
def _halt(machine: ServiceMachine, handle: ServiceHandle, wait: Wait) -> None:
    wait.cancel()


@_recovering.upon(ServiceMachine.caught_up).to(_up)
def _caught_up(machine: ServiceMachine, handle: ServiceHandle) -> None:
    handle.state = State.UP
    handle.effects.enter_up(handle)


@_up.upon(ServiceMachine.disable).to(_disabled)
@_recovering.upon(ServiceMachine.disable).to(_disabled)
def _disable(
    machine: ServiceMachine,
    handle: ServiceHandle,
    result: SendResult,
    txn: StoredTransaction,
    attempt: Attempt | None = None,
) -> None:
    old, handle.state = handle.state, State.DISABLED
    handle.effects.enter_disabled(handle, old, result, txn, attempt)


@_disabled.upon(ServiceMachine.enable).to(_recovering)
def _enable(machine: ServiceMachine, handle: ServiceHandle) -> None:
    handle.state = State.RECOVERING
    handle.effects.enter_recovering(handle, State.DISABLED)


# Asking an UP or RECOVERING service to retry changes nothing: it is sending already; nor
# does a retry end a DISABLED service's pause (only enable does), and enabling a service
# that is not disabled changes nothing.
for _s in (_up, _recovering, _disabled):
    _s.upon(ServiceMachine.retry).loop().returns(None)
for _s in (_up, _recovering, _disabled):
    _s.upon(ServiceMachine.halt).loop().returns(None)
for _any in (_up, _down, _recovering):
    _any.upon(ServiceMachine.enable).loop().returns(None)

_Machine = _builder.build()
_STATES = {
    State.UP: _up,
    State.RECOVERING: _recovering,
    State.DISABLED: _disabled,
}


async def _observe(d: Deferred[None]) -> None:
    """Wait for ``d`` to fire, leaving its result to its own callbacks."""
    waiter: Deferred[None] = Deferred()

    def passthrough(result: object) -> object:
        waiter.callback(None)
        return result

    d.addBoth(passthrough)
    await waiter
