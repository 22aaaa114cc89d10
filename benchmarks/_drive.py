"""Ways to drive an operation: closed loops of N workers, floods, open-loop schedules."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from benchmarks._harness import Sample

#: How long each round warms up (connections, caches, JIT-free but allocator-warm) before timing.
WARMUP = 0.1


Operation = Callable[[], Awaitable[int]]


async def closed_loop(
    operation: Operation | Sequence[Operation], duration: float, workers: int = 1
) -> Sample:
    """``workers`` tasks repeat an operation until the deadline; units done per second.

    An operation returns how many units it completed (1 for a request, N for a stream of N).
    Given a sequence, worker i runs ``operation[i]`` (and ``workers`` is its length). Measured
    from the start until the last worker finishes its last operation.
    """
    operations = [operation] * workers if callable(operation) else list(operation)
    await _repeat(operations, min(WARMUP, duration / 5))
    done, elapsed = await _repeat(operations, duration)
    return Sample(done / elapsed, {"units": done, "seconds": round(elapsed, 4)})


async def _repeat(operations: list[Operation], duration: float) -> tuple[int, float]:
    counts = [0] * len(operations)
    start = time.perf_counter()
    deadline = start + duration

    async def worker(index: int) -> None:
        operation = operations[index]
        count = 0
        while time.perf_counter() < deadline:
            count += await operation()
        counts[index] = count

    async with anyio.create_task_group() as tg:
        for index in range(len(operations)):
            tg.start_soon(worker, index)
    return sum(counts), time.perf_counter() - start


class Arrivals:
    """Counts deliveries at a consumer; ``wait_for(n)`` returns when ``n`` have arrived."""

    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0
        self._target = -1
        self._reached = anyio.Event()

    def arrived(self) -> None:
        self.count += 1
        self.last = time.perf_counter()
        if self.count == self._target:
            self._reached.set()

    def reset(self) -> None:
        self.count = 0
        self._target = -1
        self._reached = anyio.Event()

    async def wait_for(
        self, target: int, within: float = 10.0, lost: Callable[[], int] | None = None
    ) -> bool:
        """Wait until ``target`` arrived (or arrivals + ``lost()`` did); False after ``within``."""
        self._target = target
        if self.count >= target:
            return True
        with anyio.move_on_after(within):
            if lost is None:
                await self._reached.wait()
                return True
            while self.count + lost() < target:
                with anyio.move_on_after(0.02):
                    await self._reached.wait()
            return True
        return False


async def flood(
    publish: Callable[[], Awaitable[object]],
    arrivals: Arrivals,
    duration: float,
    *,
    settle: Callable[[], Awaitable[object]] | None = None,
    lost: Callable[[], int] | None = None,
) -> Sample:
    """Publish as fast as possible until the deadline; deliveries per second at the consumer.

    The figure is arrivals / (time of the last arrival - start), so the consumer's backlog is
    included. Messages lost on the way (``lost()``, e.g. a subscriber's dropped count) are
    reported in the notes.
    """
    arrivals.reset()
    warm_deadline = time.perf_counter() + min(WARMUP, duration / 5)
    sent = 0
    while time.perf_counter() < warm_deadline:
        await publish()
        sent += 1
    if settle is not None:
        await settle()
    await arrivals.wait_for(sent, lost=lost)
    since = _since(lost)
    arrivals.reset()

    start = time.perf_counter()
    deadline = start + duration
    sent = 0
    while time.perf_counter() < deadline:
        await publish()
        sent += 1
    if settle is not None:
        await settle()
    complete = await arrivals.wait_for(sent, lost=since)
    elapsed = (arrivals.last if arrivals.count else time.perf_counter()) - start
    notes: dict[str, object] = {"sent": sent, "arrived": arrivals.count}
    if since is not None:
        notes["lost"] = since()
    if not complete:
        notes["summary"] = f"only {arrivals.count} of {sent} arrived within 10 s"
    return Sample(arrivals.count / elapsed, notes)


def _since(lost: Callable[[], int] | None) -> Callable[[], int] | None:
    """A counter of what ``lost`` counts from now on."""
    if lost is None:
        return None
    count: Callable[[], int] = lost
    before = count()
    return lambda: count() - before


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of an already sorted list, nearest-rank."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


async def pooled_capacity(
    operation: Callable[[], Awaitable[object]], duration: float, workers: int
) -> float:
    """Operations per second when a feeder hands work to ``workers`` tasks as fast as they take
    it: the throughput of the same path :func:`open_loop` drives (its hop included)."""
    issue, issued = anyio.create_memory_object_stream[float](0)
    done = 0

    async def worker() -> None:
        nonlocal done
        async for _ in issued:
            await operation()
            done += 1

    async with anyio.create_task_group() as tg:
        await start_pool(tg, worker, workers)
        with issue:
            start = time.perf_counter()
            deadline = start + duration
            while (now := time.perf_counter()) < deadline:
                await issue.send(now)
    return done / (time.perf_counter() - start)


async def start_pool(tg: TaskGroup, worker: Callable[[], Awaitable[None]], workers: int) -> None:
    """Start ``workers`` copies of ``worker``, then freeze the heap: these long-lived tasks
    would otherwise make every full collection a pause of tens of milliseconds."""
    for _ in range(workers):
        tg.start_soon(worker)
    await anyio.lowlevel.checkpoint()
    gc.collect()
    gc.freeze()


async def open_loop(
    operation: Callable[[], Awaitable[object]],
    rate: float,
    duration: float,
    workers: int = 1000,
) -> tuple[list[float], list[float], dict[str, int]]:
    """Issue ``operation`` on a schedule of ``rate`` per second, not waiting for replies.

    A scheduler task hands issue times to a pool of ``workers`` tasks through an unbounded
    memory stream (cheaper than a task per operation, so the driver stays light), so an
    operation waits only if every worker is busy. Returns each successful operation's latency
    (from issue to completion, any wait for a free worker included), each issue's lag behind
    its schedule (the driver's own slack; both in seconds), and failures by exception type.
    """
    latencies: list[float] = []
    lags: list[float] = []
    failures: dict[str, int] = {}
    total = max(1, int(rate * duration))
    interval = 1.0 / rate
    issue, issued = anyio.create_memory_object_stream[float](math.inf)

    async def worker() -> None:
        async for at in issued:
            try:
                await operation()
            except Exception as exc:
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
            else:
                latencies.append(time.perf_counter() - at)

    async with anyio.create_task_group() as tg:
        await start_pool(tg, worker, workers)
        with issue:
            start = time.perf_counter()
            done = 0
            while done < total:
                now = time.perf_counter()
                due = min(total, int((now - start) * rate) + 1)
                while done < due:
                    lags.append(now - (start + done * interval))
                    issue.send_nowait(now)
                    done += 1
                await anyio.sleep(min(interval, 0.001))
    return latencies, lags, failures
