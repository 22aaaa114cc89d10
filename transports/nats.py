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
from typing import Any
from urllib.parse import urlsplit

import anyio
import nats.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription as _NatsSubscription

from happen._errors import PayloadTooLargeError, TransportError
from happen._transport import Message, MessageCallback, TransportListener

__all__ = ["NatsTransport", "from_url"]

log = logging.getLogger("happen.transports.nats")

DEFAULT_MAX_PAYLOAD = 1024 * 1024
DEFAULT_PENDING_MSGS_LIMIT = 512 * 1024
DEFAULT_PENDING_BYTES_LIMIT = 256 * 1024 * 1024
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
        **connect_options: Any,
    ) -> None:
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        if not self.servers:
            raise TransportError("the NATS transport needs at least one server URL")
        #: The largest frame (data plus headers) the server accepts, as its INFO says.
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self.pending_msgs_limit = pending_msgs_limit
        self.pending_bytes_limit = pending_bytes_limit
        self._user_error_cb: _ErrorCallback | None = connect_options.pop("error_cb", None)
        self._user_cbs: dict[str, _Callback | None] = {
            name: connect_options.pop(name, None)
            for name in ("disconnected_cb", "reconnected_cb", "closed_cb")
        }
        self._options = {**DEFAULT_CONNECT_OPTIONS, **connect_options}
        prefix = self._options.get("inbox_prefix", "_INBOX")
        self._inbox_prefix = prefix.decode() if isinstance(prefix, bytes) else str(prefix)
        self._nc: Client | None = None
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
        """A unique subject to receive replies on (works before ``start()`` too)."""
        if self._nc is not None:
            return self._nc.new_inbox()
        return f"{self._inbox_prefix}.{secrets.token_hex(11)}"

    def _client(self) -> Client:
        nc = self._nc
        if nc is None or self._state not in ("connected", "stopping"):
            state = "not started" if self._state in ("new", "connecting") else self._state
            raise TransportError(f"the NATS transport is {state}")
        return nc

    def _connected_client(self, action: str) -> Client:
        """The client, if its connection is up: while nats-py reconnects it would hold a
        publish or a subscription in its reconnect buffer for the whole outage."""
        nc = self._client()
        if not nc.is_connected and not nc.is_closed:
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
        nc = self._connected_client(f"subscribe to {subject!r}")
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
        nc = self._connected_client(f"publish to {subject!r}")
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


def from_url(url: str) -> NatsTransport:
    """Build a transport for ``"nats://host:4222"`` or a comma-separated list of servers.

    ``user:password@`` in a URL is passed on as is (no percent-decoding); for a password
    holding ``,`` or ``@``, build ``NatsTransport(url, user=..., password=...)`` instead.
    """
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise TransportError(f"no NATS server in the URL {url!r}")
    return NatsTransport(servers if len(servers) > 1 else servers[0])
