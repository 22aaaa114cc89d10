"""Causal context: ids, sender, causation, correlation, path, timestamp."""

from __future__ import annotations

import time

import anyio
import pytest

import happen
from tests.helpers import make_system

pytestmark = pytest.mark.anyio


async def test_root_event_context(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("echo")

        @node.on("show")
        async def show(event: happen.Event, context: dict) -> happen.CausalContext:
            return event.context

        client = system.create_node("client")
        before = time.time() * 1000
        ctx = await client.send("echo", {"type": "show"})
        assert ctx["sender"] == "client"
        assert ctx["correlation_id"] == ctx["id"]
        assert ctx.get("causation_id") is None
        assert ctx["path"] == ["client"]
        assert before - 1000 <= ctx["timestamp"] <= time.time() * 1000 + 1000
        other = await client.send("echo", {"type": "show"})
        assert other["id"] != ctx["id"]


async def test_events_sent_from_a_handler_inherit_causality(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        seen: dict[str, happen.CausalContext] = {}
        broadcast_seen = anyio.Event()
        a, b, c = (system.create_node(n) for n in ("a", "b", "c"))

        @a.on("start")
        async def start(event: happen.Event, context: dict) -> str:
            seen["a"] = event.context
            return await a.send("b", {"type": "step"})  # type: ignore[no-any-return]

        @b.on("step")
        async def step(event: happen.Event, context: dict) -> str:
            seen["b"] = event.context
            await b.broadcast({"type": "noted"})
            return await b.send("c", {"type": "last"})  # type: ignore[no-any-return]

        @c.on("last")
        def last(event: happen.Event, context: dict) -> str:  # a sync handler too
            seen["c"] = event.context
            return "done"

        @c.on("noted")
        async def noted(event: happen.Event, context: dict) -> None:
            seen["noted"] = event.context
            broadcast_seen.set()

        client = system.create_node("client")
        assert await client.send("a", {"type": "start"}) == "done"
        with anyio.fail_after(5):
            await broadcast_seen.wait()
        root = seen["a"]
        assert root.causation_id is None and root.path == ("client",)
        assert seen["b"].causation_id == root.id
        assert seen["b"].path == ("client", "a")
        assert seen["c"].causation_id == seen["b"].id
        assert seen["c"].path == ("client", "a", "b")
        assert seen["noted"].causation_id == seen["b"].id
        assert seen["noted"].sender == "b"
        ids = {ctx.id for ctx in seen.values()}
        assert len(ids) == 4
        assert {ctx.correlation_id for ctx in seen.values()} == {root.id}


async def test_streaming_handler_sends_inherit_causality(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        src = system.create_node("src")
        sink = system.create_node("sink")
        contexts: list[happen.CausalContext] = []

        @sink.on("record")
        async def record(event: happen.Event, context: dict) -> None:
            contexts.append(event.context)

        @src.on("emit")
        async def emit(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
            for i in range(2):
                await src.send("sink", {"type": "record", "payload": i})
                yield i

        client = system.create_node("client")
        async with client.stream("src", {"type": "emit"}) as stream:
            assert [i async for i in stream] == [0, 1]
        assert len(contexts) == 2
        assert all(ctx.path == ("client", "src") for ctx in contexts)
        assert contexts[0].causation_id == contexts[1].causation_id
