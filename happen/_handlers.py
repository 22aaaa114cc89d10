"""Handler registration and selection, and the event continuum."""

from __future__ import annotations

import inspect
import pickle
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import anyio

from happen._events import Event
from happen._patterns import Pattern

__all__ = [
    "ASYNC",
    "Handler",
    "HandlerTable",
    "check_process_handler",
    "classify",
    "invoke",
    "payload_type",
]

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


def _name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or fn)


def payload_type(fn: Callable[..., Any]) -> Any:
    """``T`` when the handler's first parameter is annotated ``happen.Event[T]``, else None
    (no annotation, a bare ``happen.Event``, ``Event[Any]``).

    String annotations (``from __future__ import annotations``) are resolved with
    ``typing.get_type_hints``; one that names ``Event[...]`` but cannot be resolved (a type
    defined inside a function) raises ``TypeError``.
    """
    target: Any = fn
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        call = getattr(fn, "__call__", None)  # noqa: B004 (a callable instance)
        if inspect.isfunction(call) or inspect.ismethod(call):
            target = call
    try:
        first = next(iter(inspect.signature(target).parameters.values()), None)
    except (TypeError, ValueError):  # a builtin, or not callable: classify() says why
        return None
    if first is None or first.annotation is inspect.Parameter.empty:
        return None
    annotation = first.annotation
    if isinstance(annotation, str):
        # This one annotation, in the handler's module: the others may not resolve.
        only = types.SimpleNamespace(__annotations__={first.name: annotation})
        module = getattr(inspect.unwrap(target), "__globals__", None)
        try:
            annotation = typing.get_type_hints(only, globalns=module)[first.name]
        except Exception as exc:
            if "Event[" not in annotation:
                return None  # not a typed event: the handler gets the payload as decoded
            raise TypeError(
                f"cannot resolve the annotation {annotation!r} of handler {_name(fn)!r} "
                f"({type(exc).__name__}: {exc}): define its payload type at module level"
            ) from None
    if typing.get_origin(annotation) is not Event:
        return None
    (payload,) = typing.get_args(annotation)
    return None if payload is Any else payload


def check_process_handler(fn: Callable[..., Any]) -> None:
    """Refuse, with ``TypeError``, a handler that cannot run in a worker process: anything
    but a sync function (or callable) that pickles, by reference, into a process that
    imports its module."""
    if classify(fn) != SYNC:
        raise TypeError(
            f"handler {_name(fn)!r} is async: executor='process' runs plain sync functions "
            "(CPU-bound work); register async handlers without it"
        )
    module = getattr(fn, "__module__", None)
    if module == "__main__" and not hasattr(sys.modules["__main__"], "__file__"):
        raise TypeError(
            f"handler {_name(fn)!r} is defined in an interactive session or 'python -c', "
            "which worker processes cannot import: define it in a module or a script file"
        )
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise TypeError(
            f"handler {_name(fn)!r} cannot be pickled for executor='process' ({exc}): "
            "define it at the top level of a module (not a lambda, a nested function or "
            "a closure)"
        ) from None


class Handler:
    """A registered handler, the pattern it answers, and the converter of its payload
    (None unless its event parameter is annotated ``happen.Event[T]``)."""

    __slots__ = ("convert", "fn", "kind", "pattern")

    def __init__(
        self,
        pattern: Pattern,
        fn: Callable[..., Any],
        convert: Callable[[Any], Any] | None = None,
    ) -> None:
        self.pattern = pattern
        self.fn = fn
        self.kind = classify(fn)
        self.convert = convert


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
