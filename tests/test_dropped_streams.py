"""A ``Stream`` the user forgot to close releases everything once it is garbage, with a
``ResourceWarning``, as an unclosed anyio stream does."""

from __future__ import annotations

import gc
import tracemalloc
import warnings

import anyio
import pytest

import happen
from tests.helpers import drained, eventually, make_system

pytestmark = pytest.mark.anyio

WAIT = 10


async def test_a_thousand_streams_dropped_unclosed_release_routes_memory_and_slots(
    transport_url: str,
) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("producer")
        closed = 0

        @node.on("items")
        async def items(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
            nonlocal closed
            try:
                i = 1000
                while True:
                    yield i  # a window of them waits in the consumer's buffer
                    i += 1
            finally:
                closed += 1

        client = system.create_node("client")

        async def read_three_and_forget() -> None:
            stream = await client.send("producer", {"type": "items"})
            got = 0
            async for _ in stream:
                got += 1
                if got == 3:
                    break
            # no aclose(), no async with: the stream is dropped here

        # Released by reference counting alone: no cycle keeps a dropped stream alive.
        gc.disable()
        try:
            with pytest.warns(ResourceWarning, match="was not closed") as caught:
                for _ in range(50):
                    await read_three_and_forget()
            assert len(caught) == 50
            await eventually(lambda: closed == 50, timeout=WAIT)  # producers cancelled
        finally:
            gc.enable()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                for _ in range(1000):
                    await read_three_and_forget()
            await eventually(lambda: closed == 1050, timeout=WAIT)
            await drained(node, timeout=WAIT)  # every producer's slot is back
            gc.collect()  # cancelled tasks leave exception cycles behind on asyncio
            growth = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        with anyio.fail_after(WAIT):
            await system.idle()  # no route is left
        assert growth < 1024 * 1024, f"{growth} bytes kept by 1000 dropped streams"
        stats = node.stats()
        assert stats.accepted == stats.completed + stats.failed + stats.dead_lettered == 1050


async def test_a_stream_dropped_after_its_system_stopped_raises_nothing(
    transport_url: str,
) -> None:
    system = make_system(transport_url, drain_timeout=0.2)  # the producer never ends
    node = system.create_node("producer")

    @node.on("items")
    async def items(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
        while True:
            yield 1

    client = system.create_node("client")
    async with system:
        stream = await client.send("producer", {"type": "items"})
        assert await stream.__anext__() == 1
    # The stop ended the stream (nothing is left to release); an error raised while the
    # stream is collected would surface as PytestUnraisableExceptionWarning, an error here.
    del stream
    gc.collect()
