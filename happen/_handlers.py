"""Handler registration and selection, and the event continuum."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import anyio

from happen._events import Event
from happen._patterns import Pattern

__all__ = ["Handler", "HandlerTable", "invoke"]

ASYNC, AGEN, SYNC = 0, 1, 2


def classify(fn: Callable[..., Any]) -> int:
    """How to call ``fn``: awaited, iterated (async generator), or in a worker thread."""
    if not callable(fn):
        raise TypeError(f"a handler must be callable, not {type(fn).__name__}")
    target: Any = fn
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        call = getattr(fn, "__call__", None)  # noqa: B004 (an instance with an async __call__)
        if inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call):
            target = call
    if inspect.isasyncgenfunction(target):
        return AGEN
    if inspect.iscoroutinefunction(target):
        return ASYNC
    if inspect.isgeneratorfunction(target):
        raise TypeError(
            f"handler {getattr(fn, '__name__', fn)!r} is a sync generator: write it as "
            "'async def' with 'yield' to stream results"
        )
    return SYNC


class Handler:
    """A registered handler and the pattern it answers."""

    __slots__ = ("fn", "kind", "pattern")

    def __init__(self, pattern: Pattern, fn: Callable[..., Any]) -> None:
        self.pattern = pattern
        self.fn = fn
        self.kind = classify(fn)


class HandlerTable:
    """A node's handlers, in registration order.

    Selection: the first registered handler whose pattern is the exact event type; if none,
    the first registered glob or predicate that matches. Results are cached per type.
    """

    __slots__ = ("_cache", "handlers")

    def __init__(self) -> None:
        self.handlers: list[Handler] = []
        self._cache: dict[str, Handler | None] = {}

    def add(self, handler: Handler) -> None:
        self.handlers.append(handler)
        self._cache.clear()

    def remove(self, handler: Handler) -> bool:
        try:
            self.handlers.remove(handler)
        except ValueError:
            return False
        self._cache.clear()
        return True

    def select(self, event_type: str) -> Handler | None:
        try:
            return self._cache[event_type]
        except KeyError:
            pass
        found: Handler | None = None
        for handler in self.handlers:
            if handler.pattern.exact == event_type:
                found = handler
                break
        if found is None:
            for handler in self.handlers:
                if handler.pattern.exact is None and handler.pattern.matches(event_type):
                    found = handler
                    break
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[event_type] = found
        return found

    def subjects(self) -> set[str]:
        return {handler.pattern.subject for handler in self.handlers}


async def invoke(
    fn: Callable[..., Any],
    kind: int,
    event: Event,
    context: dict[str, Any],
    limiter: anyio.CapacityLimiter,
) -> Any:
    """Run a handler and its continuum; return the result or an async generator to stream."""
    while True:
        if kind == ASYNC:
            result = await fn(event, context)
        elif kind == AGEN:
            return fn(event, context)
        else:
            result = await anyio.to_thread.run_sync(
                fn, event, context, limiter=limiter, abandon_on_cancel=True
            )
            if inspect.isawaitable(result):
                result = await result
        if not callable(result):
            return result
        fn = result
        kind = classify(fn)
