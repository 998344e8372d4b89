"""
Which application services want an event: an index over the namespaces of every
registration.

Matching follows Matrix (and Synapse): a regex matches when it matches at the start of the
string (``re.match``). A service is interested in an event when its ``users`` namespace
matches the sender or, for ``m.room.member`` events, the ``state_key``; when its ``rooms``
namespace matches the ``room_id``; or when its ``aliases`` namespace matches one of the
room's aliases. ``exclusive`` governs who may claim a namespace, not who receives events, so
it plays no part here.

The index stays cheap with thousands of registrations. Most namespaces begin with a literal
prefix (``@telegram_`` in ``@telegram_.*:example\\.org``), and only the patterns whose
literal prefix a string starts with can match it. Patterns are filed by literal prefix, the
prefixes kept sorted: the prefixes a string starts with are the last one sorted at or before
it and the prefixes that one starts with, so one bisection and a short walk find them, and
only their patterns are tried. The prefix is read conservatively (:func:`literal_prefix`);
patterns with none (an alternation, a global flag, a class or group at the start) are tried
as before, behind one combined regex that rejects in one match a string none of them wants.
A service's own user (``server_name``) is one more pattern, matching that user only. The set
of services a string matches is computed once and cached.
"""

from __future__ import annotations

import re
import string
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

import attrs

from .registration import Registration

MEMBER_EVENT = "m.room.member"

# Patterns that cannot be joined into one alternation without changing their meaning:
# back-references and conditional groups (group numbers shift), named groups (names may
# clash) and global flags.
_UNCOMBINABLE = re.compile(r"\\[1-9]|\(\?P[<=]|\(\?<|\(\?\(|\(\?[aiLmsux]+\)")


#: characters with a meaning of their own outside a character class
_METACHARACTERS = frozenset(".^$*+?{}[]()|\\")
#: what may follow a character and make it optional or repeated
_QUANTIFIERS = frozenset("*+?{")
#: what a backslash may precede and still stand for that very character (``\.``, ``\:``);
#: a backslash before a letter or digit is a class, an anchor or a reference
_ESCAPED_LITERALS = frozenset(string.punctuation + " ")
#: anchors at the start of a pattern, which a match at the start of the string satisfies
_LEADING_ANCHORS = re.compile(r"\A(?:\^|\\A)+")


def literal_prefix(pattern: re.Pattern[str]) -> str:
    """
    A string that every string ``pattern`` matches (with ``re.match``) starts with: the plain
    characters at the start of the pattern (``\\.`` is a plain ``.``), after any ``^`` or
    ``\\A``, up to the first metacharacter, and without the last one when a quantifier follows
    it (``@ab?c`` gives ``@a``). Empty when unsure: a ``|`` anywhere in the pattern (even
    where it could not split it), global flags (``(?i)``), or a group, a class or an escape
    such as ``\\d`` at the start.
    """
    if pattern.flags & ~re.UNICODE or "|" in pattern.pattern:
        return ""
    source = _LEADING_ANCHORS.sub("", pattern.pattern, count=1)
    i = 0
    chars = []
    while i < len(source):
        char, step = source[i], 1
        if char == "\\" and source[i + 1 : i + 2] in _ESCAPED_LITERALS:
            char, step = source[i + 1], 2
        elif char in _METACHARACTERS:
            break
        if source[i + step : i + step + 1] in _QUANTIFIERS:
            break
        chars.append(char)
        i += step
    return "".join(chars)


_NOTHING: frozenset[str] = frozenset()

#: a pattern's service, as a set an answer can be as it is, and the pattern's ``match``
_Entry = tuple[frozenset[str], Callable[[str], re.Match[str] | None]]


