"""The wire protocol: tagged-union frames exchanged over transport subjects.

Every frame is a msgspec Struct tagged by the field ``k``. ``docs/PROTOCOL.md`` describes the
subjects and frames for clients written in other languages.
"""

from __future__ import annotations

from typing import Any

import msgspec

from happen._events import CausalContext

__all__ = [
    "Abandon",
    "Ack",
    "BroadcastEnd",
    "BroadcastFrame",
    "BroadcastItem",
    "Cancel",
    "Chunk",
    "Chunks",
    "Credit",
    "Failure",
    "Hold",
    "InboxFrame",
    "Request",
    "Result",
    "StreamEnd",
    "StreamStart",
]

# Failure codes
NO_HANDLER = "no_handler"
QUEUE_FULL = "queue_full"
HANDLER_ERROR = "handler_error"
TIMEOUT = "timeout"
BAD_REQUEST = "bad_request"
UNAVAILABLE = "unavailable"


class _Frame(msgspec.Struct, tag_field="k", omit_defaults=True):
    pass


class Request(_Frame, tag="req"):
    """A point-to-point event, published to ``{ns}.node.{node_id}`` with a reply inbox."""

    type: str
    payload: Any = None
    context: CausalContext | None = None
    priority: int = 0
    window: int = 256  # stream credit the caller grants up front
    timeout_ms: int | None = None
    origin: str = ""  # the sending system's id; "" for foreign clients
    probe: bool = False  # answer "ack" or "hold" at once (a sender held by pressure)


class Result(_Frame, tag="res"):
    """The handler's result (final)."""

    value: Any = None


class Failure(_Frame, tag="err"):
    """The call failed (final); ``code`` says why."""

    code: str
    message: str = ""
    error_type: str = ""


class Hold(_Frame, tag="hold"):
    """Admitted while the node is under pressure: its acknowledgment is withheld."""


class Ack(_Frame, tag="ack"):
    """The withheld admission acknowledgment: the node is below its threshold again."""


class StreamStart(_Frame, tag="start"):
    """The handler streams: credit and cancel frames go to ``control``."""

    control: str


class Chunk(_Frame, tag="chunk"):
    """One streamed item."""

    item: Any = None


class Chunks(_Frame, tag="chunks"):
    """Several streamed items in order (each counts as one item against the credit)."""

    items: list[Any]


class StreamEnd(_Frame, tag="end"):
    """The stream finished (final)."""


class Credit(_Frame, tag="credit"):
    """The consumer read ``n`` more items: the producer may send ``n`` more."""

    n: int


class Cancel(_Frame, tag="cancel"):
    """The consumer is gone: stop the producer."""


class Abandon(_Frame, tag="abandon"):
    """The caller of ``reply`` gave up (cancelled or timed out): cancel its handler.

    Published to ``{ns}.cancel.{node_id}``, which every instance of the node hears.
    """

    reply: str


class Broadcast(_Frame, tag="bcast"):
    """A broadcast event, published to ``{ns}.bcast.{event_type}``."""

    type: str
    payload: Any = None
    context: CausalContext | None = None
    stream: str | None = None  # set for a streamed broadcast: its items follow as ``bitem``


class BroadcastItem(_Frame, tag="bitem"):
    """An item of the streamed broadcast ``stream``."""

    stream: str
    item: Any = None


class BroadcastEnd(_Frame, tag="bend"):
    """The streamed broadcast ``stream`` ended (``error`` set when the source failed)."""

    stream: str
    error: str | None = None


InboxFrame = (
    Result | Failure | Hold | Ack | StreamStart | Chunk | Chunks | StreamEnd | Credit | Cancel
)
BroadcastFrame = Broadcast | BroadcastItem | BroadcastEnd


def handler_failure(exc: BaseException) -> Failure:
    """The failure a handler's exception becomes: its type and message, no traceback."""
    message = str(exc).replace("\r", " ").replace("\n", " ")
    return Failure(HANDLER_ERROR, message, type(exc).__name__)


def abandoned(node_id: str) -> Failure:
    """Answered to a caller that gave up, so its system can forget the request."""
    return Failure(TIMEOUT, f"node {node_id!r} cancelled the handler: the caller gave up")


def stopped(node_id: str) -> Failure:
    return Failure(UNAVAILABLE, f"node {node_id!r} stopped")
