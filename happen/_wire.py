"""The wire: the protocol's frames, their subjects, the system's reply inbox, and publishing.

Every frame is a msgspec Struct tagged by the field ``k``. ``docs/PROTOCOL.md`` describes the
subjects and frames for clients written in other languages.

``Wire`` is the one place that talks to the transport for the core. Publishing follows one
error policy: a request or a frame the caller asked for raises (the caller can act on it); a
*reply* that cannot be published (too large, not encodable, connection lost) never raises:
it is replaced by a failure the caller can read where possible, logged, and reported to the
node as not delivered, so that it is counted as failed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable
from typing import Annotated, Any, Protocol

import msgspec

from happen._codec import Codec, Decoder
from happen._errors import (
    CodecError,
    NodeNotFoundError,
    PayloadTooLargeError,
    TransportError,
)
from happen._events import CausalContext
from happen._ids import MAX_KEY
from happen._transport import NO_RESPONDERS, STATUS_HEADER, Message, Transport

__all__ = [
    "Abandon",
    "Ack",
    "BroadcastEnd",
    "BroadcastFrame",
    "BroadcastItem",
    "Cancel",
    "Chunk",
    "Chunks",
    "Credit",
    "Failure",
    "Hold",
    "InboxFrame",
    "Owners",
    "Ping",
    "Pong",
    "Request",
    "Result",
    "RoomAsk",
    "RoomOffer",
    "Route",
    "StreamEnd",
    "StreamStart",
    "Wire",
]

# Failure codes
NO_HANDLER = "no_handler"
QUEUE_FULL = "queue_full"
HANDLER_ERROR = "handler_error"
TIMEOUT = "timeout"
BAD_REQUEST = "bad_request"
UNAVAILABLE = "unavailable"

#: The reserved event type of a presence probe: "does anyone serve this node at all?"
PRESENCE = "happen.presence"


#: A key as a frame carries it: the decoder refuses an empty one or one over ``MAX_KEY``
#: characters (and decoded text is valid UTF-8), so a received key needs no check of its own.
WireKey = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY)]


class _Frame(msgspec.Struct, tag_field="k", omit_defaults=True, gc=False):
    pass


class Request(_Frame, tag="req"):
    """A point-to-point event, published to ``{ns}.node.{node_id}`` with a reply inbox."""

    type: str
    payload: Any = None
    context: CausalContext | None = None
    priority: int = 0
    window: int = 256  # stream credit the caller grants up front
    timeout_ms: int | None = None
    origin: str = ""  # the sending system's id; "" for foreign clients
    probe: bool = False  # answer "ack" or "hold" at once (a sender held by pressure)
    seal: str = ""  # digest of the caller's secret: only its owner can abandon or cancel it
    forwarded: bool = False  # passed on by a full instance to a twin: never passed on again
    key: WireKey | None = None  # per-key order: at most one event of a key runs at a time
    reply_to: str = ""  # passed on to the owner of the key: the caller's reply subject
    routed: int = 0  # how many times the keyed event was passed between instances
    handed: bool = False  # passed on by the key's owner to the instance it hands the key to


class Result(_Frame, tag="res"):
    """The handler's result (final)."""

    value: Any = None


class Failure(_Frame, tag="err"):
    """The call failed (final); ``code`` says why."""

    code: str
    message: str = ""
    error_type: str = ""
    queued: int | None = None  # with queue_full: how many events the node's queue held
    attempts: int = 1  # with handler_error: how many times the handler ran


class Hold(_Frame, tag="hold"):
    """Admitted while the node is under pressure: its acknowledgment is withheld."""


class Ack(_Frame, tag="ack"):
    """The withheld admission acknowledgment: the node is below its threshold again."""


class StreamStart(_Frame, tag="start"):
    """The handler streams: credit and cancel frames go to ``control``."""

    control: str


class Chunk(_Frame, tag="chunk"):
    """One streamed item; ``seq`` is its index in the stream, from 0."""

    item: Any = None
    seq: int | None = None  # None from a producer that does not number its items


class Chunks(_Frame, tag="chunks"):
    """Several streamed items in order (each counts as one item against the credit);
    ``seq`` is the index of the first."""

    items: list[Any]
    seq: int | None = None


