"""
delivery: reliable event delivery to Matrix application services, on Twisted.

The public API is what this module names; everything else may change.
"""

from ._interfaces import IDeliveryObserver, IEventSource, ISender, IStore, SendResult
from .errors import (
    DeliveryError,
    InvalidEventError,
    InvalidRegistrationError,
    InvalidStoreURLError,
    UnknownServiceError,
)
from .events import StoredEvent
from .registration import DeliveryOptions, Namespace, Registration
from .service import DeliveryService, NotAcceptingEventsError, ServiceStatus

__all__ = [
    "DeliveryError",
    "DeliveryOptions",
    "DeliveryService",
    "IDeliveryObserver",
    "IEventSource",
    "ISender",
    "IStore",
    "InvalidEventError",
    "InvalidRegistrationError",
    "InvalidStoreURLError",
    "Namespace",
    "NotAcceptingEventsError",
    "Registration",
    "SendResult",
    "ServiceStatus",
    "StoredEvent",
    "UnknownServiceError",
]
