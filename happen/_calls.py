"""The caller's side: sending requests and broadcasts, a pending ``Call``, and reading a
``Stream`` while granting its producer credit.

A ``Call`` is registered on the wire under an inbox token; the wire's inbox callback feeds it
frames. ``Stream`` reads chunks and grants credit back to the producer as it consumes them,
so the producer is never more than one window ahead of the reader.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

import anyio
import msgspec

from happen import _wire as p
from happen._broadcast import LocalBroadcastStreams
from happen._errors import (
    CodecError,
    HandlerError,
    HappenError,
    InvalidIdError,
    NoHandlerError,
    QueueFullError,
    SendTimeout,
    SystemStoppedError,
    TransportError,
)
from happen._events import Event, IdGenerator, new_context
from happen._ids import validate_event_type, validate_node_id
from happen._mailbox import Mailbox
from happen._pressure import RemoteGate
from happen._runtime import Runtime
from happen._signal import Signal

__all__ = ["Call", "Caller", "Stream"]

_FINAL = (p.Result, p.Failure, p.StreamEnd)


def failure_to_error(frame: p.Failure, target: str) -> HappenError:
    """The exception a caller sees for a failure reply from node ``target``."""
    code = frame.code
    if code == p.HANDLER_ERROR:
        return HandlerError(
            f"handler on node {target!r} raised {frame.error_type}: {frame.message}",
            remote_type=frame.error_type,
            remote_message=frame.message,
        )
    if code == p.QUEUE_FULL:
        return QueueFullError(frame.message or f"node {target!r} queue is full")
    if code == p.NO_HANDLER:
        return NoHandlerError(frame.message or f"node {target!r} has no matching handler")
    if code == p.TIMEOUT:
        return SendTimeout(frame.message or f"node {target!r} timed out")
    if code == p.BAD_REQUEST:
        return CodecError(f"node {target!r} refused the request as malformed: {frame.message}")
    return TransportError(frame.message or f"node {target!r} failed the call ({code})")


class Call:
    """One request in flight: its inbox token, the frames received, the pressure hold."""

    __slots__ = (
        "_frames",
        "_wake",
        "abandoned",
        "caller",
        "control",
        "gate",
        "heard",
        "held",
        "probe",
        "reserved",
        "target",
        "token",
        "waiting",
    )

    def __init__(self, caller: Caller, target: str) -> None:
        self.caller = caller
        self.target = target
        self.token = ""
        self.control: str | None = None
        self.held = False
        self.gate: Any = None  # the RemoteGate this call holds, after a "hold"
        self.probe: Any = None  # the RemoteGate this call probes for
        self.abandoned = False
        self.waiting = True  # no final frame and no stream start yet
        self.reserved: Any = None  # the local Mailbox this call holds a place in, in transit
        self.heard = 0  # frames received so far (the liveness monitor watches it change)
        self._frames: deque[Any] = deque()
        self._wake: Signal | None = None

    # called by the system's inbox callback (never blocks)
    def feed(self, frame: Any) -> None:
        self.heard += 1
        if type(frame) is p.Hold:
            if not self.held:
                self.held = True
                self.gate = self.caller.gate_for(self.target)
                self.gate.hold()
            self._probed()
            return
        if type(frame) is p.Ack:
            self.release()
            return
        if type(frame) is p.StreamStart:
            self._probed()
            self.control = frame.control
            self.waiting = False
            self.caller.answered()
        elif isinstance(frame, _FINAL) or isinstance(frame, BaseException):
            self.release()
            self.waiting = False
            self.caller.answered()
        self._frames.append(frame)
        if self._wake is not None:
            self._wake.set()

    def _probed(self) -> None:
        if self.probe is not None:
            gate, self.probe = self.probe, None
            gate.probe_done()

    def release(self) -> None:
        """Give back what the call holds: a local reservation, a remote hold, a probe."""
        self._probed()
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


class Stream:
    """A streamed reply: an async iterator and an async context manager.

    ``async for item in stream`` yields the producer's items; leaving ``async with`` or
    calling ``aclose()`` early cancels the producer (its ``finally`` blocks run). A failure
    of the producer raises ``HandlerError`` after the items that came before it.
    """

    def __init__(
        self,
        call: Call,
        *,
        window: int,
        timeout: float | None,
        opener: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self._call = call
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

    async def __aenter__(self) -> Stream:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        if self._opener is not None:
            await self._open()
        if self._single is not None:
            if self._single:
                return self._single.pop()
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
            return frame.value
        if kind is p.Failure:
            raise failure_to_error(frame, call.target)
        if isinstance(frame, BaseException):
            raise frame
        raise TransportError(f"unexpected {kind.__name__} frame in a stream from {call.target!r}")

    async def _count(self, item: Any) -> Any:
        """One more item read: grant credit back every half window."""
        self._consumed += 1
        if self._consumed - self._granted >= self._grant_at:
            control = self._call.control
            if control:
                n = self._consumed - self._granted
                self._granted = self._consumed
                await self._call.caller.wire.publish(control, p.Credit(n))
        return item

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


class _RoundTrip:
    """The route of ``Caller.round_trip``: any answer (a "no responders" status) ends it."""

    __slots__ = ("done",)
    abandoned = False
    target = "(round trip)"

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
    ) -> None:
        self.wire = wire
        self.runtime = runtime
        self.window = window
        self._ids = ids
        self._system_id = system_id
        self._local_mailbox = local_mailbox
        self._local_listeners = local_listeners
        self._broadcast_streams = broadcast_streams
        self._gates: dict[str, RemoteGate] = {}
        self._answered: anyio.Event | None = None

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
        self.check_running()
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

    def request_frame(
        self, sender: str, event_type: str, payload: Any, timeout: float | None, priority: int
    ) -> tuple[p.Request, bytes]:
        """The request frame and its encoding (encoded now, so bad payloads fail here)."""
        if type(priority) is not int:
            raise TypeError(f"priority must be an int, not {type(priority).__name__}")
        timeout_ms = None
        if timeout is not None:
            if not timeout > 0:
                raise ValueError(f"timeout must be positive seconds, not {timeout!r}")
            timeout_ms = max(1, int(timeout * 1000))
        context = new_context(self._ids, sender)
        frame = p.Request(
            event_type, payload, context, priority, self.window, timeout_ms, self._system_id
        )
        return frame, self.wire.encode(frame)

    async def send(
        self, sender: str, target: Any, event: Any, timeout: float | None, priority: int
    ) -> Any:
        target_id, event_type, payload = self.prepare(target, event)
        frame, data = self.request_frame(sender, event_type, payload, timeout, priority)
        call = Call(self, target_id)
        first = await self._open_within(timeout, call, frame, data)
        if type(first) is p.Result:
            return first.value
        return Stream(call, window=self.window, timeout=timeout)

    def stream(
        self, sender: str, target: Any, event: Any, timeout: float | None, priority: int
    ) -> Stream:
        target_id, event_type, payload = self.prepare(target, event)
        frame, data = self.request_frame(sender, event_type, payload, timeout, priority)
        call = Call(self, target_id)

        async def opener() -> Any:
            return await self._open_within(timeout, call, frame, data)

        return Stream(call, window=self.window, timeout=timeout, opener=opener)

    async def _open_within(
        self, timeout: float | None, call: Call, frame: p.Request, data: bytes
    ) -> Any:
        """``_open`` bounded by the call's timeout (``SendTimeout`` when it passes)."""
        if timeout is None:
            return await self._open(call, frame, data)
        try:
            with anyio.fail_after(timeout):
                return await self._open(call, frame, data)
        except TimeoutError:
            raise SendTimeout(
                f"no reply from node {call.target!r} to {frame.type!r} within {timeout} s"
            ) from None

    async def _open(self, call: Call, frame: p.Request, data: bytes) -> Any:
        """Publish a request; return its first reply (a Result or a StreamStart)."""
        self.check_running()
        runtime = self.runtime
        if runtime.syncing:
            await runtime.settled()
        target = call.target
        wire = self.wire
        mailbox = self._local_mailbox(target)
        if mailbox is not None:
            while mailbox.holds_local_senders():
                await mailbox.wait_relief()
            mailbox.in_transit += 1
            call.reserved = mailbox
            # To our own instance, so the reservation is surely freed when it arrives; a
            # full instance passes requests on to a twin with room.
            subject = wire.instance_subject(target, self._system_id)
        else:
            subject = wire.node_subject(target)
            gate = self._gates.get(target)
            if gate is not None and await gate.admit(runtime.signal):
                call.probe = gate
                data = wire.encode(msgspec.structs.replace(frame, probe=True))
        call.token = wire.register(call)
        try:
            if runtime.state != "running":
                raise SystemStoppedError("the system stopped")
            await wire.publish_data(subject, data, reply=wire.inbox_prefix + call.token)
        except BaseException:
            self.forget(call)
            raise
        try:
            first = await call.next_frame()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.abandon(call)
            raise
        kind = type(first)
        if kind is p.StreamStart:
            return first
        self.forget(call)
        if kind is p.Result:
            return first
        if kind is p.Failure:
            raise failure_to_error(first, target)
        if isinstance(first, BaseException):
            raise first
        raise TransportError(f"unexpected {kind.__name__} reply from node {target!r}")

    async def broadcast(self, sender: str, event: Any, stream: AsyncIterable[Any] | None) -> None:
        _, event_type, payload = self.prepare(sender, event)
        runtime = self.runtime
        if runtime.syncing:
            await runtime.settled()
        for mailbox in self._local_listeners(event_type):
            while mailbox.under_pressure:
                await mailbox.wait_relief()
        wire = self.wire
        subject = wire.broadcast_subject(event_type)
        context = new_context(self._ids, sender)
        if stream is None:
            self.check_running()
            await wire.publish(subject, p.Broadcast(event_type, payload, context))
            return
        stream_id = self._ids()
        self.check_running()
        await wire.publish(subject, p.Broadcast(event_type, payload, context, stream_id))
        try:
            async for item in stream:
                await self._broadcast_streams.wait_room(stream_id)
                self.check_running()
                await wire.publish(subject, p.BroadcastItem(stream_id, item))
        except Exception as exc:
            with anyio.CancelScope(shield=True):
                error = f"{type(exc).__name__}: {p.describe(exc)}"
                await wire.publish(subject, p.BroadcastEnd(stream_id, error))
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
        call.release()
        self.wire.forget(call.token)

    def arrived(self, reply: str) -> None:
        """A request from this system reached a node of this system: free its reservation."""
        route = self.wire.route_for(reply)
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
            try:
                await wire.publish(call.control, p.Cancel())
            except Exception as exc:
                p.log.debug("could not cancel a stream: %s", exc)
        else:
            call.abandoned = True  # a stream that starts later is cancelled at once
            try:
                await wire.publish(
                    wire.cancel_subject(call.target), p.Abandon(wire.inbox_prefix + call.token)
                )
            except Exception as exc:
                p.log.debug("could not tell node %r the call was abandoned: %s", call.target, exc)

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
