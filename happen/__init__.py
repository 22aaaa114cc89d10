"""happen: streaming dataflow between nodes, in one process or across hosts over NATS."""

from happen._calls import Stream
from happen._config import ConcurrencySettings
from happen._delivery import Backoff, DeliverySettings
from happen._durable import Receipt
from happen._errors import (
    CodecError,
    DuplicateEventError,
    HandlerError,
    HappenError,
    HostLostError,
    InvalidConfigError,
    InvalidIdError,
    NodeNotFoundError,
    NoHandlerError,
    PayloadTooLargeError,
    QueueFullError,
    Reject,
    Retry,
    SendTimeout,
    SystemStoppedError,
    TransportError,
    ValidationError,
)
from happen._events import CausalContext, Event
from happen._mailbox import NodeStats
from happen._middleware import CallNext, Middleware
from happen._node import Node
from happen._observe import CallObserver, CallWatch
from happen._state import NodeState, StateConflict, StateView, Versioned
from happen._system import System
from happen._transport import Message, Subscription, Transport, TransportListener

__all__ = [
    "Backoff",
    "CallNext",
    "CallObserver",
    "CallWatch",
    "CausalContext",
    "CodecError",
    "ConcurrencySettings",
    "DeliverySettings",
    "DuplicateEventError",
    "Event",
    "HandlerError",
    "HappenError",
    "HostLostError",
    "InvalidConfigError",
    "InvalidIdError",
    "Message",
    "Middleware",
    "NoHandlerError",
    "Node",
    "NodeNotFoundError",
    "NodeState",
    "NodeStats",
    "PayloadTooLargeError",
    "QueueFullError",
    "Receipt",
    "Reject",
    "Retry",
    "SendTimeout",
    "StateConflict",
    "StateView",
    "Stream",
    "Subscription",
    "System",
    "SystemStoppedError",
    "Transport",
    "TransportError",
    "TransportListener",
    "ValidationError",
    "Versioned",
]

__version__ = "0.1.0"

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("happen."):
        try:
            _obj.__module__ = "happen"
        except (AttributeError, TypeError):
            pass
del _name, _obj
