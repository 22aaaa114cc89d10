"""The in-memory transport: routes subjects inside one process.

It moves bytes between subjects exactly as NATS would (``*`` and ``>`` wildcards, queue
groups, the "no responders" status for a request nobody hears, a ``max_payload`` limit on the
whole frame), so code that works here works over NATS. Subscription callbacks run inline,
in the publisher's task, one after another; the core's callbacks never block.

Its broker also keeps durable logs and key-value buckets as JetStream does (dedup window,
consumers with ack deadlines, redelivery, max_deliver, discard-new bounds; revisions and
tombstones), in the process: nothing survives it. Time is the event loop's clock
(``anyio.current_time()``); deadlines are checked when a consumer fetches, so no task runs
in the background.
"""

from __future__ import annotations

import collections
import itertools
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import msgspec

from happen._errors import PayloadTooLargeError, TransportError
from happen._transport import (
    KV_HEADROOM,
    MSG_ID_HEADER,
    NO_RESPONDERS,
    STATUS_HEADER,
    Appended,
    ConsumerSettings,
    Delivery,
    DurableTransport,
    Entry,
    LogFullError,
    LogSettings,
    MessageCallback,
    Retention,
    RevisionMismatch,
    TransportListener,
    check_append,
    check_expect,
    check_filter,
    check_name,
    check_subject,
    escape_key,
)

__all__ = [
    "MemoryBroker",
    "MemoryConsumer",
    "MemoryDelivery",
    "MemoryKeyValue",
    "MemoryLog",
    "MemoryTransport",
    "from_url",
]

log = logging.getLogger("happen.transports.memory")

DEFAULT_MAX_PAYLOAD = 1024 * 1024


class MemoryMessage(msgspec.Struct, gc=False):
    """A delivered message (the same attributes as nats-py's ``Msg``).

    A Struct: one is made for every message delivered, and a Struct is built without running
    any Python code."""

    subject: str
    data: bytes
    reply: str
    headers: dict[str, str] | None


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
    size = 12  # NATS/1.0\r\n\r\n
    for key, value in headers.items():
        if "\n" in key or "\r" in key or "\n" in value or "\r" in value:
            raise TransportError(f"header {key!r} contains a line break; nothing was sent")
        size += 4  # ": " and "\r\n"
        size += len(key) if key.isascii() else len(key.encode())
        size += len(value) if value.isascii() else len(value.encode())
    return size


class MemoryBroker:
    """The subject table several memory transports can share, like clients of one server.

    Each ``happen.System(transport="memory")`` gets a broker of its own; pass one broker to
    several ``MemoryTransport``s to run several systems ("hosts") in one process.
    """

    def __init__(self) -> None:
        #: Durable logs and key-value buckets by name (see MemoryTransport.durable_log).
        self.logs: dict[str, LogState] = {}
        self.buckets: dict[str, BucketState] = {}
        self.subs: list[MemorySubscription] = []
        self.routes: dict[str, list[list[MemorySubscription]]] = {}
        #: Routes of reply subjects by inbox (the subject less its last token).
        self.inbox_routes: dict[str, list[list[MemorySubscription]]] = {}
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
        self._inbox_routes = self.broker.inbox_routes
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
        for log_state in self.broker.logs.values():
            log_state.notify()  # a fetch of this transport waiting there raises at once
        if self._listener is not None:
            self._listener.on_closed(None)

    async def durable_log(self, name: str, settings: LogSettings | None = None) -> MemoryLog:
        """The broker's log ``name``, created with ``settings`` or updated to them (see
        :class:`happen._transport.DurableTransport`)."""
        self._check_open()
        check_name("log", name)
        settings = settings if settings is not None else LogSettings()
        state = self.broker.logs.get(name)
        if state is None:
            state = self.broker.logs[name] = LogState(name, settings)
        else:
            state.reconfigure(settings)
        return MemoryLog(self, state)

    async def key_value(self, bucket: str) -> MemoryKeyValue:
        """The broker's bucket ``bucket``, created if it does not exist."""
        self._check_open()
        check_name("bucket", bucket)
        state = self.broker.buckets.get(bucket)
        if state is None:
            state = self.broker.buckets[bucket] = BucketState(bucket)
        return MemoryKeyValue(self, state)

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
        self._inbox_routes.clear()
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
            self._inbox_routes.clear()

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

    def _inbox_route(self, subject: str) -> list[list[MemorySubscription]] | None:
        """The route of a reply subject heard only through its inbox's ``prefix.*``
        subscriptions, from a cache by prefix (each reply subject is used once, its inbox
        for every call); None for any other subject."""
        broker = self.broker
        if broker.wild or subject in broker.exact:
            return None
        head, _, token = subject.rpartition(".")
        route = self._inbox_routes.get(head)
        if route is None:
            _validate_subject(subject, wildcards=False)
            if len(self._inbox_routes) > 1000:
                self._inbox_routes.clear()
            route = self._inbox_routes[head] = self._route(subject)
        elif not token.isalnum():  # (the inbox was checked when cached; a token of letters
            _validate_subject(subject, wildcards=False)  # and digits is a valid one)
        return route

    def check_open(self) -> None:
        """Raise :class:`TransportError` unless started and not stopped."""
        self._check_open()

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
        if self._closed or not self._started:
            self._check_open()  # (raises)
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
            route = self._inbox_route(subject) if subject.startswith("_INBOX.") else None
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
            # (``_call``, written out: every message of the process takes this path)
            try:
                await sub.callback(MemoryMessage(subject, data, reply or "", hdrs))
            except anyio.get_cancelled_exc_class():
                raise
            except Exception:
                log.exception("subscription callback for %r raised", sub.pattern)

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


