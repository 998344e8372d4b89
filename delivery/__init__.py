"""
delivery: reliable event delivery to Matrix application services, on Twisted.

The public API is what this module names; everything else may change. Every type a public
method returns or raises is named here too (what the store returns included), so that
code using ``delivery`` never imports from its modules. ``delivery.testing`` has what an
embedder needs to test against it.
"""

from ._interfaces import IDeliveryObserver, IEventSource, ISender, IStore, SendResult
from .cluster import Cluster, ClusterError
from .errors import (
    DeliveryError,
    FencedError,
    InvalidEventError,
    InvalidRegistrationError,
    InvalidStoreURLError,
    NotAcceptingEventsError,
    NoURLError,
    ServiceRegisteredError,
    StoreConfigurationError,
    StoreLockedError,
    StoreUnavailableError,
    UnknownServiceError,
)
from .events import Event, StoredEvent
from .housekeeping import Housekeeping, PassResult
from .interest import RoutingFields
from .records import (
    Attempt,
    ClusterView,
    DeadLetter,
    Fence,
    Ingested,
    LeaseInfo,
    NodeInfo,
    PurgeResult,
    QueuedEvent,
    ReloadResult,
    ReplayResult,
    ServiceRecord,
    ServiceStatus,
    ServiceSummary,
    StoredTransaction,
)
from .registration import DeliveryOptions, Namespace, Registration
from .service import DeliveryService
from .store import SchemaTooNewError

__all__ = [
    "Attempt",
    "Cluster",
    "ClusterError",
    "ClusterView",
    "DeadLetter",
    "DeliveryError",
    "DeliveryOptions",
    "DeliveryService",
    "Event",
    "Fence",
    "FencedError",
    "Housekeeping",
    "IDeliveryObserver",
    "IEventSource",
    "ISender",
    "IStore",
    "Ingested",
    "InvalidEventError",
    "InvalidRegistrationError",
    "InvalidStoreURLError",
    "LeaseInfo",
    "Namespace",
    "NoURLError",
    "NodeInfo",
    "NotAcceptingEventsError",
    "PassResult",
    "PurgeResult",
    "QueuedEvent",
    "Registration",
    "ReloadResult",
    "ReplayResult",
    "RoutingFields",
    "SchemaTooNewError",
    "SendResult",
    "ServiceRecord",
    "ServiceRegisteredError",
    "ServiceStatus",
    "ServiceSummary",
    "StoreConfigurationError",
    "StoreLockedError",
    "StoreUnavailableError",
    "StoredEvent",
    "StoredTransaction",
    "UnknownServiceError",
]
