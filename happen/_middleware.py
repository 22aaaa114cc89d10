"""Middleware: code that wraps every handler execution of a system or of a node.

A middleware is ``async def mw(event, context, call_next)``. ``await call_next(event)`` runs
the rest of the chain and then the handler (with its continuum) and returns the handler's
result; for a generator handler, the async generator of its items. What the middleware
returns is the result; what it raises fails the call.

A node's chain is the system's middleware, then the node's own, each list in registration
order, the first registered outermost. A node with no middleware in either list runs its
handlers directly: ``MiddlewareStack.chain`` is then an empty tuple.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Awaitable
from typing import Any, Protocol

import anyio

from happen._events import Event
from happen._handlers import Handler, invoke

__all__ = ["CallNext", "Middleware", "MiddlewareStack", "current_node_id", "run_chain"]

#: The id of the node whose middleware chain runs in the current task.
_node_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "happen_middleware_node", default=None
)


def current_node_id() -> str | None:
    """The id of the node whose middleware is running, inside a middleware (else None)."""
    return _node_id.get()


class CallNext(Protocol):
    """What a middleware calls to run the rest of the chain and the handler:
    ``result = await call_next(event)`` (for a generator handler, an async generator)."""

    def __call__(self, event: Event, /) -> Awaitable[Any]: ...


class Middleware(Protocol):
    """``async def middleware(event, context, call_next) -> result``, given to
    ``System.use`` or ``Node.use``: it wraps every handler execution."""

    def __call__(
        self, event: Event, context: dict[str, Any], call_next: CallNext, /
    ) -> Awaitable[Any]: ...


def check_middleware(mw: Any) -> None:
    """Refuse what cannot be a middleware (``TypeError``): it must be an async function of
    ``(event, context, call_next)`` (or an object with such an ``async __call__``)."""
    if not callable(mw):
        raise TypeError(f"a middleware must be callable, not {type(mw).__name__}")
    target: Any = mw
    if not (inspect.isfunction(mw) or inspect.ismethod(mw)):
        call = getattr(mw, "__call__", None)  # noqa: B004 (an instance with an async __call__)
        if inspect.iscoroutinefunction(call):
            target = call
    if not inspect.iscoroutinefunction(target):
        name = getattr(mw, "__name__", type(mw).__name__)
        raise TypeError(
            f"middleware {name!r} must be 'async def {name}(event, context, call_next)'"
        )


class MiddlewareStack:
    """One list of middleware, and the chain it makes with the lists it is nested in.

    The system has one; each node has one nested in the system's. ``chain`` is the outer
    lists' middleware, then this list's, in registration order; it is rebuilt when any of
    them changes, so reading it costs one attribute lookup.
    """

    __slots__ = ("_inner", "_outer", "_own", "chain")

    def __init__(self, outer: MiddlewareStack | None = None) -> None:
        self._outer = outer
        self._own: list[Middleware] = []
        self._inner: list[MiddlewareStack] = []
        self.chain: tuple[Middleware, ...] = outer.chain if outer is not None else ()
        if outer is not None:
            outer._inner.append(self)

    def add(self, mw: Middleware) -> None:
        """Append ``mw`` (innermost of this list); ``TypeError`` if it is not a middleware."""
        check_middleware(mw)
        self._own.append(mw)
        self._rebuild()

    def _rebuild(self) -> None:
        outer = self._outer.chain if self._outer is not None else ()
        self.chain = (*outer, *self._own)
        for inner in self._inner:
            inner._rebuild()


async def run_chain(
    chain: tuple[Middleware, ...],
    node_id: str,
    handler: Handler,
    event: Event,
    limiter: anyio.CapacityLimiter,
    made: list[Any],
) -> Any:
    """Run ``event`` through ``chain`` and the handler; return what the outermost returns.

    Every async generator the handler makes is appended to ``made``, so that the node can
    close it when the execution ends, whatever a middleware did with it (a wrapper does not
    close what it wraps when it is closed early).
    """
    context: dict[str, Any] = {}
    last = len(chain)

    def call_next_at(index: int) -> CallNext:
        async def call_next(event: Event) -> Any:
            if not isinstance(event, Event):
                raise TypeError(
                    f"call_next takes the happen.Event to handle, not {type(event).__name__}"
                )
            if index == last:
                result = await invoke(handler.fn, handler.kind, event, context, limiter)
                if inspect.isasyncgen(result):
                    made.append(result)
                return result
            return await chain[index](event, context, call_next_at(index + 1))

        return call_next

    token = _node_id.set(node_id)
    try:
        return await chain[0](event, context, call_next_at(1))
    finally:
        _node_id.reset(token)
