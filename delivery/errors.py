"""
Errors a user of ``delivery`` can cause, each with a message that names the thing and the fix.
"""

from __future__ import annotations


class DeliveryError(Exception):
    """Base class of the errors ``delivery`` raises for a caller's mistake."""


class InvalidEventError(DeliveryError, ValueError):
    """
    An event handed to :meth:`DeliveryService.submit` is not acceptable.

    Nothing of the batch it came in was stored.
    """

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason
        super().__init__(f"event {index}: {reason}" if index >= 0 else reason)


class InvalidRegistrationError(DeliveryError, ValueError):
    """A registration (file or mapping) is not valid; names the source and the field."""

    def __init__(self, source: str, field: str | None, reason: str) -> None:
        self.source = source
        self.field = field
        self.reason = reason
        where = f"{source}: field {field!r}" if field else source
        super().__init__(f"invalid registration {where}: {reason}")


class UnknownServiceError(DeliveryError, KeyError):
    """No registration with this id is known."""

    def __init__(self, service_id: str) -> None:
        self.service_id = service_id
        super().__init__(service_id)

    def __str__(self) -> str:
        return f"no application service with id {self.service_id!r} is registered"


class InvalidStoreURLError(DeliveryError, ValueError):
    """The database URL given to :func:`delivery.store.open_store` cannot be used."""


class StoreUnavailableError(DeliveryError):
    """
    The database does not answer, for now. The call that failed may or may not have taken
    effect (a commit whose answer was lost): callers retry, and every write is idempotent
    or checked.
    """


class StoreLockedError(DeliveryError):
    """
    The SQLite database is in use by another store: another delivery process, or another
    store in this one. SQLite is single-process: one store has the file at a time.
    """


class FencedError(DeliveryError):
    """
    The database refused a write made under a lease whose epoch is no longer current:
    another node holds it now (several daemons on one PostgreSQL). Nothing was written.
    """

    def __init__(self, message: str, lease: str) -> None:
        super().__init__(message)
        self.lease = lease


class StoreConfigurationError(DeliveryError):
    """
    The database refused us for a reason that waiting will not cure (no such role or
    database, a wrong password, a file that cannot be opened): the message names what to
    fix. Unlike :class:`StoreUnavailableError`, it is not retried.
    """


class ServiceRegisteredError(DeliveryError):
    """Only an orphaned service (removed from the registrations) can be purged."""

    def __init__(self, service_id: str) -> None:
        self.service_id = service_id
        super().__init__(
            f"service {service_id!r} is registered: remove it from the registrations (and"
            " reload) before purging its data"
        )


class NoURLError(DeliveryError):
    """The service has no URL (nor a sender of its own): there is nothing to ping."""

    def __init__(self, service_id: str) -> None:
        self.service_id = service_id
        super().__init__(f"service {service_id!r} has no URL: nothing is sent to it")


class NotAcceptingEventsError(DeliveryError):
    """
    ``submit()`` or ``replay()`` on a service that reads its events from an outside source
    (it keeps none of its own to replay).
    """
