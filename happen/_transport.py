"""The seam between the core and a transport: a small NATS-shaped Protocol.

A transport moves bytes between subjects and nothing more. The request / reply / stream
protocol is written once, in the core, on top of this Protocol.

Durable delivery and node state extend the seam with two JetStream-shaped capabilities,
offered by a :class:`DurableTransport`: durable logs (:class:`DurableLog`, read through named
consumers, :class:`LogConsumer`, one :class:`Delivery` at a time) and key-value buckets
(:class:`KeyValue`). The core's delivery and state logic is written once over them.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, runtime_checkable

import msgspec

from happen._errors import HappenError, QueueFullError, TransportError

__all__ = [
    "Appended",
    "ConsumerSettings",
    "Delivery",
    "DurableLog",
    "DurableTransport",
    "Entry",
    "KeyValue",
    "LogConsumer",
    "LogFullError",
    "LogSettings",
    "Message",
    "Retention",
    "RevisionMismatch",
    "Subscription",
    "Transport",
    "TransportListener",
    "durable_transport",
]

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


# --- Durable logs and key-value buckets ------------------------------------------------------

#: Names of logs, consumers and buckets: letters, digits, '-' and '_' (valid as JetStream
#: stream, consumer and bucket names, and as one subject token).
NAME_RULE = "1-255 characters of ASCII letters, digits, '-' and '_'"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")
_TOKEN = r"[^\s.*>]+"
_SUBJECT = re.compile(rf"{_TOKEN}(?:\.{_TOKEN})*")
_FILTER = re.compile(rf"(?:{_TOKEN}|\*)(?:\.(?:{_TOKEN}|\*))*(?:\.>)?|>")
#: The longest message id (``Nats-Msg-Id``) a log accepts.
MAX_MSG_ID = 1024
#: The longest key a bucket accepts, once escaped (see :func:`escape_key`).
MAX_ESCAPED_KEY = 1024
#: Header names a log keeps for itself (JetStream reads headers starting with "Nats-").
RESERVED_HEADER_PREFIX = "nats-"
#: The header carrying a log message's id (JetStream's dedup header); it counts in the frame.
MSG_ID_HEADER = "Nats-Msg-Id"
#: Bytes of ``max_payload`` a bucket keeps for its own headers: a value may be
#: ``max_payload - KV_HEADROOM`` bytes long.
KV_HEADROOM = 64
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ESCAPED = re.compile(r"(?:[A-Za-z0-9_-]|=[0-9A-F]{2})+")


class LogFullError(QueueFullError):
    """A durable log holds ``max_msgs`` messages and refuses new ones (discard-new): nothing
    was stored. ``log`` names the log, ``limit`` is its ``max_msgs`` (also in ``queued``).

    A :class:`~happen.QueueFullError`, so a caller that is not told which node the log
    belongs to still sees the error a full queue raises."""

    def __init__(self, log: str, limit: int | None) -> None:
        bound = f"its limit of {limit} messages" if limit is not None else "its limit"
        super().__init__(f"durable log {log!r} is full ({bound}); nothing was stored", queued=limit)
        self.log = log
        self.limit = limit


class Entry(msgspec.Struct, frozen=True):
    """A key's value in a :class:`KeyValue` bucket and the revision that wrote it."""

    value: bytes
    revision: int


class RevisionMismatch(HappenError):
    """A conditional write (``expect=``) found another revision: nothing was written.

    ``bucket`` and ``key`` say where, ``expected`` is the revision the caller gave (``0``:
    "must not exist"), ``current`` the key's entry when the write was refused (``None``:
    the key does not exist, or was deleted)."""

    def __init__(self, bucket: str, key: str, expected: int, current: Entry | None) -> None:
        now = f"revision {current.revision}" if current is not None else "no value"
        super().__init__(
            f"key {key!r} of bucket {bucket!r}: expected revision {expected}, found {now}"
        )
        self.bucket = bucket
        self.key = key
        self.expected = expected
        self.current = current


class Appended(msgspec.Struct, frozen=True):
    """What :meth:`DurableLog.append` did: the message's sequence in the log, and whether
    its id was already in the dedup window (``duplicate``: nothing new was stored, and
    ``seq`` is the first copy's sequence)."""

    seq: int
    duplicate: bool


class Retention(enum.Enum):
    """When a log forgets a message.

    - ``WORK_QUEUE``: once its consumer settled it (ack or term). A message waits for a
      consumer that matches it, however late it comes. Consumers must not overlap: each
      subject has at most one.
    - ``INTEREST``: once every consumer matching its subject settled it; consumers may
      overlap (each gets its own copy). A message no consumer matches when it is appended
      is not kept.
    """

    WORK_QUEUE = "work_queue"
    INTEREST = "interest"


class LogSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How a durable log keeps messages (JetStream: a stream's configuration).

    - ``retention``: see :class:`Retention`.
    - ``max_msgs``: the most messages stored at once (``None``: no limit); an append beyond
      it raises :class:`LogFullError` and stores nothing (JetStream's discard-new).
    - ``dedup_window``: seconds an appended message id is remembered, counted from its
      first append, whether or not the message was settled meanwhile (JetStream's
      duplicate window). Must be positive.

    Raises ``ValueError`` for a value out of range.
    """

    retention: Retention = Retention.WORK_QUEUE
    max_msgs: int | None = None
    dedup_window: float = 120.0

    def __post_init__(self) -> None:
        if self.max_msgs is not None and self.max_msgs < 1:
            raise ValueError(f"max_msgs must be at least 1 or None, not {self.max_msgs}")
        if not self.dedup_window > 0:
            raise ValueError(f"dedup_window must be positive, not {self.dedup_window}")


class ConsumerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How a named consumer reads a log (JetStream: a durable pull consumer).

    - ``subjects``: the log subjects it reads (``*`` and a final ``>`` allowed; default:
      all of them).
    - ``ack_wait``: seconds a delivery may stay unsettled before it is delivered again
      (``in_progress()`` restarts the clock). Must be positive.
    - ``max_deliver``: the most deliveries of one message, naks included (``None``: no
      limit). A message whose last delivery was not acked is not delivered again, but it
      stays stored and counts toward ``max_msgs`` (as on JetStream): settle it instead.

    Raises ``ValueError`` for a value out of range or an invalid subject.
    """

    subjects: tuple[str, ...] = (">",)
    ack_wait: float = 30.0
    max_deliver: int | None = None

    def __post_init__(self) -> None:
        if not self.subjects:
            raise ValueError("a consumer needs at least one subject")
        for subject in self.subjects:
            if not isinstance(subject, str) or not _FILTER.fullmatch(subject):
                raise ValueError(
                    f"invalid consumer subject {subject!r}: dot-separated tokens without "
                    f"whitespace, '*' or a final '>' as whole tokens"
                )
        if not self.ack_wait > 0:
            raise ValueError(f"ack_wait must be positive, not {self.ack_wait}")
        if self.max_deliver is not None and self.max_deliver < 1:
            raise ValueError(f"max_deliver must be at least 1 or None, not {self.max_deliver}")


class Delivery(Protocol):
    """One delivery of a log message to a consumer, to be settled once.

    ``delivery_count`` is 1 on the first delivery and grows with each redelivery (after
    ``ack_wait``, or a ``nak``). ``msg_id`` is the id it was appended with, ``headers`` the
    headers it was appended with (``None`` if none), ``seq`` its sequence in the log.

    The first of ``ack``, ``nak`` and ``term`` settles the delivery; later calls on the same
    delivery, and ``in_progress`` after it, do nothing. A settlement is never lost half-way:
    it completes even if the task awaiting it is cancelled meanwhile (the cancellation is
    seen at the task's next wait). Each raises :class:`TransportError`
    when the transport is closed. A late settlement still counts: an ack from a delivery
    that was redelivered meanwhile settles the message (as on JetStream).
    """

    @property
    def subject(self) -> str:
        """The log subject the message was appended to."""
        ...

    @property
    def data(self) -> bytes: ...

    @property
    def headers(self) -> Mapping[str, str] | None: ...

    @property
    def seq(self) -> int: ...

    @property
    def delivery_count(self) -> int: ...

    @property
    def msg_id(self) -> str: ...

    async def ack(self) -> None:
        """Done: the message is settled for this consumer and never delivered again."""
        ...

    async def nak(self, delay: float | None = None) -> None:
        """Not done: deliver it again after ``delay`` seconds (at once with ``None`` or 0).
        Counts as a delivery toward ``max_deliver``."""
        ...

    async def in_progress(self) -> None:
        """Still working: restart the ``ack_wait`` clock. May be called many times."""
        ...

    async def term(self) -> None:
        """Give up: settled for this consumer, never delivered again (not done)."""
        ...


class LogConsumer(Protocol):
    """A named, durable reader of a log. Every handle with the same name (on any transport
    reaching the same server) shares its deliveries: each message goes to one of them."""

    @property
    def name(self) -> str: ...

    @property
    def fetch_cancellable(self) -> bool:
        """Whether a fetch may be cancelled without losing what it would have returned:
        ``False`` where messages already on their way to a cancelled fetch stay unsettled
        until ``ack_wait`` (NATS)."""
        ...

    async def fetch(self, n: int, *, timeout: float) -> list[Delivery]:
        """Up to ``n`` deliveries (``n >= 1``): redeliveries that are due first, then new
        messages, in log order. Returns as soon as at least one is available, or ``[]``
        after ``timeout`` seconds; never takes more than ``n``.

        Raises :class:`TransportError` when the transport is closed, not started, or (NATS)
        while the connection is down."""
        ...

    async def pending(self) -> int:
        """Messages this consumer has yet to settle: not delivered yet, or delivered and
        not settled (a nak'd message waiting for its delay included)."""
        ...

    async def close(self) -> None:
        """Stop fetching through this handle. The consumer and its unsettled messages stay
        (they are redelivered after ``ack_wait``). Idempotent."""
        ...


class DurableLog(Protocol):
    """A named, persistent, deduplicating message log (JetStream: a stream)."""

    @property
    def name(self) -> str: ...

    @property
    def settings(self) -> LogSettings: ...

    async def append(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> Appended:
        """Store ``data`` under ``subject`` (dot-separated tokens, no wildcards), unless
        ``msg_id`` was appended within the dedup window (then ``duplicate``, nothing stored).

        Raises :class:`LogFullError` at ``max_msgs`` (a duplicate is still answered),
        :class:`~happen.PayloadTooLargeError` for a message over ``max_payload``, and
        :class:`TransportError` for an invalid subject, id or header (header names starting
        with "Nats-" are reserved), when the transport is closed or down, or when the
        server did not answer: the message may then be stored or not, and appending it
        again with the same ``msg_id`` is safe."""
        ...

    async def stored(self, subjects: str) -> int:
        """How many messages the log holds under the subjects ``subjects`` matches (``*``
        and a final ``>`` allowed), settled or not by any consumer (a work-queue log holds
        only unsettled ones). Raises :class:`TransportError` for an invalid filter, or when
        the transport is closed or down."""
        ...

    async def consumer(self, name: str, settings: ConsumerSettings | None = None) -> LogConsumer:
        """A handle on the consumer ``name``, created with ``settings`` if it does not exist,
        updated to them if it does. A new consumer starts at the log's first stored message.

        Raises :class:`TransportError` for an invalid name, or for a work-queue log when
        another consumer reads an overlapping subject."""
        ...


class KeyValue(Protocol):
    """A key-value bucket with revisions (JetStream KV).

    Keys are any non-empty strings (escaped by the transport; at most
    ``MAX_ESCAPED_KEY`` characters once escaped). Every write gets a new revision, larger
    than any before in the bucket; compare revisions for equality, not for order.
    ``expect=None`` writes unconditionally, ``expect=0`` only if the key does not exist
    (a deleted key does not), ``expect=rev`` only if ``rev`` wrote the key's latest value
    (compare-and-set); otherwise :class:`RevisionMismatch` carries the current entry.
    """

    @property
    def bucket(self) -> str: ...

    async def get(self, key: str) -> Entry | None:
        """The key's latest value, or ``None`` if it does not exist or was deleted."""
        ...

    async def put(self, key: str, value: bytes, *, expect: int | None = None) -> int:
        """Write ``value`` and return its revision. Raises :class:`RevisionMismatch`,
        :class:`~happen.PayloadTooLargeError` for a value over ``max_payload - KV_HEADROOM``
        bytes, and
        :class:`TransportError` for an invalid key or a transport failure."""
        ...

    async def delete(self, key: str, *, expect: int | None = None) -> None:
        """Delete the key; a missing key is left as it is. With ``expect``, raises
        :class:`RevisionMismatch` unless it matches (``0``: the key must not exist)."""
        ...


@runtime_checkable
class DurableTransport(Transport, Protocol):
    """A transport with durable logs and key-value buckets (the memory and NATS transports).

    Both may be called once the transport is started; logs and buckets live on the server
    (NATS) or in the broker (memory), so every transport reaching it sees the same ones.
    """

    async def durable_log(self, name: str, settings: LogSettings | None = None) -> DurableLog:
        """The log ``name``, created with ``settings`` (default :class:`LogSettings`) if it
        does not exist, updated to them if it does. Raises :class:`TransportError` for an
        invalid name, a change of retention, or a transport failure."""
        ...

    async def key_value(self, bucket: str) -> KeyValue:
        """The bucket ``bucket``, created if it does not exist. Raises
        :class:`TransportError` for an invalid name or a transport failure."""
        ...


def durable_transport(transport: Transport) -> DurableTransport:
    """``transport`` as a :class:`DurableTransport`, or a :class:`TransportError` saying it
    has no durable logs and key-value buckets."""
    if isinstance(transport, DurableTransport):
        return transport
    raise TransportError(
        f"the transport {type(transport).__name__} has no durable logs or key-value buckets; "
        f"durable nodes and node state need a transport with them (the memory and NATS "
        f"transports have them)"
    )


# Checks both transports apply, so that what one accepts the other does too.


def check_name(kind: str, name: object) -> str:
    """``name`` if it is a valid log, consumer or bucket name, else :class:`TransportError`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TransportError(f"invalid {kind} name {name!r}: a {kind} name is {NAME_RULE}")
    return name


def check_subject(subject: object) -> str:
    """``subject`` if it can be appended to (tokens, no wildcards), else TransportError."""
    if type(subject) is not str:
        raise TransportError(f"invalid log subject {subject!r}: not a string")
    return _valid_subject(subject)


# A log's subjects repeat ("events", "keyed.7"): remember the valid ones.
@functools.lru_cache(maxsize=1024)
def _valid_subject(subject: str) -> str:
    if not _SUBJECT.fullmatch(subject):
        raise TransportError(
            f"invalid log subject {subject!r}: dot-separated non-empty tokens without "
            f"whitespace or wildcards"
        )
    return subject


def check_filter(subjects: object) -> str:
    """``subjects`` if it is a valid subject filter (tokens, ``*``, a final ``>``), else
    :class:`TransportError`."""
    if not isinstance(subjects, str) or not _FILTER.fullmatch(subjects):
        raise TransportError(
            f"invalid subject filter {subjects!r}: dot-separated tokens without whitespace, "
            f"'*' or a final '>' as whole tokens"
        )
    return subjects


def check_append(msg_id: object, headers: Mapping[str, str] | None) -> None:
    """Refuse a message id that cannot travel in a header, and reserved header names."""
    if (
        not isinstance(msg_id, str)
        or not 0 < len(msg_id) <= MAX_MSG_ID
        or msg_id != msg_id.strip()
        # (a printable one has no control characters: the regex only for the others)
        or (not msg_id.isprintable() and _CONTROL.search(msg_id) is not None)
    ):
        raise TransportError(
            f"invalid message id {msg_id!r}: 1-{MAX_MSG_ID} characters, without control "
            f"characters or surrounding whitespace"
        )
    if headers:
        for key in headers:
            if key.lower().startswith(RESERVED_HEADER_PREFIX):
                raise TransportError(
                    f"header {key!r} is reserved: names starting with 'Nats-' steer JetStream"
                )


def check_expect(expect: int | None) -> None:
    """Refuse a negative expected revision."""
    if expect is not None and (not isinstance(expect, int) or expect < 0):
        raise ValueError(f"expect must be None, 0 or a revision, not {expect!r}")


def escape_key(key: str) -> str:
    """``key`` in the JetStream KV key alphabet: letters, digits, '-' and '_' stay; every
    other UTF-8 byte becomes ``=XX`` (upper-case hex). Reversible (:func:`unescape_key`).

    Raises :class:`TransportError` for an empty key, a non-str, or one over
    ``MAX_ESCAPED_KEY`` characters once escaped."""
    if not isinstance(key, str) or not key:
        raise TransportError(f"invalid key {key!r}: a key is a non-empty string")
    escaped = _escaped(key)
    if len(escaped) > MAX_ESCAPED_KEY:
        raise TransportError(
            f"key of {len(key)} characters is too long: {len(escaped)} once escaped, "
            f"over {MAX_ESCAPED_KEY}"
        )
    return escaped


# Keys repeat (every operation on a name escapes it): remember the recent ones.
@functools.lru_cache(maxsize=4096)
def _escaped(key: str) -> str:
    # Each UTF-8 byte as the latin-1 character of the same value, so a regex finds them.
    return _KEY_UNSAFE.sub(_escape_byte, key.encode("utf-8", "surrogatepass").decode("latin-1"))


def _escape_byte(match: re.Match[str]) -> str:
    return f"={ord(match.group()):02X}"


def unescape_key(escaped: str) -> str:
    """The key :func:`escape_key` made ``escaped`` from."""
    if not _ESCAPED.fullmatch(escaped):
        raise ValueError(f"not an escaped key: {escaped!r}")
    out = bytearray()
    i = 0
    while i < len(escaped):
        if escaped[i] == "=":
            out.append(int(escaped[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(escaped[i]))
            i += 1
    return out.decode("utf-8", "surrogatepass")