# --- Durable logs ------------------------------------------------------------------------------


def _subject_matches(pattern: list[str], subject: list[str]) -> bool:
    """Whether the subject tokens match the pattern tokens (``*``, a final ``>``)."""
    for i, token in enumerate(pattern):
        if token == ">":
            return len(subject) > i
        if i >= len(subject) or (token != "*" and token != subject[i]):
            return False
    return len(pattern) == len(subject)


def _subjects_collide(a: list[str], b: list[str]) -> bool:
    """Whether some subject matches both patterns."""
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x is None or y is None:
            return False
        if x == ">" or y == ">":
            return True
        if x != "*" and y != "*" and x != y:
            return False
    return True


class StoredMessage:
    """A message kept in a log, and the consumers that have yet to settle it."""

    __slots__ = ("data", "headers", "msg_id", "needed_by", "seq", "subject", "tokens")

    def __init__(
        self, seq: int, subject: str, data: bytes, headers: dict[str, str] | None, msg_id: str
    ) -> None:
        self.seq = seq
        self.subject = subject
        self.tokens = subject.split(".")
        self.data = data
        self.headers = headers
        self.msg_id = msg_id
        self.needed_by: set[str] = set()


class PendingDelivery:
    """A delivered, unsettled message of a consumer: how often it was delivered, and when
    it becomes due for redelivery (ack_wait, or a nak's delay)."""

    __slots__ = ("delivered", "due")

    def __init__(self, delivered: int, due: float) -> None:
        self.delivered = delivered
        self.due = due


class ConsumerState:
    """A durable consumer of a log (JetStream: a pull consumer's state on the server).

    ``cursor`` is the next log sequence to deliver for the first time (it only moves
    forward); ``pending`` holds the delivered, unsettled messages; ``undelivered`` counts
    the stored messages at or after the cursor that the consumer has yet to settle.
    """

    def __init__(self, name: str, settings: ConsumerSettings) -> None:
        self.name = name
        self.settings = settings
        self.patterns = [subject.split(".") for subject in settings.subjects]
        self.cursor = 1
        self.pending: dict[int, PendingDelivery] = {}
        self.undelivered = 0

    def matches(self, tokens: list[str]) -> bool:
        return any(_subject_matches(pattern, tokens) for pattern in self.patterns)


