"""
The service's state machine alone (``delivery._state``): every transition of its diagram,
what each one asks of the effects (a recording implementation here, not the Recoverer),
the inputs that change nothing, and the handle's ``state`` following the machine.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from delivery._interfaces import SendResult
from delivery._state import ServiceHandle, State, Wait
from delivery.records import Attempt, StoredTransaction
from delivery.testing import ScriptedSender, failure

from .harness import registration

GONE = failure(410)
DOWN_RESULT = failure(503)
TXN = StoredTransaction("a", 7, b"{}", 1, 1, 1, 0.0)


class RecordingEffects:
    """A :class:`~delivery._state.StateEffects` that keeps every call, with its arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        #: every wait handed to the machine, in order
        self.waits: list[Wait] = []
        #: the delivery log's row handed with each failure, in order
        self.attempts: list[Attempt | None] = []

    def enter_down(
        self,
        handle: ServiceHandle,
        old: State,
        result: SendResult,
        txn: StoredTransaction | None,
        attempt: Attempt | None = None,
    ) -> Wait:
        self.calls.append(("down", handle, old, result, txn, handle.state))
        self.attempts.append(attempt)
        self.waits.append(Wait(until=100.0))
        return self.waits[-1]

    def enter_recovering(self, handle: ServiceHandle, old: State) -> None:
        self.calls.append(("recovering", handle, old, handle.state))

    def enter_up(self, handle: ServiceHandle) -> None:
        self.calls.append(("up", handle, handle.state))

    def enter_disabled(
        self,
        handle: ServiceHandle,
        old: State,
        result: SendResult,
        txn: StoredTransaction,
        attempt: Attempt | None = None,
    ) -> None:
        self.calls.append(("disabled", handle, old, result, txn, handle.state))
        self.attempts.append(attempt)


def handle_in(state: State) -> tuple[ServiceHandle, RecordingEffects]:
    effects = RecordingEffects()
    handle = ServiceHandle(
        registration("a", "http://127.0.0.1:1"), ScriptedSender(), effects, state=state
    )
    return handle, effects


def test_a_new_handle_is_up_and_its_machine_calls_nothing() -> None:
    effects = RecordingEffects()
    handle = ServiceHandle(registration("a", "http://127.0.0.1:1"), ScriptedSender(), effects)
    assert handle.state is State.UP
    assert handle.id == "a"
    assert effects.calls == []


@pytest.mark.parametrize("start", [State.UP, State.RECOVERING])
@pytest.mark.parametrize("txn", [TXN, None])
def test_failed_goes_down_with_the_old_state_result_and_transaction(
    start: State, txn: StoredTransaction | None
) -> None:
    handle, effects = handle_in(start)
    handle.machine.failed(DOWN_RESULT, txn)
    assert handle.state is State.DOWN
    # the state is DOWN already when the effects run
    assert effects.calls == [("down", handle, start, DOWN_RESULT, txn, State.DOWN)]


def test_retry_of_a_down_service_makes_it_recovering() -> None:
    handle, effects = handle_in(State.DOWN)
    handle.machine.retry()
    assert handle.state is State.RECOVERING
    assert effects.calls == [("recovering", handle, State.DOWN, State.RECOVERING)]


def test_caught_up_makes_a_recovering_service_up() -> None:
    handle, effects = handle_in(State.RECOVERING)
    handle.machine.caught_up()
    assert handle.state is State.UP
    assert effects.calls == [("up", handle, State.UP)]


@pytest.mark.parametrize("start", [State.UP, State.RECOVERING])
def test_disable_makes_the_service_disabled(start: State) -> None:
    handle, effects = handle_in(start)
    handle.machine.disable(GONE, TXN)
    assert handle.state is State.DISABLED
    assert effects.calls == [("disabled", handle, start, GONE, TXN, State.DISABLED)]


def test_enable_makes_a_disabled_service_recovering() -> None:
    handle, effects = handle_in(State.DISABLED)
    handle.machine.enable()
    assert handle.state is State.RECOVERING
    assert effects.calls == [("recovering", handle, State.DISABLED, State.RECOVERING)]