class StreamEnd(_Frame, tag="end"):
    """The stream finished (final) after ``count`` items."""

    count: int | None = None


class Credit(_Frame, tag="credit"):
    """The consumer read ``n`` more items: the producer may send ``n`` more."""

    n: int


class Cancel(_Frame, tag="cancel"):
    """The consumer is gone: stop the producer. ``secret`` proves it owns the stream."""

    secret: str = ""


class Abandon(_Frame, tag="abandon"):
    """The caller of ``reply`` gave up (cancelled or timed out): cancel its handler.

    Published to ``{ns}.cancel.{node_id}``, which every instance of the node hears.
    ``secret`` is the call's secret, whose digest the request carried as its ``seal``.
    """

    reply: str
    secret: str = ""


class Broadcast(_Frame, tag="bcast"):
    """A broadcast event, published to ``{ns}.bcast.{event_type}``."""

    type: str
    payload: Any = None
    context: CausalContext | None = None
    stream: str | None = None  # set for a streamed broadcast: its items follow as ``bitem``


class BroadcastItem(_Frame, tag="bitem"):
    """An item of the streamed broadcast ``stream``."""

    stream: str
    item: Any = None


class BroadcastEnd(_Frame, tag="bend"):
    """The streamed broadcast ``stream`` ended (``error`` set when the source failed)."""

    stream: str
    error: str | None = None


class Ping(_Frame, tag="ping"):
    """Liveness: "do you still hold these calls?"

    A caller publishes it to ``{ns}.ping.{node_id}`` (every instance hears it) listing the
    reply subjects of its silent calls; each instance answers ``pong`` with those it holds.
    A producer waiting for credit publishes it, ``calls`` empty, to its consumer's reply
    subject; the consumer's system answers ``pong``, or ``pong`` with ``gone`` when it no
    longer reads that stream.
    """

    calls: list[str] = []


class Pong(_Frame, tag="pong"):
    """The answer to a ``ping``: the pinged calls this instance holds, and who it is."""

    calls: list[str] = []
    instance: str = ""  # the answering system's id
    gone: bool = False  # answered by a consumer: the stream pinged is not read any more


class RoomAsk(_Frame, tag="room"):
    """A full instance asks its twins for room, on ``{ns}.room.{node_id}``."""

    instance: str  # the asking system's id (it ignores its own question)
    n: int = 1  # how many requests it would pass on


class RoomOffer(_Frame, tag="offer"):
    """A twin with room answers a ``room`` question: forward up to ``free`` requests to
    ``{ns}.inst.{node_id}.{instance}``."""

    instance: str
    free: int
    keys: bool = False  # the twin takes part in the node's key partitions


class Owners(_Frame, tag="owners"):
    """The key partitions of a node changed hands: its instances read them again.

    Published to ``{ns}.keys.{node_id}`` by the instance that wrote the change."""

    instance: str


InboxFrame = (
    Result
    | Failure
    | Hold
    | Ack
    | StreamStart
    | Chunk
    | Chunks
    | StreamEnd
    | Credit
    | Cancel
    | Ping
    | Pong
    | RoomOffer
)
BroadcastFrame = Broadcast | BroadcastItem | BroadcastEnd


#: Random bytes in a call's secret, and bytes in its seal (a BLAKE2b digest of the secret).
SECRET_BYTES = 16
SEAL_BYTES = 12
#: Random bytes in an inbox token, and how many tokens one read of the random source makes.
TOKEN_BYTES = 10
TOKEN_BATCH = 256

#: Forks of this process so far, as seen from a child: a forked child draws its own tokens
#: rather than hand out the ones its parent drew before the fork.
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


#: An empty BLAKE2b of the seal's size: a seal is made on a copy of it (cheaper than making
#: the hash anew, which parses its parameters on every call).
_SEAL_HASH = hashlib.blake2b(digest_size=SEAL_BYTES)


def seal_of(secret: str) -> str:
    """The public digest of ``secret`` a request carries (hex BLAKE2b, ``SEAL_BYTES`` long)."""
    digest = _SEAL_HASH.copy()
    digest.update(secret.encode("utf-8", "replace"))  # a peer's string may hold lone surrogates
    return digest.hexdigest()


