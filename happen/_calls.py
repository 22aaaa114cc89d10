"""The caller's side: sending requests and broadcasts, a pending ``Call``, and reading a
``Stream`` while granting its producer credit.

A ``Call`` is registered on the wire under an inbox token; the wire's inbox callback feeds it
frames. ``Stream`` reads chunks and grants credit back to the producer as it consumes them,
so the producer is never more than one window ahead of the reader. A call checks the
stream's frames as they arrive: items numbered in order, none beyond the credit granted.
"""

from __future__ import annotations

import sys
import warnings
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Generic

import anyio
import msgspec

if sys.version_info >= (3, 13):
    from typing import TypeVar
else:  # a TypeVar default (PEP 696): a bare ``happen.Stream`` means ``Stream[Any]``
    from typing_extensions import TypeVar

from happen import _wire as p
from happen._broadcast import LocalBroadcastStreams
from happen._codec import path_of
from happen._durable import DurableLogs, Receipt
from happen._errors import (
    CodecError,
    DuplicateEventError,
    HandlerError,
    HappenError,
    InvalidConfigError,
    InvalidIdError,
    NoHandlerError,
    QueueFullError,
    SendTimeout,
    SystemStoppedError,
    TransportError,
    ValidationError,
)
from happen._events import Event, IdGenerator, new_context
from happen._ids import (
    KNOWN_KEYS,
    learn_key,
    validate_event_id,
    validate_event_type,
    validate_key,
    validate_node_id,
)
from happen._mailbox import Mailbox
from happen._observe import CallObserver, CallWatch
from happen._pressure import RemoteGate
from happen._runtime import Runtime
from happen._signal import Signal

__all__ = ["Call", "Caller", "Stream", "WatchedStream"]

_FINAL = (p.Result, p.Failure, p.StreamEnd)

T = TypeVar("T", default=Any)


def failure_to_error(frame: p.Failure, target: str, event_type: str | None = None) -> HappenError:
    """The exception a caller sees for a failure reply from node ``target``."""
    code = frame.code
    if code == p.HANDLER_ERROR:
        attempts = frame.attempts
        after = f" (after {attempts} attempts)" if attempts > 1 else ""
        return HandlerError(
            f"handler on node {target!r} raised {frame.error_type}: {frame.message}{after}",
            remote_type=frame.error_type,
            remote_message=frame.message,
            node_id=target,
            attempts=attempts,
        )
    if code == p.QUEUE_FULL:
        return QueueFullError(
            frame.message or f"node {target!r} queue is full",
            node_id=target,
            queued=frame.queued,
        )
    if code == p.NO_HANDLER:
        return NoHandlerError(
            frame.message or f"node {target!r} has no matching handler",
            node_id=target,
            event_type=event_type,
        )
    if code == p.TIMEOUT:
        return SendTimeout(frame.message or f"node {target!r} timed out")
    if code == p.BAD_REQUEST:
        if frame.error_type == "ValidationError":  # a typed handler refused the payload
            return ValidationError(frame.message, path=path_of(frame.message), node_id=target)
        return CodecError(f"node {target!r} refused the request as malformed: {frame.message}")
    return TransportError(frame.message or f"node {target!r} failed the call ({code})")


async def typed_result(
    convert: Callable[[Any], Any], value: Any, target: str, event_type: str
) -> Any:
    """A call's result converted to the caller's ``result_type``; a stream is refused (and
    closed), as it is not a result of that type."""
    if isinstance(value, Stream):
        await value.aclose()
        raise ValidationError(
            f"node {target!r} answered {event_type!r} with a stream, not a result of the "
            "result_type asked for: use node.stream(..., item_type=...)",
            node_id=target,
        )
    try:
        return convert(value)
    except ValidationError as exc:
        raise ValidationError(
            f"the result of {event_type!r} from node {target!r} {exc}",
            path=exc.path,
            node_id=target,
        ) from None


