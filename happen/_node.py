"""Nodes: the public node API, and the receiving side: admitting, executing, replying."""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import AsyncIterable, Callable
from typing import Any, TypeVar, overload

import anyio
import msgspec

from happen import _wire as p
from happen._broadcast import BroadcastStream, LocalBroadcastStreams
from happen._calls import Caller, Stream
from happen._errors import CodecError, HappenError, InvalidIdError
from happen._events import Event, IdGenerator, current_event, external_context
from happen._handlers import Handler, HandlerTable, invoke
from happen._ids import validate_event_type, validate_node_id
from happen._mailbox import Mailbox, NodeStats
from happen._patterns import PatternLike, compile_pattern
from happen._producer import produce
from happen._runtime import Runtime
from happen._signal import Signal
from happen._transport import Message, Subscription, Transport

__all__ = ["Node"]

log = logging.getLogger("happen")

F = TypeVar("F", bound=Callable[..., Any])

#: Longest a full instance waits for a twin with room before it refuses a request.
ROOM_WAIT = 0.25


class Work:
    """An admitted event waiting for, or holding, a slot."""

    __slots__ = ("abandoned", "deadline", "event", "handler", "origin", "reply", "scope", "window")

    def __init__(
        self,
        event: Event,
        handler: Handler,
        reply: str,
        window: int,
        deadline: float | None,
        origin: str = "",
    ) -> None:
        self.event = event
        self.handler = handler
        self.reply = reply
        self.window = window
        self.deadline = deadline
        self.origin = origin  # the calling happen system's id, "" for a foreign client
        self.scope: anyio.CancelScope | None = None  # the worker's scope while it runs
        self.abandoned = False  # the caller gave up


class Overflow:
    """A request that met a full queue, waiting (briefly) for a twin instance with room."""

    __slots__ = ("request", "work")

    def __init__(self, request: p.Request, work: Work) -> None:
        self.request = request
        self.work = work


class RoomSearch:
    """The route of one ``room`` question: the offers of twins that have room."""

    __slots__ = ("answered", "offers", "target")
    abandoned = False

    def __init__(self, node_id: str, answered: Signal) -> None:
        self.target = node_id
        self.answered = answered
        self.offers: list[p.RoomOffer] = []

    def feed(self, frame: Any) -> None:
        if type(frame) is p.RoomOffer and frame.free > 0:
            try:
                validate_node_id(frame.instance)  # it becomes a subject token
            except InvalidIdError:
                return
            self.offers.append(frame)
        elif not isinstance(frame, BaseException):
            return
        self.answered.set()


