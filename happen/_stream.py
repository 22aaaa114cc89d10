"""The caller's side of a request: waiting for the result, and reading a streamed reply.

A ``Call`` is registered under an inbox token; the system's inbox callback feeds it frames.
``Stream`` reads chunks and grants credit back to the producer as it consumes them, so the
producer is never more than one window ahead of the reader.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from happen import _protocol as p
from happen._errors import (
    CodecError,
    HandlerError,
    HappenError,
    NoHandlerError,
    QueueFullError,
    SendTimeout,
    TransportError,
)
from happen._signal import Signal

if TYPE_CHECKING:
    from happen._sending import Sending

__all__ = ["Call", "Stream"]

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
        "control",
        "gate",
        "held",
        "probe",
        "reserved",
        "system",
        "target",
        "token",
        "waiting",
    )

    def __init__(self, system: Sending, target: str) -> None:
        self.system = system
        self.target = target
        self.token = ""
        self.control: str | None = None
        self.held = False
        self.gate: Any = None  # the RemoteGate this call holds, after a "hold"
        self.probe: Any = None  # the RemoteGate this call probes for
        self.abandoned = False
        self.waiting = True  # no final frame and no stream start yet
        self.reserved: Any = None  # the local Mailbox this call holds a place in, in transit
        self._frames: deque[Any] = deque()
        self._wake: Signal | None = None

    # called by the system's inbox callback (never blocks)
    def feed(self, frame: Any) -> None:
        if type(frame) is p.Hold:
            if not self.held:
                self.held = True
                self.gate = self.system._gate_for(self.target)
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
            self.system._on_answered()
        elif isinstance(frame, _FINAL) or isinstance(frame, BaseException):
            self.release()
            self.waiting = False
            self.system._on_answered()
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
            self._wake = self.system._signal()
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
                await self._call.system._send_frame(control, p.Credit(n))
        return item

    def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            self._call.system._forget(self._call)

    async def aclose(self) -> None:
        """Stop reading: cancel the producer if it is still running. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._opener = None
        call = self._call
        with anyio.CancelScope(shield=True):
            await call.system._abandon(call)
