"""Streamed replies: iteration, early exit, credit-based flow control, failures."""

from __future__ import annotations

import anyio
import pytest

import happen
from tests.helpers import assert_accounted, drained, eventually, make_system

pytestmark = pytest.mark.anyio


async def test_send_to_a_generator_returns_a_stream(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("counter")

        @node.on("count")
        async def count(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
            for i in range(event.payload):
                yield {"i": i}

        client = system.create_node("client")
        stream = await client.send("counter", {"type": "count", "payload": 600})
        assert isinstance(stream, happen.Stream)
        items = [item async for item in stream]
        assert items == [{"i": i} for i in range(600)]
        await drained(node)
        assert assert_accounted(node, sent=1).completed == 1


async def test_stream_of_a_plain_handler_yields_its_one_result(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("plain")
        node.on("one", lambda e, c: "only")
        client = system.create_node("client")
        async with client.stream("plain", {"type": "one"}) as stream:
            assert [item async for item in stream] == ["only"]


async def test_empty_generator_gives_an_empty_stream(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("empty")

        @node.on("nothing")
        async def nothing(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
            return
            yield

        client = system.create_node("client")
        async with client.stream("empty", {"type": "nothing"}) as stream:
            assert [item async for item in stream] == []


@pytest.mark.parametrize("how", ["break", "aclose"])
async def test_leaving_early_closes_the_producer_generator(transport_url: str, how: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("producer")
        finalised = anyio.Event()
        produced: list[int] = []

        @node.on("numbers")
        async def numbers(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
            try:
                i = 0
                while True:
                    produced.append(i)
                    yield i
                    i += 1
            finally:
                finalised.set()

        client = system.create_node("client")
        got = []
        if how == "break":
            async with client.stream("producer", {"type": "numbers"}) as stream:
                async for item in stream:
                    got.append(item)
                    if len(got) == 3:
                        break
        else:
            stream = await client.send("producer", {"type": "numbers"})
            async for item in stream:
                got.append(item)
                if len(got) == 3:
                    break
            await stream.aclose()
        assert got == [0, 1, 2]
        with anyio.fail_after(1):
            await finalised.wait()
        await drained(node)
        assert_accounted(node, sent=1)
        assert node.stats().active == 0


async def test_slow_consumer_holds_the_producer_within_one_window(transport_url: str) -> None:
    window = 8
    async with make_system(transport_url, stream_window=window) as system:
        node = system.create_node("fast-producer")
        produced = 0

        @node.on("flood")
        async def flood(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
            nonlocal produced
            for i in range(100):
                produced += 1
                yield i

        client = system.create_node("client")
        consumed = 0
        async with client.stream("fast-producer", {"type": "flood"}) as stream:
            # Before reading anything, the producer fills exactly one window and stops.
            await eventually(lambda: produced == window)
            if transport_url == "memory":
                await anyio.wait_all_tasks_blocked()
            assert produced == window
            async for _ in stream:
                consumed += 1
                assert produced - consumed <= window
                if consumed == 50:
                    # Still held: the producer cannot run more than a window ahead.
                    assert produced <= consumed + window
        assert consumed == 100


async def test_generator_failing_half_way_delivers_items_then_handler_error(
    transport_url: str,
) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("flaky")

        @node.on("partial")
        async def partial(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
            yield 1
            yield 2
            raise ValueError("ran out of data")

        client = system.create_node("client")
        got = []
        with pytest.raises(happen.HandlerError) as info:
            async with client.stream("flaky", {"type": "partial"}) as stream:
                async for item in stream:
                    got.append(item)
        assert got == [1, 2]
        assert info.value.remote_type == "ValueError"
        assert info.value.remote_message == "ran out of data"
        await drained(node)
        assert assert_accounted(node, sent=1).failed == 1


async def test_stream_timeout_between_items_cancels_the_producer(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("stalling")
        closed = anyio.Event()

        @node.on("stall")
        async def stall(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
            try:
                yield "first"
                await anyio.sleep_forever()
                yield "never"
            finally:
                closed.set()

        client = system.create_node("client")
        got = []
        with pytest.raises(happen.SendTimeout):
            async with client.stream("stalling", {"type": "stall"}, timeout=0.3) as stream:
                async for item in stream:
                    got.append(item)
        assert got == ["first"]
        with anyio.fail_after(2):
            await closed.wait()


async def test_a_consumer_that_never_reads_is_closed_after_the_idle_timeout(
    transport_url: str,
) -> None:
    async with make_system(transport_url, stream_window=4, stream_idle_timeout=0.3) as system:
        node = system.create_node("patient")
        produced = 0
        closed = anyio.Event()

        @node.on("items")
        async def items(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
            nonlocal produced
            try:
                while True:
                    produced += 1
                    yield produced
            finally:
                closed.set()

        client = system.create_node("client")
        stream = client.stream("patient", {"type": "items"})
        async with stream:
            with anyio.fail_after(5):
                await closed.wait()
            assert produced == 4
            got = [item async for item in _until_error(stream)]
        assert got[:4] == [1, 2, 3, 4]
        assert isinstance(got[-1], happen.SendTimeout)
        await drained(node)
        assert assert_accounted(node, sent=1).failed == 1


async def _until_error(stream: happen.Stream):  # type: ignore[no-untyped-def]
    try:
        async for item in stream:
            yield item
    except happen.HappenError as exc:
        yield exc
