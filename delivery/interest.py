"""
Which application services want an event: an index over the namespaces of every
registration.

Matching follows Matrix (and Synapse): a regex matches when it matches at the start of the
string (``re.match``). A service is interested in an event when its ``users`` namespace
matches the sender or, for ``m.room.member`` events, the ``state_key``; when its ``rooms``
namespace matches the ``room_id``; or when its ``aliases`` namespace matches one of the
room's aliases. ``exclusive`` governs who may claim a namespace, not who receives events, so
it plays no part here.

The index stays cheap with thousands of registrations: every namespace kind has one combined
regex that rejects a string no service wants in one match, and the set of services a string
does match is computed once and cached.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

import attrs

from .registration import Registration

MEMBER_EVENT = "m.room.member"

# Patterns that cannot be joined into one alternation without changing their meaning:
# back-references and conditional groups (group numbers shift), named groups (names may
# clash) and global flags.
_UNCOMBINABLE = re.compile(r"\\[1-9]|\(\?P[<=]|\(\?<|\(\?\(|\(\?[aiLmsux]+\)")


class _Matcher:
    """All the patterns of one namespace kind, over every registration."""

    def __init__(self, patterns: Sequence[tuple[str, re.Pattern[str]]], cache_size: int) -> None:
        self.empty = not patterns
        # Joinable patterns sit behind one combined prefilter; the others are tried one by one.
        self._joined = [(s, p) for s, p in patterns if not _UNCOMBINABLE.search(p.pattern)]
        self._alone = [(s, p) for s, p in patterns if _UNCOMBINABLE.search(p.pattern)]
        self._prefilter: re.Pattern[str] | None = None
        if self._joined:
            try:
                self._prefilter = re.compile("|".join(f"(?:{p.pattern})" for _, p in self._joined))
            except (re.error, OverflowError, RecursionError):
                self._alone, self._joined = list(patterns), []
        self.services = lru_cache(maxsize=cache_size)(self._services)

    def _services(self, value: str) -> frozenset[str]:
        found = {sid for sid, p in self._alone if p.match(value)}
        if self._prefilter is not None and self._prefilter.match(value) is not None:
            found.update(sid for sid, p in self._joined if p.match(value))
        return frozenset(found)


@attrs.frozen
class RoutingFields:
    """The parts of an event that decide who wants it."""

    sender: str | None
    room_id: str | None
    type: str | None
    state_key: str | None


class InterestIndex:
    """
    Routes events to the ids of the registrations that want them.

    Registrations without a ``url`` receive nothing and are left out. When ``server_name``
    is given, each service also receives the events of its own sender user
    (``@sender_localpart:server_name``), as Synapse does.
    """

    def __init__(
        self,
        registrations: Iterable[Registration],
        *,
        server_name: str | None = None,
        cache_size: int = 65536,
    ) -> None:
        regs = [r for r in registrations if r.url is not None]
        self._users = _Matcher([(r.id, ns.pattern) for r in regs for ns in r.users], cache_size)
        self._rooms = _Matcher([(r.id, ns.pattern) for r in regs for ns in r.rooms], cache_size)
        self._aliases = _Matcher([(r.id, ns.pattern) for r in regs for ns in r.aliases], cache_size)
        self._senders: dict[str, frozenset[str]] = {}
        if server_name is not None:
            for r in regs:
                user = f"@{r.sender_localpart}:{server_name}"
                self._senders[user] = self._senders.get(user, frozenset()) | {r.id}

    @property
    def wants_aliases(self) -> bool:
        """Whether any registration has an ``aliases`` namespace (a lookup is needed)."""
        return not self._aliases.empty

    def users(self, user_id: str) -> frozenset[str]:
        found = self._users.services(user_id)
        own = self._senders.get(user_id)
        return found | own if own else found

    def route(self, event: RoutingFields, aliases: Sequence[str] = ()) -> frozenset[str]:
        """The ids of the services interested in an event."""
        found: frozenset[str] = frozenset()
        if event.sender is not None:
            found = self.users(event.sender)
        if event.type == MEMBER_EVENT and event.state_key is not None:
            found = found | self.users(event.state_key)
        if event.room_id is not None:
            found = found | self._rooms.services(event.room_id)
        for alias in aliases:
            found = found | self._aliases.services(alias)
        return found
