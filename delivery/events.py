"""
Events as ``delivery`` keeps them: validated once at ingest, encoded once to compact JSON,
and never re-encoded (transaction bodies are spliced from the stored bytes).

An event is a JSON object whose ``event_id`` is a string with something in it besides
white space. An error quotes at most :data:`QUOTED` characters of what it refuses (an id
may be megabytes long).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import attrs

from .errors import InvalidEventError
from .interest import RoutingFields

#: Matrix caps an event at 64 KiB of JSON; so do we, unless told otherwise.
DEFAULT_MAX_EVENT_BYTES = 65536

#: the most characters of a refused value an error message quotes
QUOTED = 64

# No check for circular references (it doubles the cost of encoding): an event is walked
# first (``_json_problem``), and one nested too deep, as a cycle would be, is refused.
_encoder = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=False
)
_encode = _encoder.encode


@attrs.frozen
class Event:
    """A validated event: its id, what routes it, and its JSON as stored and sent."""

    event_id: str
    routing: RoutingFields
    json: bytes


@attrs.frozen
class StoredEvent:
    """
    An event read back from the store, at its stream position. ``replay_for`` is set on a
    replay's copy of an event: it goes to that service alone (see
    :meth:`DeliveryService.replay`).
    """

    stream_id: int
    event: Event
    received_ts: float
    replay_for: str | None = None

    @classmethod
    def of(
        cls,
        stream_id: int,
        event: Mapping[str, object],
        received_ts: float = 0.0,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> StoredEvent:
        """An event of an outside event source, validated and encoded."""
        return cls(stream_id, prepare_one(0, event, max_event_bytes), received_ts)


def prepare(events: object, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> list[Event]:
    """
    Validate and encode a batch of events.

    :raises InvalidEventError: for the first event that is not acceptable; the whole batch
        is then refused.
    """
    if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Sequence):
        raise InvalidEventError(-1, "events must be given as a list of JSON objects")
    return [prepare_one(i, e, max_event_bytes) for i, e in enumerate(events)]


def prepare_one(index: int, event: object, max_event_bytes: int) -> Event:
    if not isinstance(event, (dict, Mapping)):
        raise InvalidEventError(index, f"must be a JSON object, not {type(event).__name__}")
    event_id = event.get("event_id")
    # (isspace() is False for "" and stops at the first character of a real id)
    if not isinstance(event_id, str) or not event_id or event_id.isspace():
        raise InvalidEventError(
            index, "'event_id' must be a string with something in it besides white space"
        )
    fields = [event.get(key) for key in _ROUTING_KEYS]
    for key, value in zip(_ROUTING_KEYS, fields, strict=True):
        if value is not None and not isinstance(value, str):
            raise InvalidEventError(
                index, f"{shorten(event_id)}: {key!r} must be a string, not {type(value).__name__}"
            )
    problem = _json_problem(event)
    if problem:
        raise InvalidEventError(index, f"{shorten(event_id)}: {problem}")
    try:
        data = _encode(event).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        raise InvalidEventError(
            index, f"{shorten(event_id)}: cannot be encoded as JSON: {shorten(str(e))}"
        ) from None
    if len(data) > max_event_bytes:
        raise InvalidEventError(
            index,
            f"{shorten(event_id)}: is {len(data)} bytes of JSON, more than the limit of "
            f"{max_event_bytes} bytes",
        )
    return Event(event_id, RoutingFields(*fields), data)


def shorten(text: str, limit: int = QUOTED) -> str:
    """``text``, or its first ``limit`` characters and an ellipsis: what an error quotes."""
    return text if len(text) <= limit else text[:limit] + "…"


#: the fields that route an event, in the order of :class:`RoutingFields`
_ROUTING_KEYS = ("sender", "room_id", "type", "state_key")

#: deeper nesting than this is refused (no real event comes close)
MAX_DEPTH = 100


#: values that hold no keys and no further values
_FLAT = frozenset((str, int, float, bool, type(None)))


def _json_problem(event: Mapping[str, object]) -> str | None:
    """What keeps ``event`` from being a JSON object as given (keys, depth), if anything."""
    # Runs for every value of every event ingested: concrete types are checked first
    # (an ABC's isinstance is slow), and scalars are not put on the stack.
    stack: list[tuple[object, int]] = [(event, 1)]
    push, pop = stack.append, stack.pop
    while stack:
        value, depth = pop()
        if depth > MAX_DEPTH:
            return f"is nested more than {MAX_DEPTH} levels deep"
        if isinstance(value, (dict, Mapping)):
            for key in value:
                if not isinstance(key, str):
                    return f"has a key that is not a string: {shorten(repr(key))}"
            for item in value.values():
                if type(item) not in _FLAT:
                    push((item, depth + 1))
        elif isinstance(value, (list, tuple)):
            for item in value:
                if type(item) not in _FLAT:
                    push((item, depth + 1))
    return None


def split_body(body: bytes) -> list[tuple[str, bytes]]:
    """
    The events of a transaction body, as ``(event_id, json)``: the same bytes they were
    spliced from, since the encoding is deterministic.
    """
    return [
        (event["event_id"], _encoder.encode(event).encode("utf-8"))
        for event in json.loads(body)["events"]
    ]


def transaction_body(events: Sequence[bytes]) -> bytes:
    """The body of a Matrix transaction, spliced from already-encoded events."""
    return b'{"events":[' + b",".join(events) + b"]}"


#: bytes a transaction body has besides its events and the commas between them
BODY_OVERHEAD = len(transaction_body([]))
