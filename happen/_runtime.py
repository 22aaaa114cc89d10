"""What a running system lends the objects it makes: its task spawner, its backend's
primitives, and whether it still accepts events.

A ``Runtime`` is made by the ``System`` and handed to every node and to the caller's side;
it is filled in when the system starts (the backend is known only then).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
from anyio.abc import TaskGroup

from happen._processes import ProcessPool
from happen._signal import Signal, signal_factory

__all__ = ["Runtime"]

log = logging.getLogger("happen")

_owner: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar(
    "happen_runtime", default=None
)


class Runtime:
    """The running system's facilities: spawn tasks, make signals, run sync handlers (in
    threads, or in the ``processes`` pool).

    ``state`` is ``"new"``, ``"running"``, ``"stopping"`` or ``"stopped"``; ``accepting`` is
    True while nodes admit new events.
    """

    def __init__(self, *, worker_threads: int, process_workers: int = 1) -> None:
        self.state = "new"
        self.accepting = False
        self.cancelled: type[BaseException] = BaseException
        self.signal: Callable[[], Signal] = anyio.Event
        self.limiter: anyio.CapacityLimiter | None = None
        self._threads = worker_threads
        self.processes = ProcessPool(process_workers)
        self._tg: TaskGroup | None = None
        self._scopes: set[anyio.CancelScope] = set()
        self._cancelling = False
        self._tasks_done: anyio.Event | None = None
        self._syncing = 0
        #: Whether a subscription asked for is not live yet (read on every send: an
        #: attribute, not a property).
        self.syncing = False
        self._settled: anyio.Event | None = None
        self._loop_thread: int | None = None

    def new_signal(self) -> Signal:
        """A one-shot event of the running backend (the cheapest kind)."""
        return self.signal()

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def tasks(self) -> int:
        """How many tasks the system runs now."""
        return len(self._scopes)

    def bind(self, tg: TaskGroup) -> None:
        """Called by ``System.start`` inside the event loop."""
        self.cancelled = anyio.get_cancelled_exc_class()
        self.signal = signal_factory()
        self.limiter = anyio.CapacityLimiter(self._threads)
        self._tg = tg
        self._cancelling = False
        self._loop_thread = threading.get_ident()

    def unbind(self) -> TaskGroup | None:
        tg, self._tg = self._tg, None
        return tg

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` as a task of the system, in a cancel scope of its own."""
        tg = self._tg
        if tg is None:
            raise RuntimeError("the system is not running: no task can be started")
        tg.start_soon(self._run, fn, args)

    def start_outside(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in the system's task group, but not as one of the tasks that
        ``cancel_tasks`` cancels (the stop sequence itself)."""
        tg = self._tg
        if tg is None:
            raise RuntimeError("the system is not running: no task can be started")
        tg.start_soon(fn, *args)

    def in_loop_thread(self) -> bool:
        """Whether this runs on the event loop's thread (not a worker thread's)."""
        return threading.get_ident() == self._loop_thread

    def inside_task(self) -> bool:
        """Whether the current task is one of this system's (a handler, a worker...)."""
        return _owner.get() is self

    async def _run(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        # Each task runs in its own scope, so stop() can cancel the system's tasks without
        # cancelling the code that entered the system's task group.
        _owner.set(self)
        scope = anyio.CancelScope()
        self._scopes.add(scope)
        if self._cancelling:
            scope.cancel()
        try:
            with scope:
                await fn(*args)
        except Exception:  # a bug of ours: logged, never raised into the system's task group
            log.exception("a task of the system failed")
        finally:
            self._scopes.discard(scope)
            if not self._scopes and self._tasks_done is not None:
                event, self._tasks_done = self._tasks_done, None
                event.set()

    async def cancel_tasks(self) -> None:
        """Cancel every task the system spawned and wait until they have all ended."""
        self._cancelling = True
        while self._scopes:
            for scope in list(self._scopes):
                scope.cancel()
            if self._tasks_done is None:
                self._tasks_done = anyio.Event()
            await self._tasks_done.wait()

    # ----- subscriptions being brought up to date ------------------------------------

    def sync_started(self) -> None:
        self._syncing += 1
        self.syncing = True

    def sync_ended(self) -> None:
        self._syncing -= 1
        self.syncing = self._syncing > 0
        if not self._syncing and self._settled is not None:
            event, self._settled = self._settled, None
            event.set()

    async def settled(self) -> None:
        """Wait until every subscription asked for so far is live."""
        while self._syncing:
            if self._settled is None:
                self._settled = anyio.Event()
            await self._settled.wait()
