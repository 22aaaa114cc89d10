"""The exception hierarchy: every error happen raises derives from HappenError."""

from __future__ import annotations

__all__ = [
    "CodecError",
    "DuplicateEventError",
    "HandlerError",
    "HappenError",
    "HostLostError",
    "InvalidConfigError",
    "InvalidIdError",
    "NoHandlerError",
    "NodeNotFoundError",
    "PayloadTooLargeError",
    "QueueFullError",
    "Reject",
    "Retry",
    "SendTimeout",
    "SystemStoppedError",
    "TransportError",
    "ValidationError",
]


class HappenError(Exception):
    """Root of every error happen raises."""

    __module__ = "happen"


class InvalidConfigError(HappenError, ValueError):
    """A concurrency setting (or another system setting) is invalid; the message names the key."""

    __module__ = "happen"


class InvalidIdError(HappenError, ValueError):
    """A node id or an event type does not fit the allowed characters or length."""

    __module__ = "happen"


class NodeNotFoundError(HappenError):
    """No node with the target id is running anywhere the transport reaches.

    ``node_id`` is the target.
    """

    __module__ = "happen"

    def __init__(self, message: str, *, node_id: str | None = None) -> None:
        super().__init__(message)
        self.node_id = node_id


class NoHandlerError(HappenError):
    """The target node exists but has no handler matching the event type.

    ``node_id`` and ``event_type`` say which.
    """

    __module__ = "happen"

    def __init__(
        self, message: str, *, node_id: str | None = None, event_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.event_type = event_type


class QueueFullError(HappenError):
    """The target node's queue is full; the event was rejected, not enqueued.

    ``node_id`` is the node and ``queued`` how many events its queue held (``None`` when
    the node did not say).
    """

    __module__ = "happen"

    def __init__(
        self, message: str, *, node_id: str | None = None, queued: int | None = None
    ) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.queued = queued


class DuplicateEventError(HappenError):
    """``send`` or ``stream`` to a durable node with an event id (``id=``) stored before
    within the node's ``dedup_window``: the event is not stored or run again, and its
    result goes to the caller that stored it first. ``event_id``, ``node_id`` and ``seq``
    (the first copy's sequence in the node's log) say which. ``enqueue`` reports the same
    as ``Receipt.duplicate``."""

    __module__ = "happen"

    def __init__(self, message: str, *, event_id: str, node_id: str, seq: int) -> None:
        super().__init__(message)
        self.event_id = event_id
        self.node_id = node_id
        self.seq = seq


class HandlerError(HappenError):
    """The handler raised; ``remote_type`` and ``remote_message`` describe its exception,
    ``node_id`` names the node where it ran (``None`` when unknown), and ``attempts`` says how
    many times it ran before the node gave up (1 unless the node retries; see ``Retry``)."""

    __module__ = "happen"

    def __init__(
        self,
        message: str,
        *,
        remote_type: str,
        remote_message: str,
        node_id: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.node_id = node_id
        self.attempts = attempts


class SendTimeout(HappenError, TimeoutError):
    """The call's timeout expired before a result arrived (the handler is cancelled)."""

    __module__ = "happen"


class PayloadTooLargeError(HappenError, ValueError):
    """An encoded message is larger than the transport's ``max_payload``; nothing was sent."""

    __module__ = "happen"


class CodecError(HappenError, ValueError):
    """A value could not be encoded, or bytes could not be decoded."""

    __module__ = "happen"


class ValidationError(CodecError):
    """A value does not fit the type it must have: a payload refused by a typed handler
    (``happen.Event[Order]``), or a result or stream item that does not fit ``result_type``
    or ``item_type``.

    ``path`` locates the field that does not fit, as msgspec writes it (``"$.items[0].qty"``;
    ``"$"`` is the value itself); ``node_id`` names the node that refused the payload or sent
    the value (``None`` when unknown).
    """

    __module__ = "happen"

    def __init__(self, message: str, *, path: str = "$", node_id: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.node_id = node_id


class TransportError(HappenError):
    """The transport failed: connection lost or closed, server unreachable, or misuse."""

    __module__ = "happen"


class SystemStoppedError(TransportError):
    """The system is stopped (or stopping) and no longer sends or accepts events."""

    __module__ = "happen"


class HostLostError(TransportError):
    """The host serving a call (or producing a stream) died, froze or became unreachable.

    Raised within the calling system's ``liveness_timeout``, even for a call without a
    timeout. ``node_id`` is the node the call was sent to. The handler may or may not have
    run: retry only what is safe to run twice.
    """

    __module__ = "happen"

    def __init__(self, message: str, *, node_id: str) -> None:
        super().__init__(message)
        self.node_id = node_id


class Retry(HappenError):
    """Raised by a handler to ask for another attempt, whatever the node's ``on_error`` says.

    The event runs again after ``delay`` seconds (``None``: the node's backoff), while
    attempts remain (``max_attempts`` counts every execution, the first included); after the
    last one it fails like any other error (or is dead-lettered). A retry that waits holds
    no concurrency slot. Raises ``ValueError`` for a negative or non-numeric ``delay``.
    """

    __module__ = "happen"

    def __init__(self, delay: float | None = None) -> None:
        if delay is not None and (
            type(delay) not in (int, float) or not delay >= 0 or delay == float("inf")
        ):
            raise ValueError(f"Retry delay must be None or finite seconds >= 0, not {delay!r}")
        when = "after the backoff" if delay is None else f"in {delay} s"
        super().__init__(f"the handler asked to be retried {when}")
        self.delay = delay

    def __reduce__(self) -> tuple[type[Retry], tuple[float | None]]:
        # Raised in a worker process, it travels back pickled with its delay.
        return (Retry, (self.delay,))


class Reject(HappenError):
    """Raised by a handler to refuse an event for good: it is never retried, whatever
    ``max_attempts`` and ``on_error`` say, and is dead-lettered when the node has a
    dead-letter node (else it fails). The caller gets ``HandlerError`` with ``remote_type``
    ``"Reject"`` and ``reason`` as its message."""

    __module__ = "happen"

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
