"""The in-memory transport: routes subjects inside one process.

It moves bytes between subjects exactly as NATS would (``*`` and ``>`` wildcards, queue
groups, the "no responders" status for a request nobody hears, a ``max_payload`` limit on the
whole frame), so code that works here works over NATS. Subscription callbacks run inline,
in the publisher's task, one after another; the core's callbacks never block.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Mapping

import anyio

from happen._errors import PayloadTooLargeError, TransportError
from happen._transport import (
    NO_RESPONDERS,
    STATUS_HEADER,
    MessageCallback,
    TransportListener,
)

__all__ = ["MemoryBroker", "MemoryTransport", "from_url"]

log = logging.getLogger("happen.transports.memory")

DEFAULT_MAX_PAYLOAD = 1024 * 1024


class MemoryMessage:
    """A delivered message (the same attributes as nats-py's ``Msg``)."""

    __slots__ = ("data", "headers", "reply", "subject")

    def __init__(
        self, subject: str, data: bytes, reply: str, headers: dict[str, str] | None
    ) -> None:
        self.subject = subject
        self.data = data
        self.reply = reply
        self.headers = headers


class MemorySubscription:
    """A subscription on a :class:`MemoryTransport`."""

    __slots__ = ("_transport", "active", "callback", "pattern", "queue", "tokens")

    def __init__(
        self,
        transport: MemoryTransport,
        pattern: str,
        callback: MessageCallback,
        queue: str | None,
    ) -> None:
        self._transport = transport
        self.pattern = pattern
        self.tokens = pattern.split(".")
        self.callback = callback
        self.queue = queue
        self.active = True

    @property
    def subject(self) -> str:
        """The subject (or wildcard pattern) subscribed to."""
        return self.pattern

    def matches(self, subject_tokens: list[str]) -> bool:
        tokens = self.tokens
        n = len(tokens)
        for i, token in enumerate(tokens):
            if token == ">":
                return len(subject_tokens) > i
            if i >= len(subject_tokens):
                return False
            if token != "*" and token != subject_tokens[i]:
                return False
        return n == len(subject_tokens)

    async def unsubscribe(self) -> None:
        self._transport._remove(self)


_TOKEN = r"[^\s.*>]+"
_PUBLISH_SUBJECT = re.compile(rf"{_TOKEN}(?:\.{_TOKEN})*")
_SUBSCRIBE_SUBJECT = re.compile(rf"(?:{_TOKEN}|\*)(?:\.(?:{_TOKEN}|\*))*(?:\.>)?|>")


def _validate_subject(subject: str, *, wildcards: bool) -> None:
    pattern = _SUBSCRIBE_SUBJECT if wildcards else _PUBLISH_SUBJECT
    if not pattern.fullmatch(subject):
        raise TransportError(
            f"invalid subject {subject!r}: tokens must be non-empty, without whitespace"
            + (", with '*' or a final '>' as whole tokens" if wildcards else " or wildcards")
        )


def _header_size(headers: Mapping[str, str]) -> int:
    """Bytes the headers take in a NATS frame; refuses line breaks, as the NATS transport does."""
    size = len(b"NATS/1.0\r\n\r\n")
    for key, value in headers.items():
        if any(c in key or c in value for c in "\r\n"):
            raise TransportError(f"header {key!r} contains a line break; nothing was sent")
        size += len(key.encode()) + len(value.encode()) + len(b": \r\n")
    return size


class MemoryBroker:
    """The subject table several memory transports can share, like clients of one server.

    Each ``happen.System(transport="memory")`` gets a broker of its own; pass one broker to
    several ``MemoryTransport``s to run several systems ("hosts") in one process.
    """

    def __init__(self) -> None:
        self.subs: list[MemorySubscription] = []
        self.routes: dict[str, list[list[MemorySubscription]]] = {}
        self.rr = itertools.count()
        # indexes: exact subjects, "literal.prefix.*" patterns (inboxes), everything else
        self.exact: dict[str, list[MemorySubscription]] = {}
        self.star: dict[str, list[MemorySubscription]] = {}
        self.wild: list[MemorySubscription] = []

    def index(self, sub: MemorySubscription) -> list[MemorySubscription]:
        pattern = sub.pattern
        if "*" not in pattern and ">" not in pattern:
            return self.exact.setdefault(pattern, [])
        head = pattern[:-2]
        if pattern.endswith(".*") and "*" not in head and ">" not in head:
            return self.star.setdefault(head, [])
        return self.wild


class MemoryTransport:
    """Routes messages between subscriptions in this process.

    ``max_payload`` (default 1 MiB, as nats-server's default) bounds the whole frame:
    data plus headers. Transports built with the same ``broker`` reach each other.
    """

    def __init__(
        self, *, max_payload: int = DEFAULT_MAX_PAYLOAD, broker: MemoryBroker | None = None
    ) -> None:
        self.max_payload = max_payload
        self.broker = broker if broker is not None else MemoryBroker()
        self._subs = self.broker.subs
        self._routes = self.broker.routes
        self._rr = self.broker.rr
        self._inbox_ids = itertools.count()
        self._started = False
        self._closed = False
        self._listener: TransportListener | None = None

    def set_listener(self, listener: TransportListener | None) -> None:
        self._listener = listener

    async def start(self) -> None:
        if self._closed:
            raise TransportError("this memory transport was stopped; create a new one")
        self._started = True

    async def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in [sub for sub in self._subs if sub._transport is self]:
            self._remove(sub)
        if self._listener is not None:
            self._listener.on_closed(None)

    def new_inbox(self) -> str:
        return f"_INBOX.mem{id(self):x}.{next(self._inbox_ids)}"

    async def subscribe(
        self, subject: str, callback: MessageCallback, *, queue: str | None = None
    ) -> MemorySubscription:
        self._check_open()
        _validate_subject(subject, wildcards=True)
        sub = MemorySubscription(self, subject, callback, queue)
        self._subs.append(sub)
        self.broker.index(sub).append(sub)
        self._routes.clear()
        return sub

    def _remove(self, sub: MemorySubscription) -> None:
        if sub.active:
            sub.active = False
            try:
                self._subs.remove(sub)
                self.broker.index(sub).remove(sub)
            except ValueError:
                pass
            self._routes.clear()

    def _route(self, subject: str) -> list[list[MemorySubscription]]:
        """Groups of subscriptions a subject reaches: one group per queue, singles alone."""
        broker = self.broker
        matched = [
            *broker.exact.get(subject, ()),
            *broker.star.get(subject.rpartition(".")[0], ()),
        ]
        if broker.wild:
            tokens = subject.split(".")
            matched.extend(sub for sub in broker.wild if sub.matches(tokens))
        plain: list[list[MemorySubscription]] = []
        queues: dict[str, list[MemorySubscription]] = {}
        for sub in matched:
            if sub.queue is None:
                plain.append([sub])
            else:
                queues.setdefault(sub.queue, []).append(sub)
        route = plain + list(queues.values())
        if not subject.startswith("_INBOX."):  # reply inboxes are used once: not worth keeping
            if len(self._routes) > 10_000:
                self._routes.clear()
            self._routes[subject] = route
        return route

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("the memory transport is stopped")
        if not self._started:
            raise TransportError("the memory transport is not started")

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        reply: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._check_open()
        size = len(data)
        if headers:
            size += _header_size(headers)
        if size > self.max_payload:
            raise PayloadTooLargeError(
                f"message of {size} bytes to {subject!r} is over the transport's "
                f"max_payload of {self.max_payload} bytes; nothing was sent"
            )
        route = self._routes.get(subject)
        if route is None:
            _validate_subject(subject, wildcards=False)
            route = self._route(subject)
        if not route:
            if reply:
                await self._deliver_status(reply, NO_RESPONDERS)
            return
        hdrs = dict(headers) if headers else None
        for group in route:
            if len(group) == 1:
                sub = group[0]
            else:
                sub = group[next(self._rr) % len(group)]
            if not sub.active:
                continue
            await self._call(sub, MemoryMessage(subject, data, reply or "", hdrs))

    async def _deliver_status(self, reply: str, status: str) -> None:
        route = self._routes.get(reply)
        if route is None:
            route = self._route(reply)
        for group in route:
            sub = group[0]
            await self._call(sub, MemoryMessage(reply, b"", "", {STATUS_HEADER: status}))

    async def _call(self, sub: MemorySubscription, msg: MemoryMessage) -> None:
        try:
            await sub.callback(msg)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            log.exception("subscription callback for %r raised", sub.pattern)


def from_url(url: str) -> MemoryTransport:
    """Build a transport for ``"memory"`` (or ``"memory://"``)."""
    if url not in ("memory", "memory://"):
        raise TransportError(f"the memory transport takes the URL 'memory', not {url!r}")
    return MemoryTransport()
