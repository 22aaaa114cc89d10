"""A stream never skips items silently and never buffers beyond its credit.

Items are numbered: a frame lost in transit ends the stream with ``TransportError`` naming the
node and the missing items, and cancels the producer. A producer that ignores credit is cut
off; a consumer that grants credit it never earned stops the producer.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import tracemalloc
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import msgspec
import pytest

import happen
from happen._transport import Message, MessageCallback, Subscription, Transport, TransportListener
from tests.conftest import NatsServer
from tests.helpers import assert_accounted, drained, eventually, unique_namespace
from tests.raw_peer import WAIT, Heard, RawPeer

pytestmark = pytest.mark.anyio


def seal_of(secret: str) -> str:
    """A call's seal, as docs/PROTOCOL.md defines it: hex BLAKE2b-96 of the secret."""
    return hashlib.blake2b(secret.encode(), digest_size=12).hexdigest()


class Lossy:
    """A transport that loses some of the stream frames it publishes (``chunk``/``chunks``),
    as a lossy link or a slow consumer's client would: ``lose(n)`` says whether to lose the
    n-th such frame (from 0)."""

    def __init__(self, inner: Transport, lose: Callable[[int], bool]) -> None:
        self.inner = inner
        self.lose = lose
        self.stream_frames = 0
        self.lost = 0

    @property
    def max_payload(self) -> int:
        return self.inner.max_payload

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        reply: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if data[:1] and msgspec.msgpack.decode(data).get("k") in ("chunk", "chunks"):
            n = self.stream_frames
            self.stream_frames += 1
            if self.lose(n):
                self.lost += 1
                return
        await self.inner.publish(subject, data, reply=reply, headers=headers)

    async def subscribe(
        self, subject: str, callback: MessageCallback, *, queue: str | None = None
    ) -> Subscription:
        return await self.inner.subscribe(subject, callback, queue=queue)

    def new_inbox(self) -> str:
        return self.inner.new_inbox()

    def set_listener(self, listener: TransportListener | None) -> None:
        self.inner.set_listener(listener)


