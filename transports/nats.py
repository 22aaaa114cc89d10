"""The NATS transport: the ``Transport`` Protocol on nats-py (the only module importing it).

It moves bytes and nothing more, converts nats-py's errors into happen's and reports
connection events to the system's listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as _NatsSubscription
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue as _NatsKeyValue

from happen._errors import PayloadTooLargeError, TransportError
from happen._transport import (
    KV_HEADROOM,
    MSG_ID_HEADER,
    Appended,
    ConsumerSettings,
    Delivery,
    DurableTransport,
    Entry,
    LogFullError,
    LogSettings,
    Message,
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
    "LOG_SUBJECT_PREFIX",
    "NatsConsumer",
    "NatsDelivery",
    "NatsKeyValue",
    "NatsLog",
    "NatsTransport",
    "from_url",
]

log = logging.getLogger("happen.transports.nats")

DEFAULT_MAX_PAYLOAD = 1024 * 1024
DEFAULT_PENDING_MSGS_LIMIT = 512 * 1024
DEFAULT_PENDING_BYTES_LIMIT = 256 * 1024 * 1024
#: Seconds a JetStream request (an append, a bucket write, creating a log...) waits for
#: the server's answer.
DEFAULT_JETSTREAM_TIMEOUT = 5.0
#: nats-py connect options happen sets unless the caller passes them (see NatsTransport).
DEFAULT_CONNECT_OPTIONS: dict[str, Any] = {
    "max_reconnect_attempts": -1,
    "reconnect_time_wait": 0.5,
    "connect_timeout": 2,
    "ping_interval": 20,
    "max_outstanding_pings": 3,
    "drain_timeout": 5,
}

# Headers on the wire: "NATS/1.0\r\n", "key: value\r\n" each, "\r\n"; they count in max_payload.
_HEADER_FRAME_OVERHEAD = len(b"NATS/1.0\r\n\r\n")
_HEADER_LINE_OVERHEAD = len(b": \r\n")
_Callback = Callable[[], Awaitable[None]]
_ErrorCallback = Callable[[Exception], Awaitable[None]]
#: Seconds without a drop that end a burst of slow-consumer drops on a subscription, and the
#: least time between two log lines about one subscription's drops.
DROP_LOG_INTERVAL = 1.0
_clock = time.monotonic  # module-level so a test can drive the drop log's clock
#: A durable log named N is the JetStream stream N, storing its messages under the subjects
#: ``$HAPPEN.log.N.<subject>`` (outside every namespace's subjects, as ``$KV.`` is).
LOG_SUBJECT_PREFIX = "$HAPPEN.log"
# JetStream API error codes happen maps to its own errors.
_ERR_MAX_MSGS = 10077  # "maximum messages exceeded" (discard-new)
_ERR_STREAM_NAME_IN_USE = 10058
_ERR_WRONG_LAST_SEQUENCE = (10071, 10164)
_ERR_WORK_QUEUE_OVERLAP = (10099, 10100)  # consumers that overlap on a work-queue stream
#: The JetStream API's subject prefix (the default domain).
_JS_API = "$JS.API"
#: Seconds beyond a pull request's expiry within which its end must arrive; else the
#: connection is taken to be in trouble.
PULL_GRACE = 2.0
_encode_json = msgspec.json.Encoder().encode


class _PullRefused(Exception):
    """The server ended a pull request with an error status (e.g. the consumer is gone)."""


_RETENTION = {
    Retention.WORK_QUEUE: api.RetentionPolicy.WORK_QUEUE,
    Retention.INTEREST: api.RetentionPolicy.INTEREST,
}


def _require_asyncio() -> None:
    try:
        import sniffio  # installed with trio, the only other library anyio runs on

        library = sniffio.current_async_library()
    except ImportError:
        library = "asyncio" if asyncio.current_task() is not None else "unknown"
    if library != "asyncio":
        raise TransportError(
            f"the NATS transport needs asyncio (nats-py is asyncio-only), but it was started "
            f"under {library}; run the system with anyio's asyncio backend, or use the "
            f"'memory' transport"
        )


def _redact(url: str) -> str:
    """``url`` without its password."""
    try:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
    except ValueError:
        return "<invalid url>"
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


def _describe(error: BaseException) -> str:
    text = str(error)
    if isinstance(error, nats.errors.Error) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _header_size(headers: Mapping[str, str]) -> int:
    """Bytes ``headers`` take on the wire, as nats-py encodes them; rejects line breaks."""
    size = _HEADER_FRAME_OVERHEAD
    for key, value in headers.items():
        if "\r" in key or "\n" in key or "\r" in value or "\n" in value:
            raise TransportError(
                f"header {key!r} contains a line break; NATS headers cannot carry CR or LF "
                f"(encode the value first)"
            )
        key = key.strip()
        if key:
            size += len(key.encode()) + len(value.strip().encode()) + _HEADER_LINE_OVERHEAD
    return size


class _ConnectAborted(Exception):
    """Raised from error_cb to end nats-py's first connect loop."""


def _as_coroutine_function(callback: MessageCallback) -> MessageCallback:
    async def call(msg: Message) -> None:
        await callback(msg)

    return call


