"""
Application-service registrations, read from Matrix registration YAML.

Existing bridge registration files load unchanged: keys we do not use (``protocols``,
``rate_limited``, …) are accepted. The opt-ins to ephemeral data (``receive_ephemeral``,
``de.sorunome.msc2409.push_ephemeral``) and to MSC3202's device data
(``org.matrix.msc3202``) are read, and must be booleans. Our own options (batching, retry,
probing) live under an optional ``delivery:`` key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from ._yaml import UnreadableYAML, read_yaml
from .errors import InvalidRegistrationError

NAMESPACE_KINDS = ("users", "rooms", "aliases")


@attrs.frozen
class Namespace:
    """One ``{regex, exclusive}`` entry of a registration's namespaces."""

    regex: str
    exclusive: bool
    pattern: re.Pattern[str] = attrs.field(eq=False, repr=False)

    @classmethod
    def of(cls, regex: str, exclusive: bool = False) -> Namespace:
        return cls(regex, exclusive, re.compile(regex))


#: the longest any wait or timeout may be, seconds (a week)
MAX_SECONDS = 7 * 24 * 3600


def _number(value: object) -> bool:
    # ints are checked against a bound before any float conversion (10**400 has none)
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (isinstance(value, int) or math.isfinite(value))
    )


def _seconds(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not _number(value) or not 0 < value <= MAX_SECONDS:
        raise ValueError(
            f"{attribute.name} must be a positive number of seconds, at most {MAX_SECONDS},"
            f" not {value!r}"
        )


def _count(most: int) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= most:
            raise ValueError(
                f"{attribute.name} must be a positive integer, at most {most}, not {value!r}"
            )

    return check


def _fraction(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not _number(value) or not 0 <= value < 1:
        raise ValueError(f"{attribute.name} must be a number from 0 to below 1, not {value!r}")


def _boolean(instance: object, attribute: attrs.Attribute[Any], value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be true or false, not {value!r}")


PROTOCOLS = ("matrix",)


def _protocol(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in PROTOCOLS:
        raise ValueError(f"{attribute.name} must be one of {', '.join(PROTOCOLS)}, not {value!r}")


ACTIONS = ("retry", "split", "reject", "disable")

#: what a failed answer calls for, by status; any other failure is ``retry``
DEFAULT_ACTIONS = {400: "reject", 410: "disable", 413: "split", 422: "reject"}


def _actions(value: object) -> tuple[tuple[int, str], ...]:
    if isinstance(value, tuple):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"actions must map HTTP statuses to actions, not {value!r}")
    result = []
    for status, action in value.items():
        code = int(status) if isinstance(status, str) and status.isdigit() else status
        if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code <= 599:
            raise ValueError(f"actions must map HTTP statuses (400 to 599), not {status!r}")
        if action not in ACTIONS:
            raise ValueError(
                f"actions must map {code} to one of {', '.join(ACTIONS)}, not {action!r}"
            )
        result.append((code, action))
    return tuple(sorted(result))


@attrs.frozen
class DeliveryOptions:
    """Per-registration delivery options (the optional ``delivery:`` key)."""

    #: most events in one transaction
    max_events: int = attrs.field(default=100, validator=_count(100_000))
    #: most bytes of body in one transaction (a single larger event is sent alone)
    max_bytes: int = attrs.field(default=900 * 1024, validator=_count(1 << 30))
    #: first wait after a failure, seconds
    initial_delay: float = attrs.field(default=1.0, validator=_seconds)
    #: longest wait between attempts, seconds
    max_delay: float = attrs.field(default=300.0, validator=_seconds)
    #: relative jitter applied to every wait (0.2 is ±20 %)
    jitter: float = attrs.field(default=0.2, validator=_fraction)
    #: how often a DOWN service is probed, seconds
    probe_interval: float = attrs.field(default=5.0, validator=_seconds)
    #: whether a DOWN service is probed at all
    probe: bool = attrs.field(default=True, validator=_boolean)
    #: also send ``hs_token`` as ``?access_token=`` (old receivers read it only there;
    #: Synapse's ``use_appservice_legacy_authorization``); the header always goes
    legacy_authorization: bool = attrs.field(default=False, validator=_boolean)
    #: connect timeout of one request, seconds
    connect_timeout: float = attrs.field(default=10.0, validator=_seconds)
    #: whole-request timeout (headers and body), seconds; on a cluster node at most two
    #: thirds of ``lease_ttl`` (:meth:`delivery.Cluster.check`)
    request_timeout: float = attrs.field(default=10.0, validator=_seconds)
    #: wire protocol; only ``matrix`` so far
    protocol: str = attrs.field(default="matrix", validator=_protocol)
    #: what to do on an HTTP status, over the defaults (:data:`DEFAULT_ACTIONS`):
    #: ``retry`` (DOWN, back off), ``split`` (halve the transaction), ``reject`` (after
    #: ``reject_attempts``, isolate the events refused and dead-letter them), ``disable``
    #: (stop sending until an operator enables the service)
    actions: tuple[tuple[int, str], ...] = attrs.field(default=(), converter=_actions)
    #: attempts a rejected transaction (``reject``) gets before it is bisected
    reject_attempts: int = attrs.field(default=3, validator=_count(100))
    #: pending longer than this (seconds) raises an alert: a metric and a log line
    max_pending_age: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_seconds)
    )

    def action_for(self, status: int | None) -> str:
        """What a failed answer calls for: ``retry`` unless its status says otherwise."""
        if status is None:
            return "retry"
        for code, action in self.actions:
            if code == status:
                return action
        return DEFAULT_ACTIONS.get(status, "retry")

    def __attrs_post_init__(self) -> None:
        if self.max_delay < self.initial_delay:
            raise ValueError(
                f"max_delay ({self.max_delay}) must not be below initial_delay "
                f"({self.initial_delay})"
            )


_OPTION_NAMES = frozenset(a.name for a in attrs.fields(DeliveryOptions))


@attrs.frozen
class Registration:
    """
    One application service: where to send, how to authenticate, what it wants.

    Secrets (``as_token``, ``hs_token``) are left out of ``repr`` so that they never
    reach a log line.
    """

    id: str
    url: str | None
    as_token: str = attrs.field(repr=False)
    hs_token: str = attrs.field(repr=False)
    sender_localpart: str
    users: tuple[Namespace, ...] = ()
    rooms: tuple[Namespace, ...] = ()
    aliases: tuple[Namespace, ...] = ()
    options: DeliveryOptions = DeliveryOptions()
    #: wants ephemeral data (typing, receipts, presence; ``receive_ephemeral``, Matrix 1.13)
    receive_ephemeral: bool = False
    #: wants it under the unstable names (``de.sorunome.msc2409.push_ephemeral``, MSC2409)
    push_ephemeral: bool = False
    #: wants device lists and key counts (``org.matrix.msc3202``, MSC3202)
    msc3202: bool = False

    @classmethod
    def from_dict(
        cls,
        data: object,
        source: str = "<mapping>",
        defaults: DeliveryOptions | None = None,
    ) -> Registration:
        """
        Build a registration from a parsed Matrix registration mapping.

        ``defaults`` are the options for whatever the ``delivery:`` key leaves out.

        :raises InvalidRegistrationError: naming ``source`` and the faulty field.
        """
        return _parse(data, source, defaults or DeliveryOptions())

    @classmethod
    def from_file(cls, path: str | Path, defaults: DeliveryOptions | None = None) -> Registration:
        """Read a Matrix registration YAML file (``defaults`` as for :meth:`from_dict`)."""
        source = str(path)
        try:
            data = read_yaml(path)
        except UnreadableYAML as e:
            raise InvalidRegistrationError(source, None, str(e)) from None
        return _parse(data, source, defaults or DeliveryOptions())


class InvalidOptionError(ValueError):
    """A delivery option is unknown or has a bad value; ``option`` names it if it can."""

    def __init__(self, option: str | None, message: str) -> None:
        self.option = option
        super().__init__(message)


def parse_options(raw: Mapping[str, Any], defaults: DeliveryOptions) -> DeliveryOptions:
    """
    ``defaults`` with the options of ``raw`` applied.

    :raises InvalidOptionError: for an unknown or invalid option.
    """
    for key in raw:
        if key not in _OPTION_NAMES:
            known = ", ".join(sorted(_OPTION_NAMES))
            raise InvalidOptionError(str(key), f"{key} is not a known option (known: {known})")
    try:
        return attrs.evolve(defaults, **raw)
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        raise InvalidOptionError(name if name in _OPTION_NAMES else None, str(e)) from None


def _parse(data: object, source: str, defaults: DeliveryOptions) -> Registration:
    def fail(field: str | None, reason: str) -> InvalidRegistrationError:
        return InvalidRegistrationError(source, field, reason)

    if not isinstance(data, Mapping):
        raise fail(None, f"expected a mapping of keys, found {type(data).__name__}")

    def string(key: str, secret: bool = False) -> str:
        if key not in data:
            raise fail(key, "is required")
        value = data[key]
        if not isinstance(value, str) or not value:
            # a secret's value is never repeated: error messages end up in logs
            found = type(value).__name__ if secret and value else _describe(value)
            raise fail(key, f"must be a non-empty string, not {found}")
        return value

    def optional(key: str, kind: type, default: Any, where: str | None = None) -> Any:
        value = (data if where is None else data.get(where) or {}).get(key)
        if value is None:
            return default
        if not isinstance(value, kind):
            field = key if where is None else f"{where}.{key}"
            noun = "a mapping" if kind is Mapping else "a list"
            raise fail(field, f"must be {noun}, not {_describe(value)}")
        return value

    service_id = string("id")
    as_token = string("as_token", secret=True)
    hs_token = string("hs_token", secret=True)
    sender_localpart = string("sender_localpart")

    if "url" not in data:
        raise fail("url", "is required (use null for a service that receives nothing)")
    url = data["url"]
    if url is not None:
        if not isinstance(url, str):
            raise fail("url", f"must be a string or null, not {_describe(url)}")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise fail("url", f"is not a valid URL ({e}): {url!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise fail("url", f"must be an http:// or https:// URL with a host, not {url!r}")
        if parts.query or parts.fragment or "?" in url or "#" in url:
            raise fail("url", f"must not have a query or fragment: {url!r}")
        if any(c.isspace() for c in parts.netloc):
            raise fail("url", f"has white space in its host: {url!r}")
        if port == 0:
            raise fail("url", f"has port 0, which nothing listens on: {url!r}")
        url = url.rstrip("/")

    optional("namespaces", Mapping, {})
    parsed: dict[str, tuple[Namespace, ...]] = {}
    for kind in NAMESPACE_KINDS:
        entries = optional(kind, list, [], where="namespaces")
        items = []
        for i, entry in enumerate(entries):
            where = f"namespaces.{kind}[{i}]"
            if not isinstance(entry, Mapping):
                raise fail(
                    where, f"must be a mapping with regex and exclusive, not {_describe(entry)}"
                )
            regex = entry.get("regex")
            if not isinstance(regex, str) or not regex:
                raise fail(f"{where}.regex", f"must be a non-empty string, not {_describe(regex)}")
            exclusive = entry.get("exclusive")
            if not isinstance(exclusive, bool):
                raise fail(
                    f"{where}.exclusive", f"must be true or false, not {_describe(exclusive)}"
                )
            try:
                items.append(Namespace.of(regex, exclusive))
            except (re.error, OverflowError, RecursionError) as e:
                raise fail(f"{where}.regex", f"is not a valid regular expression: {e}") from None
        parsed[kind] = tuple(items)

    def flag(key: str) -> bool:
        value = data.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise fail(key, f"must be true or false, not {_describe(value)}")
        return value

    raw_options = optional("delivery", Mapping, {})
    try:
        options = parse_options(raw_options, defaults)
    except InvalidOptionError as e:
        raise fail(f"delivery.{e.option}" if e.option else "delivery", str(e)) from None

    return Registration(
        id=service_id,
        url=url,
        as_token=as_token,
        hs_token=hs_token,
        sender_localpart=sender_localpart,
        users=parsed["users"],
        rooms=parsed["rooms"],
        aliases=parsed["aliases"],
        options=options,
        receive_ephemeral=flag("receive_ephemeral"),
        push_ephemeral=flag("de.sorunome.msc2409.push_ephemeral"),
        msc3202=flag("org.matrix.msc3202"),
    )


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "an empty string" if not value else f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__
