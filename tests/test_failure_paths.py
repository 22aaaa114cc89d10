"""Failure paths a user meets: a reply that cannot be sent, a handler that raises oddly, a
transport that closed for good, a caller that gives up while queued, deadlines, stop() from
inside a handler. Each fails one call at most, is counted, and the system serves on."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

import happen
from happen._transport import Message, Transport
from tests.conftest import NatsServer
from tests.helpers import assert_accounted, drained, eventually, make_system, unique_namespace

pytestmark = pytest.mark.anyio

WAIT = 10  # seconds; a test that needs this long has failed


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


async def _one_bad_reply(transport_url: str, handler: Callable[..., Any]) -> happen.HandlerError:
    """Send one event whose reply cannot be sent as is; the node then serves the next one."""
    async with make_system(transport_url) as system:
        node = system.create_node("n")
        node.on("bad", handler)
        node.on("ping", lambda e, c: "pong")
        client = system.create_node("client")
        with anyio.fail_after(WAIT):
            with pytest.raises(happen.HandlerError) as info:
                async with client.stream("n", {"type": "bad"}) as stream:
                    async for _ in stream:
                        pass
            assert await client.send("n", {"type": "ping"}) == "pong"
        await drained(node)
        stats = assert_accounted(node, 2)
        assert (stats.completed, stats.failed) == (1, 1)
        assert len(str(info.value)) < 10_000, "the error message is bounded"
        return info.value


async def test_a_result_over_max_payload_fails_that_call_only(transport_url: str) -> None:
    error = await _one_bad_reply(transport_url, lambda e, c: "x" * (1024 * 1024 + 100))
    assert error.remote_type == "PayloadTooLargeError"


async def test_an_exception_message_over_max_payload_fails_that_call_only(
    transport_url: str,
) -> None:
    def raises(e: happen.Event, c: dict[str, Any]) -> None:
        raise ValueError("y" * (1024 * 1024 + 100))

    error = await _one_bad_reply(transport_url, raises)
    assert error.remote_type in ("ValueError", "PayloadTooLargeError")


async def test_a_result_that_cannot_be_encoded_fails_that_call_only(transport_url: str) -> None:
    # a lone surrogate, as in a file name from os.listdir on a badly encoded disk
    error = await _one_bad_reply(transport_url, lambda e, c: {"name": "report-\udcff.txt"})
    assert error.remote_type == "CodecError"


async def test_an_exception_whose_str_raises_fails_that_call_only(transport_url: str) -> None:
    def raises(e: happen.Event, c: dict[str, Any]) -> None:
        raise Unprintable()

    error = await _one_bad_reply(transport_url, raises)
    assert error.remote_type == "Unprintable"


async def test_a_stream_item_over_max_payload_is_reported_as_itself(transport_url: str) -> None:
    async def items(e: happen.Event, c: dict[str, Any]):  # type: ignore[no-untyped-def]
        yield "small"
        yield "x" * (1024 * 1024 + 100)

    error = await _one_bad_reply(transport_url, items)
    assert error.remote_type == "PayloadTooLargeError"


async def test_a_stream_item_that_cannot_be_encoded_is_reported_as_itself(
    transport_url: str,
) -> None:
    async def items(e: happen.Event, c: dict[str, Any]):  # type: ignore[no-untyped-def]
        yield "fine"
        yield "\udcff"

    error = await _one_bad_reply(transport_url, items)
    assert error.remote_type == "CodecError"


async def test_items_nested_to_the_limit_arrive_batched_or_not(transport_url: str) -> None:
    """A batch frame adds a level of nesting: items that fit alone must still arrive."""

    def nested(levels: int) -> Any:
        value: Any = "bottom"
        for _ in range(levels):
            value = [value]
        return value

    async with make_system(transport_url, max_depth=16) as system:
        node = system.create_node("n")
        deepest = nested(14)  # a chunk frame {k, item: ...} is one level more: 15 + the leaf

        @node.on("items")
        async def items(e: happen.Event, c: dict[str, Any]):  # type: ignore[no-untyped-def]
            for _ in range(200):  # fast enough to be batched
                yield deepest

        client = system.create_node("client")
        with anyio.fail_after(WAIT):
            got = [item async for item in client.stream("n", {"type": "items"})]
        assert got == [deepest] * 200


async def test_a_malformed_request_with_a_huge_error_is_still_answered(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    system = happen.System(transport=make_transport(), namespace=ns)
    system.create_node("n").on("x", lambda e, c: "ok")
    raw = make_transport()
    replies: list[dict[str, Any]] = []
    answered = anyio.Event()

    async def on_reply(msg: Message) -> None:
        replies.append(msgspec.msgpack.decode(msg.data))
        answered.set()

    async with system:
        await system.ready()
        await raw.start()
        inbox = raw.new_inbox()
        await raw.subscribe(inbox, on_reply)
        bad_kind = "!" * (1024 * 1024 - 200)  # its error message quotes it: over the limit
        await raw.publish(
            f"{ns}.node.n", msgspec.msgpack.encode({"k": bad_kind, "type": "x"}), reply=inbox
        )
        with anyio.fail_after(WAIT):
            await answered.wait()
        assert replies[0]["k"] == "err" and replies[0]["code"] == "bad_request"
        assert "truncated" in replies[0]["message"]
        assert system.stats()["n"].rejected == 1


async def test_registering_after_the_transport_closed_for_good_does_not_crash(
    make_transport: Callable[[], Transport],
) -> None:
    transport = make_transport()
    async with happen.System(transport=transport, namespace=unique_namespace()) as system:
        system.create_node("early").on("x", lambda e, c: 1)
        await system.ready()
        await transport.stop()  # closed for good, under the system's feet
        late = system.create_node("late")
        late.on("y", lambda e, c: 2)
        system.create_node("early2").on("z", lambda e, c: 3)
        with pytest.raises(happen.TransportError):
            await late.send("early", {"type": "x"}, timeout=WAIT)
    # leaving `async with` raised nothing: the system survived


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_registering_after_the_nats_connection_closed_does_not_crash() -> None:
    from happen.transports.nats import NatsTransport

    with NatsServer() as server:
        closed = anyio.Event()

        async def on_closed() -> None:
            closed.set()

        transport = NatsTransport(server.url, allow_reconnect=False, closed_cb=on_closed)
        async with happen.System(transport=transport, namespace=unique_namespace()) as system:
            system.create_node("early").on("x", lambda e, c: 1)
            await system.ready()
            server.stop()
            with anyio.fail_after(WAIT):
                await closed.wait()
            late = system.create_node("late")
            late.on("y", lambda e, c: 2)
            with pytest.raises(happen.TransportError):
                await late.send("early", {"type": "x"}, timeout=WAIT)


async def test_a_handler_exception_is_logged_once_with_its_traceback(
    transport_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="happen")
    async with make_system(transport_url) as system:
        node = system.create_node("n")

        def explode(e: happen.Event, c: dict[str, Any]) -> None:
            raise KeyError("missing-order-42")

        node.on("x", explode)
        client = system.create_node("client")
        for _ in range(2):
            with pytest.raises(happen.HandlerError):
                await client.send("n", {"type": "x"})
    records = [r for r in caplog.records if r.name == "happen.handlers"]
    assert len(records) == 2, "once per failed event"
    assert "'n'" in records[0].getMessage() and "KeyError" in records[0].getMessage()
    assert records[0].exc_info is not None and "explode" in caplog.text  # the traceback


async def test_errors_carry_their_facts(transport_url: str) -> None:
    config = {"patterns": {"small": {"max_concurrent": 1, "queue_limit": 1}}}
    async with make_system(transport_url, concurrency=config) as system:
        small = system.create_node("small")
        release = anyio.Event()

        @small.on("hold")
        async def hold(e: happen.Event, c: dict[str, Any]) -> None:
            await release.wait()

        client = system.create_node("client")
        with pytest.raises(happen.NoHandlerError) as no_handler:
            await client.send("small", {"type": "nothing"})
        assert (no_handler.value.node_id, no_handler.value.event_type) == ("small", "nothing")
        with pytest.raises(happen.NodeNotFoundError) as not_found:
            await client.send("nobody", {"type": "x"})
        assert not_found.value.node_id == "nobody"
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.send, "small", {"type": "hold"})
            await eventually(lambda: small.stats().active == 1)
            tg.start_soon(client.send, "small", {"type": "hold"})
            await eventually(lambda: small.stats().queued == 1)
            with pytest.raises(happen.QueueFullError) as full:
                await client.send("small", {"type": "hold"})
            assert (full.value.node_id, full.value.queued) == ("small", 1)
            release.set()


async def test_a_caller_that_gives_up_while_queued_frees_its_place_at_once(
    transport_url: str,
) -> None:
    config = {"patterns": {"one": {"max_concurrent": 1, "queue_limit": 1}}}
    async with make_system(transport_url, concurrency=config) as system:
        one = system.create_node("one")
        release = anyio.Event()

        @one.on("hold")
        async def hold(e: happen.Event, c: dict[str, Any]) -> str:
            await release.wait()
            return "done"

        client = system.create_node("client")
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.send, "one", {"type": "hold"})
            await eventually(lambda: one.stats().active == 1)
            waiting = anyio.CancelScope()
            tg.start_soon(_send_in, waiting, client)
            await eventually(lambda: one.stats().queued == 1)
            waiting.cancel()  # the queued caller gives up
            # its place is free at once, while the running handler still holds the slot
            await eventually(lambda: one.stats().queued == 0, timeout=1)
            assert one.stats().failed == 1 and one.stats().active == 1
            began = time.monotonic()
            tg.start_soon(client.send, "one", {"type": "hold"})  # not QueueFullError
            await eventually(lambda: one.stats().queued == 1, timeout=1)
            assert time.monotonic() - began < 1
            release.set()
        await drained(one)
        stats = assert_accounted(one, 3)
        assert (stats.completed, stats.failed) == (2, 1)


async def _send_in(scope: anyio.CancelScope, client: happen.Node) -> None:
    with scope:
        await client.send("one", {"type": "hold"})


async def test_a_deadline_is_enforced_while_the_request_waits_in_the_queue(
    make_transport: Callable[[], Transport],
) -> None:
    """A foreign caller's timeout_ms passes while its request is queued: it is answered
    ``timeout`` at the deadline and the handler never starts."""
    ns = unique_namespace()
    config = {"patterns": {"one": {"max_concurrent": 1}}}
    system = happen.System(transport=make_transport(), namespace=ns, concurrency=config)
    one = system.create_node("one")
    release = anyio.Event()
    started: list[Any] = []

    @one.on("job")
    async def job(e: happen.Event, c: dict[str, Any]) -> None:
        started.append(e.payload)
        await release.wait()

    raw = make_transport()
    answered = anyio.Event()
    replies: list[tuple[float, dict[str, Any]]] = []

    async def on_reply(msg: Message) -> None:
        replies.append((time.monotonic(), msgspec.msgpack.decode(msg.data)))
        answered.set()

    async with system:
        await system.ready()
        await raw.start()
        inbox = raw.new_inbox()
        await raw.subscribe(inbox, on_reply)
        subject = f"{ns}.node.one"
        await raw.publish(
            subject, msgspec.msgpack.encode({"k": "req", "type": "job", "payload": 1})
        )
        await eventually(lambda: started == [1])
        sent = time.monotonic()
        request = {"k": "req", "type": "job", "payload": 2, "timeout_ms": 200}
        await raw.publish(subject, msgspec.msgpack.encode(request), reply=inbox)
        with anyio.fail_after(WAIT):
            await answered.wait()
        at, reply = replies[0]
        assert reply["k"] == "err" and reply["code"] == "timeout", reply
        assert 0.15 < at - sent < 1.0, "answered at the deadline, while the first still runs"
        assert one.stats().queued == 0
        release.set()
        await drained(one)
        assert started == [1], "the handler never started after its deadline"
        stats = assert_accounted(one, 2)
        assert (stats.completed, stats.failed) == (1, 1)


async def test_the_nodes_timeout_reaches_the_caller_with_its_message(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("slow")

        @node.on("wait")
        async def wait(e: happen.Event, c: dict[str, Any]) -> None:
            await anyio.sleep_forever()

        client = system.create_node("client")
        with pytest.raises(happen.SendTimeout, match="handler for 'wait' on node 'slow'"):
            await client.send("slow", {"type": "wait"}, timeout=0.5)
        await drained(node)
        assert node.stats().failed == 1


async def test_stop_awaited_inside_a_handler_stops_the_system(transport_url: str) -> None:
    stopped = anyio.Event()
    async with make_system(transport_url) as system:
        node = system.create_node("n")

        @node.on("shutdown")
        async def shutdown(e: happen.Event, c: dict[str, Any]) -> str:
            await system.stop()
            return "stopping"

        client = system.create_node("client")
        with anyio.fail_after(WAIT):
            assert await client.send("n", {"type": "shutdown"}) == "stopping"
            await system.stop()  # returns once the system has stopped
            stopped.set()
        with pytest.raises(happen.SystemStoppedError):
            await client.send("n", {"type": "shutdown"})
    assert stopped.is_set()


async def test_a_second_concurrent_stop_returns_once_the_system_has_stopped(
    transport_url: str,
) -> None:
    system = make_system(transport_url, drain_timeout=0.3)
    order: list[str] = []
    async with system:
        node = system.create_node("n")
        started = anyio.Event()

        @node.on("hang")
        async def hang(e: happen.Event, c: dict[str, Any]) -> None:
            started.set()
            await anyio.sleep_forever()

        client = system.create_node("client")

        async def call() -> None:
            with pytest.raises(happen.TransportError):
                await client.send("n", {"type": "hang"})

        async def stop(name: str) -> None:
            await system.stop()
            order.append(name)
            with pytest.raises(happen.SystemStoppedError):
                await client.send("n", {"type": "hang"})

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await started.wait()
                tg.start_soon(stop, "first")
                tg.start_soon(stop, "second")
    assert sorted(order) == ["first", "second"]


async def test_the_request_that_fills_the_queue_is_held(
    make_transport: Callable[[], Transport],
) -> None:
    """A remote sender following the rules stops at ``hold`` before it meets queue_full."""
    ns = unique_namespace()
    config = {
        "patterns": {
            "n": {"max_concurrent": 1, "queue_limit": 2, "backpressure_threshold": 1.0 - 1e-9}
        }
    }
    system = happen.System(transport=make_transport(), namespace=ns, concurrency=config)
    node = system.create_node("n")
    release = anyio.Event()

    @node.on("job")
    async def job(e: happen.Event, c: dict[str, Any]) -> None:
        await release.wait()

    raw = make_transport()
    frames: list[dict[str, Any]] = []

    async def on_reply(msg: Message) -> None:
        frames.append({"to": msg.subject, **msgspec.msgpack.decode(msg.data)})

    async with system:
        await system.ready()
        await raw.start()
        inboxes = [raw.new_inbox() for _ in range(3)]
        for inbox in inboxes:
            await raw.subscribe(inbox, on_reply)
        for inbox in inboxes:  # the first runs, the second and third fill the queue
            request = {"k": "req", "type": "job", "origin": "elsewhere"}
            await raw.publish(f"{ns}.node.n", msgspec.msgpack.encode(request), reply=inbox)
        await eventually(lambda: node.stats().queued == 2)
        await eventually(lambda: any(f["to"] == inboxes[2] for f in frames))
        assert [f["k"] for f in frames if f["to"] == inboxes[2]] == ["hold"]
        release.set()
        await eventually(lambda: len([f for f in frames if f["k"] == "res"]) == 3)


async def test_a_deadline_bounds_a_generator_handler_until_its_first_item(
    transport_url: str,
) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("gen")
        closed = anyio.Event()

        @node.on("late")
        async def late(e: happen.Event, c: dict[str, Any]):  # type: ignore[no-untyped-def]
            try:
                await anyio.sleep_forever()  # never produces its first item
                yield "never"
            finally:
                closed.set()

        @node.on("prompt")
        async def prompt(e: happen.Event, c: dict[str, Any]):  # type: ignore[no-untyped-def]
            yield 1
            await anyio.lowlevel.checkpoint()
            yield 2

        client = system.create_node("client")
        with anyio.fail_after(WAIT):
            with pytest.raises(happen.SendTimeout, match="handler for 'late' on node 'gen'"):
                await client.send("gen", {"type": "late"}, timeout=0.5)
            await closed.wait()  # the generator was closed
            stream = await client.send("gen", {"type": "prompt"}, timeout=5)
            assert [item async for item in stream] == [1, 2]
        await drained(node)
        stats = assert_accounted(node, 2)
        assert (stats.completed, stats.failed) == (1, 1)
