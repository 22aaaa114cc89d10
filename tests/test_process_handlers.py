"""CPU-bound handlers: ``node.on(pattern, fn, executor="process")`` runs a sync function in
the system's pool of worker processes, on several cores at once, without blocking the loop.

The handlers live at module level: worker processes import them from this module.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import anyio
import msgspec
import pytest

import happen
from tests.helpers import assert_accounted, drained, eventually, make_system

pytestmark = pytest.mark.anyio


def worker_pid(event: happen.Event, context: dict[str, Any]) -> dict[str, Any]:
    return {"pid": os.getpid(), "payload": event.payload, "sender": event.context.sender}


def busy(event: happen.Event, context: dict[str, Any]) -> dict[str, float]:
    """Burn ``event.payload`` seconds of this process's CPU time; report when and how much."""
    started = time.time()
    cpu = time.process_time()
    while time.process_time() - cpu < event.payload:
        pass
    return {"start": started, "end": time.time(), "cpu": time.process_time() - cpu}


def sleepy(event: happen.Event, context: dict[str, Any]) -> int:
    time.sleep(event.payload)
    return os.getpid()


def fails(event: happen.Event, context: dict[str, Any]) -> None:
    raise ValueError(f"no good: {event.payload}")


def returns_a_lock(event: happen.Event, context: dict[str, Any]) -> Any:
    return threading.Lock()


class Order(msgspec.Struct):
    id: int


def order_id(event: happen.Event[Order], context: dict[str, Any]) -> int:
    assert isinstance(event.payload, Order)
    return event.payload.id


class Hidden(msgspec.Struct):
    x: int


Unpicklable = Hidden  # pickle finds a class by its name, and this one's name is gone
del Hidden


def takes_unpicklable(event: happen.Event[Unpicklable], context: dict[str, Any]) -> int:
    return event.payload.x


class Doubler:
    """A picklable callable instance."""

    def __call__(self, event: happen.Event, context: dict[str, Any]) -> int:
        return 2 * int(event.payload)


