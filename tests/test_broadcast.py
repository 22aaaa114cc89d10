"""Broadcasts: to every matching node, streamed broadcasts, drops when a queue is full."""

from __future__ import annotations

import anyio
import pytest

import happen
from tests.helpers import assert_accounted, drained, eventually, make_system

pytestmark = pytest.mark.anyio


async def test_broadcast_reaches_every_matching_node(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        received: dict[str, list[str]] = {}
        nodes_by_name: dict[str, happen.Node] = {}
        for name, pattern in [
            ("audit", "order.*"),
            ("mailer", "order.created"),
            ("metrics", lambda t: t.startswith("order.")),
            ("billing", "payment.*"),
        ]:
            node = system.create_node(name)
            nodes_by_name[name] = node
            received[name] = []

            async def handler(event: happen.Event, context: dict, name: str = name) -> None:
                received[name].append(event.type)

            node.on(pattern, handler)
        sender = system.create_node("sender")
        await sender.broadcast({"type": "order.created", "payload": {"id": 1}})
        await eventually(lambda: sum(len(v) for v in received.values()) == 3)
        await drained(*nodes_by_name.values())
        assert received == {
            "audit": ["order.created"],
            "mailer": ["order.created"],
            "metrics": ["order.created"],
            "billing": [],
        }


async def test_overlapping_patterns_deliver_one_copy_per_node(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("listener")
        calls: list[str] = []
        node.on("x.*", lambda e, c: calls.append("glob"))
        node.on("x.y", lambda e, c: calls.append("exact"))
        node.on(lambda t: True, lambda e, c: calls.append("predicate"))
        sender = system.create_node("sender")
        await sender.broadcast({"type": "x.y"})
        await sender.broadcast({"type": "x.z"})
        await sender.broadcast({"type": "other"})
        await eventually(lambda: len(calls) >= 3)
        await drained(node)
        assert sorted(calls) == ["exact", "glob", "predicate"]
        assert_accounted(node, sent=3)


async def test_sender_receives_its_own_broadcast_only_with_a_handler(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        with_handler = system.create_node("with-handler")
        got = anyio.Event()

        @with_handler.on("ping")
        async def ping(event: happen.Event, context: dict) -> None:
            got.set()

        without = system.create_node("without")
        await with_handler.broadcast({"type": "ping"})
        with anyio.fail_after(5):
            await got.wait()
        await without.broadcast({"type": "nobody-listens"})
        assert without.stats().accepted == 0


async def test_streamed_broadcast_delivers_the_items_to_every_subscriber(
    transport_url: str,
) -> None:
    async with make_system(transport_url) as system:
        results: dict[str, list[int]] = {}
        done = anyio.Event()
        for name in ("left", "right"):
            node = system.create_node(name)

            @node.on("feed")
            async def consume(event: happen.Event, context: dict, name: str = name) -> None:
                assert event.stream is not None
                results[name] = [item async for item in event.stream]
                if len(results) == 2:
                    done.set()

        async def source():  # type: ignore[no-untyped-def]
            for i in range(300):
                yield i

        sender = system.create_node("sender")
        await sender.broadcast({"type": "feed"}, stream=source())
        with anyio.fail_after(10):
            await done.wait()
        assert results == {"left": list(range(300)), "right": list(range(300))}


async def test_streamed_broadcast_source_failure_reaches_subscribers(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("sub")
        outcome: list[object] = []
        done = anyio.Event()

        @node.on("feed")
        async def consume(event: happen.Event, context: dict) -> None:
            assert event.stream is not None
            try:
                async for item in event.stream:
                    outcome.append(item)
            except happen.HandlerError as exc:
                outcome.append(exc.remote_message)
            done.set()

        async def source():  # type: ignore[no-untyped-def]
            yield 1
            raise RuntimeError("sensor offline")

        sender = system.create_node("sender")
        with pytest.raises(RuntimeError):
            await sender.broadcast({"type": "feed"}, stream=source())
        with anyio.fail_after(5):
            await done.wait()
        assert outcome == [1, "RuntimeError: sensor offline"]


async def test_broadcast_copies_over_a_full_queue_are_dropped_and_counted(
    transport_url: str,
) -> None:
    config = {
        "patterns": {
            "narrow": {"max_concurrent": 1, "queue_limit": 2, "backpressure_threshold": 1.0}
        }
    }
    async with make_system(transport_url, concurrency=config) as system:
        node = system.create_node("narrow")
        release = anyio.Event()
        started = anyio.Event()

        @node.on("tick")
        async def tick(event: happen.Event, context: dict) -> None:
            started.set()
            await release.wait()

        sender = system.create_node("sender")
        await sender.broadcast({"type": "tick"})
        with anyio.fail_after(5):
            await started.wait()
        for _ in range(9):
            await sender.broadcast({"type": "tick"})
        await eventually(lambda: node.stats().dropped + node.stats().accepted == 10)
        stats = node.stats()
        assert (stats.accepted, stats.dropped, stats.queued) == (3, 7, 2)
        release.set()
        await drained(node)
        assert assert_accounted(node, sent=10).completed == 3
