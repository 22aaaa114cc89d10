"""Watching the calls a system's nodes make: the caller's side of tracing.

A ``CallObserver`` given to ``System.observe_calls`` is told when each ``send``, ``stream``
and ``broadcast`` starts; the ``CallWatch`` it returns is told once when that call ends, and
may name a trace context for the event to carry (``CausalContext.trace``). ``happen.otel``
is one: a client span per call. A system without an observer pays nothing for this.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["CallObserver", "CallWatch"]


class CallWatch(Protocol):
    """One call, watched from its start to its end.

    ``trace`` is the W3C ``traceparent`` the sent event carries in its causal context
    (``None``: the event carries the handled event's, as without an observer).
    """

    @property
    def trace(self) -> str | None: ...

    def ended(self, error: BaseException | None) -> None:
        """The call ended: its result arrived, its stream ended or was closed, its broadcast
        was published (``error`` is ``None``), or it failed with ``error``. Called once;
        must not raise or block."""
        ...


class CallObserver(Protocol):
    """Told of every call a system's nodes make; see ``System.observe_calls``."""

    def call_started(
        self, operation: str, sender: str, target: str | None, event_type: str
    ) -> CallWatch:
        """A call starts: ``operation`` is ``"send"``, ``"stream"`` or ``"broadcast"``,
        ``target`` the node id (``None`` for a broadcast). Must not raise or block."""
        ...