class NatsSubscription:
    """A subscription on a :class:`NatsTransport`.

    ``subject`` is the subject (or wildcard pattern) subscribed to, ``queue`` the queue group
    (or ``None``), and ``dropped`` how many messages nats-py dropped on it so far because its
    callback did not keep up (slow consumer).
    """

    __slots__ = (
        "_burst",
        "_last_drop",
        "_last_log",
        "_logged",
        "_transport",
        "dropped",
        "nats_subscription",
        "queue",
        "subject",
    )

    def __init__(
        self, transport: NatsTransport, sub: _NatsSubscription, subject: str, queue: str | None
    ) -> None:
        self._transport = transport
        #: The nats-py subscription underneath.
        self.nats_subscription = sub
        self.subject = subject
        self.queue = queue
        self.dropped = 0
        # The current burst of drops: how many, how many the log has told, and when.
        self._burst = self._logged = 0
        self._last_drop = self._last_log = 0.0

    async def unsubscribe(self) -> None:
        """Stop delivery at once (queued messages are discarded). Never raises."""
        self._transport._forget(self)
        self._end_drop_burst()
        with contextlib.suppress(nats.errors.Error):  # closed or draining: nothing to stop
            await self.nats_subscription.unsubscribe()

    def _record_drop(self, now: float) -> None:
        """Count one message dropped at ``now`` (``time.monotonic()``) and log it sparingly.

        The first drop of a burst is logged at once, naming the subscription; later drops are
        counted and logged at most once per ``DROP_LOG_INTERVAL``, with how many were dropped
        since the last line. A burst ends after ``DROP_LOG_INTERVAL`` without a drop: that is
        noticed at the next drop (or by :meth:`_end_drop_burst`), and logged with its total.
        No task or timer is involved: this runs in nats-py's ``error_cb``.
        """
        self.dropped += 1
        if self._burst and now - self._last_drop >= DROP_LOG_INTERVAL:
            self._end_drop_burst()
        self._last_drop = now
        self._burst += 1
        if self._burst == 1:
            self._last_log = now
            self._logged = 1
            log.warning(
                "slow consumer on %s: its callback is not keeping up, so NATS messages are "
                "being dropped (pending_msgs_limit=%d, pending_bytes_limit=%d); further drops "
                "are counted and logged at most every %g s",
                self._describe(),
                self._transport.pending_msgs_limit,
                self._transport.pending_bytes_limit,
                DROP_LOG_INTERVAL,
            )
        elif now - self._last_log >= DROP_LOG_INTERVAL:
            log.warning(
                "slow consumer on %s: %d more message(s) dropped in the last %.1f s "
                "(%d in this burst so far)",
                self._describe(),
                self._burst - self._logged,
                now - self._last_log,
                self._burst,
            )
            self._last_log = now
            self._logged = self._burst

    def _end_drop_burst(self) -> None:
        """Log the total of the current burst of drops, if it has more than one, and start
        afresh. Called lazily: at the next drop after a quiet interval, on unsubscribe and
        when the transport stops."""
        if self._burst > 1:
            log.warning(
                "slow consumer on %s: burst over, %d message(s) dropped in all",
                self._describe(),
                self._burst,
            )
        self._burst = self._logged = 0

    def _describe(self) -> str:
        queue = f" (queue group {self.queue!r})" if self.queue else ""
        return f"the subscription to {self.subject!r}{queue}"