class _Matcher:
    """
    All the patterns of one namespace kind, over every registration.

    An answer that names one service is a set made once for its pattern, not a new one: the
    cache then holds few objects of its own, and the garbage collector has little to walk.
    """

    def __init__(self, patterns: Sequence[tuple[str, re.Pattern[str]]], cache_size: int) -> None:
        self.empty = not patterns
        # Patterns with a literal prefix, filed by prefix: the prefixes sorted, each with its
        # patterns and the index of its parent, the longest other prefix it starts with.
        by_prefix: dict[str, list[_Entry]] = {}
        general = []
        for sid, p in patterns:
            prefix = literal_prefix(p)
            if prefix:
                by_prefix.setdefault(prefix, []).append((frozenset([sid]), p.match))
            else:
                general.append((sid, p))
        self._prefixes = sorted(by_prefix)
        self._entries = [tuple(by_prefix[prefix]) for prefix in self._prefixes]
        self._parents: list[int] = []
        chain: list[int] = []  # the previous prefix and the prefixes it starts with
        for i, prefix in enumerate(self._prefixes):
            while chain and not prefix.startswith(self._prefixes[chain[-1]]):
                chain.pop()
            self._parents.append(chain[-1] if chain else -1)
            chain.append(i)
        # The others: the joinable ones sit behind one combined prefilter, the rest are tried
        # one by one.
        joined = [(s, p) for s, p in general if not _UNCOMBINABLE.search(p.pattern)]
        alone = [(s, p) for s, p in general if _UNCOMBINABLE.search(p.pattern)]
        self._prefilter: re.Pattern[str] | None = None
        if joined:
            try:
                self._prefilter = re.compile("|".join(f"(?:{p.pattern})" for _, p in joined))
            except (re.error, OverflowError, RecursionError):
                alone, joined = general, []
        self._joined = [(frozenset([s]), p.match) for s, p in joined]
        self._alone = [(frozenset([s]), p.match) for s, p in alone]
        self.services = lru_cache(maxsize=cache_size)(self._services)

    def _services(self, value: str) -> frozenset[str]:
        found = _NOTHING
        # Every prefix the string starts with is the last prefix sorted at or before the
        # string, or one that prefix starts with: whatever sorts between a prefix of the string
        # and the string starts with that prefix too. So: one bisection, then down the parents.
        i = bisect_right(self._prefixes, value) - 1
        while i >= 0 and not value.startswith(self._prefixes[i]):
            i = self._parents[i]
        while i >= 0:
            found = _matching(self._entries[i], value, found)
            i = self._parents[i]
        found = _matching(self._alone, value, found)
        if self._prefilter is not None and self._prefilter.match(value) is not None:
            found = _matching(self._joined, value, found)
        return found


def _matching(entries: Iterable[_Entry], value: str, found: frozenset[str]) -> frozenset[str]:
    """``found`` and the services of the entries whose pattern matches ``value``."""
    for sids, match in entries:
        if match(value) is not None:
            found = found | sids if found else sids
    return found


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
        #: the services that receive events (a replay's copies go to one of them)
        self.service_ids = frozenset(r.id for r in regs)
        users = [(r.id, ns.pattern) for r in regs for ns in r.users]
        if server_name is not None:
            # each service's own user, as a pattern that matches that user and no one else
            for r in regs:
                user = re.escape(f"@{r.sender_localpart}:{server_name}")
                users.append((r.id, re.compile(user + r"\Z")))
        self._users = _Matcher(users, cache_size)
        self._rooms = _Matcher([(r.id, ns.pattern) for r in regs for ns in r.rooms], cache_size)
        self._aliases = _Matcher([(r.id, ns.pattern) for r in regs for ns in r.aliases], cache_size)

    @property
    def wants_aliases(self) -> bool:
        """Whether any registration has an ``aliases`` namespace (a lookup is needed)."""
        return not self._aliases.empty

    def users(self, user_id: str) -> frozenset[str]:
        return self._users.services(user_id)

    def route(self, event: RoutingFields, aliases: Sequence[str] = ()) -> frozenset[str]:
        """The ids of the services interested in an event."""
        users = self._users.services
        found = _NOTHING if event.sender is None else users(event.sender)
        state_key = event.state_key if event.type == MEMBER_EVENT else None
        if state_key is not None and (more := users(state_key)):
            found = found | more if found else more
        if event.room_id is not None and (more := self._rooms.services(event.room_id)):
            found = found | more if found else more
        for alias in aliases:
            if more := self._aliases.services(alias):
                found = found | more if found else more
        return found
