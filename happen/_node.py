"""Nodes: handlers, sending, and the receiving side of the protocol."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio

from happen import _protocol as p
from happen._broadcast import BroadcastStream
from happen._errors import CodecError, InvalidIdError
from happen._events import Event, current_event
from happen._handlers import Handler, HandlerTable, invoke
from happen._ids import validate_event_type
from happen._mailbox import Mailbox, NodeStats
from happen._patterns import PatternLike, compile_pattern
from happen._producer import produce
from happen._stream import Stream
from happen._transport import Message

if TYPE_CHECKING:
    from happen._config import ConcurrencySettings
    from happen._system import System

__all__ = ["Node"]

log = logging.getLogger("happen")

F = TypeVar("F", bound=Callable[..., Any])


class Work:
    """An admitted event waiting for, or holding, a slot."""

    __slots__ = ("abandoned", "deadline", "event", "handler", "reply", "scope", "window")

    def __init__(
        self, event: Event, handler: Handler, reply: str, window: int, deadline: float | None
    ) -> None:
        self.event = event
        self.handler = handler
        self.reply = reply
        self.window = window
        self.deadline = deadline
        self.scope: anyio.CancelScope | None = None  # the worker's scope while it runs
        self.abandoned = False  # the caller gave up


class Node:
    """A named participant: registers handlers with ``on`` and sends events to other nodes."""

    def __init__(self, system: System, node_id: str, settings: ConcurrencySettings) -> None:
        self.id = node_id
        self._system = system
        self._handlers = HandlerTable()
        self._mailbox: Mailbox[Work] = Mailbox(
            settings, self._execute, system._spawn, self._send_owed_acks, system._new_signal
        )
        self._owed_acks: list[str] = []
        self._subscriptions: dict[str, Any] = {}  # broadcast subject suffix -> Subscription
        self._direct: Any = None  # the point-to-point Subscription
        self._cancels: Any = None  # the Subscription to abandon messages
        self._inflight: dict[str, Work] = {}  # admitted requests by reply subject
        self._bstreams: dict[str, tuple[BroadcastStream, str]] = {}

    def __repr__(self) -> str:
        return f"<happen.Node {self.id!r}>"

    # ----- handlers -----------------------------------------------------------------

    @overload
    def on(self, pattern: PatternLike) -> Callable[[F], F]: ...

    @overload
    def on(self, pattern: PatternLike, handler: Callable[..., Any]) -> Callable[[], None]: ...

    def on(
        self, pattern: PatternLike, handler: Callable[..., Any] | None = None
    ) -> Callable[[], None] | Callable[[F], F]:
        """Register ``handler`` for events matching ``pattern``.

        ``pattern`` is an exact event type, a dot-segment glob (``"order.*"``, ``"order.**"``)
        or a predicate ``Callable[[str], bool]``. Called with a handler, returns a callable
        that unregisters it; used as ``@node.on(pattern)``, registers the decorated function
        and returns it unchanged. When several patterns match a type, the first registered
        exact pattern wins, else the first registered glob or predicate.

        Raises ``InvalidIdError`` for a malformed pattern and ``TypeError`` for a handler
        that is not callable (or is a sync generator).
        """
        compiled = compile_pattern(pattern)
        if handler is None:

            def decorator(fn: F) -> F:
                self._register(Handler(compiled, fn))
                return fn

            return decorator
        entry = Handler(compiled, handler)
        self._register(entry)

        def unregister() -> None:
            if self._handlers.remove(entry):
                self._system._sync_subscriptions(self)

        return unregister

    def _register(self, handler: Handler) -> None:
        self._handlers.add(handler)
        self._system._sync_subscriptions(self)

    # ----- sending ------------------------------------------------------------------

    async def send(
        self,
        target: str | Node,
        event: Event | dict[str, Any],
        *,
        timeout: float | None = None,
        priority: int = 0,
    ) -> Any:
        """Send ``event`` to node ``target`` and return its handler's result.

        When the handler is an async generator, returns a ``Stream`` of its items.
        ``timeout`` (seconds) bounds the wait for the result (or for the stream to open,
        then for each item); ``priority`` orders queues of nodes using the priority strategy.

        Raises ``NodeNotFoundError``, ``NoHandlerError``, ``QueueFullError``,
        ``HandlerError`` (the handler raised), ``SendTimeout``, ``CodecError``,
        ``PayloadTooLargeError``, ``TransportError``; ``InvalidIdError`` for a bad id or type.
        """
        return await self._system._send(self, target, event, timeout, priority)

    def stream(
        self,
        target: str | Node,
        event: Event | dict[str, Any],
        *,
        timeout: float | None = None,
        priority: int = 0,
    ) -> Stream:
        """Send ``event`` to ``target`` and return a ``Stream`` of the handler's items.

        Use as ``async with node.stream(...) as s: async for item in s: ...``; the request
        is sent when the stream is entered or first iterated. A handler that returns a
        single value yields that one value. ``timeout`` bounds each wait for an item.
        """
        return self._system._stream(self, target, event, timeout, priority)

    async def broadcast(
        self, event: Event | dict[str, Any], *, stream: AsyncIterable[Any] | None = None
    ) -> None:
        """Deliver ``event`` to every node, on every host, with a matching handler.

        Fire-and-forget. With ``stream=``, each subscriber's handler gets an event whose
        ``event.stream`` yields the items of ``stream`` as they are published. A copy that
        a node's full queue cannot take is counted in that node's ``dropped``.
        """
        await self._system._broadcast(self, event, stream)

    def stats(self) -> NodeStats:
        """A snapshot of this node's flow control and counts."""
        return self._mailbox.stats()

    # ----- receiving ----------------------------------------------------------------

    async def _on_request(self, msg: Message) -> None:
        system = self._system
        mailbox = self._mailbox
        reply = msg.reply
        try:
            req = system._request_decoder.decode(msg.data)
            validate_event_type(req.type)
        except (CodecError, InvalidIdError) as exc:
            mailbox.rejected += 1
            system._report_bad_input(f"node {self.id!r}", exc)
            system._arrived(reply)
            if reply:
                await system._reply(reply, p.Failure(p.BAD_REQUEST, str(exc)))
            return
        if req.origin == system.id:
            system._arrived(reply)
        if not system._accepting:
            mailbox.rejected += 1
            if reply:
                await system._reply(
                    reply, p.Failure(p.UNAVAILABLE, f"node {self.id!r} is stopping")
                )
            return
        handler = self._handlers.select(req.type)
        if handler is None:
            mailbox.rejected += 1
            if reply:
                message = f"node {self.id!r} has no handler for event type {req.type!r}"
                await system._reply(reply, p.Failure(p.NO_HANDLER, message))
            return
        context = req.context or system._external_context()
        deadline = None
        if req.timeout_ms is not None:
            deadline = anyio.current_time() + req.timeout_ms / 1000
        window = req.window if req.window > 0 else system._window
        work = Work(Event(req.type, req.payload, context), handler, reply, window, deadline)
        if reply:
            self._inflight[reply] = work
        if not mailbox.offer(work, req.priority):
            if reply:
                del self._inflight[reply]
            mailbox.rejected += 1
            if reply:
                message = f"node {self.id!r} queue is full ({mailbox.queued} queued)"
                await system._reply(reply, p.Failure(p.QUEUE_FULL, message))
            return
        if reply and req.origin != system.id and mailbox.under_pressure:
            self._owed_acks.append(reply)
            mailbox.owes_acks = True
            await system._reply(reply, p.Hold())
        elif req.probe and reply:
            await system._reply(reply, p.Ack())

    async def _on_abandon(self, msg: Message) -> None:
        system = self._system
        try:
            frame = system._abandon_decoder.decode(msg.data)
        except CodecError as exc:
            system._report_bad_input(f"node {self.id!r} cancel", exc)
            return
        work = self._inflight.get(frame.reply)
        if work is None:
            system.stray_frames += 1  # finished already, or another instance has it
            return
        work.abandoned = True
        if work.scope is not None:
            work.scope.cancel()

    async def _send_owed_acks(self) -> None:
        owed, self._owed_acks = self._owed_acks, []
        for reply in owed:
            await self._system._reply(reply, p.Ack())

    async def _on_broadcast(self, msg: Message, subject: str) -> None:
        system = self._system
        try:
            frame = system._broadcast_decoder.decode(msg.data)
        except CodecError as exc:
            system._report_bad_input(f"node {self.id!r} broadcast", exc)
            return
        if type(frame) is p.Broadcast:
            self._admit_broadcast(frame, subject)
            return
        entry = self._bstreams.get(frame.stream)
        if entry is None or entry[1] != subject:
            return
        if type(frame) is p.BroadcastItem:
            entry[0].put(frame.item)
        else:
            self._drop_bstream(frame.stream)
            entry[0].end(frame.error)

    def _admit_broadcast(self, frame: p.Broadcast, subject: str) -> None:
        system = self._system
        try:
            validate_event_type(frame.type)
        except InvalidIdError as exc:
            system._report_bad_input(f"node {self.id!r} broadcast", exc)
            return
        handler = self._handlers.select(frame.type)
        if handler is None or handler.pattern.subject != subject:
            return  # not ours, or another of our subscriptions delivers it
        mailbox = self._mailbox
        if not system._accepting:
            mailbox.dropped += 1
            return
        bstream = None
        if frame.stream is not None:
            bstream = BroadcastStream(self.id, frame.stream, system._window * 16)
            self._bstreams[frame.stream] = (bstream, subject)
            system._local_bstreams.setdefault(frame.stream, []).append(bstream)
        context = frame.context or system._external_context()
        event = Event(frame.type, frame.payload, context, bstream)
        if not mailbox.offer(Work(event, handler, "", 0, None)):
            mailbox.dropped += 1
            if bstream is not None:
                self._drop_bstream(bstream.stream_id)
                bstream.close()

    def _drop_bstream(self, stream_id: str) -> None:
        entry = self._bstreams.pop(stream_id, None)
        if entry is not None:
            local = self._system._local_bstreams.get(stream_id)
            if local is not None:
                local.remove(entry[0])
                if not local:
                    del self._system._local_bstreams[stream_id]

    # ----- execution ----------------------------------------------------------------

    async def _execute(self, work: Work, scope: anyio.CancelScope) -> None:
        if work.abandoned:  # the caller gave up while it waited in the queue
            self._mailbox.failed += 1
            self._inflight.pop(work.reply, None)
            await self._reply(work, p.abandoned(self.id))
            return
        work.scope = scope
        token = current_event.set(work.event)
        try:
            await self._run_handler(work)
        finally:
            work.scope = None
            if work.reply:
                self._inflight.pop(work.reply, None)
            current_event.reset(token)
            bstream = work.event.stream
            if isinstance(bstream, BroadcastStream):
                self._drop_bstream(bstream.stream_id)
                bstream.close()

    async def _run_handler(self, work: Work) -> None:
        system = self._system
        mailbox = self._mailbox
        handler = work.handler
        event = work.event
        try:
            if work.deadline is None:
                result = await invoke(handler.fn, handler.kind, event, {}, system._limiter)
            else:
                with anyio.move_on_after(work.deadline - anyio.current_time()) as scope:
                    result = await invoke(handler.fn, handler.kind, event, {}, system._limiter)
                if scope.cancelled_caught:
                    mailbox.failed += 1
                    message = f"handler for {event.type!r} on node {self.id!r} timed out"
                    await self._reply(work, p.Failure(p.TIMEOUT, message))
                    return
        except system._cancelled:
            mailbox.failed += 1
            with anyio.CancelScope(shield=True):
                await self._reply(
                    work, p.abandoned(self.id) if work.abandoned else p.stopped(self.id)
                )
            raise
        except Exception as exc:
            mailbox.failed += 1
            await self._reply(work, p.handler_failure(exc))
            return
        if inspect.isasyncgen(result):
            await produce(self, work, result)
            return
        try:
            data = system._codec.encode(p.Result(result)) if work.reply else b""
        except CodecError as exc:
            mailbox.failed += 1
            await self._reply(work, p.handler_failure(exc))
            return
        mailbox.completed += 1
        if work.reply:
            await system._publish_reply(work.reply, data)

    async def _reply(self, work: Work, frame: Any) -> None:
        if work.reply:
            await self._system._reply(work.reply, frame)
