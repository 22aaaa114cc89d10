"""The producing side of a streamed reply: credit, cancel, and batching of items.

The handler's generator runs in a pump task that buffers items, never more than the credit
the consumer granted; the publishing loop sends everything buffered as one frame. A fast
generator gets large batches (the per-message cost of the transport is paid once per batch);
a slow one has each item published as soon as it is yielded.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from happen import _wire as p
from happen._errors import PayloadTooLargeError
from happen._mailbox import Mailbox
from happen._runtime import Runtime
from happen._signal import Signal

__all__ = ["Producer", "produce", "pump"]

log = logging.getLogger("happen")

#: Items a generator may yield in a row before the pump lets the publisher run.
BATCH_LIMIT = 64


class Producer:
    """Credit from the consumer, and its cancel; fed by the system's inbox callback.

    While it waits for credit longer than ``tick`` seconds, ``ping`` (when set) asks the
    consumer's system whether it still reads: an answer keeps the stream, a "gone" answer
    or a "no responders" status stops it at once, and two unanswered pings in a row stop it
    too (``wait_for_credit`` returns ``"lost"``).
    """

    __slots__ = (
        "_wake",
        "abandoned",
        "cancelled",
        "credit",
        "lost",
        "ping",
        "scope",
        "signal",
        "target",
        "tick",
        "unanswered",
    )

    def __init__(
        self,
        credit: int,
        signal: Callable[[], Signal],
        *,
        tick: float = 0.0,
        ping: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.signal = signal
        self.target = ""  # the route protocol's field; a producer has no target node
        self.credit = credit
        self.cancelled = False
        self.lost = False  # cut off by the transport or the consumer's host, not cancelled
        self.abandoned = False
        self.scope: anyio.CancelScope | None = None
        self.tick = tick
        self.ping = ping if tick > 0 else None
        self.unanswered = 0  # pings sent in a row without a pong
        self._wake: Signal | None = None

    def feed(self, frame: Any) -> None:
        if type(frame) is p.Credit:
            if frame.n > 0:
                self.credit += frame.n
                self.unanswered = 0
                if self._wake is not None:
                    self._wake.set()
        elif type(frame) is p.Cancel:
            self.cancel()
        elif type(frame) is p.Pong:
            self.unanswered = 0
            if frame.gone:  # the consumer's system no longer reads this stream
                self.lost = True
                self.cancel()
        elif isinstance(frame, BaseException):  # connection lost, system stops, no responders
            self.lost = True
            self.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()

    async def wait_credit(self) -> None:
        while self.credit <= 0:
            self._wake = self.signal()
            await self._wake.wait()
            self._wake = None

    async def wait_for_credit(self, idle_timeout: float) -> str:
        """Wait for credit: ``""`` once there is some, ``"idle"`` when none came for
        ``idle_timeout`` seconds, ``"lost"`` when two pings in a row went unanswered."""
        deadline = anyio.current_time() + idle_timeout
        while self.credit <= 0:
            left = deadline - anyio.current_time()
            if left <= 0:
                return "idle"
            ping = self.ping
            with anyio.move_on_after(left if ping is None else min(left, self.tick)):
                await self.wait_credit()
            if self.credit > 0 or ping is None or anyio.current_time() >= deadline:
                continue
            if self.unanswered >= 2:
                return "lost"
            self.unanswered += 1
            await ping()
        return ""


class _Buffer:
    __slots__ = ("_signal", "_wake", "done", "error", "items", "outcome")

    def __init__(self, signal: Callable[[], Signal]) -> None:
        self._signal = signal
        self._wake: Signal | None = None
        self.items: list[Any] = []
        self.done = False
        self.error: Exception | None = None
        self.outcome = "end"

    def notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def wait(self) -> None:
        self._wake = self._signal()
        await self._wake.wait()
        self._wake = None


async def pump(
    agen: AsyncIterator[Any],
    producer: Producer,
    publish: Callable[[list[Any]], Awaitable[None]],
    idle_timeout: float,
) -> str:
    """Run ``agen`` within the credit and publish its items in batches.

    Returns ``"end"`` when the generator finished, ``"idle"`` when the consumer granted no
    credit for ``idle_timeout`` seconds, or ``"lost"`` when the consumer's system stopped
    answering pings; raises what the generator raised, after publishing the items it
    yielded before.
    """
    buffer = _Buffer(producer.signal)

    async def generate() -> None:
        in_a_row = 0
        try:
            while True:
                if producer.credit <= 0:
                    waited = await producer.wait_for_credit(idle_timeout)
                    if waited:
                        buffer.outcome = waited
                        return
                    continue
                item = await agen.__anext__()
                producer.credit -= 1
                buffer.items.append(item)
                buffer.notify()
                in_a_row += 1
                if in_a_row >= BATCH_LIMIT and len(buffer.items) >= BATCH_LIMIT:
                    in_a_row = 0
                    await anyio.lowlevel.checkpoint()  # let the publisher send a batch
        except StopAsyncIteration:
            buffer.outcome = "end"
        except Exception as exc:
            buffer.error = exc
        finally:
            buffer.done = True
            buffer.notify()

    async with anyio.create_task_group() as tg:
        tg.start_soon(generate)
        while True:
            if buffer.items:
                items = buffer.items
                buffer.items = []
                await publish(items)
            elif buffer.done:
                break
            else:
                await buffer.wait()
    # A cancelled generator task also ends the loop above (its finally marks the buffer
    # done): make sure a cancellation is raised here, not mistaken for the end of the stream.
    await anyio.lowlevel.checkpoint_if_cancelled()
    if buffer.error is not None:
        raise buffer.error
    return buffer.outcome


class Conversation(Protocol):
    """The request a streamed reply answers."""

    reply: str  # the caller's inbox; "" for a broadcast (nobody to reply to)
    window: int  # the credit the caller granted up front
    abandoned: bool  # the caller gave up
    origin: str  # the calling happen system's id; "" for a foreign client (never pinged)


async def publish_items(wire: p.Wire, reply: str, items: list[Any]) -> None:
    """One frame for the batch; split in halves if it is over the transport's limit."""
    frame = p.Chunk(items[0]) if len(items) == 1 else p.Chunks(items)
    try:
        await wire.publish(reply, frame)
    except PayloadTooLargeError:
        if len(items) == 1:
            raise
        half = len(items) // 2
        await publish_items(wire, reply, items[:half])
        await publish_items(wire, reply, items[half:])


