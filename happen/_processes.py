"""CPU-bound handlers (``executor="process"``): sync functions run in worker processes.

Python threads do not run Python code in parallel; processes do. A system's pool has at most
``process_workers`` processes, is made on first use and is shut down when the system stops.
The event loop never blocks on it: each call waits for its result on a worker thread, and at
most ``process_workers`` calls are handed to the pool at once.

Workers are started with ``forkserver`` where the platform has it (else ``spawn``), never by
forking the running process (whose threads could hold locks): a handler is pickled by
reference, so its module must be importable by the workers.
"""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import anyio

from happen._events import Event

__all__ = ["ProcessHandler", "ProcessPool"]


def _start_method() -> str:
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def _name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or fn)


def run_pickled(data: bytes) -> bytes:
    """In a worker process: unpickle a call, run it, pickle its result."""
    fn, event, context = pickle.loads(data)
    result = fn(event, context)
    try:
        return pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            f"the result of process handler {_name(fn)!r} (a {type(result).__name__}) cannot "
            f"be pickled to return it from its worker process: {exc}"
        ) from None


class ProcessPool:
    """A system's worker processes for CPU-bound handlers, made on first use."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._waiting: anyio.CapacityLimiter | None = None  # calls handed to the pool

    def handler(self, fn: Callable[..., Any]) -> ProcessHandler:
        """``fn`` as an async handler that runs it in this pool."""
        return ProcessHandler(fn, self)

    async def run(self, fn: Callable[..., Any], event: Event, context: dict[str, Any]) -> Any:
        """``fn(event, context)`` in a worker process; its result.

        Raises ``TypeError`` when the event or the result cannot be pickled (naming the
        handler), what ``fn`` raised, or ``BrokenProcessPool`` when a worker died (the next
        call starts a new pool).
        """
        if event.stream is not None:
            raise TypeError(
                f"process handler {_name(fn)!r} cannot read a streamed broadcast: its "
                "event.stream stays in the system's process"
            )
        try:
            data = pickle.dumps((fn, event, context), pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"the event for process handler {_name(fn)!r} cannot be pickled to send it to "
                f"a worker process: {exc}"
            ) from None
        if self._waiting is None:
            self._waiting = anyio.CapacityLimiter(self.workers)
        executor = self._executor
        if executor is None:
            context_ = multiprocessing.get_context(_start_method())
            executor = self._executor = ProcessPoolExecutor(self.workers, mp_context=context_)
        submitted: list[Future[bytes]] = []

        def call() -> bytes:  # on a worker thread: starting processes may take a while
            future = executor.submit(run_pickled, data)
            submitted.append(future)
            return future.result()

        try:
            result = await anyio.to_thread.run_sync(
                call, limiter=self._waiting, abandon_on_cancel=True
            )
        except BrokenProcessPool:
            if self._executor is executor:  # the next call starts a new pool
                self._executor = None
                executor.shutdown(wait=False, cancel_futures=True)
            raise
        except BaseException:
            for future in submitted:
                future.cancel()  # not started yet: it never will be
            raise
        return pickle.loads(result)

    def shutdown(self) -> None:
        """Cancel the calls not started; the workers exit once their current call returns
        (a running Python function cannot be interrupted)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


class ProcessHandler:
    """A sync handler registered with ``executor="process"``, called like an async one."""

    __slots__ = ("fn", "pool")

    def __init__(self, fn: Callable[..., Any], pool: ProcessPool) -> None:
        self.fn = fn
        self.pool = pool

    async def __call__(self, event: Event, context: dict[str, Any]) -> Any:
        return await self.pool.run(self.fn, event, context)
