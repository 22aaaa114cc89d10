"""Nodes: the public node API, and the receiving side: admitting, executing, replying."""

from __future__ import annotations

import heapq
import logging
import random
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine
from functools import partial
from types import AsyncGeneratorType
from typing import Any, Literal, TypeVar, overload

import anyio
import msgspec

from happen import _wire as p
from happen._broadcast import BroadcastStream, LocalBroadcastStreams
from happen._calls import Caller, Stream
from happen._delivery import (
    DEAD_LETTER_TYPE,
    DeadLetters,
    Decision,
    DeliverySettings,
    Outcome,
    dead_letter_payload,
    decide,
)
from happen._durable import REPLY_HEADER, DurableLogs, Intake, Receipt
from happen._errors import (
    CodecError,
    HappenError,
    InvalidIdError,
    NoHandlerError,
    PayloadTooLargeError,
    Reject,
    Retry,
    SystemStoppedError,
    TransportError,
    ValidationError,
)
from happen._events import Event, IdGenerator, current_event, external_context
from happen._handlers import (
    ASYNC,
    Handler,
    HandlerTable,
    check_process_handler,
    classify,
    invoke,
    payload_type,
)
from happen._ids import validate_event_type, validate_node_id
from happen._mailbox import Mailbox, NodeStats
from happen._middleware import Middleware, MiddlewareStack, run_chain
from happen._partitions import KeyRouter, durable_takeover_delay
from happen._patterns import Pattern, PatternLike, compile_pattern
from happen._producer import aclose_quietly, first_item_ahead, produce
from happen._runtime import Runtime
from happen._signal import Signal
from happen._state import NodeState, StateStore, StateView
from happen._transport import Delivery, Message, Subscription, Transport

__all__ = ["Node"]

log = logging.getLogger("happen")
#: Handler failures, one record per failed execution, with the traceback.
handler_log = logging.getLogger("happen.handlers")

#: What ``node.on`` accepts as a handler: called with the event and the flow's context dict.
#: An ``async def`` (awaited), an ``async def`` with ``yield`` (streamed), or a plain
#: function (run in a worker thread, or a worker process with ``executor="process"``).
HandlerFunction = Callable[[Event[Any], dict[str, Any]], Any]
H = TypeVar("H", bound=HandlerFunction)
M = TypeVar("M", bound=Middleware)
R = TypeVar("R")

#: Why a dead letter was not delivered: the system stopped first.
STOPPED = "the system stopped"
#: Longest a full instance waits for a twin with room before it refuses a request.
ROOM_WAIT = 0.25


class Work(msgspec.Struct, eq=False):
    """An admitted event waiting for, or holding, a slot.

    ``attempt`` is the number of its current (or next) execution, 1 for the first; while
    ``pending`` its outcome is still to come after the attempt that ran (it waits to run
    again, or for its dead letter to be delivered): it stays in the node's in-flight map.

    A Struct (compared by identity): one is made for every event admitted, and a Struct is
    built without running any Python code.
    """

    event: Event
    handler: Handler
    reply: str
    window: int
    deadline: float | None
    seal: str = ""  # the digest of the caller's secret; "" from a foreign client
    origin: str = ""  # the calling happen system's id, "" for a foreign client
    key: str | None = None  # per-key order: the mailbox runs one event of a key at a time
    scope: anyio.CancelScope | None = None  # the worker's scope while it runs
    abandoned: bool = False  # the caller gave up
    made: list[Any] | None = None  # generators the handler made, under middleware
    taken: bool = False  # a worker took it: it no longer waits in the queue
    delivery: Delivery | None = None  # a durable node's: settled at its outcome
    attempt: int = 1
    pending: bool = False  # a retry or a dead letter is still to come


class Overflow:
    """A request that met a full queue, waiting (briefly) for a twin instance with room."""

    __slots__ = ("request", "work")

    def __init__(self, request: p.Request, work: Work) -> None:
        self.request = request
        self.work = work


class RoomSearch:
    """The route of one ``room`` question: the offers of twins that have room.

    Every twin answers, with the room it has (``free`` may be 0). The search is answered at
    the first offer of room, or once every twin in ``expected`` said it has none.
    """

    __slots__ = ("answered", "expected", "heard", "offers", "target")
    abandoned = False
    secret = ""  # the route protocol's field: nothing to prove

    def __init__(self, node_id: str, answered: Signal, expected: set[str]) -> None:
        self.target = node_id
        self.answered = answered
        self.expected = expected
        self.heard: set[str] = set()
        self.offers: list[p.RoomOffer] = []

    def feed(self, frame: Any) -> None:
        if type(frame) is p.RoomOffer:
            try:
                validate_node_id(frame.instance)  # it becomes a subject token
            except InvalidIdError:
                return
            self.heard.add(frame.instance)
            if frame.free > 0:
                self.offers.append(frame)
            elif not self.expected <= self.heard:
                return  # others may still have room
        elif not isinstance(frame, BaseException):
            return
        self.answered.set()