class LogState:
    """A durable log in a broker: its messages, dedup map and consumers (JetStream: a stream).

    Every method runs without awaiting, so each is atomic among the broker's users.
    """

    def __init__(self, name: str, settings: LogSettings) -> None:
        self.name = name
        self.settings = settings
        self.messages: dict[int, StoredMessage] = {}
        self.last_seq = 0
        # dedup: id -> (sequence, forgotten at), and the ids in the order they expire
        self.ids: dict[str, tuple[int, float]] = {}
        self.id_expiry: collections.deque[tuple[float, str]] = collections.deque()
        self.consumers: dict[str, ConsumerState] = {}
        self._changed: anyio.Event | None = None

    def reconfigure(self, settings: LogSettings) -> None:
        if settings.retention is not self.settings.retention:
            raise TransportError(
                f"durable log {self.name!r} has retention {self.settings.retention.value}; "
                f"it cannot change to {settings.retention.value}"
            )
        self.settings = settings

    # waiting for something to deliver
    def notify(self) -> None:
        """Wake every fetch waiting on this log (something may have become deliverable)."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def changed(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    # appending
    def append(
        self, subject: str, data: bytes, msg_id: str, headers: dict[str, str] | None
    ) -> Appended:
        now = anyio.current_time()
        while self.id_expiry and self.id_expiry[0][0] <= now:
            expires, old = self.id_expiry.popleft()
            if self.ids.get(old, (0, 0.0))[1] == expires:
                del self.ids[old]
        known = self.ids.get(msg_id)
        if known is not None:
            return Appended(seq=known[0], duplicate=True)
        limit = self.settings.max_msgs
        if limit is not None and len(self.messages) >= limit:
            raise LogFullError(self.name, limit)
        self.last_seq += 1
        seq = self.last_seq
        expires = now + self.settings.dedup_window
        self.ids[msg_id] = (seq, expires)
        self.id_expiry.append((expires, msg_id))
        message = StoredMessage(seq, subject, data, headers, msg_id)
        for consumer in self.consumers.values():
            if consumer.matches(message.tokens):
                message.needed_by.add(consumer.name)
                consumer.undelivered += 1
        if message.needed_by or self.settings.retention is Retention.WORK_QUEUE:
            self.messages[seq] = message  # an interest log keeps only what someone reads
            self.notify()
        return Appended(seq=seq, duplicate=False)

    # consumers
    def consumer(self, name: str, settings: ConsumerSettings) -> ConsumerState:
        if self.settings.retention is Retention.WORK_QUEUE:
            self._check_no_overlap(name, settings)
        state = self.consumers.get(name)
        if state is None:
            state = self.consumers[name] = ConsumerState(name, settings)
            # it starts at the first stored message (JetStream's "deliver all")
            state.cursor = next(iter(self.messages)) if self.messages else self.last_seq + 1
            self._claim(state)
        elif settings != state.settings:
            old_subjects = state.settings.subjects
            state.settings = settings
            state.patterns = [subject.split(".") for subject in settings.subjects]
            if settings.subjects != old_subjects:
                self._claim(state)
        self.notify()
        return state

    def _check_no_overlap(self, name: str, settings: ConsumerSettings) -> None:
        mine = [subject.split(".") for subject in settings.subjects]
        for other in self.consumers.values():
            if other.name != name and any(
                _subjects_collide(a, b) for a in mine for b in other.patterns
            ):
                raise TransportError(
                    f"consumer {name!r} overlaps consumer {other.name!r} on work-queue log "
                    f"{self.name!r}: each subject of a work-queue log has one consumer"
                )

    def _claim(self, consumer: ConsumerState) -> None:
        """(Re)compute which stored, not yet delivered messages the consumer must settle."""
        consumer.undelivered = 0
        for message in list(self.messages.values()):
            if message.seq < consumer.cursor or message.seq in consumer.pending:
                continue
            if consumer.matches(message.tokens):
                message.needed_by.add(consumer.name)
                consumer.undelivered += 1
            elif consumer.name in message.needed_by:
                self._release(message, consumer.name)

    def _release(self, message: StoredMessage, consumer: str) -> None:
        message.needed_by.discard(consumer)
        if not message.needed_by:
            del self.messages[message.seq]

    # delivering
    def take(self, consumer: ConsumerState, n: int, now: float) -> list[tuple[StoredMessage, int]]:
        """Up to ``n`` messages to deliver now, with their delivery counts: due
        redeliveries first, then new messages; ``[]`` when none."""
        taken: list[tuple[StoredMessage, int]] = []
        settings = consumer.settings
        due = [seq for seq, pending in consumer.pending.items() if pending.due <= now]
        if len(due) > 1:
            due.sort()
        for seq in due:
            if len(taken) == n:
                return taken
            pending = consumer.pending[seq]
            message = self.messages.get(seq)
            if message is None or consumer.name not in message.needed_by:
                del consumer.pending[seq]
            elif settings.max_deliver is not None and pending.delivered >= settings.max_deliver:
                del consumer.pending[seq]  # stays stored and unsettled, as on JetStream
            else:
                pending.delivered += 1
                pending.due = now + settings.ack_wait
                taken.append((message, pending.delivered))
        while len(taken) < n and consumer.cursor <= self.last_seq:
            message = self.messages.get(consumer.cursor)
            consumer.cursor += 1
            if message is not None and consumer.name in message.needed_by:
                consumer.undelivered -= 1
                consumer.pending[message.seq] = PendingDelivery(1, now + settings.ack_wait)
                taken.append((message, 1))
        return taken

    def next_due(self, consumer: ConsumerState) -> float | None:
        """When the consumer's earliest unsettled delivery becomes due again."""
        return min((p.due for p in consumer.pending.values()), default=None)

    # settling
    def settle(self, consumer: ConsumerState, seq: int) -> None:
        consumer.pending.pop(seq, None)
        message = self.messages.get(seq)
        if message is not None and consumer.name in message.needed_by:
            self._release(message, consumer.name)

    def redeliver_after(self, consumer: ConsumerState, seq: int, delay: float) -> None:
        pending = consumer.pending.get(seq)
        if pending is not None:
            pending.due = anyio.current_time() + delay
            self.notify()

    def extend(self, consumer: ConsumerState, seq: int) -> None:
        pending = consumer.pending.get(seq)
        if pending is not None:
            pending.due = anyio.current_time() + consumer.settings.ack_wait


