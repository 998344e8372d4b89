"""
The loggers of ``delivery``: Twisted's structured logger, behind a level filter of our
own so that the configured level applies under twistd as well as when embedded.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)
from twisted.logger import Logger as _Logger

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.debug)
_predicate.setLogLevelForNamespace("delivery", LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])

LEVELS = ("debug", "info", "warn", "error", "critical")


def Logger() -> _Logger:
    """A logger named after the calling module, filtered by :func:`set_level`."""
    return _Logger(namespace=_Logger._namespaceFromCallingContext(), observer=_observer)


def set_level(level: str) -> None:
    """The least important level ``delivery`` logs: one of :data:`LEVELS`."""
    _predicate.setLogLevelForNamespace("delivery", LogLevel.levelWithName(level))
