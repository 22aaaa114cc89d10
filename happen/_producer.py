"""The producing side of a streamed reply: credit, cancel, and batching of items.

The handler's generator runs in a pump task that buffers items, never more than the credit
the consumer granted; the publishing loop sends everything buffered as one frame. A fast
generator gets large batches (the per-message cost of the transport is paid once per batch);
a slow one has each item published as soon as it is yielded.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from happen import _wire as p
from happen._errors import CodecError, PayloadTooLargeError
from happen._mailbox import Mailbox
from happen._runtime import Runtime
from happen._signal import Signal

__all__ = ["Producer", "produce", "pump"]

log = logging.getLogger("happen")
handler_log = logging.getLogger("happen.handlers")

#: Items a generator may yield in a row before the pump lets the publisher run.
BATCH_LIMIT = 64


class Producer:
    """Credit from the consumer, and its cancel; fed by the system's inbox callback.

    ``sent`` counts the items handed to the transport. A consumer can grant credit only for
    items it has read, so credit beyond ``sent`` in all (the window aside) breaks the
    protocol: the producer stops and ``violation`` says why. A cancel counts only with the
    secret whose digest is ``seal`` (when the request had one); ``report`` is told of any
    other, which is otherwise ignored.
    """

    __slots__ = (
        "_wake",
        "abandoned",
        "cancelled",
        "credit",
        "granted",
        "lost",
        "report",
        "scope",
        "seal",
        "sent",
        "signal",
        "target",
        "violation",
    )
    secret = ""  # the route protocol's field: a producer sends no cancel of its own

    def __init__(
        self,
        credit: int,
        signal: Callable[[], Signal],
        *,
        seal: str = "",
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.signal = signal
        self.target = ""  # the route protocol's field; a producer has no target node
        self.credit = credit
        self.granted = 0  # credit received in Credit frames, in all
        self.sent = 0  # items handed to the transport
        self.seal = seal
        self.report = report
        self.cancelled = False
        self.lost = False  # cut off by the transport, not cancelled by the consumer
        self.violation = ""  # why the consumer's frames broke the protocol, if they did
        self.abandoned = False
        self.scope: anyio.CancelScope | None = None
        self._wake: Signal | None = None

    def feed(self, frame: Any) -> None:
        kind = type(frame)
        if kind is p.Credit:
            n = frame.n
            if n > 0:
                self.granted += n
                if self.granted > self.sent:
                    self.violation = (
                        f"the consumer granted credit for {self.granted} items in all, but only "
                        f"{self.sent} were sent: credit is given for items read"
                    )
                    self.cancel()
                    return
                self.credit += n
                if self._wake is not None:
                    self._wake.set()
        elif kind is p.Cancel:
            if self.seal and not p.seal_matches(self.seal, frame.secret):
                if self.report is not None:
                    self.report("ignored a cancel without the stream's secret")
                return
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
            self._wake = self.signal()
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
    buffer = _Buffer(producer.signal)

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

    failed_publish: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(generate)
        while True:
            if buffer.items:
                items = buffer.items
                buffer.items = []
                try:
                    await publish(items)
                except Exception as exc:  # raised as itself below, not as an ExceptionGroup
                    failed_publish = exc
                    tg.cancel_scope.cancel()
                    break
            elif buffer.done:
                break
            else:
                await buffer.wait()
    if failed_publish is not None:
        raise failed_publish
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
    seal: str  # the digest of the caller's secret ("" from a client that sent none)


async def publish_items(wire: p.Wire, reply: str, items: list[Any], producer: Producer) -> None:
    """One frame for the batch, numbered from ``producer.sent``; split in halves if it is
    over the transport's limit."""
    seq = producer.sent
    frame = p.Chunk(items[0], seq) if len(items) == 1 else p.Chunks(items, seq)
    producer.sent = seq + len(items)  # before the await: credit for them may come at once
    try:
        await wire.publish(reply, frame)
    except (PayloadTooLargeError, CodecError):
        # Too large, or one item cannot be encoded, or the batch's extra level of nesting
        # is one too many: nothing was sent; send the halves, down to the item that fails.
        producer.sent = seq
        if len(items) == 1:
            raise
        half = len(items) // 2
        await publish_items(wire, reply, items[:half], producer)
        await publish_items(wire, reply, items[half:], producer)


async def produce(
    conversation: Conversation,
    agen: AsyncIterator[Any],
    *,
    node_id: str,
    wire: p.Wire,
    runtime: Runtime,
    mailbox: Mailbox[Any],
    idle_timeout: float,
) -> None:
    """Stream ``agen``'s items to the caller, never more than the granted credit ahead.

    Counts the outcome on ``mailbox``: completed, or failed (the generator raised, the
    consumer vanished or read nothing for ``idle_timeout``, the system stopped).
    """
    reply = conversation.reply
    where = f"node {node_id!r} stream"
    producer = Producer(
        conversation.window if reply else 1 << 62,
        runtime.signal,
        seal=conversation.seal,
        report=lambda message: wire.report_violation(f"{where} cancel", message),
    )
    control = wire.register(producer) if reply else ""  # the inbox token
    outcome = "cancelled"  # by the consumer, unless the loop ends otherwise

    async def publish(items: list[Any]) -> None:
        if reply:
            await publish_items(wire, reply, items, producer)

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
        handler_log.error(
            "streaming handler on node %r raised %s", node_id, type(exc).__name__, exc_info=exc
        )
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
    if producer.violation:
        mailbox.failed += 1
        wire.report_violation(where, f"stopped a stream: {producer.violation}")
        await answer(p.Failure(p.BAD_REQUEST, f"{where} stopped: {producer.violation}"))
        return
    if outcome == "idle":
        mailbox.failed += 1
        message = (
            f"stream from node {node_id!r} closed: the consumer read nothing for {idle_timeout} s"
        )
        await answer(p.Failure(p.TIMEOUT, message))
        return
    if outcome == "end" and reply and not await wire.reply(reply, p.StreamEnd(producer.sent)):
        mailbox.failed += 1
        return
    mailbox.completed += 1


async def first_item_ahead(agen: AsyncGenerator[Any, Any]) -> AsyncGenerator[Any, None]:
    """Run ``agen`` to its first item now; return a generator yielding that item, then the
    rest of ``agen`` (closing ``agen`` when it is closed). Raises what ``agen`` raised."""
    try:
        first = await agen.__anext__()
    except StopAsyncIteration:
        return _nothing()

    async def ahead() -> AsyncGenerator[Any, None]:
        try:
            yield first
            async for item in agen:
                yield item
        finally:
            await agen.aclose()

    return ahead()


async def _nothing() -> AsyncGenerator[Any, None]:
    return
    yield  # an async generator that yields nothing


async def aclose_quietly(agen: AsyncIterator[Any]) -> None:
    """Close a handler's generator (its ``finally`` blocks run); log what closing raises."""
    aclose = getattr(agen, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        log.exception("closing a handler's async generator raised")
