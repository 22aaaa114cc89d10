"""The producing side of a streamed reply: credit, cancel, and batching of items.

The handler's generator runs in a pump task that buffers items, never more than the credit
the consumer granted; the publishing loop sends everything buffered as one frame. A fast
generator gets large batches (the per-message cost of the transport is paid once per batch);
a slow one has each item published as soon as it is yielded.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from happen import _protocol as p
from happen._errors import PayloadTooLargeError
from happen._signal import Signal

if TYPE_CHECKING:
    from happen._node import Node, Work
    from happen._sending import Sending

__all__ = ["Producer", "produce", "pump"]

log = logging.getLogger("happen")

#: Items a generator may yield in a row before the pump lets the publisher run.
BATCH_LIMIT = 64


class Producer:
    """Credit from the consumer, and its cancel; fed by the system's inbox callback."""

    __slots__ = ("_signal", "_wake", "abandoned", "cancelled", "credit", "lost", "scope")

    def __init__(self, credit: int, signal: Callable[[], Signal]) -> None:
        self._signal = signal
        self.credit = credit
        self.cancelled = False
        self.lost = False  # cut off by the transport, not cancelled by the consumer
        self.abandoned = False
        self.scope: anyio.CancelScope | None = None
        self._wake: Signal | None = None

    def feed(self, frame: Any) -> None:
        if type(frame) is p.Credit:
            if frame.n > 0:
                self.credit += frame.n
                if self._wake is not None:
                    self._wake.set()
        elif type(frame) is p.Cancel:
            self.cancel()
        elif isinstance(frame, BaseException):  # the connection was lost or the system stops
            self.lost = True
            self.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()

    async def wait_credit(self) -> None:
        while self.credit <= 0:
            self._wake = self._signal()
            await self._wake.wait()
            self._wake = None


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

    Returns ``"end"`` when the generator finished or ``"idle"`` when the consumer granted no
    credit for ``idle_timeout`` seconds; raises what the generator raised, after publishing
    the items it yielded before.
    """
    buffer = _Buffer(producer._signal)

    async def generate() -> None:
        in_a_row = 0
        try:
            while True:
                if producer.credit <= 0:
                    with anyio.move_on_after(idle_timeout) as idle:
                        await producer.wait_credit()
                    if idle.cancelled_caught:
                        buffer.outcome = "idle"
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


async def publish_items(system: Sending, reply: str, items: list[Any]) -> None:
    """One frame for the batch; split in halves if it is over the transport's limit."""
    frame = p.Chunk(items[0]) if len(items) == 1 else p.Chunks(items)
    try:
        await system._reply(reply, frame)
    except PayloadTooLargeError:
        if len(items) == 1:
            raise
        half = len(items) // 2
        await publish_items(system, reply, items[:half])
        await publish_items(system, reply, items[half:])


async def produce(node: Node, work: Work, agen: AsyncIterator[Any]) -> None:
    """Stream ``agen``'s items to the caller, never more than the granted credit ahead."""
    system = node._system
    mailbox = node._mailbox
    producer = Producer(work.window if work.reply else 1 << 62, system._signal)
    control = system._register(producer) if work.reply else ""  # the inbox token
    outcome = "cancelled"  # by the consumer, unless the loop ends otherwise

    async def publish(items: list[Any]) -> None:
        if work.reply:
            await publish_items(system, work.reply, items)

    try:
        if work.reply:
            await system._reply(work.reply, p.StreamStart(system._inbox_prefix + control))
        with anyio.CancelScope() as scope:
            producer.scope = scope
            if producer.cancelled:
                scope.cancel()
            outcome = await pump(agen, producer, publish, system._idle_timeout)
    except system._cancelled:
        mailbox.failed += 1
        with anyio.CancelScope(shield=True):
            await aclose_quietly(agen)
            system._forget_token(control)
            await node._reply(work, p.abandoned(node.id) if work.abandoned else p.stopped(node.id))
        raise
    except Exception as exc:
        mailbox.failed += 1
        with anyio.CancelScope(shield=True):
            await aclose_quietly(agen)
            system._forget_token(control)
            await node._reply(work, p.handler_failure(exc))
        return
    with anyio.CancelScope(shield=True):
        await aclose_quietly(agen)
        system._forget_token(control)
    if outcome == "cancelled" and producer.lost:
        mailbox.failed += 1  # the transport cut it off: the consumer cannot be told
        return
    if outcome == "idle":
        mailbox.failed += 1
        message = (
            f"stream from node {node.id!r} closed: the consumer read nothing "
            f"for {system._idle_timeout} s"
        )
        await node._reply(work, p.Failure(p.TIMEOUT, message))
        return
    mailbox.completed += 1
    if outcome == "end":
        await node._reply(work, p.StreamEnd())


async def aclose_quietly(agen: AsyncIterator[Any]) -> None:
    """Close a handler's generator (its ``finally`` blocks run); log what closing raises."""
    aclose = getattr(agen, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        log.exception("closing a handler's async generator raised")
