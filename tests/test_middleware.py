"""Middleware: ``system.use(mw)`` / ``node.use(mw)`` around every handler execution, for
async, sync and generator handlers alike."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest

import happen
from tests.helpers import assert_accounted, drained, make_system

pytestmark = pytest.mark.anyio

KINDS = ["async", "sync", "generator"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def serve_list(node: happen.Node, kind: str, log: list[str]) -> None:
    """Register handler ``items`` on ``node``: it answers its payload, a list, as one result
    (async and sync) or item by item (generator), and logs "handler" when it runs."""
    if kind == "async":

        @node.on("items")
        async def items_async(event: happen.Event, context: dict[str, Any]) -> Any:
            log.append("handler")
            return event.payload

    elif kind == "sync":

        @node.on("items")
        def items_sync(event: happen.Event, context: dict[str, Any]) -> Any:
            log.append("handler")
            return event.payload

    else:

        @node.on("items")
        async def items_generator(
            event: happen.Event, context: dict[str, Any]
        ) -> AsyncIterator[Any]:
            log.append("handler")
            for item in event.payload:
                yield item


async def ask(client: happen.Node, target: str, payload: list[Any]) -> list[Any]:
    """Send ``items`` and read the answer as a list, streamed or not."""
    result = await client.send(target, {"type": "items", "payload": payload}, timeout=10)
    if isinstance(result, happen.Stream):
        return [item async for item in result]
    return list(result)


def recorder(name: str, log: list[str]) -> happen.Middleware:
    async def record(
        event: happen.Event, context: dict[str, Any], call_next: happen.CallNext
    ) -> Any:
        log.append(f"{name} in")
        try:
            return await call_next(event)
        finally:
            log.append(f"{name} out")

    return record


async def times_ten(
    event: happen.Event, context: dict[str, Any], call_next: happen.CallNext
) -> Any:
    """Multiplies the result by ten: each item of a generator handler, as it is yielded."""
    result = await call_next(event)
    if inspect.isasyncgen(result):

        async def mapped() -> AsyncIterator[Any]:
            async for item in result:
                yield item * 10

        return mapped()
    return [item * 10 for item in result]


async def test_system_middleware_wraps_node_middleware_in_registration_order(
    transport_url: str, kind: str
) -> None:
    log: list[str] = []
    async with make_system(transport_url) as system:
        node = system.create_node("svc")
        serve_list(node, kind, log)
        system.use(recorder("system-1", log))
        node.use(recorder("node-1", log))
        node.use(recorder("node-2", log))
        system.use(recorder("system-2", log))  # after the node was made: still applies
        client = system.create_node("client")
        assert await ask(client, "svc", [1, 2]) == [1, 2]
        await drained(node)
        wrapping = ["system-1", "system-2", "node-1", "node-2"]
        expected = [f"{n} in" for n in wrapping] + [f"{n} out" for n in reversed(wrapping)]
        if kind == "generator":  # the generator's body runs as its items are read
            assert [entry for entry in log if entry != "handler"] == expected
            assert log.count("handler") == 1
        else:
            assert log == [*expected[:4], "handler", *expected[4:]]
        assert_accounted(node, sent=1)


async def test_a_node_without_middleware_is_not_wrapped(transport_url: str) -> None:
    log: list[str] = []
    async with make_system(transport_url) as system:
        wrapped, plain = system.create_node("wrapped"), system.create_node("plain")
        serve_list(wrapped, "async", log)
        serve_list(plain, "async", log)
        wrapped.use(recorder("mw", log))
        client = system.create_node("client")
        assert await ask(client, "plain", [1]) == [1]
        assert log == ["handler"]
        assert await ask(client, "wrapped", [1]) == [1]
        assert log == ["handler", "mw in", "handler", "mw out"]


async def test_a_middleware_changes_the_result(transport_url: str, kind: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("svc")
        serve_list(node, kind, [])
        node.use(times_ten)
        client = system.create_node("client")
        assert await ask(client, "svc", [1, 2, 3]) == [10, 20, 30]
        async with client.stream("svc", {"type": "items", "payload": [4, 5]}) as stream:
            got = [item async for item in stream]
        assert got == ([40, 50] if kind == "generator" else [[40, 50]])
        await drained(node)
        stats = assert_accounted(node, sent=2)
        assert stats.completed == 2


async def test_a_middleware_that_raises_fails_the_call_counted_and_logged(
    transport_url: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[str] = []

    async def refuse(
        event: happen.Event, context: dict[str, Any], call_next: happen.CallNext
    ) -> Any:
        if event.payload == ["bad"]:
            raise PermissionError("not allowed")
        return await call_next(event)

    async with make_system(transport_url) as system:
        node = system.create_node("svc")
        serve_list(node, kind, log)
        node.use(refuse)
        client = system.create_node("client")
        with caplog.at_level(logging.ERROR, logger="happen.handlers"):
            with pytest.raises(happen.HandlerError) as raised:
                await ask(client, "svc", ["bad"])
        assert raised.value.remote_type == "PermissionError"
        assert raised.value.remote_message == "not allowed"
        assert log == []  # the handler never ran
        records = [r for r in caplog.records if r.name == "happen.handlers"]
        assert len(records) == 1 and records[0].exc_info is not None
        assert "'svc'" in records[0].getMessage()
        assert await ask(client, "svc", ["good"]) == ["good"]
        await drained(node)
        stats = assert_accounted(node, sent=2)
        assert (stats.failed, stats.completed) == (1, 1)


async def test_a_middleware_raising_after_the_handler_fails_the_call(
    transport_url: str, kind: str
) -> None:
    log: list[str] = []

    async def check_result(
        event: happen.Event, context: dict[str, Any], call_next: happen.CallNext
    ) -> Any:
        result = await call_next(event)
        if inspect.isasyncgen(result):

            async def checked() -> AsyncIterator[Any]:
                async for item in result:
                    if item < 0:
                        raise ValueError(f"negative item {item}")
                    yield item

            return checked()
        if any(item < 0 for item in result):
            raise ValueError("negative result")
        return result

    async with make_system(transport_url) as system:
        node = system.create_node("svc")
        serve_list(node, kind, log)
        node.use(check_result)
        client = system.create_node("client")
        got: list[Any] = []
        with pytest.raises(happen.HandlerError, match="ValueError: negative"):
            result = await client.send("svc", {"type": "items", "payload": [1, 2, -3, 4]})
            if isinstance(result, happen.Stream):
                async for item in result:
                    got.append(item)
        assert log == ["handler"]
        if kind == "generator":
            assert got == [1, 2]  # the items before the failure, then the error
        await drained(node)
        assert assert_accounted(node, sent=1).failed == 1


async def test_a_middleware_that_never_calls_call_next_short_circuits(
    transport_url: str, kind: str
) -> None:
    log: list[str] = []

    async def cached(
        event: happen.Event, context: dict[str, Any], call_next: happen.CallNext
    ) -> Any:
        return ["from the cache"]

    async with make_system(transport_url) as system:
        node = system.create_node("svc")
        serve_list(node, kind, log)
        system.use(cached)
        client = system.create_node("client")
        # For a generator handler the result is a plain value, as if the handler returned it.
        assert await client.send("svc", {"type": "items", "payload": [1]}) == ["from the cache"]
        async with client.stream("svc", {"type": "items", "payload": [1]}) as stream:
            assert [item async for item in stream] == [["from the cache"]]
        assert log == []  # the handler never ran
        await drained(node)
        assert assert_accounted(node, sent=2).completed == 2


async def test_a_wrapped_generator_is_closed_when_the_consumer_leaves_early(
    transport_url: str,
) -> None:
    closed = anyio.Event()
    async with make_system(transport_url) as system:
        node = system.create_node("model")

        @node.on("count")
        async def count(event: happen.Event, context: dict[str, Any]) -> AsyncIterator[int]:
            try:
                for i in range(1_000_000):
                    yield i
            finally:
                closed.set()

        node.use(times_ten)  # wraps the items; its wrapper does not close what it wraps
        client = system.create_node("client")
        async with client.stream("model", {"type": "count"}) as stream:
            async for item in stream:
                if item == 30:
                    break
        with anyio.fail_after(5):
            await closed.wait()  # the handler's own finally ran
        await drained(node)
        assert_accounted(node, sent=1)


async def test_middleware_passes_a_changed_event_and_shares_the_context(
    transport_url: str,
) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("svc")

        def finish(event: happen.Event, context: dict[str, Any]) -> Any:
            return {"payload": event.payload, "user": context["user"]}

        @node.on("who")
        async def who(event: happen.Event, context: dict[str, Any]) -> Any:
            return finish  # the continuum gets the same context

        @node.use
        async def authenticate(
            event: happen.Event, context: dict[str, Any], call_next: happen.CallNext
        ) -> Any:
            context["user"] = "ada"
            return await call_next(msgspec.structs.replace(event, payload=event.payload + 1))

        client = system.create_node("client")
        assert await client.send("svc", {"type": "who", "payload": 1}) == {
            "payload": 2,
            "user": "ada",
        }


async def test_middleware_wraps_broadcast_handlers(transport_url: str) -> None:
    log: list[str] = []
    async with make_system(transport_url) as system:
        node = system.create_node("audit")
        done = anyio.Event()

        @node.on("order.created")
        async def record(event: happen.Event, context: dict[str, Any]) -> None:
            log.append("handler")
            done.set()

        system.use(recorder("mw", log))
        await system.ready()
        await system.create_node("shop").broadcast({"type": "order.created"})
        with anyio.fail_after(5):
            await done.wait()
        await drained(node)
        assert log == ["mw in", "handler", "mw out"]


async def test_use_refuses_what_is_not_an_async_middleware() -> None:
    async with happen.System() as system:
        node = system.create_node("n")

        def sync_middleware(event: Any, context: Any, call_next: Any) -> Any:
            return None

        with pytest.raises(TypeError, match="async def sync_middleware"):
            node.use(sync_middleware)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="callable"):
            system.use(42)  # type: ignore[type-var]
