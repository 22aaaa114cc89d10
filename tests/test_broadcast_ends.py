"""Every streamed broadcast ends for its subscribers: with an end frame when the broadcast is
cancelled, and after the idle bound when the broadcaster vanished or the stream was forged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import pytest

import happen
from happen._transport import Transport
from tests.helpers import assert_accounted, drained, eventually, unique_namespace
from tests.raw_peer import WAIT, RawPeer

pytestmark = pytest.mark.anyio

IDLE = 0.5  # the subscribers' stream_idle_timeout, in seconds


class Subscriber:
    """A node whose handler reads a streamed broadcast and records how it ended."""

    def __init__(self, system: happen.System, node_id: str = "sub") -> None:
        self.node = system.create_node(node_id)
        self.items: list[int] = []
        self.error: BaseException | None = None
        self.ended = anyio.Event()
        self.reading = anyio.Event()

        @self.node.on("feed")
        async def consume(event: happen.Event, context: dict) -> None:
            assert event.stream is not None
            self.reading.set()
            try:
                async for item in event.stream:
                    self.items.append(item)
            except Exception as exc:
                self.error = exc
                raise  # the handler fails: its slot is given back
            finally:
                self.ended.set()

    async def wait_items(self, count: int) -> None:
        await eventually(lambda: len(self.items) >= count, timeout=WAIT)

    async def wait_end(self) -> None:
        with anyio.fail_after(WAIT):
            await self.ended.wait()


async def two_then_wait(hold: anyio.Event) -> AsyncIterator[int]:
    yield 0
    yield 1
    await hold.wait()
    yield 2


async def broadcast_from(sender: happen.Node, source: AsyncIterator[int]) -> None:
    await sender.broadcast({"type": "feed"}, stream=source)


async def test_cancelling_a_streamed_broadcast_ends_its_subscribers_streams(
    make_transport: Callable[[], Transport],
) -> None:
    namespace = unique_namespace()
    broadcaster_system = happen.System(transport=make_transport(), namespace=namespace)
    subscriber_system = happen.System(transport=make_transport(), namespace=namespace)
    subscriber = Subscriber(subscriber_system)
    sender = broadcaster_system.create_node("sender")
    async with broadcaster_system, subscriber_system:
        await subscriber_system.ready()
        async with anyio.create_task_group() as tg:
            tg.start_soon(broadcast_from, sender, two_then_wait(anyio.Event()))
            await subscriber.wait_items(2)
            tg.cancel_scope.cancel()  # the broadcasting task is cancelled mid-stream
        await subscriber.wait_end()
        assert subscriber.items == [0, 1]
        assert isinstance(subscriber.error, happen.HandlerError)
        assert "cancelled" in str(subscriber.error)
        await drained(subscriber.node)
        assert assert_accounted(subscriber.node, sent=1).failed == 1


async def test_a_streamed_broadcast_whose_broadcaster_vanished_ends_after_the_idle_bound(
    make_transport: Callable[[], Transport],
) -> None:
    namespace = unique_namespace()
    vanishing = make_transport()
    broadcaster_system = happen.System(transport=vanishing, namespace=namespace)
    subscriber_system = happen.System(
        transport=make_transport(), namespace=namespace, stream_idle_timeout=IDLE
    )
    subscriber = Subscriber(subscriber_system)
    sender = broadcaster_system.create_node("sender")
    async with broadcaster_system, subscriber_system:
        await subscriber_system.ready()
        hold = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def broadcast() -> None:
                with pytest.raises(happen.TransportError):
                    await sender.broadcast({"type": "feed"}, stream=two_then_wait(hold))

            tg.start_soon(broadcast)
            await subscriber.wait_items(2)
            await vanishing.stop()  # the broadcaster's connection is gone: no end frame
            hold.set()
        began = anyio.current_time()
        await subscriber.wait_end()
        assert subscriber.items == [0, 1]
        assert isinstance(subscriber.error, happen.SendTimeout), subscriber.error
        assert "'sub'" in str(subscriber.error)
        assert anyio.current_time() - began < IDLE + 2
        await drained(subscriber.node)
        assert assert_accounted(subscriber.node, sent=1).failed == 1


async def test_a_forged_streamed_broadcast_ends_after_the_idle_bound(
    make_transport: Callable[[], Transport],
) -> None:
    system = happen.System(
        transport=make_transport(), namespace=unique_namespace(), stream_idle_timeout=IDLE
    )
    subscriber = Subscriber(system)
    peer = await RawPeer(make_transport()).start()
    async with system:
        await system.ready()
        # One frame announcing a stream, and nothing after it.
        await peer.publish(
            f"{system.namespace}.bcast.feed", {"k": "bcast", "type": "feed", "stream": "forged-1"}
        )
        await subscriber.wait_end()
        assert subscriber.items == []
        assert isinstance(subscriber.error, happen.SendTimeout), subscriber.error
        assert "forged-1" in str(subscriber.error)
        await drained(subscriber.node)
        assert assert_accounted(subscriber.node, sent=1).failed == 1
        with anyio.fail_after(WAIT):
            await system.idle()