async def test_items_lost_in_transit_end_the_stream_with_an_error(
    make_transport: Callable[[], Transport],
) -> None:
    namespace = unique_namespace()
    lossy = Lossy(make_transport(), lose=lambda n: n == 1)  # the second frame of items
    producer_system = happen.System(transport=lossy, namespace=namespace)
    consumer_system = happen.System(transport=make_transport(), namespace=namespace)
    producer = producer_system.create_node("numbers")
    finalised = anyio.Event()

    @producer.on("count")
    async def count(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
        try:
            for i in range(event.payload):
                yield i
                await anyio.lowlevel.checkpoint()  # one frame per item or a few
        finally:
            finalised.set()

    async with producer_system, consumer_system:
        await producer_system.ready()
        client = consumer_system.create_node("client")
        got: list[int] = []
        with pytest.raises(happen.TransportError) as info:
            event = {"type": "count", "payload": 1000}
            async with client.stream("numbers", event, timeout=WAIT) as stream:
                async for item in stream:
                    got.append(item)
        assert lossy.lost == 1
        assert 0 < len(got) < 1000
        assert got == list(range(len(got))), "no item was skipped silently"
        message = str(info.value)
        assert "'numbers'" in message, message
        assert re.search(rf"lost items? {len(got)}\b", message), message
        with anyio.fail_after(WAIT):
            await finalised.wait()  # the producer was cancelled
        await drained(producer)
        assert_accounted(producer, sent=1)


async def serve_raw_stream(
    peer: RawPeer, subject: str, frames: list[dict[str, Any]]
) -> tuple[Heard, Heard]:
    """Make ``peer`` answer each request on ``subject`` with a stream start (control: its own
    inbox) and ``frames``; returns the requests it heard and what arrives on its control."""
    control = await peer.listen(peer.inbox + ".control")

    async def respond(msg: Message, request: dict[str, Any]) -> None:
        await peer.publish(msg.reply, {"k": "start", "control": peer.inbox + ".control"})
        for frame in frames:
            await peer.publish(msg.reply, frame)

    requests = await peer.listen(subject, queue="feed", respond=respond)
    return requests, control


RAW_STREAMS = [
    pytest.param(
        [
            {"k": "chunk", "item": 0, "seq": 0},
            {"k": "chunks", "items": [1, 2], "seq": 1},
            {"k": "chunk", "item": 5, "seq": 5},
            {"k": "end", "count": 6},
        ],
        [0, 1, 2],
        "lost items 3-4",
        id="gap",
    ),
    pytest.param(
        [
            {"k": "chunk", "item": 0, "seq": 0},
            {"k": "chunk", "item": 1, "seq": 1},
            {"k": "end", "count": 4},
        ],
        [0, 1],
        "lost items 2-3",
        id="end-after-a-gap",
    ),
    pytest.param(
        [{"k": "chunk", "item": 0, "seq": 0}, {"k": "chunk", "item": 1, "seq": 0}],
        [0],
        "out of sequence",
        id="repeated",
    ),
    pytest.param(
        [
            {"k": "chunk", "item": 0},
            {"k": "chunks", "items": []},
            {"k": "chunks", "items": [1, 2]},
            {"k": "end"},
        ],
        [0, 1, 2],
        None,
        id="foreign-without-seq",
    ),
    pytest.param(
        [
            {"k": "chunk", "item": 0, "seq": 0},
            {"k": "chunks", "items": [], "seq": 1},
            {"k": "chunk", "item": 1, "seq": 1},
            {"k": "end", "count": 2},
        ],
        [0, 1],
        None,
        id="empty-chunks",
    ),
]


@pytest.mark.parametrize(("frames", "items", "error"), RAW_STREAMS)
async def test_a_producers_sequence_is_checked(
    make_transport: Callable[[], Transport],
    frames: list[dict[str, Any]],
    items: list[int],
    error: str | None,
) -> None:
    system = happen.System(transport=make_transport(), namespace=unique_namespace())
    peer = await RawPeer(make_transport()).start()
    async with system:
        requests, control = await serve_raw_stream(peer, f"{system.namespace}.node.feed", frames)
        client = system.create_node("client")
        got: list[int] = []
        if error is None:
            async with client.stream("feed", {"type": "items"}, timeout=WAIT) as stream:
                got = [item async for item in stream]
        else:
            with pytest.raises(happen.TransportError, match=error) as info:
                async with client.stream("feed", {"type": "items"}, timeout=WAIT) as stream:
                    async for item in stream:
                        got.append(item)
            assert "'feed'" in str(info.value)
            # The producer is told to stop, by the call's owner: the secret matches the seal.
            (cancel,) = await control.wait_for(1)
            assert cancel["k"] == "cancel"
            assert seal_of(cancel["secret"]) == requests.frames[0]["seal"]
        assert got == items
        with anyio.fail_after(WAIT):
            await system.idle()


async def test_a_producer_that_ignores_credit_is_cut_off(
    make_transport: Callable[[], Transport],
) -> None:
    window, sent = 4, 10_000
    system = happen.System(
        transport=make_transport(), namespace=unique_namespace(), stream_window=window
    )
    peer = await RawPeer(make_transport()).start()
    kilobyte = "x" * 1024
    flood = [{"k": "chunk", "item": kilobyte, "seq": i} for i in range(sent)]
    async with system:
        requests, control = await serve_raw_stream(peer, f"{system.namespace}.node.feed", [])
        client = system.create_node("client")
        stream = client.stream("feed", {"type": "items"})
        got: list[str] = []
        tracemalloc.start()
        try:
            async with stream:
                await requests.wait_for(1)
                (msg, request) = requests.messages[0]
                assert request["window"] == window
                # The producer ignores the credit: 10 MB of items for a window of 4.
                before = tracemalloc.get_traced_memory()[0]
                for frame in flood:
                    await peer.publish(msg.reply, frame)
                # everything past the cut-off arrives as stray frames: nothing is buffered
                await eventually(lambda: system.stray_frames >= sent - window - 1, timeout=WAIT)
                growth = tracemalloc.get_traced_memory()[0] - before
                with pytest.raises(happen.TransportError, match="granted 4") as info:
                    async for item in stream:
                        got.append(item)
        finally:
            tracemalloc.stop()
        assert "'feed'" in str(info.value)
        assert got == [kilobyte] * window
        assert growth < 1024 * 1024, f"{growth} bytes buffered for a window of {window}"
        await control.wait_until(lambda: "cancel" in control.kinds)


def items_of(heard: Heard) -> list[Any]:
    """The streamed items among the frames ``heard``, in order."""
    items: list[Any] = []
    for frame in heard.frames:
        if frame.get("k") == "chunk":
            items.append(frame.get("item"))
        elif frame.get("k") == "chunks":
            items.extend(frame["items"])
    return items


async def test_a_consumer_granting_credit_it_never_earned_stops_the_producer(
    make_transport: Callable[[], Transport], caplog: pytest.LogCaptureFixture
) -> None:
    system = happen.System(transport=make_transport(), namespace=unique_namespace())
    node = system.create_node("source")
    closed = 0

    @node.on("items")
    async def items(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
        nonlocal closed
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed += 1

    peer = await RawPeer(make_transport()).start()
    caplog.set_level(logging.WARNING, logger="happen")

    async def overgrant(attempt: int) -> None:
        replies = await peer.listen(f"{peer.inbox}.r{attempt}")
        request = {"k": "req", "type": "items", "window": 4}
        await peer.publish(f"{system.namespace}.node.source", request, reply=replies.subject)
        await replies.wait_until(lambda: len(items_of(replies)) == 4)
        control = replies.frames[0]["control"]
        await peer.publish(control, {"k": "credit", "n": 4})  # earned: 4 items read
        await replies.wait_until(lambda: len(items_of(replies)) == 8)
        await peer.publish(control, {"k": "credit", "n": 1000})  # never earned
        await replies.wait_until(lambda: "err" in replies.kinds)
        failure = replies.frames[-1]
        assert failure["code"] == "bad_request", failure
        assert "credit" in failure["message"] and "'source'" in failure["message"]
        await eventually(lambda: closed == attempt, timeout=WAIT)  # the producer stopped

    async with system:
        await system.ready()
        await overgrant(1)
        await overgrant(2)
        await drained(node)
        assert assert_accounted(node, sent=2).failed == 2
        assert system.bad_inputs == 2
        logged = [r for r in caplog.records if r.name == "happen" and "credit" in r.getMessage()]
        assert len(logged) == 1, "a violation is logged once, then counted"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_frames_a_slow_consumers_client_drops_end_the_stream_with_an_error(
    nats_server: NatsServer,
) -> None:
    """The real thing: nats-py drops messages past a subscription's pending limit while the
    consumer's event loop is busy; the stream reports the gap instead of skipping it."""
    from happen.transports.nats import NatsTransport

    url = nats_server.start().url
    namespace = unique_namespace()
    ready, stop = threading.Event(), threading.Event()

    def producer_host() -> None:  # another "host": its own thread, loop and connection
        async def main() -> None:
            async with happen.System(transport=url, namespace=namespace) as system:
                node = system.create_node("numbers")

                @node.on("count")
                async def count(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
                    for i in range(event.payload):
                        yield i
                        if i % 16 == 0:
                            await anyio.lowlevel.checkpoint()  # frames of a few items

                await system.ready()
                ready.set()
                await anyio.to_thread.run_sync(stop.wait)

        anyio.run(main)

    host = threading.Thread(target=producer_host)
    host.start()
    try:
        assert await anyio.to_thread.run_sync(ready.wait, WAIT)
        consumer = happen.System(
            transport=NatsTransport(url, pending_msgs_limit=16),
            namespace=namespace,
            stream_window=100_000,
        )
        async with consumer:
            client = consumer.create_node("client")
            got: list[int] = []
            with pytest.raises(happen.TransportError, match="lost item") as info:
                event = {"type": "count", "payload": 100_000}
                async with client.stream("numbers", event, timeout=WAIT) as stream:
                    async for item in stream:
                        got.append(item)
                        if item == 0:  # the loop is busy: the client's buffer overflows
                            time.sleep(0.5)  # noqa: ASYNC251
            assert got == list(range(len(got))), "no item was skipped silently"
            assert len(got) < 100_000
            assert "'numbers'" in str(info.value)
    finally:
        stop.set()
        await anyio.to_thread.run_sync(host.join, WAIT)