class Node:
    """A named participant: registers handlers with ``on`` and sends events to other nodes.

    Made by ``System.create_node``, which hands it its collaborators.
    """

    def __init__(
        self,
        node_id: str,
        mailbox: Mailbox[Any],
        *,
        system_id: str,
        wire: p.Wire,
        caller: Caller,
        runtime: Runtime,
        ids: IdGenerator,
        broadcast_streams: LocalBroadcastStreams,
        idle_timeout: float,
        liveness_timeout: float,
    ) -> None:
        self.id = node_id
        self._system_id = system_id
        self._wire = wire
        self._caller = caller
        self._runtime = runtime
        self._ids = ids
        self._broadcast_streams = broadcast_streams
        self._idle_timeout = idle_timeout
        self._liveness_timeout = liveness_timeout
        self._room_wait = min(ROOM_WAIT, liveness_timeout / 4)
        self._handlers = HandlerTable()
        self._mailbox = mailbox
        mailbox.serve(self._execute, self._send_owed_acks)
        self._owed_acks: list[str] = []
        self._subscriptions: dict[str, Subscription] = {}  # broadcast subject suffix -> sub
        self._direct: Subscription | None = None  # the point-to-point subscription
        self._instance: Subscription | None = None  # requests for this instance only
        self._rooms: Subscription | None = None  # twins asking for room
        self._pings: Subscription | None = None  # liveness pings of callers
        self._cancels: Subscription | None = None  # the subscription to abandon frames
        self._syncing = False
        self._inflight: dict[str, Work] = {}  # admitted requests by reply subject
        self._overflow: deque[Overflow] = deque()  # met a full queue: looking for a twin
        self._searching = False  # a search for room runs
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
                self._add(Handler(compiled, fn))
                return fn

            return decorator
        entry = Handler(compiled, handler)
        self._add(entry)

        def unregister() -> None:
            if self._handlers.remove(entry):
                self.sync_subscriptions()

        return unregister

    def _add(self, handler: Handler) -> None:
        self._handlers.add(handler)
        self.sync_subscriptions()

    def hears(self, event_type: str) -> bool:
        """Whether a handler of this node matches ``event_type``."""
        return self._handlers.select(event_type) is not None

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
        return await self._caller.send(self.id, target, event, timeout, priority)

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
        return self._caller.stream(self.id, target, event, timeout, priority)

    async def broadcast(
        self, event: Event | dict[str, Any], *, stream: AsyncIterable[Any] | None = None
    ) -> None:
        """Deliver ``event`` to every node, on every host, with a matching handler.

        Fire-and-forget. With ``stream=``, each subscriber's handler gets an event whose
        ``event.stream`` yields the items of ``stream`` as they are published. A copy that
        a node's full queue cannot take is counted in that node's ``dropped``.
        """
        await self._caller.broadcast(self.id, event, stream)

    def stats(self) -> NodeStats:
        """A snapshot of this node's flow control and counts."""
        return self._mailbox.stats()

    # ----- subscriptions ------------------------------------------------------------

    def sync_subscriptions(self) -> None:
        """Bring the subscriptions in line with the handlers, in the background."""
        if self._runtime.running and not self._syncing:
            self._syncing = True
            self._runtime.sync_started()
            self._runtime.spawn(self._sync_in_background)

    async def _sync_in_background(self) -> None:
        try:
            if self._runtime.running and self._wire.transport is not None:
                await self.subscribe(self._wire.transport)
        except Exception as exc:
            log.error("node %r could not subscribe: %s", self.id, exc)
        finally:
            self._syncing = False
            self._runtime.sync_ended()

    async def subscribe(self, transport: Transport) -> None:
        """Subscribe to this node's subjects (and the broadcasts its handlers hear)."""
        wire = self._wire
        if self._direct is None:
            self._cancels = await transport.subscribe(
                wire.cancel_subject(self.id), self._on_abandon
            )
            # Pings first: an instance that can be handed a request answers for it.
            self._pings = await transport.subscribe(wire.ping_subject(self.id), self._on_ping)
            self._rooms = await transport.subscribe(wire.room_subject(self.id), self._on_room)
            self._instance = await transport.subscribe(
                wire.instance_subject(self.id, self._system_id), self._on_request
            )
            self._direct = await transport.subscribe(
                wire.node_subject(self.id), self._on_request, queue=self.id
            )
        wanted = self._handlers.subjects()
        for suffix in wanted - self._subscriptions.keys():

            async def callback(msg: Message, suffix: str = suffix) -> None:
                await self._on_broadcast(msg, suffix)

            self._subscriptions[suffix] = await transport.subscribe(
                wire.broadcast_subject(suffix), callback
            )
        for suffix in self._subscriptions.keys() - wanted:
            await self._subscriptions.pop(suffix).unsubscribe()

    async def unsubscribe(self) -> None:
        """Stop hearing new events (the system is stopping). Never raises.

        Pings and abandons are still heard, for the calls this instance still holds,
        until ``close``."""
        subs = [self._direct, self._instance, self._rooms, *self._subscriptions.values()]
        self._direct = self._instance = self._rooms = None
        self._subscriptions.clear()
        await _unsubscribe_all(subs)

    async def close(self) -> None:
        """Stop hearing anything: every call this instance held has been answered."""
        subs = [self._pings, self._cancels]
        self._pings = self._cancels = None
        await _unsubscribe_all(subs)

    def owns_subject(self, subject: str) -> bool:
        """Whether one of this node's subscriptions is on ``subject``."""
        wire = self._wire
        if subject in (
            wire.node_subject(self.id),
            wire.instance_subject(self.id, self._system_id),
        ):
            return True
        return any(subject == wire.broadcast_subject(s) for s in self._subscriptions)

    def count_dropped(self, count: int) -> None:
        """The transport dropped ``count`` messages meant for this node."""
        self._mailbox.dropped += count

    async def fail_pending(self) -> None:
        """The system stops: every admitted event not yet running fails with ``unavailable``;
        requests still looking for a twin with room are refused alike."""
        overflow, self._overflow = self._overflow, deque()
        for entry in overflow:
            self._mailbox.rejected += 1
            await self._reply(entry.work, p.Failure(p.UNAVAILABLE, f"node {self.id!r} stopped"))
        for work in self._mailbox.take_pending():
            self._mailbox.failed += 1
            self._inflight.pop(work.reply, None)
            if work.reply:
                await self._wire.reply(
                    work.reply, p.Failure(p.UNAVAILABLE, f"node {self.id!r} stopped")
                )

    # ----- receiving ----------------------------------------------------------------

    async def _on_request(self, msg: Message) -> None:
        wire = self._wire
        mailbox = self._mailbox
        reply = msg.reply
        try:
            req = wire.request_decoder.decode(msg.data)
            validate_event_type(req.type)
        except (CodecError, InvalidIdError) as exc:
            mailbox.rejected += 1
            wire.report_bad_input(f"node {self.id!r}", exc)
            self._caller.arrived(reply)
            if reply:
                await wire.reply(reply, p.Failure(p.BAD_REQUEST, p.fit_message(str(exc))))
            return
        if req.origin == self._system_id:
            self._caller.arrived(reply)
        if req.type == p.PRESENCE:  # a liveness question, not an event: answered, not counted
            if reply:
                await wire.reply(reply, p.Ack())
            return
        if not self._runtime.accepting:
            mailbox.rejected += 1
            if reply:
                await wire.reply(reply, p.Failure(p.UNAVAILABLE, f"node {self.id!r} is stopping"))
            return
        handler = self._handlers.select(req.type)
        if handler is None:
            mailbox.rejected += 1
            if reply:
                message = f"node {self.id!r} has no handler for event type {req.type!r}"
                await wire.reply(reply, p.Failure(p.NO_HANDLER, message))
            return
        context = req.context or external_context(self._ids)
        deadline = None
        if req.timeout_ms is not None:
            deadline = anyio.current_time() + req.timeout_ms / 1000
        window = req.window if req.window > 0 else self._caller.window
        event = Event(req.type, req.payload, context)
        work = Work(event, handler, reply, window, deadline, req.origin)
        if self._admit(work, req.priority):
            if reply and (req.probe or mailbox.under_pressure):  # (else nothing to say now)
                await self._acknowledge(work, req)
        elif req.forwarded:
            await self._refuse_full(reply)
        else:
            self._overflow.append(Overflow(req, work))
            if not self._searching:
                self._searching = True
                self._runtime.spawn(self._find_room)

    def _admit(self, work: Work, priority: int) -> bool:
        """Offer ``work`` to the mailbox; False when the queue is full."""
        reply = work.reply
        if reply:
            self._inflight[reply] = work
        if self._mailbox.offer(work, priority):
            return True
        if reply:
            del self._inflight[reply]
        return False

    async def _acknowledge(self, work: Work, req: p.Request) -> None:
        """What an admitted request is answered at once: ``hold`` under pressure (remote
        senders only), ``ack`` for a probe."""
        reply = work.reply
        mailbox = self._mailbox
        if reply and req.origin != self._system_id and mailbox.under_pressure:
            self._owed_acks.append(reply)
            mailbox.owes_acks = True
            await self._wire.reply(reply, p.Hold())
        elif req.probe and reply:
            await self._wire.reply(reply, p.Ack())

    async def _refuse_full(self, reply: str) -> None:
        mailbox = self._mailbox
        mailbox.rejected += 1
        if reply:
            message = f"node {self.id!r} queue is full ({mailbox.queued} queued)"
            await self._wire.reply(reply, p.Failure(p.QUEUE_FULL, message))

    # ----- sharing load with twin instances -----------------------------------------

    async def _find_room(self) -> None:
        """Pass requests that met a full queue on to twin instances that have room.

        Asks on the room subject and forwards to the instance subject of the twins that
        offer room; gives up after ``_room_wait`` seconds. What no twin took is admitted
        here if room came meanwhile, else refused with ``queue_full``.
        """
        wire = self._wire
        deadline = anyio.current_time() + self._room_wait
        try:
            while self._overflow:
                left = deadline - anyio.current_time()
                if left <= 0:
                    break
                search = RoomSearch(self.id, self._runtime.signal())
                token = wire.register_probe(search)
                try:
                    ask = p.RoomAsk(self._system_id, len(self._overflow))
                    await wire.publish(
                        wire.room_subject(self.id), ask, reply=wire.inbox_prefix + token
                    )
                    with anyio.move_on_after(left):
                        await search.answered.wait()
                finally:
                    wire.forget(token)
                if not search.offers:
                    break
                for offer in search.offers:
                    await self._forward(offer)
        except HappenError as exc:
            log.debug("node %r could not ask its twins for room: %s", self.id, exc)
        finally:
            with anyio.CancelScope(shield=True):
                await self._settle_overflow()
            self._searching = False

    async def _forward(self, offer: p.RoomOffer) -> None:
        """Pass up to ``offer.free`` waiting requests on to the twin that offered room."""
        wire = self._wire
        overflow = self._overflow
        subject = wire.instance_subject(self.id, offer.instance)
        for _ in range(min(offer.free, len(overflow))):
            entry = overflow.popleft()
            work, req = entry.work, entry.request
            timeout_ms = req.timeout_ms
            if work.deadline is not None:  # what is left of it, not all of it again
                timeout_ms = max(1, int((work.deadline - anyio.current_time()) * 1000))
            try:
                data = wire.encode(
                    msgspec.structs.replace(req, forwarded=True, timeout_ms=timeout_ms)
                )
                await wire.publish_data(subject, data, reply=work.reply or None)
            except HappenError as exc:
                log.debug("node %r could not pass a request on to a twin: %s", self.id, exc)
                overflow.appendleft(entry)
                return
            self._mailbox.forwarded += 1

    async def _settle_overflow(self) -> None:
        """Requests no twin took: admitted here if room came meanwhile, else refused."""
        overflow = self._overflow
        while overflow:
            entry = overflow.popleft()
            work = entry.work
            if not self._runtime.accepting:
                self._mailbox.rejected += 1
                await self._reply(work, p.Failure(p.UNAVAILABLE, f"node {self.id!r} is stopping"))
            elif self._admit(work, entry.request.priority):
                await self._acknowledge(work, entry.request)
            else:
                await self._refuse_full(work.reply)

    async def _on_room(self, msg: Message) -> None:
        wire = self._wire
        try:
            ask = wire.room_decoder.decode(msg.data)
        except CodecError as exc:
            wire.report_bad_input(f"node {self.id!r} room", exc)
            return
        if ask.instance == self._system_id or not msg.reply or not self._runtime.accepting:
            return  # our own question, or nowhere to answer
        free = self._mailbox.room()
        if free > 0 and not self._overflow:
            await wire.reply(msg.reply, p.RoomOffer(self._system_id, free))

    # ----- liveness -----------------------------------------------------------------

    async def _on_ping(self, msg: Message) -> None:
        wire = self._wire
        try:
            ping = wire.ping_decoder.decode(msg.data)
        except CodecError as exc:
            wire.report_bad_input(f"node {self.id!r} ping", exc)
            return
        if not msg.reply:
            return
        inflight = self._inflight
        held = [reply for reply in ping.calls if reply in inflight]
        if self._overflow:
            waiting = {entry.work.reply for entry in self._overflow}
            held.extend(reply for reply in ping.calls if reply in waiting)
        await wire.reply(msg.reply, p.Pong(held, self._system_id))

    async def _on_abandon(self, msg: Message) -> None:
        wire = self._wire
        try:
            frame = wire.abandon_decoder.decode(msg.data)
        except CodecError as exc:
            wire.report_bad_input(f"node {self.id!r} cancel", exc)
            return
        work = self._inflight.get(frame.reply)
        if work is None:
            wire.stray_frames += 1  # finished already, or another instance has it
            return
        work.abandoned = True
        if work.scope is not None:
            work.scope.cancel()

    async def _send_owed_acks(self) -> None:
        owed, self._owed_acks = self._owed_acks, []
        for reply in owed:
            await self._wire.reply(reply, p.Ack())

    async def _on_broadcast(self, msg: Message, subject: str) -> None:
        wire = self._wire
        try:
            frame = wire.broadcast_decoder.decode(msg.data)
        except CodecError as exc:
            wire.report_bad_input(f"node {self.id!r} broadcast", exc)
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
        try:
            validate_event_type(frame.type)
        except InvalidIdError as exc:
            self._wire.report_bad_input(f"node {self.id!r} broadcast", exc)
            return
        handler = self._handlers.select(frame.type)
        if handler is None or handler.pattern.subject != subject:
            return  # not ours, or another of our subscriptions delivers it
        mailbox = self._mailbox
        if not self._runtime.accepting:
            mailbox.dropped += 1
            return
        bstream = None
        if frame.stream is not None:
            bstream = BroadcastStream(self.id, frame.stream, self._caller.window * 16)
            self._bstreams[frame.stream] = (bstream, subject)
            self._broadcast_streams.add(bstream)
        context = frame.context or external_context(self._ids)
        event = Event(frame.type, frame.payload, context, bstream)
        if not mailbox.offer(Work(event, handler, "", 0, None)):
            mailbox.dropped += 1
            if bstream is not None:
                self._drop_bstream(bstream.stream_id)
                bstream.close()

    def _drop_bstream(self, stream_id: str) -> None:
        entry = self._bstreams.pop(stream_id, None)
        if entry is not None:
            self._broadcast_streams.remove(entry[0])

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
        runtime = self._runtime
        mailbox = self._mailbox
        handler = work.handler
        event = work.event
        limiter = runtime.limiter
        assert limiter is not None
        try:
            if work.deadline is None:
                result = await invoke(handler.fn, handler.kind, event, {}, limiter)
            else:
                with anyio.move_on_after(work.deadline - anyio.current_time()) as scope:
                    result = await invoke(handler.fn, handler.kind, event, {}, limiter)
                if scope.cancelled_caught:
                    mailbox.failed += 1
                    message = f"handler for {event.type!r} on node {self.id!r} timed out"
                    await self._reply(work, p.Failure(p.TIMEOUT, message))
                    return
        except runtime.cancelled:
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
            await produce(
                work,
                result,
                node_id=self.id,
                wire=self._wire,
                runtime=runtime,
                mailbox=mailbox,
                idle_timeout=self._idle_timeout,
                liveness_timeout=self._liveness_timeout,
            )
            return
        if work.reply and not await self._wire.reply(work.reply, p.Result(result)):
            mailbox.failed += 1
            return
        mailbox.completed += 1

    async def _reply(self, work: Work, frame: Any) -> None:
        if work.reply:
            await self._wire.reply(work.reply, frame)


async def _unsubscribe_all(subs: list[Subscription | None]) -> None:
    for sub in subs:
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:
                log.debug("unsubscribe failed while stopping", exc_info=True)
