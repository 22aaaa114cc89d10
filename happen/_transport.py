"""The seam between the core and a transport: a small NATS-shaped Protocol.

A transport moves bytes between subjects and nothing more. The request / reply / stream
protocol is written once, in the core, on top of this Protocol.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, runtime_checkable

__all__ = ["Message", "Subscription", "Transport", "TransportListener"]

#: The header a transport sets on a message that reports a NATS status (e.g. "503").
STATUS_HEADER = "Status"
#: The status a request gets when nobody subscribes to its subject.
NO_RESPONDERS = "503"


@runtime_checkable
class Message(Protocol):
    """A message delivered to a subscription callback (nats-py's ``Msg`` satisfies this)."""

    subject: str
    data: bytes
    reply: str
    headers: dict[str, str] | None


class Subscription(Protocol):
    """A live subscription, as ``Transport.subscribe()`` returns it."""

    @property
    def subject(self) -> str:
        """The subject (or wildcard pattern) subscribed to."""
        ...

    async def unsubscribe(self) -> None:
        """Stop delivery; never raises."""
        ...


class TransportListener(Protocol):
    """What a transport tells the system about its connection (set with ``set_listener``)."""

    def on_disconnected(self) -> None:
        """The connection was lost; in-flight calls must fail."""

    def on_reconnected(self) -> None:
        """The connection is back; subscriptions are live again."""

    def on_closed(self, error: BaseException | None) -> None:
        """The transport closed for good (or was stopped)."""

    def on_dropped(self, subscription: Subscription, count: int) -> None:
        """The transport dropped ``count`` messages meant for ``subscription`` because its
        callback did not keep up (NATS: the subscription's pending limits were full).

        ``subscription`` is the very object ``Transport.subscribe()`` returned, so the
        listener can tell by identity which subscriber (which node) lost them. Called from
        the transport's own task: it must only count, not block or raise."""


MessageCallback = Callable[[Message], Awaitable[None]]


@runtime_checkable
class Transport(Protocol):
    """Moves bytes between subjects (``*`` and ``>`` wildcards, queue groups, reply inboxes).

    Contract every implementation keeps (the transport contract tests check it):

    - ``publish`` to a subject nobody subscribes to is silently dropped, except that a
      message with a ``reply`` subject makes the transport deliver a message with header
      ``Status: 503`` (and no data) to that reply subject ("no responders").
    - Messages from one publisher to one subscription arrive in publish order.
    - Subscriptions with the same ``queue`` share the messages of a subject: each message
      goes to one member of the group.
    - ``publish`` raises ``PayloadTooLargeError`` for a frame (data plus headers) over
      ``max_payload``, and ``TransportError`` once the connection is closed or, at once,
      while it is down (reconnecting): nothing is held back to be sent later. ``subscribe``
      raises ``TransportError`` in both cases too.
    """

    max_payload: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        reply: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None: ...

    async def subscribe(
        self, subject: str, callback: MessageCallback, *, queue: str | None = None
    ) -> Subscription: ...

    def new_inbox(self) -> str: ...

    def set_listener(self, listener: TransportListener | None) -> None: ...
