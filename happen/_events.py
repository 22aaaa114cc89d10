"""Events and their causal context, and the context variable that carries causality."""

from __future__ import annotations

import contextvars
import itertools
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, Generic

import msgspec

if sys.version_info >= (3, 13):
    from typing import TypeVar
else:  # a TypeVar default (PEP 696): a bare ``happen.Event`` means ``Event[Any]``
    from typing_extensions import TypeVar

__all__ = [
    "CausalContext",
    "Event",
    "current_event",
    "external_context",
    "new_context",
]

#: How many node ids ``CausalContext.path`` keeps: the last hops of the flow. A flow that
#: travels further keeps counting in ``hops``, so neither a frame nor the cost of a send grows
#: with the length of the flow.
PATH_LENGTH = 16
#: ``hops`` stops growing here (the largest signed 64-bit int), so a forged count
#: cannot make the sends of the handler that receives it unencodable.
_MAX_HOPS = 2**63 - 1

P = TypeVar("P", default=Any)


class CausalContext(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """Where an event comes from.

    - ``id``: unique id of this event.
    - ``sender``: id of the node that sent it.
    - ``causation_id``: id of the event whose handler sent this one, or ``None`` for a root.
    - ``correlation_id``: id of the root event of this flow.
    - ``path``: the node ids of the flow's last hops, the sender last: at most
      ``PATH_LENGTH`` (16); older ones are dropped.
    - ``timestamp``: when it was sent, epoch milliseconds.
    - ``hops``: how many sends the flow has travelled in all, this one included (1 for a
      root event): ``len(path)`` until the path is cut. ``0`` in a context a foreign client
      built without counting; read it as ``len(path)``.
    - ``trace``: the W3C ``traceparent`` of the call that sent it, when the sending system
      traces its calls (``happen.otel``), else ``None``. An event sent from a handler carries
      its own call's, or else the handled event's.
    """

    id: str
    sender: str
    correlation_id: str
    path: tuple[str, ...] = ()
    timestamp: int = 0
    causation_id: str | None = None
    hops: int = 0
    trace: str | None = None


class Event(msgspec.Struct, Generic[P], frozen=True):
    """An event: a ``type``, a ``payload`` and its causal ``context``.

    Generic over the payload's type: a handler whose event parameter is annotated
    ``happen.Event[Order]`` gets ``event.payload`` converted to ``Order`` before it runs (a
    payload that does not fit is refused with ``ValidationError``). A bare ``happen.Event``
    is ``Event[Any]``: the payload as decoded.

    In a handler of a streamed broadcast, ``stream`` is an async iterator of the items the
    broadcaster publishes; otherwise it is ``None``.

    ``delivery`` is the attempt number, 1 on the first execution of this event on its node,
    2 on the first retry, and so on (see the node's ``max_attempts``).

    ``key`` is the key it was sent with (``send(..., key=...)``): at most one event of a key
    runs at a time on the node, in the order the node accepted them. ``None``: unkeyed.
    """

    type: str
    payload: P = None  # type: ignore[assignment]  # an event without a payload carries None
    context: CausalContext = msgspec.field(
        default_factory=lambda: CausalContext(id="", sender="", correlation_id="")
    )
    stream: AsyncIterator[Any] | None = None
    delivery: int = 1
    key: str | None = None


#: The event whose handler is running in the current task (None outside handlers).
current_event: contextvars.ContextVar[Event | None] = contextvars.ContextVar(
    "happen_current_event", default=None
)


class IdGenerator:
    """Unique, cheap event ids: a random per-system prefix and a counter."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


def external_context(ids: IdGenerator) -> CausalContext:
    """The context of an event from a foreign client, which sent none."""
    event_id = ids()
    return CausalContext(event_id, "external", event_id, ("external",))


def new_context(
    ids: IdGenerator, sender: str, trace: str | None = None, event_id: str | None = None
) -> CausalContext:
    """The context of an event sent by ``sender`` now, inheriting from the running handler.

    Constant cost per hop: the path keeps its last ``PATH_LENGTH`` ids and ``hops`` counts.
    ``trace`` (the sending call's traceparent) defaults to the handled event's; ``event_id``
    (a new unique id when left out) is the event's id.
    """
    if event_id is None:
        event_id = ids()
    parent = current_event.get()
    now = time.time_ns() // 1_000_000
    if parent is None:
        return CausalContext(event_id, sender, event_id, (sender,), now, None, 1, trace)
    ctx = parent.context
    if trace is None:
        trace = ctx.trace
    path = ctx.path
    travelled = len(path)
    hops = ctx.hops
    if hops < travelled:  # a context that did not count (a foreign client's)
        hops = travelled
    if hops < _MAX_HOPS:
        hops += 1
    if travelled >= PATH_LENGTH:
        path = path[travelled - PATH_LENGTH + 1 :]
    return CausalContext(
        event_id, sender, ctx.correlation_id, (*path, sender), now, ctx.id, hops, trace
    )