class NatsTransport:
    """Moves bytes over a NATS connection (nats-py, asyncio only).

    ``servers`` is one URL or a list (``user:password@`` in a URL is passed on). Other keyword
    arguments are nats-py ``connect()`` options and override happen's defaults:

    - ``max_reconnect_attempts=-1``: reconnect forever (nats-py gives up after 60 attempts
      and stays closed); ``reconnect_time_wait=0.5`` seconds between attempts on a server.
    - ``connect_timeout=2`` seconds per attempt; ``ping_interval=20``,
      ``max_outstanding_pings=3``: a dead connection is noticed within about a minute.
    - ``drain_timeout=5`` seconds for :meth:`stop` to drain the subscriptions.

    ``error_cb``, ``disconnected_cb``, ``reconnected_cb`` and ``closed_cb`` may be passed too;
    they are called after happen's own handling. Each subscription may hold
    ``pending_msgs_limit`` messages or ``pending_bytes_limit`` bytes that its callback has not
    taken yet; nats-py drops what arrives beyond. Each drop is reported to the listener's
    ``on_dropped`` with the subscription :meth:`subscribe` returned, and counted in its
    ``dropped``; the log tells of drops once per burst, not once per message.

    While the connection is down and nats-py reconnects, :meth:`publish` and :meth:`subscribe`
    raise :class:`TransportError` at once: nothing waits in nats-py's reconnect buffer to be
    sent, late, after the outage.

    :meth:`start` fails fast: once every server has failed once (a refused connection, a
    timeout, an authorization error...), or after ``3 * connect_timeout`` seconds per server,
    it raises :class:`TransportError` naming the cause instead of retrying forever.
    """

    def __init__(
        self,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        *,
        pending_msgs_limit: int = DEFAULT_PENDING_MSGS_LIMIT,
        pending_bytes_limit: int = DEFAULT_PENDING_BYTES_LIMIT,
        jetstream_timeout: float = DEFAULT_JETSTREAM_TIMEOUT,
        **connect_options: Any,
    ) -> None:
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        if not self.servers:
            raise TransportError("the NATS transport needs at least one server URL")
        #: The largest frame (data plus headers) the server accepts, as its INFO says.
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self.pending_msgs_limit = pending_msgs_limit
        self.pending_bytes_limit = pending_bytes_limit
        self.jetstream_timeout = jetstream_timeout
        self._user_error_cb: _ErrorCallback | None = connect_options.pop("error_cb", None)
        self._user_cbs: dict[str, _Callback | None] = {
            name: connect_options.pop(name, None)
            for name in ("disconnected_cb", "reconnected_cb", "closed_cb")
        }
        self._options = {**DEFAULT_CONNECT_OPTIONS, **connect_options}
        prefix = self._options.get("inbox_prefix", "_INBOX")
        self._inbox_prefix = prefix.decode() if isinstance(prefix, bytes) else str(prefix)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        # consumer handles whose pull subscriptions are re-made after a reconnect
        self._consumers: set[NatsConsumer] = set()
        self._listener: TransportListener | None = None
        # nats-py's subscription -> the one subscribe() returned, to name it in on_dropped
        self._subscriptions: dict[_NatsSubscription, NatsSubscription] = {}
        # new -> connecting -> connected -> stopping -> closed (or connecting -> closed)
        self._state = "new"
        self._closed_reported = False
        self._connect_errors: list[Exception] = []
        self._connect_settled: anyio.Event | None = None

    def set_listener(self, listener: TransportListener | None) -> None:
        """Report connection events (lost, back, closed, dropped messages) to ``listener``."""
        self._listener = listener

    async def start(self) -> None:
        """Connect. Raises :class:`TransportError` when not under asyncio, when started before,
        or when no server accepts the connection (naming the cause)."""
        _require_asyncio()
        if self._state != "new":
            raise TransportError(f"this NATS transport is {self._state}; create a new one")
        self._state = "connecting"
        nc = Client()
        self._nc = nc
        settled = self._connect_settled = anyio.Event()
        deadline = 3 * float(self._options["connect_timeout"]) * len(self.servers)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._connect, nc, settled)
                with anyio.move_on_after(deadline):
                    await settled.wait()
                tg.cancel_scope.cancel()
        except BaseException:
            await self._abort_start(nc)
            raise
        if not nc.is_connected:
            await self._abort_start(nc)
            causes = list(dict.fromkeys(_describe(e) for e in self._connect_errors))
            cause = "; ".join(causes) or f"no answer within {deadline:g} s"
            servers = ", ".join(_redact(url) for url in self.servers)
            raise TransportError(f"could not connect to NATS at {servers}: {cause}")
        self._connect_errors.clear()
        self.max_payload = nc.max_payload
        self._js = nc.jetstream(timeout=self.jetstream_timeout)
        self._state = "connected"

    async def _connect(self, nc: Client, settled: anyio.Event) -> None:
        try:
            await nc.connect(
                self.servers,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed,
                **self._options,
            )
        except Exception as exc:  # _ConnectAborted comes after settled.set()
            if not settled.is_set():
                self._connect_errors.append(exc)
        settled.set()

    async def _abort_start(self, nc: Client) -> None:
        self._state = "closed"
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await nc.close()  # the error raised next names the cause

    async def stop(self) -> None:
        """Drain subscriptions and publishes, then close; ``on_closed(None)`` once. Idempotent.

        Messages published before ``stop()`` reach their subscribers' callbacks before it returns.
        """
        if self._state in ("stopping", "closed"):
            if self._state == "closed":
                self._report_closed(None)
            return
        self._state = "stopping"
        nc = self._nc
        try:
            # A pull subscription holds status messages no fetch takes (the end of a fetch
            # that timed out): draining would wait for them until drain_timeout.
            for consumer in list(self._consumers):
                await consumer.release()
            if nc is not None and nc.is_connected:
                await nc.drain()
        except (nats.errors.Error, OSError) as exc:
            log.warning("draining the NATS connection failed: %s", _describe(exc))
        finally:
            if nc is not None:
                with anyio.CancelScope(shield=True):
                    await nc.close()
            self._state = "closed"
            self._report_closed(None)

    def new_inbox(self) -> str:
        """A unique subject to receive replies on (works before ``start()`` too):
        ``<inbox_prefix>.<unique>``, the unique part 72 random bits in 12 characters.

        Shorter than nats-py's (22): every reply subject starts with it, and nats-py reads
        each one with regular expressions as it publishes and receives it."""
        return f"{self._inbox_prefix}.{secrets.token_urlsafe(9)}"

    def _client(self) -> Client:
        nc = self._nc
        if nc is None or self._state not in ("connected", "stopping"):
            state = "not started" if self._state in ("new", "connecting") else self._state
            raise TransportError(f"the NATS transport is {state}")
        return nc

    def _connected_client(self, action: str, subject: str | None = None) -> Client:
        """The client, if its connection is up: while nats-py reconnects it would hold a
        publish or a subscription in its reconnect buffer for the whole outage. ``action``
        (and ``subject``, quoted after it) say what could not be done."""
        nc = self._client()
        if not nc.is_connected and not nc.is_closed:
            if subject is not None:
                action = f"{action} {subject!r}"
            raise TransportError(
                f"cannot {action}: the connection to NATS is down (reconnecting); nothing was sent"
            )
        return nc

    def _forget(self, subscription: NatsSubscription) -> None:
        self._subscriptions.pop(subscription.nats_subscription, None)

    async def subscribe(
        self, subject: str, callback: MessageCallback, *, queue: str | None = None
    ) -> NatsSubscription:
        """Deliver messages on ``subject`` (wildcards allowed) to ``callback``, one at a time.

        With ``queue``, subscriptions of the same group share the messages. Raises
        :class:`TransportError` for an invalid subject, a closed connection, or at once while
        the connection is down and nats-py reconnects.
        """
        nc = self._connected_client("subscribe to", subject)
        if not inspect.iscoroutinefunction(callback):  # nats-py takes coroutine functions only
            callback = _as_coroutine_function(callback)
        try:
            sub = await nc.subscribe(
                subject,
                queue=queue or "",
                cb=callback,
                pending_msgs_limit=self.pending_msgs_limit,
                pending_bytes_limit=self.pending_bytes_limit,
            )
        except nats.errors.BadSubjectError:
            raise TransportError(f"invalid subject {subject!r} or queue {queue!r}") from None
        except nats.errors.Error as exc:
            raise TransportError(f"cannot subscribe to {subject!r}: {_describe(exc)}") from exc
        subscription = NatsSubscription(self, sub, subject, queue or None)
        self._subscriptions[sub] = subscription
        return subscription

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        reply: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish ``data`` (and ``headers``) to ``subject``, with an optional reply subject.

        Raises :class:`PayloadTooLargeError` when data plus encoded headers exceed
        ``max_payload`` (nothing is sent), and :class:`TransportError` for a header with a line
        break, an invalid subject or header name, a closed connection, or at once while the
        connection is down and nats-py reconnects (nothing is sent, nothing is buffered).
        """
        nc = self._nc
        if nc is None or self._state != "connected" or not nc.is_connected:
            nc = self._connected_client("publish to", subject)  # (raises, unless closed)
        # nats-py checks whitespace only; an empty token shows as ".." once framed by dots.
        if "*" in subject or ">" in subject or ".." in f".{subject}.":
            raise TransportError(f"invalid subject {subject!r}: a wildcard or an empty token")
        size = len(data)
        hdrs: dict[str, str] | None = None
        if headers:
            size += _header_size(headers)
            hdrs = dict(headers)
        if size > self.max_payload:
            raise PayloadTooLargeError(
                f"message of {size} bytes to {subject!r} is over the server's max_payload of "
                f"{self.max_payload} bytes; nothing was sent"
            )
        try:
            await nc.publish(subject, data, reply=reply or "", headers=hdrs)
        except nats.errors.BadSubjectError:
            raise TransportError(f"invalid subject {subject!r} or reply {reply!r}") from None
        except nats.errors.Error as exc:
            raise TransportError(f"cannot publish to {subject!r}: {_describe(exc)}") from exc

    def up(self) -> bool:
        """False while the connection is down and nats-py reconnects (``jetstream`` then
        raises, naming the action). Raises as ``jetstream`` does unless the transport runs."""
        nc = self._client()
        return nc.is_connected or nc.is_closed

    def jetstream(self, action: str) -> JetStreamContext:
        """The JetStream context, if the connection is up (else :class:`TransportError`,
        at once: a request would wait in nats-py's reconnect buffer for its whole timeout)."""
        self._connected_client(action)
        assert self._js is not None  # made with the connection
        return self._js

    def settling_client(self) -> Client:
        """The client, for acks and the like: while nats-py reconnects they wait in its buffer
        and go out once it is back (a lost ack only means a redelivery)."""
        return self._client()

    def add_consumer_handle(self, consumer: NatsConsumer) -> None:
        self._consumers.add(consumer)

    def discard_consumer_handle(self, consumer: NatsConsumer) -> None:
        self._consumers.discard(consumer)

    async def durable_log(self, name: str, settings: LogSettings | None = None) -> NatsLog:
        """The JetStream stream ``name`` (subjects ``$HAPPEN.log.<name>.>``, file storage,
        discard-new), created with ``settings`` or updated to them. Raises
        :class:`TransportError` for an invalid name, a stream of that name that is not a
        log of this name, a change of retention, or a JetStream failure."""
        check_name("log", name)
        log = NatsLog(self, name, settings if settings is not None else LogSettings())
        await log.ensure_stream()
        return log

    async def key_value(self, bucket: str) -> NatsKeyValue:
        """The JetStream KV bucket ``bucket`` (one revision kept per key), created if it
        does not exist. Raises :class:`TransportError` for an invalid name or a failure."""
        check_name("bucket", bucket)
        js = self.jetstream(f"open bucket {bucket!r}")
        try:
            try:
                kv = await js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                try:
                    kv = await js.create_key_value(bucket=bucket, history=1)
                except nats.js.errors.BadRequestError as exc:
                    if exc.err_code != _ERR_STREAM_NAME_IN_USE:
                        raise
                    kv = await js.key_value(bucket)  # another host made it meanwhile
        except (nats.errors.Error, OSError) as exc:
            raise TransportError(f"cannot open bucket {bucket!r}: {_describe(exc)}") from exc
        return NatsKeyValue(self, bucket, kv)

    # nats-py's callbacks run inside its tasks: they only record and notify.
    async def _on_error(self, error: Exception) -> None:
        if self._user_error_cb is not None:
            await self._user_error_cb(error)
        settled = self._connect_settled
        if self._state == "connecting" and settled is not None and not settled.is_set():
            self._connect_errors.append(error)
            # A refused or timed-out server (OSError) may be followed by one that accepts;
            # other errors (authorization, TLS, a server -ERR) would fail on every server.
            if not isinstance(error, OSError) or len(self._connect_errors) >= len(self.servers):
                settled.set()
                # Raising here ends nats-py's connect loop, which would otherwise retry
                # forever, while its connection is still in a state close() cleans up.
                raise _ConnectAborted
        elif isinstance(error, nats.errors.SlowConsumerError):
            subscription = self._subscriptions.get(error.sub)
            if subscription is None:  # unsubscribed meanwhile: nobody to count it for
                log.debug("slow consumer on %r: message dropped", error.sub.subject)
                return
            subscription._record_drop(_clock())
            self._notify("on_dropped", subscription, 1)
        elif isinstance(error, nats.errors.Error | OSError):  # OSError: a reconnect attempt
            level = logging.INFO if isinstance(error, OSError) else logging.WARNING
            log.log(level, "NATS connection: %s", _describe(error))
        else:
            log.error("a NATS subscription callback raised", exc_info=error)

    async def _on_disconnected(self) -> None:
        if self._state == "connected":
            self._notify("on_disconnected")
        await self._call_user("disconnected_cb")

    async def _on_reconnected(self) -> None:
        for consumer in self._consumers:
            consumer.mark_stale()  # nats.py#504: a pull subscription may not survive it
        if self._state == "connected" and self._nc is not None:
            self.max_payload = self._nc.max_payload
            self._notify("on_reconnected")
        await self._call_user("reconnected_cb")

    async def _on_closed(self) -> None:
        if self._state == "connected":
            self._state = "closed"
            error = self._nc.last_error if self._nc is not None else None
            reason = _describe(error) if error is not None else "closed by nats-py"
            self._report_closed(TransportError(f"the NATS connection is closed: {reason}"))
        await self._call_user("closed_cb")

    def _report_closed(self, error: BaseException | None) -> None:
        if not self._closed_reported:
            self._closed_reported = True
            self._consumers.clear()
            for subscription in self._subscriptions.values():
                subscription._end_drop_burst()
            self._subscriptions.clear()
            self._notify("on_closed", error)

    def _notify(self, method: str, *args: Any) -> None:
        listener = self._listener
        if listener is None:
            return
        try:
            getattr(listener, method)(*args)
        except Exception:
            log.exception("transport listener %s raised", method)

    async def _call_user(self, name: str) -> None:
        callback = self._user_cbs[name]
        if callback is not None:
            await callback()


# --- Durable logs on JetStream ----------------------------------------------------------------


def _jetstream_error(action: str, exc: BaseException) -> TransportError:
    if isinstance(exc, nats.errors.TimeoutError):
        return TransportError(f"cannot {action}: JetStream did not answer in time")
    if isinstance(exc, nats.js.errors.NoStreamResponseError):
        return TransportError(f"cannot {action}: JetStream did not answer (is it enabled?)")
    return TransportError(f"cannot {action}: {_describe(exc)}")


class NatsLog:
    """A durable log on JetStream (a ``DurableLog``): the stream ``name``, its messages under
    ``$HAPPEN.log.<name>.<subject>``, an append a JetStream publish with ``Nats-Msg-Id``."""

    def __init__(self, transport: NatsTransport, name: str, settings: LogSettings) -> None:
        self._transport = transport
        self.name = name
        self.settings = settings
        self.subject_prefix = f"{LOG_SUBJECT_PREFIX}.{name}."
        self._config = api.StreamConfig(
            name=name,
            subjects=[f"{self.subject_prefix}>"],
            retention=_RETENTION[settings.retention],
            max_msgs=settings.max_msgs if settings.max_msgs is not None else -1,
            discard=api.DiscardPolicy.NEW,
            duplicate_window=settings.dedup_window,
            storage=api.StorageType.FILE,
        )

    async def ensure_stream(self) -> None:
        """Create the stream, or bring an existing one to this log's settings."""
        action = f"open durable log {self.name!r}"
        js = self._transport.jetstream(action)
        try:
            try:
                info = await js.stream_info(self.name)
            except nats.js.errors.NotFoundError:
                try:
                    await js.add_stream(self._config)
                    return
                except nats.js.errors.BadRequestError as exc:
                    if exc.err_code != _ERR_STREAM_NAME_IN_USE:
                        raise
                    info = await js.stream_info(self.name)  # another host made it meanwhile
            have, want = info.config, self._config
            if have.subjects != want.subjects:
                raise TransportError(
                    f"cannot {action}: a JetStream stream of that name exists with subjects "
                    f"{have.subjects}, not {want.subjects}; it is not this log"
                )
            if have.retention != want.retention:
                raise TransportError(
                    f"durable log {self.name!r} has retention {have.retention}; it cannot "
                    f"change to {self.settings.retention.value}"
                )
            if (
                have.max_msgs != want.max_msgs
                or have.discard != want.discard
                or abs(have.duplicate_window - want.duplicate_window) > 1e-3
            ):
                await js.update_stream(self._config)
        except TransportError:
            raise
        except (nats.errors.Error, OSError) as exc:
            raise _jetstream_error(action, exc) from exc

    async def append(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> Appended:
        """Store a message unless its id is in the dedup window (see ``DurableLog``)."""
        check_subject(subject)
        check_append(msg_id, headers)
        hdrs = {**(headers or {}), MSG_ID_HEADER: msg_id}
        size = len(data) + _header_size(hdrs)
        max_payload = self._transport.max_payload
        if size > max_payload:
            raise PayloadTooLargeError(
                f"message of {size} bytes to log {self.name!r} is over the server's "
                f"max_payload of {max_payload} bytes; nothing was stored"
            )
        action = f"append to durable log {self.name!r}"
        for attempt in (1, 2):
            js = self._transport.jetstream(action)
            try:
                ack = await js.publish(self.subject_prefix + subject, data, headers=hdrs)
            except nats.js.errors.NoStreamResponseError:
                if attempt == 2:
                    raise TransportError(
                        f"cannot {action}: JetStream did not answer (is it enabled?)"
                    ) from None
                await self.ensure_stream()  # the server lost it (a memory store, a new server)
                continue
            except nats.js.errors.APIError as exc:
                if exc.err_code == _ERR_MAX_MSGS:
                    raise LogFullError(self.name, self.settings.max_msgs) from None
                raise _jetstream_error(action, exc) from exc
            except nats.errors.TimeoutError:
                raise TransportError(
                    f"cannot {action}: JetStream did not answer in time; the message may be "
                    f"stored or not (append it again with the same msg_id)"
                ) from None
            except (nats.errors.Error, OSError) as exc:
                raise _jetstream_error(action, exc) from exc
            return Appended(seq=ack.seq, duplicate=bool(ack.duplicate))
        raise AssertionError("unreachable")

    async def stored(self, subjects: str) -> int:
        """Messages held under subjects matching ``subjects`` (see ``DurableLog.stored``):
        the stream's per-subject counts, in one request."""
        check_filter(subjects)
        action = f"count the messages of durable log {self.name!r}"
        js = self._transport.jetstream(action)
        try:
            info = await js.stream_info(self.name, subjects_filter=self.subject_prefix + subjects)
        except (nats.errors.Error, OSError) as exc:
            raise _jetstream_error(action, exc) from exc
        return sum((info.state.subjects or {}).values())

    def consumer_config(self, name: str, settings: ConsumerSettings) -> api.ConsumerConfig:
        filters = [self.subject_prefix + subject for subject in settings.subjects]
        return api.ConsumerConfig(
            name=name,
            durable_name=name,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=settings.ack_wait,
            max_deliver=settings.max_deliver if settings.max_deliver is not None else -1,
            # The core paces intake per instance; the server-side cap is shared by every
            # instance (and counts nak'd messages), so it must not hold them back.
            max_ack_pending=-1,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
        )

    async def consumer(self, name: str, settings: ConsumerSettings | None = None) -> NatsConsumer:
        """A handle on the durable pull consumer ``name``, created with ``settings`` or
        updated to them (see ``DurableLog.consumer``)."""
        check_name("consumer", name)
        consumer = NatsConsumer(
            self._transport, self, name, settings if settings is not None else ConsumerSettings()
        )
        await consumer.ensure()
        await consumer.bind()
        return consumer


class NatsConsumer:
    """A handle on a durable pull consumer (a ``LogConsumer``).

    Fetches are JetStream pull requests answered on an inbox of this handle, one at a time.
    Every request ends (its batch is filled, or the server says "no messages" or "expired")
    before its fetch returns, so no message the server sent for a fetch is left behind for
    a later one (nats-py's pull subscription may leave a long-polling request open, whose
    next message then waits in its buffer: returned by a later fetch, or held until
    ``ack_wait`` once the instance stops fetching). The inbox is made again after a
    reconnect and after a failed fetch, with the stream and the consumer made again if the
    server lost them.
    """

    #: Messages the server sent to a cancelled fetch wait out ``ack_wait``.
    fetch_cancellable = False

    def __init__(
        self, transport: NatsTransport, log: NatsLog, name: str, settings: ConsumerSettings
    ) -> None:
        self._transport = transport
        self._log = log
        self.name = name
        self.settings = settings
        self._config = log.consumer_config(name, settings)
        self._pull_subject = f"{_JS_API}.CONSUMER.MSG.NEXT.{log.name}.{name}"
        self._subscription: _NatsSubscription | None = None
        self._inbox = ""
        self._stale = False
        self._closed = False
        self._idle = False  # the last fetch waited and got nothing
        self._lock = anyio.Lock()

    def mark_stale(self) -> None:
        """Make the inbox again before the next fetch."""
        self._stale = True

    async def ensure(self) -> None:
        """Create the consumer or bring it to this handle's settings."""
        action = f"open consumer {self.name!r} of durable log {self._log.name!r}"
        js = self._transport.jetstream(action)
        try:
            await js.add_consumer(self._log.name, self._config)  # creates or updates
        except nats.js.errors.APIError as exc:
            if exc.err_code in _ERR_WORK_QUEUE_OVERLAP:
                raise TransportError(
                    f"consumer {self.name!r} overlaps another consumer on work-queue log "
                    f"{self._log.name!r}: each subject of a work-queue log has one consumer"
                ) from None
            raise _jetstream_error(action, exc) from exc
        except (nats.errors.Error, OSError) as exc:
            raise _jetstream_error(action, exc) from exc

    async def bind(self) -> None:
        """(Re)make the inbox the pull requests are answered on. What the server still
        sends to the old one (a request cut short) waits out ``ack_wait``."""
        old, self._subscription = self._subscription, None
        if old is not None:
            with contextlib.suppress(nats.errors.Error, ValueError):
                await old.unsubscribe()
        action = f"read durable log {self._log.name!r}"
        self._transport.jetstream(action)  # (the connection is up)
        inbox = self._transport.new_inbox()
        try:
            self._subscription = await self._transport.settling_client().subscribe(inbox)
        except (nats.errors.Error, OSError) as exc:
            raise _jetstream_error(action, exc) from exc
        self._inbox = inbox
        self._stale = False
        self._transport.add_consumer_handle(self)

    async def _rebind(self) -> None:
        await self._log.ensure_stream()
        await self.ensure()
        await self.bind()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"the handle on consumer {self.name!r} is closed")

    async def fetch(self, n: int, *, timeout: float) -> list[Delivery]:
        """Up to ``n`` deliveries, waiting at most ``timeout`` seconds for the first."""
        if n < 1:
            raise ValueError(f"fetch needs n >= 1, not {n}")
        self._check_open()
        action = f"fetch from durable log {self._log.name!r}"
        deadline = time.monotonic() + timeout
        async with self._lock:
            for attempt in (1, 2):
                self._check_open()
                self._transport.jetstream(action)
                if self._stale or self._subscription is None:
                    await self._rebind()
                try:
                    messages = await self._pull(n, deadline)
                    break
                except _PullRefused as exc:
                    # e.g. the consumer was deleted: make it again, and try once more
                    self._stale = True
                    if attempt == 2:
                        raise TransportError(f"cannot {action}: {exc}") from None
                    log.warning(
                        "fetch from consumer %r of durable log %r failed (%s); making it again",
                        self.name,
                        self._log.name,
                        exc,
                    )
                except (nats.errors.Error, OSError) as exc:
                    self._stale = True
                    raise _jetstream_error(action, exc) from exc
        prefix = len(self._log.subject_prefix)
        return [NatsDelivery(self._transport, msg, prefix) for msg in messages]

    async def _pull(self, n: int, deadline: float) -> list[Msg]:
        """What is there now (up to ``n``); if nothing, wait until ``deadline`` for one
        message, then take what else is there (up to ``n`` in all). After a fetch that got
        nothing, the first look is skipped (an idle consumer costs one request a fetch)."""
        if not self._idle:
            messages = await self._request(n, None)
            if messages:
                return messages
        wait = deadline - time.monotonic()
        if wait < 0.001:
            self._idle = False  # (no wait: look at once next time)
            return []
        messages = await self._request(1, wait)
        self._idle = not messages
        if messages and n > 1:
            messages += await self._request(n - 1, None)
        return messages

    async def _request(self, batch: int, wait: float | None) -> list[Msg]:
        """One pull request, read to its end: ``batch`` messages, or fewer and the server's
        word that there are no more now (``wait`` None) or that it expired (after
        ``wait`` seconds)."""
        subscription = self._subscription
        assert subscription is not None
        body: dict[str, Any] = {"batch": batch}
        if wait is None:
            body["no_wait"] = True
        else:
            body["expires"] = max(int(wait * 1_000_000_000), 1_000_000)
        await self._transport.settling_client().publish(
            self._pull_subject, _encode_json(body), reply=self._inbox
        )
        give_up = time.monotonic() + (wait or 0.0) + PULL_GRACE
        messages: list[Msg] = []
        while len(messages) < batch:
            try:
                msg = await subscription.next_msg(timeout=max(give_up - time.monotonic(), 0.001))
            except TimeoutError:
                # No end of the request in time: the connection is in trouble. What the
                # server sends for it later goes to an inbox nobody reads any more.
                self._stale = True
                if messages:
                    return messages
                raise nats.errors.TimeoutError from None
            status = msg.headers.get(api.Header.STATUS) if msg.headers else None
            if not status:
                messages.append(msg)
            elif status in (api.StatusCode.NO_MESSAGES, api.StatusCode.REQUEST_TIMEOUT):
                break  # the request is over
            elif status == api.StatusCode.CONTROL_MESSAGE:
                continue  # a heartbeat
            else:
                description = msg.headers.get(api.Header.DESCRIPTION, "") if msg.headers else ""
                if messages:  # (what came is returned; the next fetch makes things again)
                    self._stale = True
                    return messages
                raise _PullRefused(f"{status} {description}".strip())
        return messages

    async def pending(self) -> int:
        """Messages the consumer has yet to settle (undelivered, or delivered and unsettled)."""
        self._check_open()
        action = f"read consumer {self.name!r} of durable log {self._log.name!r}"
        js = self._transport.jetstream(action)
        try:
            info = await js.consumer_info(self._log.name, self.name)
        except (nats.errors.Error, OSError) as exc:
            raise _jetstream_error(action, exc) from exc
        return (info.num_pending or 0) + (info.num_ack_pending or 0)

    async def close(self) -> None:
        """Stop fetching through this handle; the consumer stays on the server."""
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            await self.release()

    async def release(self) -> None:
        """Drop the inbox (messages on their way to it return after ``ack_wait``); a later
        fetch makes it again."""
        self._transport.discard_consumer_handle(self)
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(nats.errors.Error, ValueError):
                await subscription.unsubscribe()


class NatsDelivery:
    """One delivery of a JetStream message (a ``Delivery``), on nats-py's ``Msg``."""

    __slots__ = (
        "_msg",
        "_settled",
        "_transport",
        "data",
        "delivery_count",
        "headers",
        "msg_id",
        "seq",
        "subject",
    )

    def __init__(self, transport: NatsTransport, msg: Msg, prefix: int) -> None:
        self._transport = transport
        self._msg = msg
        self._settled = False
        self.subject = msg.subject[prefix:]
        self.data = msg.data
        headers = dict(msg.headers) if msg.headers else {}
        self.msg_id = headers.pop(MSG_ID_HEADER, "")
        self.headers: dict[str, str] | None = headers or None
        metadata = msg.metadata
        self.seq = metadata.sequence.stream
        self.delivery_count = metadata.num_delivered

    async def _send(self, verb: str, settles: bool, delay: float | None = None) -> None:
        self._transport.settling_client()  # raises once the transport is closed
        if self._settled:
            return
        if settles:
            self._settled = True
        try:
            # Shielded: a settlement is not lost half-way to a cancellation (``Delivery``).
            with anyio.CancelScope(shield=True):
                if verb == "ack":
                    await self._msg.ack()
                elif verb == "nak":
                    await self._msg.nak(delay=delay if delay and delay > 0 else None)
                elif verb == "term":
                    await self._msg.term()
                else:
                    await self._msg.in_progress()
        except (nats.errors.Error, OSError) as exc:
            raise TransportError(
                f"cannot {verb} message {self.seq} of {self.subject!r}: {_describe(exc)}"
            ) from exc

    async def ack(self) -> None:
        await self._send("ack", True)

    async def nak(self, delay: float | None = None) -> None:
        await self._send("nak", True, delay)

    async def in_progress(self) -> None:
        await self._send("in_progress", False)

    async def term(self) -> None:
        await self._send("term", True)

    def __repr__(self) -> str:
        return (
            f"<NatsDelivery seq={self.seq} subject={self.subject!r} "
            f"delivery_count={self.delivery_count}>"
        )


# --- Key-value buckets on JetStream KV ----------------------------------------------------------


class NatsKeyValue:
    """A JetStream KV bucket (a ``KeyValue``); keys escaped with ``escape_key``."""

    def __init__(self, transport: NatsTransport, bucket: str, kv: _NatsKeyValue) -> None:
        self._transport = transport
        self.bucket = bucket
        self._kv = kv

    def _ready(self, action: str, key: str) -> str:
        escaped = escape_key(key)
        if not self._transport.up():  # (the message made only when it is needed)
            self._transport.jetstream(f"{action} key {key!r} of bucket {self.bucket!r}")
        return escaped

    async def _current(self, escaped: str) -> Entry | None:
        try:
            entry = await self._kv.get(escaped)
        except nats.js.errors.KeyNotFoundError:  # missing, or deleted
            return None
        assert entry.value is not None and entry.revision is not None
        return Entry(entry.value, entry.revision)

    async def get(self, key: str) -> Entry | None:
        """The key's latest value, or ``None``."""
        escaped = self._ready("read", key)
        try:
            return await self._current(escaped)
        except (nats.errors.Error, OSError) as exc:
            raise _jetstream_error(f"read key {key!r} of bucket {self.bucket!r}", exc) from exc

    async def put(self, key: str, value: bytes, *, expect: int | None = None) -> int:
        """Write ``value`` (conditionally with ``expect``); returns the new revision."""
        escaped = self._ready("write", key)
        check_expect(expect)
        limit = self._transport.max_payload - KV_HEADROOM
        if len(value) > limit:
            raise PayloadTooLargeError(
                f"value of {len(value)} bytes for key {key!r} is over the {limit} bytes a "
                f"bucket value may take (max_payload less {KV_HEADROOM}); nothing was written"
            )
        try:
            try:
                if expect is None:
                    return await self._kv.put(escaped, value)
                if expect == 0:  # nats-py's create also creates over a delete's tombstone
                    return await self._kv.create(escaped, value)
                return await self._kv.update(escaped, value, last=expect)
            except nats.js.errors.KeyWrongLastSequenceError:
                raise RevisionMismatch(
                    self.bucket, key, expect or 0, await self._current(escaped)
                ) from None
        except RevisionMismatch:
            raise
        except (nats.errors.Error, OSError) as exc:
            raise _jetstream_error(f"write key {key!r} of bucket {self.bucket!r}", exc) from exc

    async def delete(self, key: str, *, expect: int | None = None) -> None:
        """Delete the key (conditionally with ``expect``); a missing key stays missing."""
        escaped = self._ready("delete", key)
        check_expect(expect)
        try:
            if expect == 0:
                current = await self._current(escaped)
                if current is not None:
                    raise RevisionMismatch(self.bucket, key, 0, current)
                return
            try:
                await self._kv.delete(escaped, last=expect)
            except nats.js.errors.APIError as exc:
                if exc.err_code not in _ERR_WRONG_LAST_SEQUENCE or expect is None:
                    raise
                raise RevisionMismatch(
                    self.bucket, key, expect, await self._current(escaped)
                ) from None
        except RevisionMismatch:
            raise
        except (nats.errors.Error, OSError) as exc:
            raise _jetstream_error(f"delete key {key!r} of bucket {self.bucket!r}", exc) from exc


if TYPE_CHECKING:  # the type checker holds the NATS transport to the durable seam
    _durable: type[DurableTransport] = NatsTransport


def from_url(url: str) -> NatsTransport:
    """Build a transport for ``"nats://host:4222"`` or a comma-separated list of servers.

    ``user:password@`` in a URL is passed on as is (no percent-decoding); for a password
    holding ``,`` or ``@``, build ``NatsTransport(url, user=..., password=...)`` instead.
    """
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise TransportError(f"no NATS server in the URL {url!r}")
    return NatsTransport(servers if len(servers) > 1 else servers[0])