class TwinCensus:
    """The route that hears every twin of a node answer its first ``room`` question (the
    census it makes when it subscribes): each answer names a twin, and says whether the
    twins share the node's keys (then this instance joins them: ``keys_in_use``)."""

    __slots__ = ("keys_in_use", "target", "twins")
    abandoned = False
    secret = ""  # the route protocol's field: nothing to prove

    def __init__(self, node_id: str, twins: set[str], keys_in_use: Callable[[], None]) -> None:
        self.target = node_id
        self.twins = twins
        self.keys_in_use = keys_in_use

    def feed(self, frame: Any) -> None:
        if type(frame) is p.RoomOffer:
            try:
                self.twins.add(validate_node_id(frame.instance))
            except InvalidIdError:
                return
            if frame.keys:
                self.keys_in_use()


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
        handlers_changed: Callable[[], None],
        liveness_timeout: float,
        state: StateStore,
        middleware: MiddlewareStack | None = None,
        delivery: DeliverySettings | None = None,
        dead_letters: DeadLetters | None = None,
        durable: DurableLogs | None = None,
    ) -> None:
        self.id = node_id
        self._durable = durable  # the namespace's durable logs, for a durable node
        self._intake: Intake | None = None
        self._held: dict[int, Work] = {}  # durable events this instance holds, by delivery
        self._delivery = delivery if delivery is not None else DeliverySettings()
        self._dead_letters = dead_letters if dead_letters is not None else DeadLetters(caller)
        # Retries, suppression or dead letters may apply: a streaming handler then runs to
        # its first item before the stream starts, so that a failure before it can be
        # retried (or suppressed, or dead-lettered) like any other.
        self._first_item_ahead = not self._delivery.plain
        self._state_store = state
        self._state = NodeState(state, node_id, mailbox)
        self._middleware = middleware if middleware is not None else MiddlewareStack()
        self._handlers_changed = handlers_changed
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
        self._keys_news: Subscription | None = None  # changes of the key partitions
        self._twins: set[str] = set()  # system ids of the node's other instances, as heard
        self._census = ""  # the inbox token of the twin census
        self._pings: Subscription | None = None  # liveness pings of callers
        self._cancels: Subscription | None = None  # the subscription to abandon frames
        self._syncing = False
        self._inflight: dict[str, Work] = {}  # admitted requests by reply subject
        self._deadlines: list[tuple[float, int, Work]] = []  # queued work with a deadline
        self._deadline_seq = 0
        self._deadline_wake: Any = None  # a signal while the watcher sleeps
        self._watching = False
        self._overflow: deque[Overflow] = deque()  # met a full queue: looking for a twin
        self._searching = False  # a search for room runs
        self._bstreams: dict[str, tuple[BroadcastStream, str]] = {}
        self._refused_types: set[str] = set()  # broadcast types refused (logged once each)
        self._retries_closed = False  # the system stops: failures are not retried any more
        self._router = KeyRouter(
            node_id=node_id,
            system_id=system_id,
            mailbox=mailbox,
            wire=wire,
            runtime=runtime,
            lease=liveness_timeout,
            accept=self._accept_held,
            answer=self._answer,
            takeover_delay=(
                durable_takeover_delay(self._delivery.ack_wait, liveness_timeout)
                if durable is not None
                else 0.0
            ),
        )

    def __repr__(self) -> str:
        return f"<happen.Node {self.id!r}>"

    # ----- handlers -----------------------------------------------------------------

    @overload
    def on(
        self, pattern: PatternLike, *, executor: Literal["process"] | None = None
    ) -> Callable[[H], H]: ...

    @overload
    def on(
        self,
        pattern: PatternLike,
        handler: HandlerFunction,
        *,
        executor: Literal["process"] | None = None,
    ) -> Callable[[], None]: ...

    def on(
        self,
        pattern: PatternLike,
        handler: HandlerFunction | None = None,
        *,
        executor: Literal["process"] | None = None,
    ) -> Callable[[], None] | Callable[[H], H]:
        """Register ``handler`` for events matching ``pattern``.

        ``pattern`` is an exact event type, a dot-segment glob (``"order.*"``, ``"order.**"``)
        or a predicate ``Callable[[str], bool]``. Called with a handler, returns a callable
        that unregisters it; used as ``@node.on(pattern)``, registers the decorated function
        and returns it unchanged. When several patterns match a type, the first registered
        exact pattern wins, else the first registered glob or predicate.

        A handler whose event parameter is annotated ``happen.Event[T]`` gets the payload
        converted to ``T``; a payload that does not fit is refused with ``ValidationError``
        and the handler does not run. ``executor="process"`` runs a sync handler in one of
        the system's worker processes (CPU-bound work).

        Raises ``InvalidIdError`` for a malformed pattern; ``TypeError`` for a handler that
        is not callable or is a sync generator, a payload type msgspec cannot convert to, and
        with ``executor="process"`` a handler that is not a sync function or cannot be
        pickled; ``ValueError`` for an unknown ``executor``.
        """
        compiled = compile_pattern(pattern)
        if handler is None:

            def decorator(fn: H) -> H:
                self._add(self._handler(compiled, fn, executor))
                return fn

            return decorator
        entry = self._handler(compiled, handler, executor)
        self._add(entry)

        def unregister() -> None:
            if self._handlers.remove(entry):
                self._handlers_changed()
                self.sync_subscriptions()

        return unregister

    def _handler(self, pattern: Pattern, fn: Callable[..., Any], executor: str | None) -> Handler:
        if executor not in (None, "process"):
            raise ValueError(f"executor must be 'process' or None, not {executor!r}")
        payload = payload_type(fn)
        convert = None if payload is None else self._wire.codec.converter(payload)
        if executor == "process":
            check_process_handler(fn)
            fn = self._runtime.processes.handler(fn)
        return Handler(pattern, fn, convert)

    def _add(self, handler: Handler) -> None:
        self._handlers.add(handler)
        self._handlers_changed()
        self.sync_subscriptions()

    def use(self, middleware: M) -> M:
        """Run ``middleware`` around every handler execution of this node; returns it
        unchanged (so ``@node.use`` works as a decorator).

        ``async def middleware(event, context, call_next)``: ``await call_next(event)`` runs
        the rest of the chain and the handler and returns its result (for a generator
        handler, the async generator of its items); what the middleware returns is the
        result, and what it raises fails the call (``HandlerError`` at the caller). The
        system's middleware wraps the node's; each list runs in registration order, the
        first registered outermost. Raises ``TypeError`` for anything but an async function.
        """
        self._middleware.add(middleware)
        return middleware

    def hears(self, event_type: str) -> bool:
        """Whether a handler of this node matches ``event_type``."""
        return self._handlers.select(event_type) is not None

    # ----- sending ------------------------------------------------------------------

    @overload
    async def send(
        self,
        target: str | Node,
        event: Event | dict[str, Any],
        *,
        timeout: float | None = None,
        priority: int = 0,
        id: str | None = None,
        key: str | None = None,
        result_type: type[R],
    ) -> R: ...

    @overload
    async def send(
        self,
        target: str | Node,
        event: Event | dict[str, Any],
        *,
        timeout: float | None = None,
        priority: int = 0,
        id: str | None = None,
        key: str | None = None,
        result_type: None = None,
    ) -> Any: ...

    @overload
    async def send(
        self,
        target: str | Node,
        event: Event | dict[str, Any],
        *,
        timeout: float | None = None,
        priority: int = 0,
        id: str | None = None,
        key: str | None = None,
        result_type: object,
    ) -> object: ...

    async def send(
        self,
        target: str | Node,
        event: Event | dict[str, Any],
        *,
        timeout: float | None = None,
        priority: int = 0,
        id: str | None = None,
        key: str | None = None,
        result_type: object = None,
    ) -> Any:
        """Send ``event`` to node ``target`` and return its handler's result.

        When the handler is an async generator, returns a ``Stream`` of its items.
        ``timeout`` (seconds) bounds the wait for the result (or for the stream to open,
        then for each item); ``priority`` orders queues of nodes using the priority strategy.
        With ``key`` (a string of 1-256 characters, e.g. an account id), at most one event of
        that key runs at a time on the target node, across all its instances, in the order
        the node accepted them; the handler sees it as ``event.key``. With ``result_type``
        (a msgspec Struct, a dataclass, a TypedDict, ``list[Item]``...) the result is
        converted to that type, and typed so; a type a checker cannot spell as ``type[T]``
        (a union) gives ``object``.

        Raises ``NodeNotFoundError``, ``NoHandlerError``, ``QueueFullError``,
        ``HandlerError`` (the handler raised), ``SendTimeout``, ``CodecError``,
        ``PayloadTooLargeError``, ``TransportError``; ``InvalidIdError`` for a bad id, type or
        key, and ``TypeError`` for a key that is not a string; ``ValidationError`` (a
        ``CodecError``) when the node's handler refused the payload as not fitting its type,
        or the result does not fit ``result_type`` (or is a stream).
        """
        convert = None if result_type is None else self._wire.codec.converter(result_type)
        return await self._caller.send(
            self.id, target, event, timeout, priority, convert, event_id=id, key=key
        )

    @overload
    def stream(
        self,
        target: str | Node,
        event: Event | dict[str, Any],
        *,
        timeout: float | None = None,
        priority: int = 0,
        id: str | None = None,
        key: str | None = None,
        item_type: type[R],
    ) -> Stream[R]: ...

    @overload
    def stream(
        self,
        target: str | Node,
        event: Event | dict[str, Any],
        *,
        timeout: float | None = None,
        priority: int = 0,
        id: str | None = None,
        key: str | None = None,
        item_type: None = None,
    ) -> Stream[Any]: ...

    @overload
    def stream(
        self,
        target: str | Node,
        event: Event | dict[str, Any],
        *,
        timeout: float | None = None,
        priority: int = 0,
        id: str | None = None,
        key: str | None = None,
        item_type: object,
    ) -> Stream[object]: ...

    def stream(
        self,
        target: str | Node,
        event: Event | dict[str, Any],
        *,
        timeout: float | None = None,
        priority: int = 0,
        id: str | None = None,
        key: str | None = None,
        item_type: object = None,
    ) -> Stream[Any]:
        """Send ``event`` to ``target`` and return a ``Stream`` of the handler's items.

        Use as ``async with node.stream(...) as s: async for item in s: ...``; the request
        is sent when the stream is entered or first iterated. A handler that returns a
        single value yields that one value. ``timeout`` bounds each wait for an item.
        ``key`` orders the event with the other events of its key, as for ``send`` (a
        streaming handler holds its key until it finishes). With ``item_type`` every item is
        converted to that type (``Stream[T]``); one that does not fit raises
        ``ValidationError`` from the iteration and closes the stream.
        """
        convert = None if item_type is None else self._wire.codec.converter(item_type)
        return self._caller.stream(self.id, target, event, timeout, priority, convert, id, key)

    async def enqueue(
        self,
        target: str | Node,
        event: Event | dict[str, Any],
        *,
        id: str | None = None,
        key: str | None = None,
    ) -> Receipt:
        """Store ``event`` for the durable node ``target`` and return once it is stored,
        without waiting for it to run: a ``Receipt`` with its sequence in the node's log and
        whether ``id`` was stored before (``duplicate``: within the node's ``dedup_window``,
        nothing new was stored).

        ``id`` (1-256 characters without whitespace, such as ``"order-7-charge"``) becomes
        the event's id; without it every call is a new event. ``key`` orders the event with
        the other events of its key, as for ``send``.

        Raises ``InvalidConfigError`` when ``target`` is not a durable node,
        ``QueueFullError`` when its log holds ``queue_limit`` events (nothing was stored),
        ``PayloadTooLargeError``, ``CodecError``, ``TransportError``; ``InvalidIdError``
        for a bad id, type or key, and ``TypeError`` for a key that is not a string.
        """
        return await self._caller.enqueue(self.id, target, event, id, key)

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
        stats = self._mailbox.stats()
        held = self._router.held
        if held:  # keyed events waiting here for their key's partition (not admitted yet)
            return msgspec.structs.replace(stats, keyed_waiting=stats.keyed_waiting + held)
        return stats

    # ----- state --------------------------------------------------------------------

    @property
    def state(self) -> NodeState:
        """This node's state: named values shared by every instance of the node, with
        revisions and compare-and-set (``get``, ``put``, ``delete``, ``update``)."""
        return self._state

    def view(self, node_id: str | Node) -> StateView:
        """Read-only access to another node's state (``get`` only); its reads count in
        this node's ``state_reads``. Raises ``InvalidIdError`` for a malformed id."""
        target = node_id.id if isinstance(node_id, Node) else node_id
        return StateView(self._state_store, target, self._mailbox)

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
            self._keys_news = await transport.subscribe(
                wire.keys_subject(self.id), self._on_keys_news
            )
            # A census: every twin answers (and so learns of this instance too).
            self._census = wire.register_probe(TwinCensus(self.id, self._twins, self._router.join))
            await wire.publish(
                wire.room_subject(self.id),
                p.RoomAsk(self._system_id, 0),
                reply=wire.inbox_prefix + self._census,
            )
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
        if self._durable is not None and self._intake is None:
            durable = self._durable
            intake = Intake(
                node_id=self.id,
                logs=durable,
                slots=self._mailbox,
                admit=self._on_delivery,
                held=self._held_deliveries,
                backlog=self._set_backlog,
                spawn=self._runtime.spawn,
                partitions=self._router,
            )
            self._router.attach(intake)
            await intake.start()
            self._intake = intake
            # Keyed events stored before: take part in the key partitions (else on news).
            self._runtime.spawn(self._router.join_if_keyed, partial(durable.keyed_stored, self.id))

    async def unsubscribe(self) -> None:
        """Stop hearing new events (the system is stopping). Never raises.

        Pings and abandons are still heard, for the calls this instance still holds,
        until ``close``."""
        subs = [self._direct, self._instance, self._rooms, *self._subscriptions.values()]
        self._direct = self._instance = self._rooms = None
        self._subscriptions.clear()
        await _unsubscribe_all(subs)
        if self._intake is not None:
            await self._intake.stop()

    async def close(self) -> None:
        """Stop hearing anything: every call this instance held has been answered."""
        subs = [self._pings, self._cancels, self._keys_news]
        self._pings = self._cancels = self._keys_news = None
        self._wire.forget(self._census)
        await _unsubscribe_all(subs)

    def owns(self, subscription: Subscription) -> bool:
        """Whether ``subscription`` is one of this node's (requests or broadcasts)."""
        return (
            subscription is self._direct
            or subscription is self._instance
            or any(subscription is sub for sub in self._subscriptions.values())
        )

    def count_dropped(self, count: int) -> None:
        """The transport dropped ``count`` messages meant for this node."""
        self._mailbox.dropped += count

    async def hand_over_keys(self) -> None:
        """The system stops: the key partitions this instance owns go to its twins (new
        keyed events go there; the ones admitted here finish first)."""
        await self._router.leave()

    async def release_keys(self) -> None:
        """The drain is over: this instance gives up its last key partitions."""
        await self._router.finish()

    async def fail_pending(self) -> None:
        """The system stops: every admitted event not yet running (or waiting to run again)
        fails with ``unavailable``; requests still looking for a twin with room are refused
        alike. A handler that fails from now on is not retried."""
        self._retries_closed = True
        overflow, self._overflow = self._overflow, deque()
        for entry in overflow:
            self._mailbox.rejected += 1
            await self._reply(entry.work, p.stopped(self.id))
        pending = self._mailbox.take_pending()
        # Durable events go back to their log in log order: a key partition's next owner
        # gets them again in that order, before the partition's later events.
        stored = sorted((w for w in pending if w.delivery is not None), key=_log_order)
        for work in stored:
            await self._hand_back(work)
        for work in pending:
            if work.delivery is None:
                await self._fail_unstarted(work, p.stopped(self.id))

    # ----- receiving ----------------------------------------------------------------

    async def _on_request(self, msg: Message) -> None:
        wire = self._wire
        mailbox = self._mailbox
        reply = msg.reply
        try:
            req = wire.request_decoder.decode(msg.data)
            validate_event_type(req.type)  # (a key is checked by the decoder)
        except (CodecError, InvalidIdError) as exc:
            mailbox.rejected += 1
            wire.report_bad_input(f"node {self.id!r}", exc)
            self._caller.arrived(reply)
            if reply:
                await wire.reply(reply, p.Failure(p.BAD_REQUEST, p.fit_message(str(exc))))
            return
        if req.reply_to:  # passed on by a twin to the owner of its key: answer the caller
            reply = req.reply_to
        if req.origin == self._system_id:
            self._caller.arrived(reply)
        if req.type == p.PRESENCE:  # a liveness question, not an event: answered, not counted
            if reply:
                await wire.reply(reply, p.Ack())
            return
        if req.key is not None:
            router = self._router
            # (``route``'s first check written out: with one instance, every key is here)
            if not (router.all_here and not router.held_requests and self._runtime.accepting):
                where = router.route(req)
                if where != "":
                    await self._pass_keyed(req, reply, where)
                    return
        follow = self._accept(req, reply)
        if follow is not None:
            await follow

    async def _pass_keyed(self, req: p.Request, reply: str, where: str | None) -> None:
        """A keyed request this instance does not run now: passed on to the instance that
        owns its key's partition, or held until the partition has a live owner."""
        router = self._router
        if where is not None:
            await router.forward(req, reply, where)
        elif not router.hold(req, reply):
            why = router.failure()
            if why is None:
                await self._refuse_full(reply)
            else:
                self._mailbox.rejected += 1
                await self._answer(reply, p.Failure(p.UNAVAILABLE, why))

    def _accept(self, req: p.Request, reply: str) -> Coroutine[Any, Any, None] | None:
        """Admit a request this instance runs (or refuse it, or look for a twin with room).

        Returns the answer still to be awaited (a refusal, a pressure hold), or None: the
        common case costs no coroutine."""
        mailbox = self._mailbox
        if not self._runtime.accepting:
            mailbox.rejected += 1
            return self._answer(reply, p.Failure(p.UNAVAILABLE, f"node {self.id!r} is stopping"))
        handler = self._handlers.select(req.type)
        if handler is None:
            mailbox.rejected += 1
            message = f"node {self.id!r} has no handler for event type {req.type!r}"
            return self._answer(reply, p.Failure(p.NO_HANDLER, message))
        payload = req.payload
        if handler.convert is not None:
            try:
                payload = handler.convert(payload)
            except ValidationError as exc:
                return self._refuse_payload(req.type, exc, reply)
        context = req.context or external_context(self._ids)
        deadline = None
        if req.timeout_ms is not None:
            deadline = anyio.current_time() + req.timeout_ms / 1000
        window = req.window if req.window > 0 else self._caller.window
        key = req.key
        event = Event(req.type, payload, context, key=key)
        work = Work(event, handler, reply, window, deadline, req.seal, req.origin, key)
        if self._admit(work, req.priority):
            # (else nothing to say now; an empty queue never holds senders)
            if reply and (req.probe or (mailbox.queued and mailbox.holds_senders)):
                return self._acknowledge(work, req)
            return None
        if req.forwarded or key is not None or not self._twins:
            # (refused at once: no twin to ask, or a keyed event, which runs where its key
            # is owned and nowhere else)
            return self._refuse_full(reply)
        self._overflow.append(Overflow(req, work))
        if not self._searching:
            self._searching = True
            self._runtime.spawn(self._find_room)
        return None

    async def _accept_held(self, req: p.Request, reply: str) -> None:
        """``_accept`` for a keyed request that was held here."""
        follow = self._accept(req, reply)
        if follow is not None:
            await follow

    async def _answer(self, reply: str, failure: p.Failure) -> None:
        if reply:
            await self._wire.reply(reply, failure)

    def _admit(self, work: Work, priority: int, force: bool = False) -> bool:
        """Offer ``work`` to the mailbox; False when the queue is full (unless ``force``)."""
        reply = work.reply
        if reply:
            self._inflight[reply] = work
        mailbox = self._mailbox
        queued = mailbox.queued
        if mailbox.offer(work, priority, force):
            if work.deadline is not None and mailbox.queued > queued:
                self._watch_deadline(work)  # it waits in the queue: answer it at its deadline
            return True
        if reply:
            del self._inflight[reply]
        return False

    async def _acknowledge(self, work: Work, req: p.Request) -> None:
        """What an admitted request is answered at once: ``hold`` from the pressure
        threshold on (remote senders only), ``ack`` for a probe."""
        reply = work.reply
        mailbox = self._mailbox
        if reply and req.origin != self._system_id and mailbox.holds_senders:
            self._owed_acks.append(reply)
            mailbox.owes_acks = True
            await self._wire.reply(reply, p.Hold())
        elif req.probe and reply:
            await self._wire.reply(reply, p.Ack())

    async def _refuse_full(self, reply: str) -> None:
        mailbox = self._mailbox
        mailbox.rejected += 1
        if reply:
            queued = mailbox.queued
            message = f"node {self.id!r} queue is full ({queued} queued)"
            await self._wire.reply(reply, p.Failure(p.QUEUE_FULL, message, queued=queued))

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
                search = RoomSearch(self.id, self._runtime.signal(), set(self._twins))
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
                self._twins -= search.expected - search.heard  # silent twins are gone
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
        try:
            self._twins.add(validate_node_id(ask.instance))
        except InvalidIdError as exc:
            wire.report_bad_input(f"node {self.id!r} room", exc)
            return
        free = self._mailbox.room() if not self._overflow else 0
        await wire.reply(
            msg.reply, p.RoomOffer(self._system_id, max(free, 0), self._router.started)
        )

    async def _on_keys_news(self, msg: Message) -> None:
        """An instance changed the node's key partitions: read them (and join them)."""
        wire = self._wire
        try:
            news = wire.owners_decoder.decode(msg.data)
        except CodecError as exc:
            wire.report_bad_input(f"node {self.id!r} keys", exc)
            return
        if news.instance != self._system_id:
            self._router.news()

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
        if self._router.started:
            held.extend(self._router.claims(ping.calls))
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
            if self._router.started and await self._router.abandon(frame.reply, frame.secret):
                return  # a keyed request held here
            wire.stray_frames += 1  # finished already, or another instance has it
            return
        if work.seal and not p.seal_matches(work.seal, frame.secret):
            # Whoever saw the request knows its reply subject; only its caller knows the secret.
            wire.report_violation(
                f"node {self.id!r} cancel", "ignored an abandon without the call's secret"
            )
            return
        work.abandoned = True
        if work.scope is not None:
            work.scope.cancel()
        elif self._mailbox.withdraw(work):  # still queued, or waiting to run again
            await self._fail_unstarted(work, p.abandoned(self.id))
        elif work.pending:  # its dead letter is being delivered: the caller is let go now
            self._inflight.pop(work.reply, None)
            await self._reply(work, p.abandoned(self.id))

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
        if self._durable is not None and frame.stream is None:
            return  # a durable node hears its copy from the broadcast log
        mailbox = self._mailbox
        if not self._runtime.accepting:
            mailbox.dropped += 1
            return
        payload = frame.payload
        if handler.convert is not None:
            try:
                payload = handler.convert(payload)
            except ValidationError as exc:
                self._refuse_broadcast(frame.type, exc)
                return
        bstream = None
        if frame.stream is not None:
            bstream = BroadcastStream(
                self.id, frame.stream, self._caller.window * 16, self._idle_timeout
            )
            self._bstreams[frame.stream] = (bstream, subject)
            self._broadcast_streams.add(bstream)
        context = frame.context or external_context(self._ids)
        event = Event(frame.type, payload, context, bstream)
        if not mailbox.offer(Work(event, handler, "", 0, None)):
            mailbox.dropped += 1
            if bstream is not None:
                self._drop_bstream(bstream.stream_id)
                bstream.close()

    async def _refuse_payload(self, event_type: str, exc: ValidationError, reply: str) -> None:
        """A request whose payload does not fit its handler's type: rejected, and the caller
        is answered ``bad_request`` with ``error_type`` ``"ValidationError"``."""
        self._mailbox.rejected += 1
        if reply:
            message = p.fit_message(
                f"node {self.id!r} refused the payload of {event_type!r}, which {exc}"
            )
            await self._wire.reply(reply, p.Failure(p.BAD_REQUEST, message, "ValidationError"))

    def _refuse_broadcast(self, event_type: str, exc: ValidationError) -> None:
        """A broadcast copy whose payload does not fit: rejected, logged once per type."""
        self._mailbox.rejected += 1
        if event_type not in self._refused_types and len(self._refused_types) < 1024:
            self._refused_types.add(event_type)
            log.warning(
                "node %r refused a broadcast of %r: its payload %s; further ones are counted "
                "in rejected only",
                self.id,
                event_type,
                exc,
            )

    def _drop_bstream(self, stream_id: str) -> None:
        entry = self._bstreams.pop(stream_id, None)
        if entry is not None:
            self._broadcast_streams.remove(entry[0])

    # ----- deadlines of queued events -------------------------------------------------

    def _watch_deadline(self, work: Work) -> None:
        assert work.deadline is not None
        self._deadline_seq += 1
        deadlines = self._deadlines
        heapq.heappush(deadlines, (work.deadline, self._deadline_seq, work))
        if len(deadlines) > 2 * self._mailbox.queued + 64:
            # Entries of events taken since are dropped lazily; keep the heap as small as
            # the queue, so a busy node does not keep one per request for its whole timeout.
            deadlines[:] = [entry for entry in deadlines if not entry[2].taken]
            heapq.heapify(deadlines)
        if self._deadlines[0][2] is work and self._deadline_wake is not None:
            self._deadline_wake.set()  # earlier than the one the watcher sleeps for
        if not self._watching:
            self._watching = True
            self._runtime.spawn(self._expire_deadlines)

    async def _expire_deadlines(self) -> None:
        """Answer ``timeout`` for queued events whose deadline passed, at the deadline."""
        deadlines = self._deadlines
        try:
            while deadlines:
                delay = deadlines[0][0] - anyio.current_time()
                if delay > 0:
                    self._deadline_wake = wake = self._runtime.signal()
                    with anyio.move_on_after(delay):
                        await wake.wait()
                    self._deadline_wake = None
                    continue
                work = heapq.heappop(deadlines)[2]
                if not work.taken and self._mailbox.withdraw(work):
                    await self._fail_unstarted(work, self._timed_out(work))
        finally:
            self._watching = False
            self._deadline_wake = None

    async def _fail_unstarted(self, work: Work, failure: p.Failure) -> None:
        """An admitted event ends without its handler running (again): counted failed,
        forgotten, and its caller told why."""
        work.pending = False
        self._mailbox.failed += 1
        self._inflight.pop(work.reply, None)
        await self._reply(work, failure)

    def _timed_out(self, work: Work) -> p.Failure:
        return p.Failure(
            p.TIMEOUT, f"handler for {work.event.type!r} on node {self.id!r} timed out"
        )

    # ----- execution ----------------------------------------------------------------

    async def _execute(self, work: Work, scope: anyio.CancelScope) -> None:
        """Run an admitted event in the worker whose scope is ``scope``: its handler, its
        reply (or stream), and its outcome, counted once.

        One coroutine for the whole run (the handler's run is written out here, where a
        coroutine of its own cost every event one more): the inner ``try`` is the run's
        outcome, the outer one the guard against a bug of ours and the cleanup."""
        work.taken = True
        work.pending = False
        if work.abandoned:  # the caller gave up while it waited in the queue
            await self._fail_unstarted(work, p.abandoned(self.id))
            return
        if work.deadline is not None and anyio.current_time() >= work.deadline:
            await self._fail_unstarted(work, self._timed_out(work))  # never start it late
            return
        work.scope = scope
        token = current_event.set(work.event)
        try:
            runtime = self._runtime
            mailbox = self._mailbox
            handler = work.handler
            event = work.event
            limiter = runtime.limiter
            assert limiter is not None
            chain = self._middleware.chain
            context: dict[str, Any] = {}
            direct = False
            result: Any = None
            try:
                if chain:
                    work.made = []
                    execution = run_chain(chain, self.id, handler, event, limiter, work.made)
                elif handler.kind == ASYNC:  # (``invoke``'s first step, written out)
                    direct = True
                    execution = handler.fn(event, context)
                else:
                    execution = invoke(handler.fn, handler.kind, event, context, limiter)
                if work.deadline is None:
                    result = await execution
                    if direct and callable(result):  # the continuum goes on
                        result = await invoke(result, classify(result), event, context, limiter)
                    if self._first_item_ahead and isinstance(result, AsyncGeneratorType):
                        result = await first_item_ahead(result)  # a failure before it may retry
                else:
                    with anyio.move_on_after(work.deadline - anyio.current_time()) as bound:
                        result = await execution
                        if direct and callable(result):
                            result = await invoke(result, classify(result), event, context, limiter)
                        if isinstance(result, AsyncGeneratorType):
                            # the deadline bounds it until its first item
                            result = await first_item_ahead(result)
                    if bound.cancelled_caught:
                        mailbox.failed += 1
                        if isinstance(result, AsyncGeneratorType):
                            with anyio.CancelScope(shield=True):
                                await aclose_quietly(result)
                        await self._reply(work, self._timed_out(work))
                        return
            except runtime.cancelled:
                if work.delivery is not None and not work.abandoned:
                    # The instance stops: the event goes back to the log, for a twin (or this
                    # node, once back) to run; its caller keeps waiting for that result.
                    with anyio.CancelScope(shield=True):
                        await self._hand_back(work)
                    raise
                mailbox.failed += 1
                with anyio.CancelScope(shield=True):
                    await self._reply(
                        work, p.abandoned(self.id) if work.abandoned else p.stopped(self.id)
                    )
                raise
            except Exception as exc:
                await self._act(work, exc, self._decide(work, exc))
                return
            if isinstance(result, AsyncGeneratorType):
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
        except Exception as exc:  # a bug of ours: never let it reach the task group
            log.exception("node %r failed to run an event of type %r", self.id, work.event.type)
            self._mailbox.failed += 1
            await self._reply(work, p.handler_failure(exc))
        finally:
            if work.made:  # a middleware may have wrapped or dropped them: close them now
                with anyio.CancelScope(shield=True):
                    for agen in work.made:
                        await aclose_quietly(agen)
            work.scope = None
            if work.reply and not work.pending:  # (else it runs again, or is dead-lettered)
                self._inflight.pop(work.reply, None)
            if work.delivery is not None and not work.pending:
                # (no shield needed: a transport's settlement completes even when the task
                # awaiting it is cancelled meanwhile; see ``Delivery``)
                await self._settle_delivery(work)
            current_event.reset(token)
            bstream = work.event.stream
            if bstream is not None and isinstance(bstream, BroadcastStream):
                self._drop_bstream(bstream.stream_id)
                bstream.close()

    async def _reply(self, work: Work, frame: Any) -> None:
        if work.reply:
            await self._wire.reply(work.reply, frame)

    # ----- attempts, retries and dead letters -----------------------------------------

    def _decide(self, work: Work, error: BaseException) -> Decision:
        """What becomes of ``work`` now that its attempt ``work.attempt`` raised ``error``:
        the node's delivery settings applied in one place (see ``happen._delivery.decide``).

        A streamed broadcast is not run again (its items were read), and a dead letter
        whose handler failed is not dead-lettered in turn.
        """
        event = work.event
        decision = decide(
            self._delivery, error, work.attempt, random.random, retryable=event.stream is None
        )
        if decision.outcome is Outcome.DEAD_LETTER and event.type == DEAD_LETTER_TYPE:
            return Decision(Outcome.FAIL)
        return decision

    async def _act(self, work: Work, error: Exception, decision: Decision) -> None:
        """Carry out ``decision`` for ``work``, whose attempt raised ``error``: hold it to run
        again (no slot, no queue place, still claimed for its caller), answer its caller
        with ``None`` (suppressed) or with the failure (``HandlerError`` with ``attempts``),
        or hand its dead letter to a task that delivers it and then settles ``work``."""
        mailbox = self._mailbox
        event = work.event
        outcome = decision.outcome
        settings = self._delivery
        if outcome is Outcome.RETRY and not self._retries_closed:
            if isinstance(error, Retry):
                handler_log.info(
                    "handler for %r on node %r asked for a retry (attempt %d of %d): "
                    "running it again in %.3g s",
                    event.type,
                    self.id,
                    work.attempt,
                    settings.max_attempts,
                    decision.delay,
                )
            else:
                handler_log.warning(
                    "handler for %r on node %r raised %s (attempt %d of %d): running it again "
                    "in %.3g s",
                    event.type,
                    self.id,
                    type(error).__name__,
                    work.attempt,
                    settings.max_attempts,
                    decision.delay,
                    exc_info=error,
                )
            mailbox.retried += 1
            work.attempt += 1
            work.event = msgspec.structs.replace(event, delivery=work.attempt)
            work.taken = False
            work.pending = True
            mailbox.later(work, decision.delay)
            if work.deadline is not None:
                self._watch_deadline(work)  # the call's deadline bounds the wait too
            return
        if outcome is Outcome.RETRY:  # the system stops: it will not run again here
            if work.delivery is not None:
                await self._hand_back(work)  # (a durable one runs again elsewhere)
                return
            mailbox.failed += 1
            await self._reply(work, p.stopped(self.id))
            return
        after = f" after {work.attempt} attempts" if work.attempt > 1 else ""
        if outcome is Outcome.SUPPRESS:
            handler_log.warning(
                "handler for %r on node %r raised %s%s: suppressed, the event completes with None",
                event.type,
                self.id,
                type(error).__name__,
                after,
                exc_info=error,
            )
            if work.reply and not await self._wire.reply(work.reply, p.Result(None)):
                mailbox.failed += 1
                return
            mailbox.completed += 1
            mailbox.suppressed += 1
            return
        if isinstance(error, Reject):  # a decision of the handler, not a fault: no traceback
            handler_log.warning(
                "handler for %r on node %r rejected the event%s: %s",
                event.type,
                self.id,
                after,
                p.describe(error),
            )
        else:
            handler_log.error(
                "handler for %r on node %r raised %s%s",
                event.type,
                self.id,
                type(error).__name__,
                after,
                exc_info=error,
            )
        failure = p.handler_failure(error, work.attempt)
        if outcome is Outcome.DEAD_LETTER:
            work.pending = True
            mailbox.keep_key(work)  # held until the dead letter is delivered (``_settle``)
            mailbox.dead_letters_pending += 1
            payload = dead_letter_payload(event, self.id, error, work.attempt, failure.message)
            self._runtime.spawn(self._dead_letter, work, payload, failure)
            return
        mailbox.failed += 1
        await self._reply(work, failure)

    async def _dead_letter(self, work: Work, payload: dict[str, Any], failure: p.Failure) -> None:
        """Deliver the dead letter of ``work``, then settle ``work`` (counted dead-lettered,
        its caller answered with ``failure``).

        A dead letter that could not be delivered is tried again after the node's backoff,
        as long as it takes; one that can never be (it cannot be encoded, or is too large)
        and one still undelivered when the system stops leave ``work`` counted failed, and
        are logged.
        """
        target = self._delivery.dead_letter
        assert target is not None
        event = work.event
        current_event.set(event)  # the dead letter's causal parent (this task's own context)
        event_id = f"{event.context.id}:dead"
        tries = 0
        lost = ""
        try:
            while True:
                tries += 1
                try:
                    await self._dead_letters.publish(self.id, target, event_id, payload)
                    break
                except SystemStoppedError:
                    lost = STOPPED
                    break
                except (CodecError, PayloadTooLargeError, InvalidIdError) as exc:
                    lost = f"{type(exc).__name__}: {exc}"
                    break
                except Exception as exc:
                    delay = self._delivery.delay(tries)
                    log.warning(
                        "node %r could not deliver the dead letter of event %s to %r (%s: %s); "
                        "trying again in %.3g s",
                        self.id,
                        event.context.id,
                        target,
                        type(exc).__name__,
                        exc,
                        delay,
                    )
                    await anyio.sleep(delay)
        except self._runtime.cancelled:
            with anyio.CancelScope(shield=True):
                await self._dead_letter_lost(work, failure, target, STOPPED)
            raise
        if lost:
            await self._dead_letter_lost(work, failure, target, lost)
            return
        mailbox = self._mailbox
        mailbox.dead_letters_pending -= 1
        mailbox.dead_lettered += 1
        self._settle(work)
        if not work.abandoned:
            await self._reply(work, failure)
        if work.delivery is not None:
            await self._settle_delivery(work)

    async def _dead_letter_lost(
        self, work: Work, failure: p.Failure, target: str, why: str
    ) -> None:
        mailbox = self._mailbox
        mailbox.dead_letters_pending -= 1
        if work.delivery is not None and why == STOPPED:
            # Kept, never dropped: back to the log, to be tried again by a twin (or here).
            self._settle(work)
            await self._hand_back(work)
            return
        mailbox.failed += 1
        self._settle(work)
        if work.delivery is not None:
            await self._settle_delivery(work)
        log.error(
            "node %r gave up delivering the dead letter of event %s (%r) to %r: %s; the event "
            "is counted failed",
            self.id,
            work.event.context.id,
            work.event.type,
            target,
            why,
        )
        if not work.abandoned:
            await self._reply(work, failure)

    def _settle(self, work: Work) -> None:
        work.pending = False
        if work.reply:
            self._inflight.pop(work.reply, None)
        self._mailbox.release_key(work)  # its final outcome: the key's next event may run

    # ----- durable intake -----------------------------------------------------------

    async def _on_delivery(self, delivery: Delivery, broadcast: bool) -> None:
        """An event (or a stored broadcast) fetched from the node's durable log."""
        if not self._runtime.accepting:  # fetched as the system began to stop: not taken
            await _settle_quietly(delivery.nak, self.id)
            return
        wire = self._wire
        mailbox = self._mailbox
        reply = ""
        if delivery.headers:
            reply = delivery.headers.get(REPLY_HEADER, "")
        try:
            if broadcast:
                frame = wire.broadcast_decoder.decode(delivery.data)
                if type(frame) is not p.Broadcast:
                    raise CodecError(f"a stored broadcast is a {type(frame).__name__} frame")
            else:
                frame = wire.request_decoder.decode(delivery.data)  # (its key checked)
            validate_event_type(frame.type)
        except (CodecError, InvalidIdError) as exc:
            mailbox.rejected += 1
            wire.report_bad_input(f"durable node {self.id!r}", exc)
            if reply:
                await wire.reply(reply, p.Failure(p.BAD_REQUEST, p.fit_message(str(exc))))
            await self._poisoned(delivery, exc)
            return
        handler = self._handlers.select(frame.type)
        if handler is None:
            if broadcast:  # a broadcast this node does not hear: nothing to do
                await _settle_quietly(delivery.ack, self.id)
                return
            mailbox.rejected += 1
            message = f"node {self.id!r} has no handler for event type {frame.type!r}"
            if reply:
                await wire.reply(reply, p.Failure(p.NO_HANDLER, message))
            log.warning("durable %s: settled without running it", message)
            await self._poisoned(delivery, NoHandlerError(message), frame)
            return
        payload = frame.payload
        if handler.convert is not None:
            try:
                payload = handler.convert(payload)
            except ValidationError as exc:
                if broadcast:
                    self._refuse_broadcast(frame.type, exc)
                else:
                    await self._refuse_payload(frame.type, exc, reply)
                await self._poisoned(delivery, exc, frame)
                return
        context = frame.context or external_context(self._ids)
        # Attempts count deliveries: one that comes back after a crash is the next attempt.
        attempt = max(1, delivery.delivery_count)
        if broadcast:
            event = Event(frame.type, payload, context, delivery=attempt)
            work = Work(event, handler, "", 0, None)
            priority = 0
        else:
            key = frame.key  # (ordered within this instance: see docs/keys-and-state.md)
            event = Event(frame.type, payload, context, delivery=attempt, key=key)
            window = frame.window if frame.window > 0 else self._caller.window
            work = Work(event, handler, reply, window, None, frame.seal, frame.origin, key)
            priority = frame.priority
        work.delivery = delivery
        work.attempt = attempt
        if delivery.delivery_count > 1:
            mailbox.redelivered += 1
        self._held[id(delivery)] = work
        self._admit(work, priority, force=True)  # (fetched for a free slot: never refused)

    async def _poisoned(self, delivery: Delivery, error: BaseException, frame: Any = None) -> None:
        """An event this node can never run: settled, so it is not delivered for ever;
        dead-lettered first when the node has a dead-letter node (in the background)."""
        target = self._delivery.dead_letter
        if target is None or (frame is not None and frame.type == DEAD_LETTER_TYPE):
            await _settle_quietly(delivery.term, self.id)
            return
        self._runtime.spawn(self._poison_letter, delivery, error, frame, target)

    async def _poison_letter(
        self, delivery: Delivery, error: BaseException, frame: Any, target: str
    ) -> None:
        """Deliver the dead letter of an event this node cannot run, then settle it. If the
        letter cannot be delivered, the event goes back to the log (after the backoff) and
        comes round again: it is never dropped."""
        message = p.describe(error)
        if frame is not None:
            context = frame.context or external_context(self._ids)
            event = Event(frame.type, frame.payload, context)
            payload = dead_letter_payload(event, self.id, error, 0, message)
            current_event.set(event)  # the letter's causal parent
            event_id = f"{context.id}:dead"
        else:  # not even decoded: the letter carries the stored bytes as they are
            payload = {
                "event": {"type": None, "payload": delivery.data, "context": None},
                "node": self.id,
                "error": {"type": type(error).__name__, "message": message},
                "attempts": 0,
            }
            event_id = f"{delivery.msg_id or delivery.seq}:dead"
        try:
            await self._dead_letters.publish(self.id, target, event_id, payload)
        except Exception as exc:
            delay = self._delivery.delay(max(1, delivery.delivery_count))
            log.warning(
                "node %r could not dead-letter an event it cannot run (%s: %s); it goes back "
                "to the log for %.3g s",
                self.id,
                type(exc).__name__,
                exc,
                delay,
            )
            with anyio.CancelScope(shield=True):
                await _settle_quietly(partial(delivery.nak, delay), self.id)
            return
        await _settle_quietly(delivery.term, self.id)

    async def _settle_delivery(self, work: Work) -> None:
        """A durable event reached its outcome (its reply, if any, was published): ack."""
        delivery = work.delivery
        if delivery is None or self._held.pop(id(delivery), None) is None:
            return  # handed back already
        await _settle_quietly(delivery.ack, self.id)

    async def _hand_back(self, work: Work) -> None:
        """A durable event this stopping instance will not finish: back to the log at once,
        for a twin instance (or this node, when it comes back). Counted ``handed_back``."""
        delivery = work.delivery
        if delivery is None or self._held.pop(id(delivery), None) is None:
            return
        self._mailbox.handed_back += 1
        self._inflight.pop(work.reply, None)
        await _settle_quietly(delivery.nak, self.id)

    def _held_deliveries(self) -> list[Delivery]:
        return [work.delivery for work in self._held.values() if work.delivery is not None]

    def _set_backlog(self, count: int) -> None:
        self._mailbox.backlog = count


def _log_order(work: Work) -> int:
    assert work.delivery is not None
    return work.delivery.seq


async def _settle_quietly(settle: Callable[[], Awaitable[None]], node_id: str) -> None:
    """Settle a durable delivery; a transport failure is logged (the log delivers the event
    again after ``ack_wait``)."""
    try:
        await settle()
    except TransportError as exc:
        log.warning("node %r could not settle a durable event: %s", node_id, exc)


async def _unsubscribe_all(subs: list[Subscription | None]) -> None:
    for sub in subs:
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:
                log.debug("unsubscribe failed while stopping", exc_info=True)