class Call:
    """One request in flight: its inbox token, the frames received, the pressure hold.

    ``secret`` proves this system owns the call when it cancels or abandons it (the request
    carries only its digest). For a stream, ``allowed`` is how many items the consumer has
    granted (the window plus the credit it sent) and ``received`` how many arrived: a frame
    out of sequence, or beyond ``allowed``, cuts the stream off with ``TransportError``.
    """

    __slots__ = (
        "_frames",
        "_wake",
        "abandoned",
        "allowed",
        "caller",
        "control",
        "durable",
        "ended",
        "gate",
        "heard",
        "held",
        "live_claimed",
        "live_missed",
        "live_quiet",
        "live_seen",
        "live_unanswered",
        "live_unheard",
        "probe",
        "received",
        "reserved",
        "secret",
        "target",
        "token",
        "waiting",
    )
    # Set by the liveness monitor when it first sees the call (``live_seen`` says whether it
    # has): its record of the call, kept here rather than in a table of its own.
    live_quiet: int  # whole ticks without a frame
    live_unheard: int  # whole ticks without a frame or a claim
    live_claimed: bool  # a pong claimed it since the last tick
    live_missed: int  # answered rounds in a row that did not claim it
    live_unanswered: int  # rounds in a row that nobody answered at all

    def __init__(self, caller: Caller, target: str) -> None:
        self.caller = caller
        self.target = target
        wire = caller.wire
        self.token = wire.new_token()  # registered when the request is published
        #: Proves this system owns the call when it cancels or abandons it.
        self.secret = wire.new_secret()
        self.control: str | None = None
        self.held = False
        self.gate: Any = None  # the RemoteGate this call holds, after a "hold"
        self.probe: Any = None  # the RemoteGate this call probes for
        self.abandoned = False
        self.waiting = True  # no final frame and no stream start yet
        self.ended = False  # a final frame (or an error) is queued: nothing more is taken
        self.reserved: Any = None  # the local Mailbox this call holds a place in, in transit
        self.allowed = caller.window
        self.received = 0
        self.heard = 0  # frames received so far (the liveness monitor watches it change)
        self.live_seen = -1  # ``heard`` at the liveness monitor's last tick (-1: not seen yet)
        #: To a durable node: stored first, then it waits for the result of whichever
        #: instance runs it (not judged by liveness until its stream starts).
        self.durable = False
        self._frames: deque[Any] | None = None  # made when the first frame comes
        self._wake: Signal | None = None

    # called by the system's inbox callback (never blocks)
    def feed(self, frame: Any) -> None:
        if self.ended:
            return  # after the end: a duplicate, or a frame of a stream cut off
        self.heard += 1
        kind = type(frame)
        if kind is p.Result:  # (the final frame of every call that does not stream)
            if self.held or self.probe is not None or self.reserved is not None:
                self.release()
            self.waiting = False
            self.ended = True
            self.caller.answered()
            frames = self._frames  # (``_queue``, written out)
            if frames is None:
                frames = self._frames = deque()
            frames.append(frame)
            if self._wake is not None:
                self._wake.set()
            return
        if kind is p.Chunk or kind is p.Chunks:
            self._take_items(frame, 1 if kind is p.Chunk else len(frame.items))
            return
        if kind is p.Hold:
            if not self.held:
                self.held = True
                self.gate = self.caller.gate_for(self.target)
                self.gate.hold()
            self._probed()
            return
        if kind is p.Ack:
            self.release()
            return
        if kind is p.StreamEnd and frame.count is not None and frame.count != self.received:
            self._cut(self._missing(self.received, frame.count, f"the end after {frame.count}"))
            return
        if kind is p.StreamStart:
            if self.control is not None:
                return  # a second start: ignored
            self._probed()
            self.control = frame.control
            self.waiting = False
            self.caller.answered()
        elif isinstance(frame, _FINAL) or isinstance(frame, BaseException):
            self.release()
            self.waiting = False
            self.ended = True
            self.caller.answered()
        frames = self._frames  # (``_queue``, written out: every reply takes this path)
        if frames is None:
            frames = self._frames = deque()
        frames.append(frame)
        if self._wake is not None:
            self._wake.set()

    def _take_items(self, frame: p.Chunk | p.Chunks, n: int) -> None:
        """Queue a frame of ``n`` items, checking its sequence and the credit."""
        received = self.received
        seq = frame.seq
        if seq is not None and seq != received:  # a producer that numbers its items
            self._cut(self._missing(received, seq, f"item {seq}"))
            return
        received += n
        if received > self.allowed:
            self._cut(
                TransportError(
                    f"node {self.target!r} sent {received} items where the consumer had "
                    f"granted {self.allowed}: a producer that ignores credit is cut off"
                )
            )
            return
        self.received = received
        if n:  # an empty "chunks" frame carries nothing
            self._queue(frame)

    def _missing(self, expected: int, got: int, what: str) -> TransportError:
        """The error for a frame numbered ``got`` (``what``) where item ``expected`` was due."""
        closed = "the stream was closed and its producer cancelled"
        if got > expected:
            if got == expected + 1:
                lost, them = f"item {expected}", "it"
            else:
                lost, them = f"items {expected}-{got - 1}", "them"
            return TransportError(
                f"stream from node {self.target!r} lost {lost} in transit ({what} arrived "
                f"after {them}): {closed}"
            )
        return TransportError(
            f"stream from node {self.target!r} is out of sequence: {what} arrived where item "
            f"{expected} was due: {closed}"
        )

    def _cut(self, error: TransportError) -> None:
        """End the stream with ``error`` after the items already queued; stop the producer."""
        self.ended = True
        self.waiting = False
        self._queue(error)
        self.caller.discard(self)

    def _queue(self, frame: Any) -> None:
        """Hand ``frame`` to the reader, waking it if it waits."""
        frames = self._frames
        if frames is None:  # (most calls get one frame: none is kept while they wait)
            frames = self._frames = deque()
        frames.append(frame)
        if self._wake is not None:
            self._wake.set()

    def _probed(self) -> None:
        if self.probe is not None:
            gate, self.probe = self.probe, None
            gate.probe_done()

    def release(self) -> None:
        """Give back what the call holds: a local reservation, a remote hold, a probe."""
        if self.probe is not None:  # (``_probed``, written out: every call comes here twice)
            gate, self.probe = self.probe, None
            gate.probe_done()
        if self.reserved is not None:
            mailbox, self.reserved = self.reserved, None
            mailbox.arrived()
        if self.held:
            self.held = False
            self.gate.release()

    async def next_frame(self) -> Any:
        while not self._frames:
            self._wake = self.caller.runtime.signal()
            await self._wake.wait()
            self._wake = None
        return self._frames.popleft()