def seal_matches(seal: str, secret: str) -> bool:
    """Whether ``secret`` is the one ``seal`` was made from (in constant time)."""
    return hmac.compare_digest(seal_of(secret).encode(), seal.encode("utf-8", "replace"))


def describe(exc: BaseException) -> str:
    """``str(exc)`` on one line, always encodable, even when ``__str__`` raises."""
    try:
        message = str(exc)
    except Exception:
        message = f"<{type(exc).__name__} whose message cannot be printed>"
    message = message.replace("\r", " ").replace("\n", " ")
    return message.encode("utf-8", "replace").decode("utf-8")  # lone surrogates become "?"


def handler_failure(exc: BaseException, attempts: int = 1) -> Failure:
    """The failure a handler's exception becomes: its type and message, no traceback, and
    how many times the handler ran."""
    return Failure(HANDLER_ERROR, describe(exc), type(exc).__name__, attempts=attempts)


def abandoned(node_id: str) -> Failure:
    """Answered to a caller that gave up, so its system can forget the request."""
    return Failure(TIMEOUT, f"node {node_id!r} cancelled the handler: the caller gave up")


def stopped(node_id: str) -> Failure:
    return Failure(UNAVAILABLE, f"node {node_id!r} stopped")


log = logging.getLogger("happen")


class ReplyLost(Exception):
    """A reply could not be handed to the transport (already logged, to be counted)."""


class Route(Protocol):
    """What the reply inbox delivers frames to: a pending call, or a stream's producer."""

    abandoned: bool
    target: str

    @property
    def secret(self) -> str:
        """What proves a cancel comes from this conversation's owner ("" if nothing)."""

    def feed(self, frame: Any) -> None:
        """Take a decoded frame, or an exception that ends the conversation. Never blocks."""


