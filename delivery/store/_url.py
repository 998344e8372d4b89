"""
Database URLs made fit to show: every password libpq would read in one, hidden.

libpq takes a password in four places, and all are hidden: the user information of a URL
(``postgresql://user:pw@host/db``, also percent-encoded, and with characters a URL should
have encoded, such as ``/`` or ``@``), a parameter of its query (``?password=pw``,
``&sslpassword=pw``), and a value of a key/value connection string
(``host=x password=pw``, ``password='a b'``). The rule is to hide rather than risk a leak:
whatever cannot be read with certainty (a query parameter without ``=``, an unterminated
quote, credentials without a scheme) is hidden whole. Every place that shows a database
URL (logs, errors, ``delivery check-config``, a store's ``repr``) goes through
:func:`redact_url`, and text from the database's client library through
:func:`hide_secrets`.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["hide_secrets", "redact_url"]

HIDDEN = "***"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: the hosts of a URL: ``name[:port]`` or ``[v6 address][:port]``, separated by commas
_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[^\[\]:/?@,]*)(?::[0-9]*)?"
_HOSTS = re.compile(rf"{_HOST}(?:,{_HOST})*")
#: one ``key = value`` of a libpq connection string: a quoted value (with ``\'`` and
#: ``\\``) or a bare one (with backslash escapes)
_PAIR = re.compile(
    r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*('(?:[^'\\]|\\.)*'|(?:[^\s'\\]|\\.)*)(\s+|$)"
)


def _secret_key(key: str) -> bool:
    """Whether a libpq parameter holds a secret (``password``, ``sslpassword``)."""
    return "password" in unquote(key).lower()


def redact_url(url: str) -> str:
    """A database URL (or libpq connection string) fit for a log line or an error."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        if "=" in url:
            return _redact_keywords(url)
        # A path, a word: nothing libpq would take a password from; unless it has an "@".
        return HIDDEN if "@" in url else url
    parts = _split(url)
    if parts is None:
        return scheme.group() + HIDDEN
    _, userinfo, rest = parts
    user = ""
    if userinfo is not None:
        name, colon, _ = userinfo.partition(":")
        user = f"{name}:{HIDDEN}@" if colon else f"{userinfo}@"
    return f"{scheme.group()}{user}{_redact_query(rest)}"


def _split(url: str) -> tuple[str, str | None, str] | None:
    """
    A URL as its scheme, user information (None: none) and the rest, the way libpq reads
    it (the user information ends at an "@" before any "/" or "?"); None if it is not a
    URL whose hosts can be read.
    """
    scheme = _SCHEME.match(url)
    if scheme is None:
        return None
    rest = url[scheme.end() :]
    userinfo = None
    stop = re.search(r"[@/?]", rest)
    if stop is not None and stop.group() == "@":
        userinfo, rest = rest[: stop.start()], rest[stop.end() :]
    if not _HOSTS.fullmatch(re.split(r"[/?]", rest, maxsplit=1)[0]):
        # "user:pa/ss@host" (a raw "/", "?" or "@" in a password) leaves a host that is
        # not one: what is in it cannot be told apart.
        return None
    return scheme.group(), userinfo, rest


def _redact_query(rest: str) -> str:
    """``host/db?query``, with the values of its secret parameters hidden."""
    base, question, query = rest.partition("?")
    if not question:
        return rest
    parameters = []
    for parameter in query.split("&"):
        key, equals, _ = parameter.partition("=")
        if not equals:
            # Not a parameter: perhaps the rest of a password with a raw "&" in it.
            return f"{base}?{HIDDEN}"
        parameters.append(f"{key}={HIDDEN}" if _secret_key(key) else parameter)
    return f"{base}?{'&'.join(parameters)}"


def _redact_keywords(text: str) -> str:
    """A libpq key/value connection string with its secret values hidden."""
    shown = []
    position = 0
    while position < len(text):
        pair = _PAIR.match(text, position)
        if pair is None or pair.end() == position:
            return HIDDEN  # not a connection string libpq would read: show none of it
        key, value, space = pair.groups()
        shown.append(f"{key}={HIDDEN if _secret_key(key) else value}{space and ' '}")
        position = pair.end()
    return "".join(shown).rstrip()


def _secrets(url: str) -> set[str]:
    """Every password in ``url``, in each form it may be quoted back in (raw, decoded)."""
    found: set[str] = set()
    parts = _split(url)
    if parts is not None:
        _, userinfo, rest = parts
        if userinfo is not None:
            found.add(userinfo.partition(":")[2])
        for parameter in rest.partition("?")[2].split("&"):
            key, _, value = parameter.partition("=")
            if _secret_key(key):
                found.add(value)
    else:
        for pair in _PAIR.finditer(url):
            key, value = pair.group(1), pair.group(2)
            if _secret_key(key):
                found.add(value)
                found.add(re.sub(r"\\(.)", r"\1", value.strip("'")))
    return {form for secret in found for form in (secret, unquote(secret)) if form}


def hide_secrets(text: str, url: str) -> str:
    """``text`` (a client library's error, say) with every password of ``url`` hidden."""
    for secret in sorted(_secrets(url), key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return text