class MemoryLog:
    """A :class:`MemoryTransport`'s handle on a broker log (a ``DurableLog``)."""

    def __init__(self, transport: MemoryTransport, state: LogState) -> None:
        self._transport = transport
        self._state = state

    @property
    def name(self) -> str:
        return self._state.name

    @property
    def settings(self) -> LogSettings:
        return self._state.settings

    async def append(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> Appended:
        """Store a message unless its id is in the dedup window (see ``DurableLog``)."""
        self._transport.check_open()
        check_subject(subject)
        check_append(msg_id, headers)
        size = len(data) + _header_size({**(headers or {}), MSG_ID_HEADER: msg_id})
        if size > self._transport.max_payload:
            raise PayloadTooLargeError(
                f"message of {size} bytes to log {self.name!r} is over the transport's "
                f"max_payload of {self._transport.max_payload} bytes; nothing was stored"
            )
        return self._state.append(subject, bytes(data), msg_id, dict(headers) if headers else None)

    async def stored(self, subjects: str) -> int:
        """Messages held under subjects matching ``subjects`` (see ``DurableLog.stored``)."""
        self._transport.check_open()
        pattern = check_filter(subjects).split(".")
        return sum(
            1
            for message in self._state.messages.values()
            if _subject_matches(pattern, message.tokens)
        )

    async def consumer(self, name: str, settings: ConsumerSettings | None = None) -> MemoryConsumer:
        """A handle on the consumer ``name`` (see ``DurableLog.consumer``)."""
        self._transport.check_open()
        check_name("consumer", name)
        state = self._state.consumer(name, settings if settings is not None else ConsumerSettings())
        return MemoryConsumer(self._transport, self._state, state)


class MemoryConsumer:
    """A handle on a consumer of a broker log (a ``LogConsumer``)."""

    def __init__(self, transport: MemoryTransport, log: LogState, state: ConsumerState) -> None:
        self._transport = transport
        self._log = log
        self._state = state
        self._closed = False

    @property
    def name(self) -> str:
        return self._state.name

    #: A fetch takes its messages only once it returns: cancelling it loses nothing.
    fetch_cancellable = True

    def _check_open(self) -> None:
        self._transport.check_open()
        if self._closed:
            raise TransportError(f"the handle on consumer {self.name!r} is closed")

    async def fetch(self, n: int, *, timeout: float) -> list[Delivery]:
        """Up to ``n`` deliveries, waiting at most ``timeout`` seconds for the first."""
        if n < 1:
            raise ValueError(f"fetch needs n >= 1, not {n}")
        self._check_open()
        log, state = self._log, self._state
        deadline = anyio.current_time() + timeout
        while True:
            now = anyio.current_time()
            taken = log.take(state, n, now)
            if taken:
                return [
                    MemoryDelivery(self._transport, log, state, message, count)
                    for message, count in taken
                ]
            wake = deadline
            due = log.next_due(state)
            if due is not None and due < wake:
                wake = due
            if now >= deadline:
                return []
            with anyio.move_on_after(max(wake - now, 0.0)):
                await log.changed().wait()
            self._check_open()

    async def pending(self) -> int:
        """Messages the consumer has yet to settle (undelivered, or delivered and unsettled)."""
        self._check_open()
        return self._state.undelivered + len(self._state.pending)

    async def close(self) -> None:
        """Stop fetching through this handle; the consumer stays."""
        self._closed = True


class MemoryDelivery:
    """One delivery of a broker log message (a ``Delivery``)."""

    __slots__ = (
        "_consumer",
        "_log",
        "_settled",
        "_transport",
        "data",
        "delivery_count",
        "headers",
        "msg_id",
        "seq",
        "subject",
    )

    def __init__(
        self,
        transport: MemoryTransport,
        log: LogState,
        consumer: ConsumerState,
        message: StoredMessage,
        delivery_count: int,
    ) -> None:
        self._transport = transport
        self._log = log
        self._consumer = consumer
        self._settled = False
        self.subject = message.subject
        self.data = message.data
        self.headers = dict(message.headers) if message.headers else None
        self.msg_id = message.msg_id
        self.seq = message.seq
        self.delivery_count = delivery_count

    def _settle(self) -> bool:
        """Mark the delivery settled; False if it already was (then do nothing)."""
        self._transport.check_open()
        if self._settled:
            return False
        self._settled = True
        return True

    async def ack(self) -> None:
        if self._settle():
            self._log.settle(self._consumer, self.seq)

    async def term(self) -> None:
        if self._settle():
            self._log.settle(self._consumer, self.seq)

    async def nak(self, delay: float | None = None) -> None:
        if self._settle():
            self._log.redeliver_after(self._consumer, self.seq, max(delay or 0.0, 0.0))

    async def in_progress(self) -> None:
        self._transport.check_open()
        if not self._settled:
            self._log.extend(self._consumer, self.seq)

    def __repr__(self) -> str:
        return (
            f"<MemoryDelivery seq={self.seq} subject={self.subject!r} "
            f"delivery_count={self.delivery_count}>"
        )


# --- Key-value buckets ---------------------------------------------------------------------


class BucketState:
    """A key-value bucket in a broker: each key's latest value (``None``: a tombstone left by
    a delete) and the revision that wrote it; one revision counter for the whole bucket."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.revision = 0
        self.entries: dict[str, tuple[bytes | None, int]] = {}

    def current(self, key: str) -> Entry | None:
        value, revision = self.entries.get(key, (None, 0))
        return Entry(value, revision) if value is not None else None

    def check(self, key: str, expect: int | None) -> None:
        """Raise RevisionMismatch unless ``expect`` allows a write to ``key`` now."""
        if expect is None:
            return
        current = self.current(key)
        if expect == 0:
            ok = current is None
        else:  # the latest write, a tombstone included (as JetStream compares)
            ok = key in self.entries and self.entries[key][1] == expect
        if not ok:
            raise RevisionMismatch(self.name, key, expect, current)

    def write(self, key: str, value: bytes | None) -> int:
        self.revision += 1
        self.entries[key] = (value, self.revision)
        return self.revision


class MemoryKeyValue:
    """A :class:`MemoryTransport`'s handle on a broker bucket (a ``KeyValue``).

    Each operation is a checkpoint, as a round trip to a server is: a cancellation comes
    before the operation (then nothing was done), and the caller yields after it, so a loop
    of bucket operations does not hold the event loop."""

    def __init__(self, transport: MemoryTransport, state: BucketState) -> None:
        self._transport = transport
        self._state = state

    @property
    def bucket(self) -> str:
        return self._state.name

    def _key(self, key: str) -> str:
        self._transport.check_open()
        return escape_key(key)

    async def get(self, key: str) -> Entry | None:
        """The key's latest value, or ``None``."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        entry = self._state.current(self._key(key))
        await anyio.lowlevel.cancel_shielded_checkpoint()
        return entry

    async def put(self, key: str, value: bytes, *, expect: int | None = None) -> int:
        """Write ``value`` (conditionally with ``expect``); returns the new revision."""
        escaped = self._key(key)
        check_expect(expect)
        limit = self._transport.max_payload - KV_HEADROOM
        if len(value) > limit:
            raise PayloadTooLargeError(
                f"value of {len(value)} bytes for key {key!r} is over the {limit} bytes a "
                f"bucket value may take (max_payload less {KV_HEADROOM}); nothing was written"
            )
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._state.check(escaped, expect)
        revision = self._state.write(escaped, bytes(value))
        await anyio.lowlevel.cancel_shielded_checkpoint()
        return revision

    async def delete(self, key: str, *, expect: int | None = None) -> None:
        """Delete the key (conditionally with ``expect``); a missing key stays missing."""
        escaped = self._key(key)
        check_expect(expect)
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._state.check(escaped, expect)
        if self._state.current(escaped) is not None:
            self._state.write(escaped, None)
        await anyio.lowlevel.cancel_shielded_checkpoint()


def from_url(url: str) -> MemoryTransport:
    """Build a transport for ``"memory"`` (or ``"memory://"``)."""
    if url not in ("memory", "memory://"):
        raise TransportError(f"the memory transport takes the URL 'memory', not {url!r}")
    return MemoryTransport()


if TYPE_CHECKING:  # the type checker holds the memory transport to the durable seam
    _durable: type[DurableTransport] = MemoryTransport
