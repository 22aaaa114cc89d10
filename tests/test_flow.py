"""Concurrency caps, bounded queues, priorities, pressure, and exact accounting."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

import happen
from tests.helpers import assert_accounted, drained, eventually, make_system

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"default": {"max_concurrent": 0}}, "default.max_concurrent"),
        ({"default": {"max_concurrent": "5"}}, "default.max_concurrent"),
        ({"default": {"max_concurrent": True}}, "default.max_concurrent"),
        ({"default": {"queue_limit": -1}}, "default.queue_limit"),
        ({"default": {"queue_strategy": "lifo"}}, "default.queue_strategy"),
        ({"default": {"backpressure_threshold": 0}}, "default.backpressure_threshold"),
        ({"default": {"backpressure_threshold": 1.5}}, "default.backpressure_threshold"),
        ({"default": {"speed": 1}}, "speed"),
        ({"patterns": {"api-*": {"queue_limit": -5}}}, "patterns['api-*'].queue_limit"),
        ({"patterns": {"api-*": 3}}, "patterns['api-*']"),
        ({"defaults": {}}, "defaults"),
    ],
)
def test_invalid_concurrency_settings_name_the_key(settings: dict, key: str) -> None:
    with pytest.raises(happen.InvalidConfigError) as info:
        happen.System(concurrency=settings)
    assert key in str(info.value)


def test_settings_resolve_from_least_to_most_specific_pattern() -> None:
    system = happen.System(
        concurrency={
            "default": {"max_concurrent": 10, "queue_limit": 100},
            "patterns": {
                "api-v1-*": {"queue_strategy": "priority"},
                "api-*": {"max_concurrent": 200, "queue_limit": 20_000},
                "*": {"max_concurrent": 1},
            },
        }
    )
    assert system.concurrency_for("api-v1-users") == happen.ConcurrencySettings(
        max_concurrent=200,
        queue_limit=20_000,
        queue_strategy="priority",
        backpressure_threshold=0.8,
    )
    assert system.concurrency_for("worker") == happen.ConcurrencySettings(
        max_concurrent=1, queue_limit=100
    )
    assert happen.System().concurrency_for("x") == happen.ConcurrencySettings()


async def test_at_most_max_concurrent_handlers_run_at_once(transport_url: str) -> None:
    config = {"patterns": {"capped": {"max_concurrent": 3}}}
    async with make_system(transport_url, concurrency=config) as system:
        node = system.create_node("capped")
        running = 0
        peak = 0

        @node.on("job")
        async def job(event: happen.Event, context: dict) -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await anyio.sleep(0.01)
            running -= 1
            return int(event.payload)

        client = system.create_node("client")
        results: list[int] = []

        async def one(i: int) -> None:
            results.append(await client.send("capped", {"type": "job", "payload": i}))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
        assert sorted(results) == list(range(20))
        assert peak == 3
        assert node.stats().max_concurrent == 3


@pytest.mark.parametrize("strategy", ["fifo", "priority"])
async def test_queue_order_fifo_or_by_priority(transport_url: str, strategy: str) -> None:
    config = {
        "patterns": {
            "single": {
                "max_concurrent": 1,
                "queue_strategy": strategy,
                "backpressure_threshold": 1.0,
            }
        }
    }
    async with make_system(transport_url, concurrency=config) as system:
        node = system.create_node("single")
        gate = anyio.Event()
        order: list[int] = []

        @node.on("job")
        async def job(event: happen.Event, context: dict) -> None:
            if event.payload == -1:
                await gate.wait()
            else:
                order.append(event.payload)

        client = system.create_node("client")
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.send("single", {"type": "job", "payload": -1}))
            await eventually(lambda: node.stats().active == 1)
            for i, priority in enumerate([1, 5, 1, 9, 5]):
                tg.start_soon(
                    lambda i=i, priority=priority: client.send(
                        "single", {"type": "job", "payload": i}, priority=priority
                    )
                )
                await eventually(lambda i=i: node.stats().queued == i + 1)
            gate.set()
        if strategy == "fifo":
            assert order == [0, 1, 2, 3, 4]
        else:
            assert order == [3, 1, 4, 0, 2]


async def test_full_queue_rejects_with_queue_full_error(transport_url: str) -> None:
    config = {
        "patterns": {"tiny": {"max_concurrent": 1, "queue_limit": 2, "backpressure_threshold": 1.0}}
    }
    async with make_system(transport_url, concurrency=config) as system:
        node = system.create_node("tiny")
        release = anyio.Event()

        @node.on("job")
        async def job(event: happen.Event, context: dict) -> str:
            await release.wait()
            return "ok"

        client = system.create_node("client")
        outcomes: list[str] = []

        async def one() -> None:
            try:
                outcomes.append(await client.send("tiny", {"type": "job"}))
            except happen.QueueFullError as exc:
                assert "'tiny' queue is full (2 queued)" in str(exc)
                outcomes.append("full")

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(one)
            await eventually(lambda: outcomes.count("full") == 7)
            release.set()
        assert sorted(outcomes) == ["full"] * 7 + ["ok"] * 3
        await drained(node)
        stats = assert_accounted(node, sent=10)
        assert (stats.accepted, stats.rejected, stats.completed) == (3, 7, 3)


async def test_a_local_sender_is_held_while_the_node_is_under_pressure(
    transport_url: str,
) -> None:
    # pressure band: 5 <= queued < 10
    config = {
        "patterns": {
            "busy": {"max_concurrent": 1, "queue_limit": 10, "backpressure_threshold": 0.5}
        }
    }
    async with make_system(transport_url, concurrency=config) as system:
        node = system.create_node("busy")
        release = anyio.Event()

        @node.on("job")
        async def job(event: happen.Event, context: dict) -> int:
            await release.wait()
            return int(event.payload)

        client = system.create_node("client")
        results: list[int] = []

        async def one(i: int) -> None:
            results.append(await client.send("busy", {"type": "job", "payload": i}))

        async with anyio.create_task_group() as tg:
            for i in range(6):  # one runs, five wait: the node is now under pressure
                tg.start_soon(one, i)
            await eventually(lambda: node.stats().queued == 5)
            assert node.stats().under_pressure
            for i in range(6, 30):  # these senders are suspended, not enqueued, not rejected
                tg.start_soon(one, i)
            await anyio.wait_all_tasks_blocked()
            stats = node.stats()
            assert (stats.accepted, stats.queued, stats.rejected) == (6, 5, 0)
            release.set()
        assert sorted(results) == list(range(30))
        await drained(node)
        stats = assert_accounted(node, sent=30)
        assert stats.rejected == 0 and stats.completed == 30


async def test_flood_accounts_for_every_event(transport_url: str) -> None:
    config = {
        "patterns": {
            "sink": {"max_concurrent": 4, "queue_limit": 50, "backpressure_threshold": 1.0}
        }
    }
    async with make_system(transport_url, concurrency=config) as system:
        node = system.create_node("sink")

        @node.on("job")
        async def job(event: happen.Event, context: dict) -> None:
            await anyio.lowlevel.checkpoint()
            if event.payload % 7 == 0:
                raise ValueError("unlucky")

        client = system.create_node("client")
        errors: dict[str, int] = {}

        async def one(i: int) -> None:
            try:
                await client.send("sink", {"type": "job", "payload": i})
            except happen.HappenError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(one, i)
        for _ in range(100):
            await client.broadcast({"type": "job", "payload": 1})
        # broadcasts are fire-and-forget: wait until every copy has reached the node
        await eventually(lambda: sum(_arrivals(node.stats())) == 600)
        await drained(node)
        stats = assert_accounted(node, sent=600)
        assert stats.rejected == errors.get("QueueFullError", 0)
        assert stats.failed == errors.get("HandlerError", 0)


def _arrivals(stats: happen.NodeStats) -> tuple[int, int, int]:
    return stats.accepted, stats.rejected, stats.dropped
