"""The system: owns the transport, the nodes, the task group and the inbox routing."""

from __future__ import annotations

import importlib
import itertools
import logging
import os
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from happen import _protocol as p
from happen._broadcast import BroadcastStream
from happen._codec import Decoder, make_codec
from happen._config import ConcurrencyConfig, ConcurrencySettings
from happen._errors import (
    InvalidConfigError,
    InvalidIdError,
    SystemStoppedError,
    TransportError,
)
from happen._events import IdGenerator
from happen._ids import validate_node_id
from happen._mailbox import NodeStats
from happen._node import Node
from happen._pressure import RemoteGate
from happen._sending import Sending
from happen._signal import Signal, signal_factory
from happen._stream import Call
from happen._transport import Message, Subscription, Transport

__all__ = ["System"]

log = logging.getLogger("happen")


def _positive(name: str, value: object, kind: type) -> Any:
    if type(value) not in ((int, float) if kind is float else (int,)) or not value > 0:  # type: ignore[operator]
        raise InvalidConfigError(f"{name} must be a positive {kind.__name__}, not {value!r}")
    return value


class System(Sending):
    """A set of nodes sharing a transport: ``async with happen.System(...) as system``.

    Keyword arguments:

    - ``concurrency``: ``{"default": {...}, "patterns": {glob: {...}}}`` flow-control
      settings (see ``ConcurrencySettings``), validated here (``InvalidConfigError``).
    - ``transport``: a ``Transport`` or a URL, ``"memory"`` (default) or ``"nats://host:4222"``.
    - ``namespace``: prefix of every subject, isolating systems that share a NATS server.
    - ``codec``: ``"msgpack"`` (default) or ``"json"``.
    - ``max_depth``: nesting limit of decoded messages (default 64).
    - ``stream_window``: credit a stream consumer grants, in items (default 256).
    - ``stream_idle_timeout``: seconds a producer waits for credit before closing (60).
    - ``worker_threads``: how many sync handlers may run at once in threads (40).
    - ``drain_timeout``: seconds ``stop()`` lets in-flight handlers finish (10).

    Use it as an async context manager; ``stop()`` may also be awaited inside the
    ``async with`` block. Without ``async with``, ``start()`` and ``stop()`` must be awaited
    from the same task and cancel-scope level (the system's task group lives between them).
    """

    def __init__(
        self,
        *,
        concurrency: Mapping[str, Any] | None = None,
        transport: Transport | str = "memory",
        namespace: str = "happen",
        codec: str = "msgpack",
        max_depth: int = 64,
        stream_window: int = 256,
        stream_idle_timeout: float = 60.0,
        worker_threads: int = 40,
        drain_timeout: float = 10.0,
    ) -> None:
        self._config = ConcurrencyConfig(
            dict(concurrency) if isinstance(concurrency, Mapping) else concurrency
        )
        try:
            validate_node_id(namespace)
        except InvalidIdError:
            raise InvalidConfigError(
                f"namespace {namespace!r} must be 1-128 ASCII letters, digits, '-' or '_'"
            ) from None
        if not isinstance(transport, str) and not isinstance(transport, Transport):
            raise InvalidConfigError(
                f"transport must be a URL or a happen.Transport, not {type(transport).__name__}"
            )
        self._codec = make_codec(codec, max_depth)
        self._window: int = _positive("stream_window", stream_window, int)
        self._idle_timeout: float = _positive("stream_idle_timeout", stream_idle_timeout, float)
        self._threads: int = _positive("worker_threads", worker_threads, int)
        self._drain_timeout: float = _positive("drain_timeout", drain_timeout, float)
        self._transport_spec = transport
        self._transport: Transport | None = None
        self.namespace = namespace
        self.id = os.urandom(8).hex()
        self._ids = IdGenerator()
        self._tokens = itertools.count(1)
        self._nodes: dict[str, Node] = {}
        self._routes: dict[str, Any] = {}  # inbox token -> Call | Producer
        self._gates: dict[str, RemoteGate] = {}
        self._local_bstreams: dict[str, list[BroadcastStream]] = {}
        self._dirty: set[Node] = set()
        self._syncing = False
        self._settled: anyio.Event | None = None
        self._tg: TaskGroup | None = None
        self._task_scopes: set[anyio.CancelScope] = set()
        self._tasks_done: anyio.Event | None = None
        self._cancelling = False
        self._answered: anyio.Event | None = None
        self._context_managed = False
        self._state = "new"
        self._accepting = False
        self._inbox_prefix = ""
        self._bad_input_logged: set[str] = set()
        self.bad_inputs = 0  # malformed frames received by this system, all nodes together
        self.stray_frames = 0  # well-formed frames for a request or stream no longer here
        self._request_decoder = self._codec.decoder(p.Request)
        self._inbox_decoder: Decoder[Any] = self._codec.decoder(p.InboxFrame)  # type: ignore[arg-type]
        self._abandon_decoder = self._codec.decoder(p.Abandon)
        self._broadcast_decoder: Decoder[Any] = self._codec.decoder(p.BroadcastFrame)  # type: ignore[arg-type]
        self._cancelled: type[BaseException] = BaseException
        self._signal: Callable[[], Signal] = anyio.Event
        self._limiter: anyio.CapacityLimiter = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<happen.System {self.namespace!r} {self._state}>"

    # ----- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> System:
        await self.start()
        self._context_managed = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        await self._close_task_group()

    async def start(self) -> None:
        """Connect the transport and subscribe every node. Raises ``TransportError``."""
        if self._state != "new":
            raise SystemStoppedError(f"a system starts once; this one is {self._state}")
        transport = self._resolve_transport(self._transport_spec)
        self._cancelled = anyio.get_cancelled_exc_class()
        self._signal = signal_factory()
        self._limiter = anyio.CapacityLimiter(self._threads)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            transport.set_listener(self)
            await transport.start()
            self._transport = transport
            inbox = transport.new_inbox()
            self._inbox_prefix = inbox + "."
            await transport.subscribe(inbox + ".*", self._on_inbox)
            self._state = "running"
            self._accepting = True
            for node in self._nodes.values():
                await self._subscribe_node(node)
        except BaseException:
            self._state = "stopped"
            with anyio.CancelScope(shield=True):
                await self._cancel_tasks()
            self._tg = None
            await tg.__aexit__(None, None, None)
            with anyio.CancelScope(shield=True):
                try:
                    await transport.stop()
                except Exception:
                    log.debug("stopping the transport after a failed start", exc_info=True)
            raise

    async def stop(self, timeout: float | None = None) -> None:
        """Stop: refuse new events, let in-flight handlers finish, then cancel the rest.

        Handlers get ``timeout`` seconds (default: the ``drain_timeout`` setting) to finish;
        queued events still waiting then fail with ``unavailable``, running handlers are
        cancelled, and every open stream and pending call of this system fails.
        """
        if self._state != "running":
            return
        self._state = "stopping"
        self._accepting = False
        tg = self._tg
        assert tg is not None and self._transport is not None
        with anyio.CancelScope(shield=True):
            for node in self._nodes.values():
                await self._unsubscribe_node(node)
            with anyio.move_on_after(self._drain_timeout if timeout is None else timeout):
                for node in self._nodes.values():
                    await node._mailbox.wait_drained()
            for node in self._nodes.values():
                for work in node._mailbox.take_pending():
                    node._mailbox.failed += 1
                    node._inflight.pop(work.reply, None)
                    if work.reply:
                        await self._reply(
                            work.reply, p.Failure(p.UNAVAILABLE, f"node {node.id!r} stopped")
                        )
            await self._cancel_tasks()
            # Replies our own nodes published to our own callers may still be in flight.
            with anyio.move_on_after(2.0):
                while self._awaiting_local_replies():
                    self._answered = anyio.Event()
                    await self._answered.wait()
        self._fail_routes(SystemStoppedError("the system stopped"))
        self._state = "stopped"
        with anyio.CancelScope(shield=True):
            try:
                await self._transport.stop()
            except Exception:
                log.warning("the transport failed to stop cleanly", exc_info=True)
        if not self._context_managed:
            await self._close_task_group()

    def _awaiting_local_replies(self) -> bool:
        return any(
            type(route) is Call
            and route.waiting
            and not route.abandoned
            and route.target in self._nodes
            for route in self._routes.values()
        )

    def _on_answered(self) -> None:
        if self._answered is not None:
            event, self._answered = self._answered, None
            event.set()

    async def _cancel_tasks(self) -> None:
        """Cancel every task the system spawned and wait until they have all ended."""
        self._cancelling = True
        while self._task_scopes:
            for scope in list(self._task_scopes):
                scope.cancel()
            if self._tasks_done is None:
                self._tasks_done = anyio.Event()
            await self._tasks_done.wait()

    async def _close_task_group(self) -> None:
        tg, self._tg = self._tg, None
        if tg is not None:
            await tg.__aexit__(None, None, None)

    def _resolve_transport(self, spec: Transport | str) -> Transport:
        if not isinstance(spec, str):
            return spec
        scheme = spec.split("://", 1)[0] if "://" in spec else spec
        if scheme in ("nats", "tls", "ws", "wss"):
            scheme = "nats"
        if not scheme.isidentifier():
            raise TransportError(f"cannot resolve transport URL {spec!r}")
        try:
            module = importlib.import_module(f"happen.transports.{scheme}")
        except ModuleNotFoundError:
            raise TransportError(
                f"no transport for {spec!r}: use 'memory' or 'nats://host:port'"
            ) from None
        transport: Transport = module.from_url(spec)
        return transport

    # ----- nodes --------------------------------------------------------------------

    def create_node(self, node_id: str) -> Node:
        """Create the node ``node_id`` (``InvalidIdError`` if malformed or already here)."""
        validate_node_id(node_id)
        if node_id in self._nodes:
            raise InvalidIdError(f"node {node_id!r} already exists in this system")
        if self._state in ("stopping", "stopped"):
            raise SystemStoppedError(f"cannot create node {node_id!r}: the system is stopped")
        node = Node(self, node_id, self._config.resolve(node_id))
        self._nodes[node_id] = node
        self._sync_subscriptions(node)
        return node

    def concurrency_for(self, node_id: str) -> ConcurrencySettings:
        """The concurrency settings that apply to ``node_id``."""
        return self._config.resolve(validate_node_id(node_id))

    def stats(self) -> dict[str, NodeStats]:
        """A snapshot of every node's stats, by node id."""
        return {node_id: node.stats() for node_id, node in self._nodes.items()}

    def _new_signal(self) -> Signal:
        return self._signal()

    def _spawn(self, fn: Any, *args: Any) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._run_task, fn, args)

    async def _run_task(self, fn: Any, args: tuple[Any, ...]) -> None:
        # Each task runs in its own scope, so stop() can cancel the system's tasks without
        # cancelling the code that entered the system's task group.
        scope = anyio.CancelScope()
        self._task_scopes.add(scope)
        if self._cancelling:
            scope.cancel()
        try:
            with scope:
                await fn(*args)
        finally:
            self._task_scopes.discard(scope)
            if not self._task_scopes and self._tasks_done is not None:
                event, self._tasks_done = self._tasks_done, None
                event.set()

    def _sync_subscriptions(self, node: Node) -> None:
        """Bring the node's subscriptions in line with its handlers, in the background."""
        self._dirty.add(node)
        if self._state == "running" and not self._syncing:
            self._syncing = True
            self._spawn(self._sync_dirty)

    async def _sync_dirty(self) -> None:
        try:
            while self._dirty and self._state == "running":
                await self._subscribe_node(self._dirty.pop())
        finally:
            self._syncing = False
            if self._settled is not None:
                event, self._settled = self._settled, None
                event.set()

    async def _settle(self) -> None:
        """Wait until every handler registered so far is subscribed."""
        while self._syncing:
            if self._settled is None:
                self._settled = anyio.Event()
            await self._settled.wait()

    async def _subscribe_node(self, node: Node) -> None:
        self._dirty.discard(node)
        transport = self._transport
        assert transport is not None
        if node._direct is None:
            node._cancels = await transport.subscribe(
                f"{self.namespace}.cancel.{node.id}", node._on_abandon
            )
            node._direct = await transport.subscribe(
                f"{self.namespace}.node.{node.id}", node._on_request, queue=node.id
            )
        wanted = node._handlers.subjects()
        for subject in wanted - node._subscriptions.keys():

            async def callback(msg: Message, subject: str = subject) -> None:
                await node._on_broadcast(msg, subject)

            node._subscriptions[subject] = await transport.subscribe(
                f"{self.namespace}.bcast.{subject}", callback
            )
        for subject in node._subscriptions.keys() - wanted:
            await node._subscriptions.pop(subject).unsubscribe()

    async def _unsubscribe_node(self, node: Node) -> None:
        subs = [node._direct, *node._subscriptions.values(), node._cancels]
        node._direct = node._cancels = None
        node._subscriptions.clear()
        for sub in subs:
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception:
                    log.debug("unsubscribe failed while stopping", exc_info=True)

    # ----- TransportListener --------------------------------------------------------

    def on_disconnected(self) -> None:
        self._fail_routes(TransportError("the connection to the transport was lost"))

    def on_reconnected(self) -> None:
        log.info("transport reconnected")

    def on_closed(self, error: BaseException | None) -> None:
        if self._state == "running":
            reason = f": {error}" if error else ""
            self._fail_routes(TransportError(f"the transport closed{reason}"))

    def on_dropped(self, subscription: Subscription, count: int) -> None:
        subject = subscription.subject
        prefix = f"{self.namespace}.node."
        if subject.startswith(prefix):
            node = self._nodes.get(subject[len(prefix) :])
            if node is not None:
                node._mailbox.dropped += count
                return
        bcast = f"{self.namespace}.bcast."
        if subject.startswith(bcast):
            suffix = subject[len(bcast) :]
            for node in self._nodes.values():
                if suffix in node._subscriptions:
                    node._mailbox.dropped += count
                    return
        log.warning("the transport dropped %d message(s) on %s", count, subject)