@pytest.mark.parametrize("start", [State.UP, State.RECOVERING, State.DISABLED])
def test_retry_changes_nothing_unless_the_service_is_down(start: State) -> None:
    handle, effects = handle_in(start)
    handle.machine.retry()
    assert handle.state is start
    assert effects.calls == []


@pytest.mark.parametrize("start", [State.UP, State.DOWN, State.RECOVERING])
def test_enable_changes_nothing_unless_the_service_is_disabled(start: State) -> None:
    handle, effects = handle_in(start)
    handle.machine.enable()
    assert handle.state is start
    assert effects.calls == []


def test_the_whole_diagram_in_one_run_and_the_state_follows() -> None:
    handle, effects = handle_in(State.UP)
    seen = []
    for step in (
        lambda: handle.machine.failed(DOWN_RESULT, TXN),  # UP -> DOWN
        handle.machine.retry,  # DOWN -> RECOVERING
        lambda: handle.machine.failed(DOWN_RESULT, None),  # RECOVERING -> DOWN
        handle.machine.retry,  # DOWN -> RECOVERING
        handle.machine.caught_up,  # RECOVERING -> UP
        lambda: handle.machine.disable(GONE, TXN),  # UP -> DISABLED
        handle.machine.retry,  # no-op
        handle.machine.enable,  # DISABLED -> RECOVERING
        lambda: handle.machine.disable(GONE, TXN),  # RECOVERING -> DISABLED
        handle.machine.enable,  # DISABLED -> RECOVERING
        handle.machine.enable,  # no-op
        handle.machine.caught_up,  # RECOVERING -> UP
    ):
        step()
        seen.append(handle.state)
    assert seen == [
        State.DOWN,
        State.RECOVERING,
        State.DOWN,
        State.RECOVERING,
        State.UP,
        State.DISABLED,
        State.DISABLED,
        State.RECOVERING,
        State.DISABLED,
        State.RECOVERING,
        State.RECOVERING,
        State.UP,
    ]
    assert [call[0] for call in effects.calls] == [
        "down",
        "recovering",
        "down",
        "recovering",
        "up",
        "disabled",
        "recovering",
        "disabled",
        "recovering",
        "up",
    ]
    assert [call[2] for call in effects.calls if call[0] in ("down", "recovering", "disabled")] == [
        State.UP,
        State.DOWN,
        State.RECOVERING,
        State.DOWN,
        State.UP,
        State.DISABLED,
        State.RECOVERING,
        State.DISABLED,
    ]


def test_leaving_down_cancels_its_wait_timers_and_probe() -> None:
    clock = Clock()
    handle, effects = handle_in(State.UP)
    handle.machine.failed(DOWN_RESULT, TXN)
    wait = effects.waits[-1]
    wait.retry_call = clock.callLater(100, lambda: None)
    wait.probe_call = clock.callLater(5, lambda: None)
    cancelled: list[object] = []
    wait.probing = Deferred(cancelled.append)
    handle.machine.retry()
    assert handle.state is State.RECOVERING
    assert wait.over
    assert clock.getDelayedCalls() == []
    assert len(cancelled) == 1
    # failing again makes a new wait; the old one stays over
    handle.machine.failed(DOWN_RESULT, TXN)
    assert effects.waits[-1] is not wait
    assert not effects.waits[-1].over


def test_halt_cancels_the_wait_of_a_down_service_and_nothing_else() -> None:
    clock = Clock()
    handle, effects = handle_in(State.UP)
    handle.machine.halt()  # UP: nothing to cancel, nothing called
    assert effects.calls == []
    handle.machine.failed(DOWN_RESULT, None)
    wait = effects.waits[-1]
    wait.retry_call = clock.callLater(100, lambda: None)
    handle.machine.halt()
    assert wait.over
    assert clock.getDelayedCalls() == []
    assert [c[0] for c in effects.calls] == ["down"]
    # a halted service can still be retried (it is resumed when delivered here again)
    handle.machine.retry()
    assert [c[0] for c in effects.calls] == ["down", "recovering"]


def test_a_handle_built_down_waits_on_nothing_until_it_is_resumed() -> None:
    handle, effects = handle_in(State.DOWN)
    handle.machine.halt()
    handle.machine.retry()
    assert handle.state is State.RECOVERING
    assert [c[0] for c in effects.calls] == ["recovering"]
