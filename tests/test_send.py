"""Request / reply: handlers, patterns, the continuum, errors a caller sees."""

from __future__ import annotations

import threading

import anyio
import pytest

import happen
from tests.helpers import assert_accounted, drained, eventually, make_system

pytestmark = pytest.mark.anyio


async def test_send_returns_the_handler_result(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        orders = system.create_node("order-service")

        @orders.on("process-order")
        async def process(event: happen.Event, context: dict) -> dict:
            return {"ok": True, "id": event.payload["id"]}

        client = system.create_node("client")
        result = await client.send("order-service", {"type": "process-order", "payload": {"id": 7}})
        assert result == {"ok": True, "id": 7}
        assert await client.send(orders, happen.Event("process-order", {"id": 8})) == {
            "ok": True,
            "id": 8,
        }
        await drained(orders)
        assert_accounted(orders, sent=2)


async def test_decorator_returns_the_handler_and_call_returns_unregister(
    transport_url: str,
) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("n")

        async def handler(event: happen.Event, context: dict) -> str:
            return "first"

        assert node.on("a")(handler) is handler
        unregister = node.on("b", handler)
        assert callable(unregister)
        client = system.create_node("c")
        assert await client.send("n", {"type": "b"}) == "first"
        unregister()
        with pytest.raises(happen.NoHandlerError, match="'b'"):
            await client.send("n", {"type": "b"})
        assert await client.send("n", {"type": "a"}) == "first"
        unregister()  # a second call is harmless


async def test_sync_handlers_run_in_a_worker_thread(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("sync-node")
        main_thread = threading.get_ident()

        @node.on("work")
        def work(event: happen.Event, context: dict) -> dict:
            return {"in_thread": threading.get_ident() != main_thread, "x": event.payload}

        client = system.create_node("client")
        assert await client.send("sync-node", {"type": "work", "payload": 3}) == {
            "in_thread": True,
            "x": 3,
        }


async def test_patterns_exact_glob_double_star_and_predicate(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("router")
        node.on("order.created", lambda e, c: "exact")
        node.on("order.*", lambda e, c: "one-segment")
        node.on("order.**", lambda e, c: "many-segments")
        node.on("notify-*", lambda e, c: "prefix")
        node.on(lambda t: t.startswith("custom:"), lambda e, c: "predicate")
        client = system.create_node("client")

        async def answer(event_type: str) -> str:
            return await client.send("router", {"type": event_type})  # type: ignore[no-any-return]

        assert await answer("order.created") == "exact"
        assert await answer("order.shipped") == "one-segment"
        assert await answer("order.created.eu") == "many-segments"
        assert await answer("notify-success") == "prefix"
        assert await answer("custom:thing") == "predicate"
        with pytest.raises(happen.NoHandlerError):
            await answer("order")
        with pytest.raises(happen.NoHandlerError):
            await answer("notify.x")


async def test_exact_match_wins_then_first_registered_pattern(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("router")
        node.on("a.**", lambda e, c: "double-star registered first")
        node.on("a.*", lambda e, c: "star registered second")
        node.on("a.b", lambda e, c: "exact registered last")
        node.on("a.b", lambda e, c: "exact registered twice")
        client = system.create_node("client")
        assert await client.send("router", {"type": "a.b"}) == "exact registered last"
        assert await client.send("router", {"type": "a.c"}) == "double-star registered first"


async def test_event_continuum_shares_the_context(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("flow")
        seen: list[str] = []

        def finish(event: happen.Event, context: dict) -> dict:  # sync step, in a thread
            seen.append("finish")
            return {"total": context["subtotal"] + 1}

        async def price(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
            seen.append("price")
            context["subtotal"] = event.payload * 10
            return finish

        @node.on("checkout")
        async def validate(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
            seen.append("validate")
            context["valid"] = True
            return price

        client = system.create_node("client")
        assert await client.send("flow", {"type": "checkout", "payload": 4}) == {"total": 41}
        assert seen == ["validate", "price", "finish"]


async def test_handler_exception_reaches_sender_as_handler_error(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("faulty")

        @node.on("boom")
        async def boom(event: happen.Event, context: dict) -> None:
            raise KeyError("missing thing")

        client = system.create_node("client")
        with pytest.raises(happen.HandlerError) as info:
            await client.send("faulty", {"type": "boom"})
        assert info.value.remote_type == "KeyError"
        assert "missing thing" in info.value.remote_message
        await drained(node)
        stats = assert_accounted(node, sent=1)
        assert stats.failed == 1


async def test_missing_node_raises_node_not_found_at_once(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        client = system.create_node("client")
        with anyio.fail_after(2):
            with pytest.raises(happen.NodeNotFoundError, match="nobody"):
                await client.send("nobody", {"type": "x"})


async def test_no_matching_handler_is_rejected_and_counted(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("n")
        node.on("known", lambda e, c: 1)
        client = system.create_node("client")
        with pytest.raises(happen.NoHandlerError, match="unknown"):
            await client.send("n", {"type": "unknown"})
        assert node.stats().rejected == 1


async def test_timeout_raises_send_timeout_and_cancels_the_handler(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node(
            "slow",
        )
        started = anyio.Event()
        cancelled = anyio.Event()

        @node.on("hang")
        async def hang(event: happen.Event, context: dict) -> None:
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()

        node.on("quick", lambda e, c: "done")
        client = system.create_node("client")
        with pytest.raises(happen.SendTimeout) as info:
            await client.send("slow", {"type": "hang"}, timeout=0.2)
        assert isinstance(info.value, TimeoutError)
        with anyio.fail_after(5):
            await cancelled.wait()
        await drained(node)
        stats = assert_accounted(node, sent=1)
        assert stats.failed == 1 and stats.active == 0
        assert await client.send("slow", {"type": "quick"}, timeout=5) == "done"


async def test_cancelling_the_caller_cancels_the_handler(transport_url: str) -> None:
    config = {"patterns": {"one-slot": {"max_concurrent": 1}}}
    async with make_system(transport_url, concurrency=config) as system:
        node = system.create_node("one-slot")
        started = anyio.Event()
        cancelled = anyio.Event()

        @node.on("hang")
        async def hang(event: happen.Event, context: dict) -> None:
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                cancelled.set()

        node.on("quick", lambda e, c: "served")
        client = system.create_node("client")
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.send, "one-slot", {"type": "hang"})
            # a second call waits in the queue behind the first; its caller gives up too
            tg.start_soon(client.send, "one-slot", {"type": "hang"})
            with anyio.fail_after(5):
                await started.wait()
            await eventually(lambda: node.stats().queued == 1)
            tg.cancel_scope.cancel()
        with anyio.fail_after(1):
            await cancelled.wait()
        await drained(node)
        stats = assert_accounted(node, sent=2)
        assert stats.failed == 2
        with anyio.fail_after(5):
            await system.idle()  # nothing left behind by the callers
        # the slot is free again: a new call is served at once
        assert await client.send("one-slot", {"type": "quick"}, timeout=5) == "served"
