"""One-shot wake-ups for the hot path, cheaper than ``anyio.Event`` on asyncio.

``anyio.Event()`` looks up the running backend on every construction; a request needs two of
them. The system picks a factory once, at start: a bare future under asyncio, trio's own
``Event`` under trio. Both are cancelled by anyio cancel scopes like any other await.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

__all__ = ["Signal", "signal_factory"]


class Signal(Protocol):
    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self) -> Awaitable[None]: ...


class FutureSignal:
    """A one-shot event on an asyncio future.

    ``wait()`` returns the future itself, so a waiter awaits it without a coroutine of its
    own (a done future returns at once). The future is made directly: the running loop's
    ``create_future`` (a Python method under asyncio) makes the same kind.
    """

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] = asyncio.Future()

    def set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def is_set(self) -> bool:
        return self._future.done()

    def wait(self) -> Awaitable[None]:
        return self._future


def signal_factory() -> Callable[[], Signal]:
    """The cheapest one-shot event for the running backend (call inside the event loop)."""
    cancelled = anyio.get_cancelled_exc_class()
    if cancelled is asyncio.CancelledError:
        return FutureSignal
    if cancelled.__module__.startswith("trio"):
        import trio

        return trio.Event
    return anyio.Event
