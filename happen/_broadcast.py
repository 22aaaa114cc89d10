"""The receiving side of a streamed broadcast: ``event.stream`` in a subscriber's handler."""

from __future__ import annotations

from collections import deque
from typing import Any

import anyio

from happen._errors import HandlerError, QueueFullError, SendTimeout

__all__ = ["BroadcastStream"]


class BroadcastStream:
    """An async iterator of a streamed broadcast's items, as they arrive.

    Items wait in a buffer of at most ``limit`` items. A broadcaster in the same process
    waits for room before publishing; a remote one cannot be held, so a subscriber that
    falls a whole buffer behind gets ``QueueFullError`` from its iteration. A reader that
    waits ``idle_timeout`` seconds for an item or the end, and gets neither (the
    broadcaster vanished, or the stream was forged), gets ``SendTimeout``.
    """

    def __init__(self, node_id: str, stream_id: str, limit: int, idle_timeout: float) -> None:
        self.node_id = node_id
        self.stream_id = stream_id
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._items: deque[Any] = deque()
        self._done = False
        self._error: BaseException | None = None
        self._wake: anyio.Event | None = None
        self._room: anyio.Event | None = None

    @property
    def full(self) -> bool:
        return len(self._items) >= self.limit and not self._done

    def put(self, item: Any) -> None:
        if self._done:
            return
        if len(self._items) >= self.limit:
            self._finish(
                QueueFullError(
                    f"node {self.node_id!r} fell {self.limit} items behind broadcast stream "
                    f"{self.stream_id!r}; the rest of it was dropped"
                )
            )
            return
        self._items.append(item)
        self._signal()

    def end(self, error: str | None) -> None:
        if error is None:
            self._finish(None)
        else:
            self._finish(
                HandlerError(
                    f"the broadcaster's source failed: {error}",
                    remote_type="BroadcastSourceError",
                    remote_message=error,
                )
            )

    def close(self) -> None:
        """The handler finished: release anyone waiting for room."""
        self._done = True
        self._items.clear()
        self._signal_room()

    def _finish(self, error: BaseException | None) -> None:
        if not self._done:
            self._done = True
            self._error = error
            self._signal()
            self._signal_room()

    def _signal(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _signal_room(self) -> None:
        if self._room is not None:
            event, self._room = self._room, None
            event.set()

    async def wait_room(self) -> None:
        while self.full:
            if self._room is None:
                self._room = anyio.Event()
            await self._room.wait()

    def __aiter__(self) -> BroadcastStream:
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self._done:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._wake = anyio.Event()
            with anyio.move_on_after(self.idle_timeout) as idle:
                await self._wake.wait()
            self._wake = None
            if idle.cancelled_caught and not self._items:
                self._finish(
                    SendTimeout(
                        f"broadcast stream {self.stream_id!r} to node {self.node_id!r}: nothing "
                        f"arrived for {self.idle_timeout} s; the broadcaster stopped or vanished"
                    )
                )
        item = self._items.popleft()
        if len(self._items) < self.limit:
            self._signal_room()
        return item


class LocalBroadcastStreams:
    """The streamed broadcasts this system's nodes are reading, by stream id.

    A broadcaster in the same process waits for room in each of them before it publishes
    the next item, so local subscribers are never overrun.
    """

    def __init__(self) -> None:
        self._streams: dict[str, list[BroadcastStream]] = {}

    def add(self, stream: BroadcastStream) -> None:
        self._streams.setdefault(stream.stream_id, []).append(stream)

    def remove(self, stream: BroadcastStream) -> None:
        local = self._streams.get(stream.stream_id)
        if local is not None and stream in local:
            local.remove(stream)
            if not local:
                del self._streams[stream.stream_id]

    async def wait_room(self, stream_id: str) -> None:
        for local in list(self._streams.get(stream_id, ())):
            await local.wait_room()
