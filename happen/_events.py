"""Events and their causal context, and the context variable that carries causality."""

from __future__ import annotations

import contextvars
import itertools
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

__all__ = ["CausalContext", "Event", "current_event", "external_context", "new_context"]


class CausalContext(msgspec.Struct, frozen=True, omit_defaults=True):
    """Where an event comes from.

    - ``id``: unique id of this event.
    - ``sender``: id of the node that sent it.
    - ``causation_id``: id of the event whose handler sent this one, or ``None`` for a root.
    - ``correlation_id``: id of the root event of this flow.
    - ``path``: node ids the flow has travelled, the sender last.
    - ``timestamp``: when it was sent, epoch milliseconds.
    """

    id: str
    sender: str
    correlation_id: str
    path: tuple[str, ...] = ()
    timestamp: int = 0
    causation_id: str | None = None


class Event(msgspec.Struct, frozen=True):
    """An event: a ``type``, a ``payload`` and its causal ``context``.

    In a handler of a streamed broadcast, ``stream`` is an async iterator of the items the
    broadcaster publishes; otherwise it is ``None``.
    """

    type: str
    payload: Any = None
    context: CausalContext = msgspec.field(
        default_factory=lambda: CausalContext(id="", sender="", correlation_id="")
    )
    stream: AsyncIterator[Any] | None = None


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


def new_context(ids: IdGenerator, sender: str) -> CausalContext:
    """The context of an event sent by ``sender`` now, inheriting from the running handler."""
    event_id = ids()
    parent = current_event.get()
    now = time.time_ns() // 1_000_000
    if parent is None:
        return CausalContext(event_id, sender, event_id, (sender,), now, None)
    ctx = parent.context
    return CausalContext(event_id, sender, ctx.correlation_id, (*ctx.path, sender), now, ctx.id)