async def test_a_process_handler_runs_in_another_process(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        cruncher = system.create_node("cruncher")
        unregister = cruncher.on("pid", worker_pid, executor="process")
        cruncher.on("double", Doubler(), executor="process")

        client = system.create_node("client")
        result = await client.send("cruncher", {"type": "pid", "payload": [1, 2]})
        assert result["pid"] != os.getpid()
        assert result["payload"] == [1, 2] and result["sender"] == "client"
        assert await client.send("cruncher", {"type": "double", "payload": 21}) == 42
        await drained(cruncher)
        assert_accounted(cruncher, sent=2)
        unregister()
        with pytest.raises(happen.NoHandlerError):
            await client.send("cruncher", {"type": "pid"})


async def test_decorator_form_and_typed_payloads(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        cruncher = system.create_node("cruncher")
        assert cruncher.on("order", executor="process")(order_id) is order_id
        client = system.create_node("client")
        assert await client.send("cruncher", {"type": "order", "payload": {"id": 7}}) == 7
        with pytest.raises(happen.ValidationError):
            await client.send("cruncher", {"type": "order", "payload": {"id": "seven"}})


def burn(seconds: float) -> float:
    """The control's task: ``busy`` without happen."""
    cpu = time.process_time()
    while time.process_time() - cpu < seconds:
        pass
    return time.process_time() - cpu


def bare_pool_wall(seconds: float) -> float:
    """Wall time of two ``burn(seconds)`` in a bare process pool of two (the control)."""
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        list(pool.map(burn, [0.01, 0.01]))  # both workers started
        started = time.monotonic()
        list(pool.map(burn, [seconds, seconds]))
        return time.monotonic() - started


async def test_process_handlers_run_on_several_cores_at_once(transport_url: str) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores is None or cores < 2:
        pytest.skip("one core: nothing can run in parallel")
    async with make_system(transport_url, process_workers=2) as system:
        cruncher = system.create_node("cruncher")
        cruncher.on("busy", busy, executor="process")
        client = system.create_node("client")

        async def run_two(seconds: float) -> tuple[float, list[dict[str, float]]]:
            results: list[dict[str, float]] = []

            async def one() -> None:
                results.append(await client.send("cruncher", {"type": "busy", "payload": seconds}))

            started = time.monotonic()
            async with anyio.create_task_group() as tg:
                tg.start_soon(one)
                tg.start_soon(one)
            return time.monotonic() - started, results

        await run_two(0.01)  # both worker processes started
        # Each task burns 0.5 s of CPU time in its own process: one after the other they need
        # 1 s of wall time, on two cores about 0.5 s. Others may be using this machine's
        # cores: a few attempts are allowed, each beside a control (a bare process pool doing
        # the same), and a machine where even the control never runs two at once is skipped.
        walls: list[float] = []
        controls: list[float] = []
        for _attempt in range(5):
            controls.append(await anyio.to_thread.run_sync(bare_pool_wall, 0.5))
            wall, results = await run_two(0.5)
            walls.append(wall)
            assert all(r["cpu"] >= 0.5 for r in results)
            # Both ran at the same time: each started before the other ended.
            assert max(r["start"] for r in results) < min(r["end"] for r in results)
            if wall < 0.85:
                return
        if min(controls) >= 0.85:
            pytest.skip(f"fewer than two free cores: a bare process pool took {controls} s")
        raise AssertionError(f"two 0.5 s CPU-bound handlers took {walls} s (control {controls})")


async def test_the_event_loop_is_not_blocked(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        cruncher = system.create_node("cruncher")
        cruncher.on("sleepy", sleepy, executor="process")
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await anyio.sleep(0.01)

        client = system.create_node("client")
        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            assert await client.send("cruncher", {"type": "sleepy", "payload": 0.3}) != os.getpid()
            tg.cancel_scope.cancel()
        assert ticks >= 10


async def test_process_workers_bounds_how_many_run_at_once(transport_url: str) -> None:
    async with make_system(transport_url, process_workers=1) as system:
        cruncher = system.create_node("cruncher")
        cruncher.on("busy", busy, executor="process")
        client = system.create_node("client")
        results: list[dict[str, float]] = []

        async def one() -> None:
            results.append(await client.send("cruncher", {"type": "busy", "payload": 0.1}))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one)
        spans = sorted((r["start"], r["end"]) for r in results)
        assert all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(spans))


async def test_failures_reach_the_caller_as_handler_errors(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        cruncher = system.create_node("cruncher")
        cruncher.on("fails", fails, executor="process")
        cruncher.on("lock", returns_a_lock, executor="process")
        cruncher.on("hidden", takes_unpicklable, executor="process")
        client = system.create_node("client")
        with pytest.raises(happen.HandlerError, match="no good: 3") as raised:
            await client.send("cruncher", {"type": "fails", "payload": 3})
        assert raised.value.remote_type == "ValueError"
        with pytest.raises(happen.HandlerError, match="result of process handler") as raised:
            await client.send("cruncher", {"type": "lock"})
        assert "returns_a_lock" in raised.value.remote_message
        assert "cannot be pickled" in raised.value.remote_message
        with pytest.raises(happen.HandlerError, match="event for process handler") as raised:
            await client.send("cruncher", {"type": "hidden", "payload": {"x": 1}})
        assert "takes_unpicklable" in raised.value.remote_message
        await drained(cruncher)
        stats = assert_accounted(cruncher, sent=3)
        assert stats.failed == 3


async def test_what_cannot_run_in_a_process_is_refused_at_registration(
    transport_url: str,
) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("n")

        async def coroutine(event: happen.Event, context: dict[str, Any]) -> None:
            pass

        async def agen(event: happen.Event, context: dict[str, Any]) -> Any:
            yield 1

        def nested(event: happen.Event, context: dict[str, Any]) -> None:
            pass

        with pytest.raises(TypeError, match="async"):
            node.on("a", coroutine, executor="process")
        with pytest.raises(TypeError, match="async"):
            node.on("a", agen, executor="process")
        with pytest.raises(TypeError, match="cannot be pickled"):
            node.on("a", lambda e, c: None, executor="process")
        with pytest.raises(TypeError, match="cannot be pickled"):
            node.on("a", nested, executor="process")
        with pytest.raises(TypeError, match="callable"):
            node.on("a", 42, executor="process")  # type: ignore[call-overload]
        with pytest.raises(ValueError, match="executor"):
            node.on("a", worker_pid, executor="thread")  # type: ignore[call-overload]
        assert not node.hears("a")


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2", True])
def test_process_workers_is_validated(workers: Any) -> None:
    with pytest.raises(happen.InvalidConfigError, match="process_workers"):
        happen.System(process_workers=workers)


async def test_a_timeout_answers_the_caller_at_once(transport_url: str) -> None:
    async with make_system(transport_url, process_workers=1) as system:
        cruncher = system.create_node("cruncher")
        cruncher.on("sleepy", sleepy, executor="process")
        client = system.create_node("client")
        started = time.monotonic()
        with pytest.raises(happen.SendTimeout):
            await client.send("cruncher", {"type": "sleepy", "payload": 1.0}, timeout=0.2)
        assert time.monotonic() - started < 0.8
        await drained(cruncher)
        assert cruncher.stats().failed == 1


async def test_the_workers_exit_when_the_system_stops(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        cruncher = system.create_node("cruncher")
        cruncher.on("pid", worker_pid, executor="process")
        client = system.create_node("client")
        pid = (await client.send("cruncher", {"type": "pid"}))["pid"]

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await eventually(gone, timeout=10)


async def test_middleware_wraps_a_process_handler(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        seen: list[str] = []

        @system.use
        async def around(
            event: happen.Event, context: dict[str, Any], call_next: happen.CallNext
        ) -> Any:
            seen.append(event.type)
            return {"wrapped": await call_next(event)}

        cruncher = system.create_node("cruncher")
        cruncher.on("double", Doubler(), executor="process")
        client = system.create_node("client")
        assert await client.send("cruncher", {"type": "double", "payload": 4}) == {"wrapped": 8}
        assert seen == ["double"]