class Wire:
    """The system's side of the transport: subjects, the reply inbox and its routes, and
    publishing with one error policy.

    Made by the system before it starts; ``attach`` connects it to the started transport.
    """

    def __init__(self, codec: Codec, namespace: str) -> None:
        self.codec = codec
        self.namespace = namespace
        self.transport: Transport | None = None
        self.inbox_prefix = ""
        self.routes: dict[str, Route] = {}  # open calls and streams, by inbox token
        self.probes: dict[str, Route] = {}  # short protocol questions (pings, room), by token
        self.bad_inputs = 0  # malformed frames received by this system, all nodes together
        self.stray_frames = 0  # well-formed frames for a request or stream no longer here
        self._bad_input_logged: set[str] = set()
        self.request_decoder = codec.decoder(Request)
        self.abandon_decoder = codec.decoder(Abandon)
        self.ping_decoder = codec.decoder(Ping)
        self.room_decoder = codec.decoder(RoomAsk)
        self.owners_decoder = codec.decoder(Owners)
        self.broadcast_decoder: Decoder[Any] = codec.decoder(BroadcastFrame)  # type: ignore[arg-type]
        self._inbox_decoder: Decoder[Any] = codec.decoder(InboxFrame)  # type: ignore[arg-type]
        self._tokens: list[str] = []  # drawn from the random source, not handed out yet
        self._secrets: list[str] = []  # the same, for call secrets
        self._drawn_at = _forks  # (of both lists)
        self.rename(namespace)

    def rename(self, namespace: str) -> None:
        """Use ``namespace`` for every subject (before the system starts)."""
        self.namespace = namespace
        self._node_prefix = f"{namespace}.node."
        self._bcast_prefix = f"{namespace}.bcast."
        self._inst_prefix = f"{namespace}.inst."

    # ----- subjects -----------------------------------------------------------------

    def node_subject(self, node_id: str) -> str:
        return self._node_prefix + node_id

    def cancel_subject(self, node_id: str) -> str:
        return f"{self.namespace}.cancel.{node_id}"

    def ping_subject(self, node_id: str) -> str:
        """Liveness pings to every instance of ``node_id``."""
        return f"{self.namespace}.ping.{node_id}"

    def instance_subject(self, node_id: str, system_id: str) -> str:
        """Requests for the instance of ``node_id`` hosted by system ``system_id`` only."""
        return self._inst_prefix + node_id + "." + system_id

    def room_subject(self, node_id: str) -> str:
        """Questions of a full instance of ``node_id`` to its twins."""
        return f"{self.namespace}.room.{node_id}"

    def keys_subject(self, node_id: str) -> str:
        """News of the key partitions of ``node_id``, to all its instances."""
        return f"{self.namespace}.keys.{node_id}"

    def broadcast_subject(self, suffix: str) -> str:
        return self._bcast_prefix + suffix

    # ----- connection ---------------------------------------------------------------

    async def attach(self, transport: Transport) -> None:
        """Use the started ``transport``; subscribe the reply inbox."""
        inbox = transport.new_inbox()
        await transport.subscribe(inbox + ".*", self._on_inbox)
        self.inbox_prefix = inbox + "."
        self.transport = transport

    def _transport(self) -> Transport:
        transport = self.transport
        if transport is None:
            raise TransportError("the system is not connected to its transport")
        return transport

    # ----- publishing ---------------------------------------------------------------

    def encode(self, frame: Any) -> bytes:
        return self.codec.encode(frame)

    # ``publish`` and ``publish_data`` return the transport's coroutine for the caller to
    # await (``await wire.publish(...)``): a frame sent passes through no coroutine of ours.
    # A failure to encode, or no transport, raises at the call, where the caller awaits.

    def publish(self, subject: str, frame: Any, *, reply: str | None = None) -> Awaitable[None]:
        """Encode and publish a frame the caller asked for; errors propagate to the caller."""
        transport = self.transport
        if transport is None:
            transport = self._transport()  # (raises)
        return transport.publish(subject, self.codec.encode(frame), reply=reply)

    def publish_data(
        self, subject: str, data: bytes, *, reply: str | None = None
    ) -> Awaitable[None]:
        """Publish encoded bytes; errors propagate to the caller."""
        transport = self.transport
        if transport is None:
            transport = self._transport()  # (raises)
        return transport.publish(subject, data, reply=reply)

    def reply(self, subject: str, frame: Any) -> Awaitable[bool]:
        """Publish a reply frame (``await wire.reply(...)``); never raises. True once it was
        handed to the transport.

        A frame that cannot be encoded or is over ``max_payload`` is replaced by a failure
        naming why, so the caller is told; a lost connection is logged. Either way the
        answer is False: the node counts the call as failed.
        """
        # Encoded here, and ``reply_data``'s coroutine returned as it is: every reply would
        # otherwise pass through one more coroutine.
        try:
            data = self.codec.encode(frame)
        except CodecError as exc:
            return self._replied_instead(subject, exc)
        return self.reply_data(subject, data)

    async def _replied_instead(self, subject: str, exc: Exception) -> bool:
        await self._reply_instead(subject, exc)
        return False

    async def reply_data(self, subject: str, data: bytes) -> bool:
        """``reply`` for an encoded frame."""
        transport = self.transport
        if transport is None:
            return False
        try:
            await transport.publish(subject, data)
        except PayloadTooLargeError as exc:
            await self._reply_instead(subject, exc)
            return False
        except TransportError as exc:
            log.warning("could not deliver a reply to %s: %s", subject, exc)
            return False
        return True

    async def _reply_instead(self, subject: str, exc: Exception) -> None:
        """The reply could not be sent: tell the caller why, in a frame that always fits."""
        failure = handler_failure(exc)
        failure = Failure(failure.code, fit_message(failure.message), failure.error_type)
        log.warning("a reply to %s could not be sent: %s", subject, failure.message)
        transport = self.transport
        if transport is None:
            return
        try:
            await transport.publish(subject, self.codec.encode(failure))
        except (TransportError, CodecError, PayloadTooLargeError) as again:
            log.warning("could not deliver a failure to %s: %s", subject, again)

    # ----- the reply inbox ----------------------------------------------------------

    def new_token(self) -> str:
        """A new inbox token: a capability, unguessable (80 random bits), one per
        conversation."""
        tokens = self._tokens
        if not tokens or self._drawn_at != _forks:
            tokens = self._draw_tokens()
        return tokens.pop()

    def new_secret(self) -> str:
        """A new call secret: 128 random bits (32 hex digits), which only its caller knows
        (its request carries ``seal_of`` it; the caller keeps it with the call)."""
        secrets = self._secrets
        if not secrets or self._drawn_at != _forks:
            self._draw_tokens()
            secrets = self._secrets
        return secrets.pop()

    def _draw_tokens(self) -> list[str]:
        # One read of the random source for a batch of tokens and secrets (a read per
        # token cost a system call per request); each is still its own random bits. A
        # forked child draws both lists anew.
        drawn = os.urandom((TOKEN_BYTES + SECRET_BYTES) * TOKEN_BATCH)
        cut = TOKEN_BYTES * TOKEN_BATCH
        self._tokens = drawn[:cut].hex(" ", TOKEN_BYTES).split()
        self._secrets = drawn[cut:].hex(" ", SECRET_BYTES).split()
        self._drawn_at = _forks
        return self._tokens

    def register(self, route: Route, token: str = "") -> str:
        """Route the frames of a new conversation to ``route`` (under ``token``, or a new
        one); returns its inbox token."""
        token = token or self.new_token()
        self.routes[token] = route
        return token

    def register_probe(self, route: Route) -> str:
        """``register`` for a short protocol question (a ping round, a room search): its
        answers are routed alike, but it is not an open call (``System.idle`` ignores it)."""
        token = self.new_token()
        self.probes[token] = route
        return token

    def forget(self, token: str) -> None:
        if token:
            if self.routes.pop(token, None) is None:
                self.probes.pop(token, None)

    def route_for(self, subject: str) -> Route | None:
        """The route of one of this system's reply subjects, if still open."""
        if subject.startswith(self.inbox_prefix):
            return self.routes.get(subject[len(self.inbox_prefix) :])
        return None

    async def _on_inbox(self, msg: Message) -> None:
        token = msg.subject[len(self.inbox_prefix) :]
        route = self.routes.get(token)
        if route is None:
            route = self.probes.get(token)
        headers = msg.headers
        if headers and headers.get(STATUS_HEADER) == NO_RESPONDERS:
            if route is not None:
                self.forget(token)
                route.feed(
                    NodeNotFoundError(
                        f"no node {route.target!r} is running in namespace {self.namespace!r}",
                        node_id=route.target,
                    )
                )
            return
        try:
            frame = self._inbox_decoder.decode(msg.data)
        except CodecError as exc:
            self.report_bad_input("inbox", exc)
            return
        if type(frame) is Ping:  # a producer asks whether we still read its stream
            if msg.reply:
                await self.reply(msg.reply, Pong(gone=token not in self.routes))
            return
        if route is None:
            # Late frames are normal (a credit after the stream ended, a reply after the
            # caller gave up); they are counted, not raised.
            self.stray_frames += 1
            return
        if route.abandoned:
            if type(frame) is StreamStart:
                self.routes.pop(token, None)
                try:
                    await self.publish(frame.control, Cancel(route.secret))
                except Exception as exc:
                    log.debug("could not cancel a stream nobody reads: %s", exc)
            elif isinstance(frame, (Result, Failure, StreamEnd)):
                self.routes.pop(token, None)
            return
        route.feed(frame)

    def fail_routes(self, error: BaseException) -> None:
        """End every open conversation with ``error`` (connection lost, system stopped)."""
        routes = [*self.routes.values(), *self.probes.values()]
        self.routes.clear()
        self.probes.clear()
        for route in routes:
            route.feed(error)

    def report_violation(self, where: str, message: str) -> None:
        """Count a well-formed frame that breaks the protocol (a cancel without the
        conversation's secret, credit for items never sent); log the first per place."""
        self.bad_inputs += 1
        key = f"{where}:violation"
        if key not in self._bad_input_logged:
            self._bad_input_logged.add(key)
            log.warning("%s: %s; further violations are counted only", where, message)

    def report_bad_input(self, where: str, exc: BaseException) -> None:
        """Count a malformed frame; log the first of each kind per place."""
        self.bad_inputs += 1
        key = f"{where}:{type(exc).__name__}"
        if key not in self._bad_input_logged:
            self._bad_input_logged.add(key)
            log.warning(
                "%s: dropped malformed input (%s); further ones are counted only", where, exc
            )


#: Longest error message quoted back in a failure frame, in characters.
MESSAGE_LIMIT = 4096


def fit_message(message: str) -> str:
    """``message`` cut to ``MESSAGE_LIMIT`` characters, marked when cut."""
    if len(message) <= MESSAGE_LIMIT:
        return message
    return message[: MESSAGE_LIMIT - 20] + " ... (truncated)"
