"""Watching calls (``system.observe_calls``) and the trace context in the causal context."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import msgspec
import pytest

import happen
from tests.helpers import make_system, unique_namespace

pytestmark = pytest.mark.anyio

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Watch:
    def __init__(self, log: list[Any], started: tuple[Any, ...], trace: str | None) -> None:
        self.log = log
        self.started = started
        self.trace = trace

    def ended(self, error: BaseException | None) -> None:
        self.log.append((*self.started, type(error).__name__ if error else None))


class Observer:
    """Records every call and its outcome; gives each a traceparent of its own."""

    def __init__(self) -> None:
        self.ended: list[Any] = []
        self.count = 0

    def call_started(
        self, operation: str, sender: str, target: str | None, event_type: str
    ) -> Watch:
        self.count += 1
        trace = f"00-{'1' * 32}-{self.count:016x}-01"
        return Watch(self.ended, (operation, sender, target, event_type), trace)


def test_the_trace_field_is_omitted_when_unset() -> None:
    context = happen.CausalContext(id="e-1", sender="a", correlation_id="e-1")
    assert b"trace" not in msgspec.json.encode(context)
    traced = msgspec.structs.replace(context, trace=TRACE)
    assert msgspec.json.decode(msgspec.json.encode(traced), type=happen.CausalContext) == traced


async def test_a_send_from_a_handler_inherits_the_trace(
    make_transport: Callable[[], happen.Transport],
) -> None:
    namespace = unique_namespace()
    front = happen.System(transport=make_transport(), namespace=namespace)
    back = happen.System(transport=make_transport(), namespace=namespace)
    async with front, back:
        a, b = back.create_node("a"), back.create_node("b")

        @a.on("start")
        async def start(event: happen.Event, context: dict[str, Any]) -> Any:
            return [event.context.trace, await a.send("b", {"type": "next"})]

        @b.on("next")
        async def next_(event: happen.Event, context: dict[str, Any]) -> Any:
            return event.context.trace

        await back.ready()
        client = front.create_node("client")
        assert await client.send("a", {"type": "start"}) == [None, None]
        # The calls of an observed system carry a trace; the handler of an unobserved one
        # passes it on to its own sends.
        observer = Observer()
        front.observe_calls(observer)
        trace = f"00-{'1' * 32}-{1:016x}-01"
        assert await client.send("a", {"type": "start"}) == [trace, trace]


async def test_an_observer_sees_every_call_and_its_outcome(transport_url: str) -> None:
    observer = Observer()
    async with make_system(transport_url) as system:
        node = system.create_node("svc")
        seen: list[str | None] = []
        heard = anyio.Event()

        @node.on("one")
        async def one(event: happen.Event, context: dict[str, Any]) -> Any:
            seen.append(event.context.trace)
            return 1

        @node.on("fail")
        async def fail(event: happen.Event, context: dict[str, Any]) -> Any:
            raise ValueError("no")

        @node.on("many")
        async def many(event: happen.Event, context: dict[str, Any]) -> AsyncIterator[int]:
            seen.append(event.context.trace)
            for i in range(3):
                yield i

        @node.on("note")
        async def note(event: happen.Event, context: dict[str, Any]) -> None:
            seen.append(event.context.trace)
            heard.set()

        system.observe_calls(observer)
        with pytest.raises(RuntimeError, match="observer already"):
            system.observe_calls(Observer())
        await system.ready()
        client = system.create_node("client")
        assert await client.send("svc", {"type": "one"}) == 1
        with pytest.raises(happen.HandlerError):
            await client.send("svc", {"type": "fail"})
        async with client.stream("svc", {"type": "many"}) as stream:
            assert [i async for i in stream] == [0, 1, 2]
        sent = await client.send("svc", {"type": "many"})
        async for i in sent:
            if i == 1:
                break  # closed early: ended without an error
        await sent.aclose()
        await client.broadcast({"type": "note"})
        with anyio.fail_after(5):
            await heard.wait()
        assert observer.ended == [
            ("send", "client", "svc", "one", None),
            ("send", "client", "svc", "fail", "HandlerError"),
            ("stream", "client", "svc", "many", None),
            ("send", "client", "svc", "many", None),
            ("broadcast", "client", None, "note", None),
        ]
        # Each event carried its own call's trace.
        assert seen == [f"00-{'1' * 32}-{n:016x}-01" for n in (1, 3, 4, 5)]
        system.observe_calls(None)
        assert await client.send("svc", {"type": "one"}) == 1
        assert len(observer.ended) == 5