class Stream(Generic[T]):
    """A streamed reply: an async iterator and an async context manager.

    ``async for item in stream`` yields the producer's items; leaving ``async with`` or
    calling ``aclose()`` early cancels the producer (its ``finally`` blocks run). A failure
    of the producer raises ``HandlerError`` after the items that came before it. Items lost
    in transit, or a producer that sends more than the credit granted, raise
    ``TransportError`` (naming the node and the missing items) and cancel the producer:
    items are never skipped silently. A stream dropped without being closed releases what it
    holds when it is collected, cancels the producer, and warns with ``ResourceWarning``. A
    ``Stream[T]`` (``node.stream(..., item_type=T)``) converts every item to ``T``: one that
    does not fit raises ``ValidationError`` and closes the stream.
    """

    def __init__(
        self,
        call: Call,
        *,
        window: int,
        timeout: float | None,
        opener: Callable[[], Awaitable[Any]] | None = None,
        convert: Callable[[Any], T] | None = None,
    ) -> None:
        self._call = call
        self._convert = convert
        self._window = window
        self._grant_at = max(1, window // 2)
        self._timeout = timeout
        self._opener = opener
        self._consumed = 0
        self._granted = 0
        self._batch: deque[Any] = deque()  # items of a received Chunks frame, not yet read
        self._closed = False
        self._single: list[Any] | None = None

    @property
    def target(self) -> str:
        """The id of the node producing this stream."""
        return self._call.target

    async def _open(self) -> None:
        opener, self._opener = self._opener, None
        if opener is None:
            return
        try:
            first = await opener()
        except BaseException:
            self._closed = True
            raise
        if isinstance(first, p.Result):
            self._single = [first.value]

    async def __aenter__(self) -> Stream[T]:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Stream[T]:
        return self

    async def __anext__(self) -> T:
        if self._opener is not None:
            await self._open()
        if self._single is not None:
            if self._single:
                return await self._typed(self._single.pop())
            await self.aclose()
            raise StopAsyncIteration
        if self._batch:
            return await self._count(self._batch.popleft())
        if self._closed:
            raise StopAsyncIteration
        call = self._call
        try:
            if self._timeout is None:
                frame = await call.next_frame()
            else:
                with anyio.fail_after(self._timeout):
                    frame = await call.next_frame()
        except TimeoutError:
            await self.aclose()
            raise SendTimeout(
                f"no item from node {call.target!r} within {self._timeout} s"
            ) from None
        except BaseException:
            await self.aclose()
            raise
        kind = type(frame)
        if kind is p.Chunk:
            return await self._count(frame.item)
        if kind is p.Chunks and frame.items:
            self._batch.extend(frame.items)
            return await self._count(self._batch.popleft())
        self._finish()
        if kind is p.StreamEnd:
            raise StopAsyncIteration
        if kind is p.Result:  # a non-generator handler answering a stream request
            self._single = []
            return await self._typed(frame.value)
        if kind is p.Failure:
            raise failure_to_error(frame, call.target)
        if isinstance(frame, BaseException):
            raise frame
        raise TransportError(f"unexpected {kind.__name__} frame in a stream from {call.target!r}")

    async def _count(self, item: Any) -> T:
        """One more item read: grant credit back every half window."""
        self._consumed += 1
        if self._consumed - self._granted >= self._grant_at:
            call = self._call
            control = call.control
            if control:
                n = self._consumed - self._granted
                self._granted = self._consumed
                call.allowed += n
                await call.caller.wire.publish(control, p.Credit(n))
        if self._convert is None:
            return item  # type: ignore[no-any-return]  # an untyped stream: T is Any
        return await self._typed(item)

    async def _typed(self, item: Any) -> T:
        """``item`` converted to the stream's item type; one that does not fit closes it."""
        convert = self._convert
        if convert is None:
            return item  # type: ignore[no-any-return]
        try:
            return convert(item)
        except ValidationError as exc:
            await self.aclose()
            raise ValidationError(
                f"an item of the stream from node {self.target!r} {exc}",
                path=exc.path,
                node_id=self.target,
            ) from None

    def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            self._call.caller.forget(self._call)

    async def aclose(self) -> None:
        """Stop reading: cancel the producer if it is still running. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._opener = None
        call = self._call
        with anyio.CancelScope(shield=True):
            await call.caller.abandon(call)

    def __del__(self) -> None:
        # Dropped while open (neither exhausted, closed, nor left with ``async with``):
        # release the route and the frames it buffered now, and cancel the producer in the
        # background. Never raises: it may run anywhere the last reference goes.
        try:
            if self._closed or self._opener is not None:
                return  # finished, or never opened: nothing was sent
            call = self._call
            if call.caller.drop(call):
                warnings.warn(
                    f"a happen.Stream from node {call.target!r} was not closed; use "
                    "'async with node.stream(...)' or 'await stream.aclose()'",
                    ResourceWarning,
                    stacklevel=1,
                )
        except Exception:
            pass


class WatchedStream(Stream[T]):
    """A ``Stream`` of an observed call: its ``CallWatch`` is told when the stream ends,
    fails or is closed."""

    def __init__(
        self,
        call: Call,
        *,
        window: int,
        timeout: float | None,
        watch: CallWatch,
        opener: Callable[[], Awaitable[Any]] | None = None,
        convert: Callable[[Any], T] | None = None,
    ) -> None:
        super().__init__(call, window=window, timeout=timeout, opener=opener, convert=convert)
        self._watch: CallWatch | None = watch
        self._reading = False

    def _settle(self, error: BaseException | None) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.ended(error)

    async def __aenter__(self) -> Stream[T]:
        try:
            return await super().__aenter__()
        except BaseException as exc:
            self._settle(exc)
            raise

    async def __anext__(self) -> T:
        self._reading = True  # a failure closes the stream first: the watch gets the error
        try:
            return await super().__anext__()
        except StopAsyncIteration:
            self._settle(None)
            raise
        except BaseException as exc:
            self._settle(exc)
            raise
        finally:
            self._reading = False

    async def aclose(self) -> None:
        await super().aclose()
        if not self._reading:
            self._settle(None)


class _RoundTrip:
    """The route of ``Caller.round_trip``: any answer (a "no responders" status) ends it."""

    __slots__ = ("done",)
    abandoned = False
    target = "(round trip)"
    secret = ""

    def __init__(self, done: Signal) -> None:
        self.done = done

    def feed(self, frame: Any) -> None:
        self.done.set()


class Caller:
    """One system's sending side: requests, streams and broadcasts, and their pending calls.

    ``local_mailbox(node_id)`` gives the mailbox of a node hosted by this system (so local
    senders can be held under pressure before they publish); ``local_listeners(event_type)``
    the mailboxes of this system's nodes that hear a broadcast type.
    """

    def __init__(
        self,
        *,
        wire: p.Wire,
        runtime: Runtime,
        ids: IdGenerator,
        system_id: str,
        window: int,
        local_mailbox: Callable[[str], Mailbox[Any] | None],
        local_listeners: Callable[[str], list[Mailbox[Any]]],
        broadcast_streams: LocalBroadcastStreams,
        durable: DurableLogs | None = None,
    ) -> None:
        self.wire = wire
        self.durable = durable
        self.runtime = runtime
        self.window = window
        self._ids = ids
        self._system_id = system_id
        self._local_mailbox = local_mailbox
        self._local_listeners = local_listeners
        self._broadcast_streams = broadcast_streams
        self._gates: dict[str, RemoteGate] = {}
        self._own_subjects: dict[str, str] = {}  # the instance subjects of local nodes
        self._answered: anyio.Event | None = None
        #: Told of every call (``System.observe_calls``); None: calls are not watched.
        self.observer: CallObserver | None = None

    # ----- sending ------------------------------------------------------------------

    def check_running(self) -> None:
        state = self.runtime.state
        if state != "running":
            raise SystemStoppedError(
                f"the system is {state}: start it (async with happen.System()) "
                "before sending, and do not send after stop()"
            )

    def prepare(self, target: Any, event: Any) -> tuple[str, str, Any]:
        """Check a call's target and event; returns (node id, event type, payload)."""
        if self.runtime.state != "running":
            self.check_running()  # (raises)
        target_id = target if type(target) is str else getattr(target, "id", target)
        target_id = validate_node_id(target_id)
        if type(event) is dict and "type" in event and len(event) <= 2:
            if len(event) == 1 or "payload" in event:  # the common shape, checked cheaply
                return target_id, validate_event_type(event["type"]), event.get("payload")
        if isinstance(event, Event):
            return target_id, validate_event_type(event.type), event.payload
        if not isinstance(event, Mapping):
            raise TypeError(
                f"an event is a happen.Event or a dict with 'type' and 'payload', "
                f"not {type(event).__name__}"
            )
        if "type" not in event:
            raise InvalidIdError(f"the event has no 'type': {sorted(event)!r}")
        extra = event.keys() - {"type", "payload"}
        if extra:
            raise TypeError(
                f"unexpected event keys {sorted(extra)!r}: an event has 'type' and 'payload'"
            )
        return target_id, validate_event_type(event["type"]), event.get("payload")

    def stores(self, target_id: str) -> bool:
        """Whether ``target_id`` is a durable node (its events are stored first)."""
        durable = self.durable
        return durable is not None and durable.any_durable and durable.durable(target_id)

    def new_call(self, target_id: str) -> Call:
        call = Call(self, target_id)
        durable = self.durable  # (``stores``, written out: every call is made here)
        if durable is not None and durable.any_durable and durable.durable(target_id):
            call.durable = True
        return call

    async def enqueue(
        self,
        sender: str,
        target: Any,
        event: Any,
        event_id: str | None = None,
        key: str | None = None,
    ) -> Receipt:
        """Store ``event`` for the durable node ``target``; returns once it is stored."""
        target_id, event_type, payload = self.prepare(target, event)
        if event_id is not None:
            event_id = validate_event_id(event_id)
        if key is not None:
            validate_key(key)
        durable = self.durable
        if durable is None or not self.stores(target_id):
            raise InvalidConfigError(
                f"node {target_id!r} is not durable: enqueue stores events for durable nodes "
                f"only (delivery={{'patterns': {{{target_id!r}: {{'durable': True}}}}}})"
            )
        trace = None
        watch = None
        if self.observer is not None:
            watch = self.observer.call_started("enqueue", sender, target_id, event_type)
            trace = watch.trace
        try:
            context = new_context(self._ids, sender, trace, event_id)
            frame = p.Request(
                event_type, payload, context, 0, self.window, None, self._system_id, key=key
            )
            data = self.wire.encode(frame)
            self.check_running()
            if key is not None:
                await self._keyed(target_id)
            receipt = await durable.append(target_id, data, msg_id=context.id, key=key)
        except BaseException as exc:
            if watch is not None:
                watch.ended(exc)
            raise
        if watch is not None:
            watch.ended(None)
        return receipt

    def request_frame(
        self,
        sender: str,
        event_type: str,
        payload: Any,
        timeout: float | None,
        priority: int,
        call: Call,
        trace: str | None = None,
        event_id: str | None = None,
        key: str | None = None,
    ) -> tuple[p.Request, bytes]:
        """The request frame and its encoding (encoded now, so bad payloads fail here);
        ``event_id`` is the event's id (a new one when left out)."""
        if type(priority) is not int:
            raise TypeError(f"priority must be an int, not {type(priority).__name__}")
        if key is not None:
            try:
                known = key in KNOWN_KEYS
            except TypeError:  # (unhashable: not a str)
                known = False
            if not known:
                learn_key(key)  # (raises if it is not a valid key)
        timeout_ms = None
        if timeout is not None:
            if not timeout > 0:
                raise ValueError(f"timeout must be positive seconds, not {timeout!r}")
            # The node's deadline is a little earlier than the caller's, so that the node's
            # own "timed out" answer (naming the handler) arrives before the caller gives up.
            timeout_ms = max(1, int(timeout * 1000 - min(50.0, timeout * 100)))
        if call.durable:
            timeout_ms = None  # stored: the caller's timeout bounds its own wait only
        context = new_context(self._ids, sender, trace, event_id)
        frame = p.Request(
            event_type,
            payload,
            context,
            priority,
            self.window,
            timeout_ms,
            self._system_id,
            seal=p.seal_of(call.secret),
            key=key,
        )
        try:
            return frame, self.wire.codec.encode(frame)
        except CodecError:
            if key is not None:
                validate_key(key)  # (a str subclass equal to a known key: named as a bad key)
            raise

    async def send(
        self,
        sender: str,
        target: Any,
        event: Any,
        timeout: float | None,
        priority: int,
        convert: Callable[[Any], Any] | None = None,
        *,
        event_id: str | None = None,
        key: str | None = None,
    ) -> Any:
        target_id, event_type, payload = self.prepare(target, event)
        if event_id is not None:
            event_id = validate_event_id(event_id)
        result: Any
        if self.observer is not None:
            result = await self._send_watched(
                self.observer.call_started("send", sender, target_id, event_type),
                sender,
                target_id,
                event_type,
                payload,
                timeout,
                priority,
                event_id,
                key,
            )
        else:
            call = self.new_call(target_id)
            frame, data = self.request_frame(
                sender, event_type, payload, timeout, priority, call, None, event_id, key
            )
            if timeout is None:  # (no scope to enter: one coroutine less on every resume)
                opening = self._open(call, frame, data)
            else:
                opening = self._open_within(timeout, call, frame, data)
            del frame, data  # (not kept while the call waits)
            first = await opening
            if type(first) is p.Result:
                if convert is None:
                    return first.value
                result = first.value
            else:
                result = Stream(call, window=self.window, timeout=timeout)
        if convert is None:
            return result
        return await typed_result(convert, result, target_id, event_type)

    async def _send_watched(
        self,
        watch: CallWatch,
        sender: str,
        target_id: str,
        event_type: str,
        payload: Any,
        timeout: float | None,
        priority: int,
        event_id: str | None = None,
        key: str | None = None,
    ) -> Any:
        try:
            call = self.new_call(target_id)
            frame, data = self.request_frame(
                sender, event_type, payload, timeout, priority, call, watch.trace, event_id, key
            )
            opening = self._open_within(timeout, call, frame, data)
            del frame, data  # (not kept while the call waits)
            first = await opening
        except BaseException as exc:
            watch.ended(exc)
            raise
        if type(first) is p.Result:
            watch.ended(None)
            return first.value
        return WatchedStream(call, window=self.window, timeout=timeout, watch=watch)

    def stream(
        self,
        sender: str,
        target: Any,
        event: Any,
        timeout: float | None,
        priority: int,
        convert: Callable[[Any], Any] | None = None,
        event_id: str | None = None,
        key: str | None = None,
    ) -> Stream[Any]:
        target_id, event_type, payload = self.prepare(target, event)
        if event_id is not None:
            event_id = validate_event_id(event_id)
        watch = None
        if self.observer is not None:
            watch = self.observer.call_started("stream", sender, target_id, event_type)
        call = self.new_call(target_id)
        try:
            trace = watch.trace if watch is not None else None
            frame, data = self.request_frame(
                sender, event_type, payload, timeout, priority, call, trace, event_id, key
            )
        except BaseException as exc:
            if watch is not None:
                watch.ended(exc)
            raise

        async def opener() -> Any:
            return await self._open_within(timeout, call, frame, data)

        if watch is not None:
            return WatchedStream(
                call,
                window=self.window,
                timeout=timeout,
                watch=watch,
                opener=opener,
                convert=convert,
            )
        return Stream(call, window=self.window, timeout=timeout, opener=opener, convert=convert)

    async def _open_within(
        self, timeout: float | None, call: Call, frame: p.Request, data: bytes
    ) -> Any:
        """``_open`` bounded by the call's timeout (``SendTimeout`` when it passes)."""
        opening = self._open(call, frame, data)
        event_type = frame.type
        del frame, data  # a waiting call keeps none of its request (see ``_open``)
        if timeout is None:
            return await opening
        with anyio.move_on_after(timeout):
            return await opening
        # (a SendTimeout the node answered, naming its handler, went through as it is)
        raise SendTimeout(
            f"no reply from node {call.target!r} to {event_type!r} within {timeout} s"
        )

    async def _open(self, call: Call, frame: p.Request, data: bytes) -> Any:
        """Publish a request; return its first reply (a Result or a StreamStart)."""
        runtime = self.runtime
        if runtime.state != "running":
            self.check_running()  # (raises)
        if runtime.syncing:
            await runtime.settled()
        target = call.target
        wire = self.wire
        if call.durable:
            return await self._open_durable(call, frame, data)
        mailbox = self._local_mailbox(target)
        if mailbox is not None:
            # (nothing queued or in transit: the mailbox holds no sender)
            while (mailbox.queued or mailbox.in_transit) and mailbox.holds_local_senders():
                await mailbox.wait_relief()
            mailbox.in_transit += 1
            call.reserved = mailbox
            # To our own instance, so the reservation is surely freed when it arrives; a
            # full instance passes requests on to a twin with room.
            subject = self._own_subjects.get(target)
            if subject is None:
                subject = wire.instance_subject(target, self._system_id)
                self._own_subjects[target] = subject
        else:
            subject = wire.node_subject(target)
            gate = self._gates.get(target)
            if gate is not None and await gate.admit(runtime.signal):
                call.probe = gate
                data = wire.encode(msgspec.structs.replace(frame, probe=True))
        wire.routes[call.token] = call  # (``wire.register``: the token is the call's own)
        try:
            if runtime.state != "running":
                raise SystemStoppedError("the system stopped")
            await wire.publish_data(subject, data, reply=wire.inbox_prefix + call.token)
        except BaseException:
            self.forget(call)
            raise
        # Published: the request's frame, bytes and subject are let go while the call waits
        # (~0.8 kB a call, with a 100-byte payload; the caller's frames hold none of them).
        event_type = frame.type
        del frame, data, subject
        try:
            first = await call.next_frame()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.abandon(call)
            raise
        if type(first) is p.Result:  # (``_first_reply``, written out for the common case)
            self.forget(call)
            return first
        return self._first_reply(call, event_type, first)

    async def _open_durable(self, call: Call, frame: p.Request, data: bytes) -> Any:
        """Store a request for a durable node; return the first reply of whichever
        instance runs it. A caller that gives up forgets the call: the event stays stored
        and runs all the same."""
        durable = self.durable
        assert durable is not None and frame.context is not None
        wire = self.wire
        wire.register(call, call.token)
        try:
            if frame.key is not None:
                await self._keyed(call.target)
            receipt = await durable.append(
                call.target,
                data,
                msg_id=frame.context.id,
                reply=wire.inbox_prefix + call.token,
                key=frame.key,
            )
            if receipt.duplicate:
                raise DuplicateEventError(
                    f"event id {frame.context.id!r} was stored for durable node "
                    f"{call.target!r} before, within its dedup_window: it is not stored or "
                    f"run again, and its result goes to the first caller",
                    event_id=frame.context.id,
                    node_id=call.target,
                    seq=receipt.seq,
                )
            first = await call.next_frame()
        except BaseException:
            self.forget(call)
            raise
        return self._first_reply(call, frame.type, first)

    async def _keyed(self, target: str) -> None:
        """A keyed event is about to be stored for the durable node ``target``: the first
        time, tell its running instances, so that they order its keys across instances
        (happen._durable)."""
        durable = self.durable
        assert durable is not None
        if durable.first_keyed(target):
            wire = self.wire
            await wire.publish(wire.keys_subject(target), p.Owners(self._system_id))

    def _first_reply(self, call: Call, event_type: str, first: Any) -> Any:
        target = call.target
        kind = type(first)
        if kind is p.StreamStart:
            return first
        self.forget(call)
        if kind is p.Result:
            return first
        if kind is p.Failure:
            raise failure_to_error(first, target, event_type)
        if isinstance(first, BaseException):
            raise first
        raise TransportError(f"unexpected {kind.__name__} reply from node {target!r}")

    def broadcast(
        self, sender: str, event: Any, stream: AsyncIterable[Any] | None
    ) -> Awaitable[None]:
        """Publish a broadcast (``await caller.broadcast(...)``): an event that is not
        valid raises here; an unwatched broadcast runs in one coroutine, not two."""
        _, event_type, payload = self.prepare(sender, event)
        if self.observer is None:
            return self._broadcast(sender, event_type, payload, stream, None)
        return self._broadcast_watched(
            self.observer.call_started("broadcast", sender, None, event_type),
            sender,
            event_type,
            payload,
            stream,
        )

    async def _broadcast_watched(
        self,
        watch: CallWatch,
        sender: str,
        event_type: str,
        payload: Any,
        stream: AsyncIterable[Any] | None,
    ) -> None:
        try:
            await self._broadcast(sender, event_type, payload, stream, watch.trace)
        except BaseException as exc:
            watch.ended(exc)
            raise
        watch.ended(None)

    async def _broadcast(
        self,
        sender: str,
        event_type: str,
        payload: Any,
        stream: AsyncIterable[Any] | None,
        trace: str | None,
    ) -> None:
        runtime = self.runtime
        if runtime.syncing:
            await runtime.settled()
        for mailbox in self._local_listeners(event_type):
            while mailbox.under_pressure:
                await mailbox.wait_relief()
        wire = self.wire
        subject = wire.broadcast_subject(event_type)
        context = new_context(self._ids, sender, trace)
        if stream is None:
            if runtime.state != "running":
                self.check_running()  # (raises)
            frame = p.Broadcast(event_type, payload, context)
            durable = self.durable
            if durable is not None and durable.any_durable:  # stored for durable nodes first
                await durable.append_broadcast(event_type, wire.encode(frame), msg_id=context.id)
            await wire.publish(subject, frame)
            return
        stream_id = self._ids()
        self.check_running()
        await wire.publish(subject, p.Broadcast(event_type, payload, context, stream_id))
        try:
            async for item in stream:
                await self._broadcast_streams.wait_room(stream_id)
                self.check_running()
                await wire.publish(subject, p.BroadcastItem(stream_id, item))
        except BaseException as exc:
            # The source failed, or this call was cancelled: either way the subscribers'
            # streams end now, rather than wait out their idle bound.
            if isinstance(exc, Exception):
                error = f"{type(exc).__name__}: {p.describe(exc)}"
            else:
                error = "Cancelled: the broadcaster was cancelled before the end of the stream"
            with anyio.CancelScope(shield=True):
                try:
                    await wire.publish(subject, p.BroadcastEnd(stream_id, error))
                except Exception as again:
                    p.log.debug("could not end broadcast stream %s: %s", stream_id, again)
            raise
        await wire.publish(subject, p.BroadcastEnd(stream_id))

    async def round_trip(self) -> None:
        """Return once a message published now has been through the server and back: every
        subscription this system made before is then live there."""
        wire = self.wire
        probe = _RoundTrip(self.runtime.signal())
        token = wire.register(probe)
        try:
            await wire.publish_data(
                f"{wire.namespace}.ready.{self._system_id}", b"", reply=wire.inbox_prefix + token
            )
            await probe.done.wait()
        finally:
            wire.forget(token)

    # ----- pending calls ------------------------------------------------------------

    def forget(self, call: Call) -> None:
        if call.held or call.probe is not None or call.reserved is not None:
            call.release()  # (most calls released all they held with their final frame)
        self.wire.routes.pop(call.token, None)  # (``wire.forget``: a call is never a probe)

    def arrived(self, reply: str) -> None:
        """A request from this system reached a node of this system: free its reservation."""
        wire = self.wire  # (``wire.route_for``, written out: every local request comes here)
        if not reply.startswith(wire.inbox_prefix):
            return
        route = wire.routes.get(reply[len(wire.inbox_prefix) :])
        if type(route) is Call and route.reserved is not None:
            mailbox, route.reserved = route.reserved, None
            mailbox.arrived()

    async def abandon(self, call: Call) -> None:
        """The caller stopped waiting: cancel the producer now, or when it starts."""
        call.release()
        wire = self.wire
        if call.token not in wire.routes:
            return
        if call.control is not None:
            wire.forget(call.token)
            await self._tell(call.control, p.Cancel(call.secret))
        else:
            call.abandoned = True  # a stream that starts later is cancelled at once
            await self._tell(
                wire.cancel_subject(call.target),
                p.Abandon(wire.inbox_prefix + call.token, call.secret),
            )

    def discard(self, call: Call) -> None:
        """Forget ``call`` now and stop its producer in the background: a stream cut off
        for a protocol error, or dropped unclosed. Synchronous; never raises."""
        wire = self.wire
        reply = wire.inbox_prefix + call.token
        self.forget(call)
        frame: p.Cancel | p.Abandon
        if call.control is not None:
            subject, frame = call.control, p.Cancel(call.secret)
        else:
            subject, frame = wire.cancel_subject(call.target), p.Abandon(reply, call.secret)
        try:
            self.runtime.spawn(self._tell, subject, frame)
        except Exception:  # the system is not running: the producer's idle bound ends it
            p.log.debug("could not cancel the producer of a stream from %r", call.target)

    def drop(self, call: Call) -> bool:
        """A ``Stream`` was dropped unclosed: ``discard`` its call if it is still open.
        Returns whether it was.

        Garbage collection may run on another thread (a sync handler's): there only the
        route is forgotten, and the producer's idle bound ends it.
        """
        if self.wire.routes.get(call.token) is not call:
            return False
        if self.runtime.in_loop_thread():
            self.discard(call)
        else:
            self.wire.forget(call.token)
        return True

    async def _tell(self, subject: str, frame: p.Cancel | p.Abandon) -> None:
        """Publish a cancel or an abandon; a failure is logged, not raised (the producer's
        idle bound is the fallback)."""
        try:
            await self.wire.publish(subject, frame)
        except Exception as exc:
            p.log.debug("could not tell %s the caller is gone: %s", subject, exc)

    def gate_for(self, target: str) -> RemoteGate:
        gate = self._gates.get(target)
        if gate is None:
            gate = self._gates[target] = RemoteGate()
        return gate

    def answered(self) -> None:
        """A call got its final answer or its stream started (wakes ``wait_answers``)."""
        if self._answered is not None:
            event, self._answered = self._answered, None
            event.set()

    def awaiting(self, targets: Mapping[str, Any]) -> bool:
        """Whether a call of this system still waits for an answer from one of ``targets``."""
        return any(
            type(route) is Call
            and route.waiting
            and not route.abandoned
            and route.target in targets
            for route in self.wire.routes.values()
        )

    async def wait_answers(self, targets: Mapping[str, Any]) -> None:
        """Wait until no call waits for an answer from ``targets`` (bound it by a scope)."""
        while self.awaiting(targets):
            self._answered = anyio.Event()
            await self._answered.wait()
