"""A hostile or broken peer for the tests: a bare transport that publishes hand-written frames
and records what arrives on the subjects it listens to, as a client in another process would.

Frames are MessagePack maps, the default codec of a happen system.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec

from happen._transport import Message, Transport

WAIT = 10  # seconds; a test that needs this long has failed


def encode(frame: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode(frame)


class Heard:
    """What arrived on one subscription (``subject``): (message, decoded frame) pairs."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.messages: list[tuple[Message, dict[str, Any]]] = []
        self._changed = anyio.Event()

    def add(self, msg: Message) -> None:
        frame = msgspec.msgpack.decode(msg.data) if msg.data else {}
        self.messages.append((msg, frame))
        self._changed.set()

    @property
    def frames(self) -> list[dict[str, Any]]:
        return [frame for _, frame in self.messages]

    @property
    def kinds(self) -> list[str]:
        return [frame.get("k", "") for frame in self.frames]

    async def wait_until(self, condition: Callable[[], bool], timeout: float = WAIT) -> None:
        with anyio.fail_after(timeout):
            while not condition():
                self._changed = anyio.Event()
                await self._changed.wait()

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        await self.wait_until(lambda: len(self.messages) >= count)
        return self.frames


class RawPeer:
    """A bare transport (of the test's kind) with an inbox of its own."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.inbox = ""

    async def start(self) -> RawPeer:
        await self.transport.start()
        self.inbox = self.transport.new_inbox()
        return self

    async def listen(
        self,
        subject: str,
        *,
        queue: str | None = None,
        respond: Callable[[Message, dict[str, Any]], Awaitable[None]] | None = None,
    ) -> Heard:
        """Record what arrives on ``subject`` (and hand each frame to ``respond``); returns
        once the subscription is live on the server."""
        heard = Heard(subject)

        async def on_message(msg: Message) -> None:
            heard.add(msg)
            if respond is not None:
                await respond(msg, heard.frames[-1])

        await self.transport.subscribe(subject, on_message, queue=queue)
        await self.round_trip()
        return heard

    async def round_trip(self) -> None:
        """Return once a request to nobody came back as "no responders": every subscription
        made before is then live on the server."""
        answered = anyio.Event()
        probe = f"{self.inbox}.probe{id(answered):x}"

        async def on_status(msg: Message) -> None:
            answered.set()

        sub = await self.transport.subscribe(probe, on_status)
        await self.transport.publish("zz.nobody.listens", b"", reply=probe)
        with anyio.fail_after(WAIT):
            await answered.wait()
        await sub.unsubscribe()

    async def publish(self, subject: str, frame: dict[str, Any], reply: str | None = None) -> None:
        await self.transport.publish(subject, encode(frame), reply=reply)
