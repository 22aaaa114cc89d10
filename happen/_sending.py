"""The caller's side of the system: sending requests and broadcasts, and routing the frames
that come back to the system's inbox (replies, stream items, credit for its producers).

``System`` inherits these methods; the state they use is created in ``System.__init__``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterable, Callable, Mapping
from typing import Any

import anyio
import msgspec

from happen import _protocol as p
from happen._broadcast import BroadcastStream
from happen._codec import Codec, Decoder
from happen._errors import (
    InvalidIdError,
    NodeNotFoundError,
    SendTimeout,
    SystemStoppedError,
    TransportError,
)
from happen._events import CausalContext, Event, IdGenerator, new_context
from happen._ids import validate_event_type, validate_node_id
from happen._node import Node
from happen._pressure import RemoteGate
from happen._producer import Producer
from happen._signal import Signal
from happen._stream import Call, Stream, failure_to_error
from happen._transport import NO_RESPONDERS, STATUS_HEADER, Message, Transport

__all__ = ["Sending"]

log = logging.getLogger("happen")


class Sending:
    """Requests, broadcasts and the inbox routes of one system."""

    namespace: str
    id: str
    bad_inputs: int
    stray_frames: int
    _state: str
    _syncing: bool
    _window: int
    _codec: Codec
    _ids: IdGenerator
    _tokens: itertools.count[int]
    _nodes: dict[str, Node]
    _routes: dict[str, Any]
    _gates: dict[str, RemoteGate]
    _local_bstreams: dict[str, list[BroadcastStream]]
    _transport: Transport | None
    _inbox_prefix: str
    _inbox_decoder: Decoder[Any]
    _bad_input_logged: set[str]
    _signal: Callable[[], Signal]

    async def _settle(self) -> None:
        raise NotImplementedError

    def _on_answered(self) -> None:
        raise NotImplementedError

    # ----- sending ------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state != "running":
            raise SystemStoppedError(
                f"the system is {self._state}: start it (async with happen.System()) "
                "before sending, and do not send after stop()"
            )

    def _prepare(self, target: Any, event: Any) -> tuple[str, str, Any]:
        self._check_running()
        if isinstance(target, Node):
            target_id = target.id
        else:
            target_id = validate_node_id(target)
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

    def _request_frame(
        self, sender: Node, event_type: str, payload: Any, timeout: float | None, priority: int
    ) -> tuple[p.Request, bytes]:
        """The request frame and its encoding (encoded now, so bad payloads fail here)."""
        if type(priority) is not int:
            raise TypeError(f"priority must be an int, not {type(priority).__name__}")
        timeout_ms = None
        if timeout is not None:
            if not timeout > 0:
                raise ValueError(f"timeout must be positive seconds, not {timeout!r}")
            timeout_ms = max(1, int(timeout * 1000))
        context = new_context(self._ids, sender.id)
        frame = p.Request(event_type, payload, context, priority, self._window, timeout_ms, self.id)
        return frame, self._codec.encode(frame)

    async def _send(
        self, sender: Node, target: Any, event: Any, timeout: float | None, priority: int
    ) -> Any:
        target_id, event_type, payload = self._prepare(target, event)
        frame, data = self._request_frame(sender, event_type, payload, timeout, priority)
        call = Call(self, target_id)
        first = await self._open_within(timeout, call, frame, data)
        if type(first) is p.Result:
            return first.value
        return Stream(call, window=self._window, timeout=timeout)

    def _stream(
        self, sender: Node, target: Any, event: Any, timeout: float | None, priority: int
    ) -> Stream:
        target_id, event_type, payload = self._prepare(target, event)
        frame, data = self._request_frame(sender, event_type, payload, timeout, priority)
        call = Call(self, target_id)

        async def opener() -> Any:
            return await self._open_within(timeout, call, frame, data)

        return Stream(call, window=self._window, timeout=timeout, opener=opener)

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
        self._check_running()
        if self._syncing:
            await self._settle()
        target = call.target
        node = self._nodes.get(target)
        if node is not None:
            mailbox = node._mailbox
            while mailbox.holds_local_senders():
                await mailbox.wait_relief()
            mailbox.in_transit += 1
            call.reserved = mailbox
        else:
            gate = self._gates.get(target)
            if gate is not None and await gate.admit(self._signal):
                call.probe = gate
                data = self._codec.encode(msgspec.structs.replace(frame, probe=True))
        token = self._register(call)
        call.token = token
        transport = self._transport
        assert transport is not None
        try:
            if self._state != "running":
                raise SystemStoppedError("the system stopped")
            await transport.publish(
                f"{self.namespace}.node.{target}", data, reply=self._inbox_prefix + token
            )
        except BaseException:
            self._forget(call)
            raise
        try:
            first = await call.next_frame()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._abandon(call)
            raise
        kind = type(first)
        if kind is p.StreamStart:
            return first
        self._forget(call)
        if kind is p.Result:
            return first
        if kind is p.Failure:
            raise failure_to_error(first, target)
        if isinstance(first, BaseException):
            raise first
        raise TransportError(f"unexpected {kind.__name__} reply from node {target!r}")

    async def _broadcast(self, sender: Node, event: Any, stream: AsyncIterable[Any] | None) -> None:
        _, event_type, payload = self._prepare(sender, event)
        if self._syncing:
            await self._settle()
        for node in self._nodes.values():
            handler = node._handlers.select(event_type)
            if handler is not None:
                while node._mailbox.under_pressure:
                    await node._mailbox.wait_relief()
        subject = f"{self.namespace}.bcast.{event_type}"
        context = new_context(self._ids, sender.id)
        if stream is None:
            await self._publish(subject, p.Broadcast(event_type, payload, context))
            return
        stream_id = self._ids()
        await self._publish(subject, p.Broadcast(event_type, payload, context, stream_id))
        try:
            async for item in stream:
                for local in self._local_bstreams.get(stream_id, ()):
                    await local.wait_room()
                await self._publish(subject, p.BroadcastItem(stream_id, item))
        except Exception as exc:
            with anyio.CancelScope(shield=True):
                error = f"{type(exc).__name__}: {exc}".replace("\n", " ")
                await self._publish(subject, p.BroadcastEnd(stream_id, error))
            raise
        await self._publish(subject, p.BroadcastEnd(stream_id))

    # ----- frames and routes --------------------------------------------------------

    async def _publish(self, subject: str, frame: Any) -> None:
        self._check_running()
        assert self._transport is not None
        await self._transport.publish(subject, self._codec.encode(frame))

    async def _send_frame(self, subject: str, frame: Any) -> None:
        """Publish a protocol frame to an inbox (credit, cancel); errors propagate."""
        assert self._transport is not None
        await self._transport.publish(subject, self._codec.encode(frame))

    async def _reply(self, subject: str, frame: Any) -> None:
        """Publish a reply frame; a transport failure is logged, not raised."""
        await self._publish_reply(subject, self._codec.encode(frame))

    async def _publish_reply(self, subject: str, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        try:
            await transport.publish(subject, data)
        except TransportError as exc:
            log.warning("could not deliver a reply to %s: %s", subject, exc)

    def _register(self, route: Call | Producer) -> str:
        token = f"{next(self._tokens):x}"
        self._routes[token] = route
        return token

    def _arrived(self, reply: str) -> None:
        """A request from this system reached a node of this system: free its reservation."""
        if reply.startswith(self._inbox_prefix):
            route = self._routes.get(reply[len(self._inbox_prefix) :])
            if type(route) is Call and route.reserved is not None:
                mailbox, route.reserved = route.reserved, None
                mailbox.arrived()

    def _forget(self, call: Call) -> None:
        call.release()
        self._routes.pop(call.token, None)

    def _forget_token(self, token: str) -> None:
        if token:
            self._routes.pop(token, None)

    async def _abandon(self, call: Call) -> None:
        """The caller stopped waiting: cancel the producer now, or when it starts."""
        call.release()
        if call.token not in self._routes:
            return
        if call.control is not None:
            self._routes.pop(call.token, None)
            try:
                await self._send_frame(call.control, p.Cancel())
            except Exception as exc:
                log.debug("could not cancel a stream: %s", exc)
        else:
            call.abandoned = True  # a stream that starts later is cancelled at once
            try:
                await self._send_frame(
                    f"{self.namespace}.cancel.{call.target}",
                    p.Abandon(self._inbox_prefix + call.token),
                )
            except Exception as exc:
                log.debug("could not tell node %r the call was abandoned: %s", call.target, exc)

    def _gate_for(self, target: str) -> RemoteGate:
        gate = self._gates.get(target)
        if gate is None:
            gate = self._gates[target] = RemoteGate()
        return gate

    async def _on_inbox(self, msg: Message) -> None:
        token = msg.subject[len(self._inbox_prefix) :]
        route = self._routes.get(token)
        headers = msg.headers
        if headers and headers.get(STATUS_HEADER) == NO_RESPONDERS:
            if route is not None:
                self._routes.pop(token, None)
                route.feed(
                    NodeNotFoundError(
                        f"no node {getattr(route, 'target', '?')!r} is running in "
                        f"namespace {self.namespace!r}"
                    )
                )
            return
        try:
            frame = self._inbox_decoder.decode(msg.data)
        except Exception as exc:
            self._report_bad_input("inbox", exc)
            return
        if route is None:
            # Late frames are normal (a credit after the stream ended, a reply after the
            # caller gave up); they are counted, not raised.
            self.stray_frames += 1
            return
        if route.abandoned:
            if type(frame) is p.StreamStart:
                self._routes.pop(token, None)
                await self._send_frame(frame.control, p.Cancel())
            elif isinstance(frame, (p.Result, p.Failure, p.StreamEnd)):
                self._routes.pop(token, None)
            return
        route.feed(frame)

    def _fail_routes(self, error: BaseException) -> None:
        routes = list(self._routes.values())
        self._routes.clear()
        for route in routes:
            route.feed(error)

    def _external_context(self) -> CausalContext:
        """The context of an event from a foreign client, which sent none."""
        event_id = self._ids()
        return CausalContext(event_id, "external", event_id, ("external",))

    def _report_bad_input(self, where: str, exc: BaseException) -> None:
        self.bad_inputs += 1
        key = f"{where}:{type(exc).__name__}"
        if key not in self._bad_input_logged:
            self._bad_input_logged.add(key)
            log.warning(
                "%s: dropped malformed input (%s); further ones are counted only", where, exc
            )