async def produce(
    conversation: Conversation,
    agen: AsyncIterator[Any],
    *,
    node_id: str,
    wire: p.Wire,
    runtime: Runtime,
    mailbox: Mailbox[Any],
    idle_timeout: float,
    liveness_timeout: float,
) -> None:
    """Stream ``agen``'s items to the caller, never more than the granted credit ahead.

    Counts the outcome on ``mailbox``: completed, or failed (the generator raised, the
    consumer vanished or read nothing for ``idle_timeout``, the consumer's system stopped
    answering within ``liveness_timeout``, the system stopped).
    """
    reply = conversation.reply
    control = ""  # the inbox token of the producer's control subject

    async def ping() -> None:
        try:
            await wire.publish(reply, p.Ping(), reply=wire.inbox_prefix + control)
        except Exception as exc:  # not answered, then: counted as such
            log.debug("could not ping the consumer of %s: %s", reply, exc)

    producer = Producer(
        conversation.window if reply else 1 << 62,
        runtime.signal,
        tick=liveness_timeout / 4 if reply and conversation.origin else 0.0,
        ping=ping,
    )
    control = wire.register(producer) if reply else ""
    outcome = "cancelled"  # by the consumer, unless the loop ends otherwise

    async def publish(items: list[Any]) -> None:
        if reply:
            await publish_items(wire, reply, items)

    async def answer(frame: Any) -> None:
        if reply:
            await wire.reply(reply, frame)

    try:
        if reply and not await wire.reply(reply, p.StreamStart(wire.inbox_prefix + control)):
            raise p.ReplyLost(f"could not start a stream to {reply}")
        with anyio.CancelScope() as scope:
            producer.scope = scope
            if producer.cancelled:
                scope.cancel()
            outcome = await pump(agen, producer, publish, idle_timeout)
    except runtime.cancelled:
        mailbox.failed += 1
        with anyio.CancelScope(shield=True):
            await aclose_quietly(agen)
            wire.forget(control)
            await answer(p.abandoned(node_id) if conversation.abandoned else p.stopped(node_id))
        raise
    except p.ReplyLost:
        mailbox.failed += 1
        with anyio.CancelScope(shield=True):
            await aclose_quietly(agen)
            wire.forget(control)
        return
    except Exception as exc:
        mailbox.failed += 1
        with anyio.CancelScope(shield=True):
            await aclose_quietly(agen)
            wire.forget(control)
            await answer(p.handler_failure(exc))
        return
    with anyio.CancelScope(shield=True):
        await aclose_quietly(agen)
        wire.forget(control)
    if outcome == "cancelled" and producer.lost:
        mailbox.failed += 1  # the transport cut it off: the consumer cannot be told
        return
    if outcome == "idle":
        mailbox.failed += 1
        message = (
            f"stream from node {node_id!r} closed: the consumer read nothing for {idle_timeout} s"
        )
        await answer(p.Failure(p.TIMEOUT, message))
        return
    if outcome == "lost":
        mailbox.failed += 1
        message = (
            f"stream from node {node_id!r} closed: the consumer's system did not answer "
            f"for {liveness_timeout} s"
        )
        await answer(p.Failure(p.TIMEOUT, message))  # in case it was only frozen
        return
    if outcome == "end" and reply and not await wire.reply(reply, p.StreamEnd()):
        mailbox.failed += 1
        return
    mailbox.completed += 1


async def aclose_quietly(agen: AsyncIterator[Any]) -> None:
    """Close a handler's generator (its ``finally`` blocks run); log what closing raises."""
    aclose = getattr(agen, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        log.exception("closing a handler's async generator raised")
