"""The system: lifecycle only. It owns the configuration, resolves the transport, runs the
task group, starts and stops the nodes in order, and keeps the node registry."""

from __future__ import annotations

import importlib
import logging
import os
import socket
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TypeVar

import anyio
import msgspec

from happen._broadcast import LocalBroadcastStreams
from happen._calls import Caller
from happen._codec import make_codec
from happen._config import ConcurrencyConfig, ConcurrencySettings
from happen._delivery import DeadLetters, DeliveryConfig, DeliverySettings
from happen._durable import DurableLogs
from happen._errors import (
    InvalidConfigError,
    InvalidIdError,
    SystemStoppedError,
    TransportError,
)
from happen._events import IdGenerator
from happen._ids import validate_node_id
from happen._liveness import LivenessMonitor
from happen._mailbox import Mailbox, NodeStats
from happen._middleware import Middleware, MiddlewareStack
from happen._node import Node
from happen._observe import CallObserver
from happen._runtime import Runtime
from happen._state import StateStore
from happen._transport import Message, Subscription, Transport
from happen._wire import Wire

__all__ = ["System"]

log = logging.getLogger("happen")

M = TypeVar("M", bound=Middleware)


def _checked_transport(transport: object) -> Transport | str:
    if not isinstance(transport, str) and not isinstance(transport, Transport):
        raise InvalidConfigError(
            f"transport must be a URL or a happen.Transport, not {type(transport).__name__}"
        )
    return transport


def _checked_namespace(namespace: object) -> str:
    try:
        return validate_node_id(namespace)
    except (InvalidIdError, TypeError):
        raise InvalidConfigError(
            f"namespace {namespace!r} must be 1-128 ASCII letters, digits, '-' or '_'"
        ) from None


def _positive(name: str, value: object, kind: type) -> Any:
    if type(value) not in ((int, float) if kind is float else (int,)) or not value > 0:  # type: ignore[operator]
        raise InvalidConfigError(f"{name} must be a positive {kind.__name__}, not {value!r}")
    return value


class System:
    """A set of nodes sharing a transport: ``async with happen.System(...) as system``.

    Keyword arguments:

    - ``concurrency``: ``{"default": {...}, "patterns": {glob: {...}}}`` flow-control
      settings (see ``ConcurrencySettings``), validated here (``InvalidConfigError``).
    - ``delivery``: ``{"default": {...}, "patterns": {glob: {...}}}`` attempts and errors
      settings (``max_attempts``, ``backoff``, ``on_error``, ``dead_letter``, ...; see
      ``DeliverySettings``), resolved per node id like ``concurrency``.
    - ``transport``: a ``Transport`` or a URL, ``"memory"`` (the default when left out) or
      ``"nats://host:4222"``.
    - ``namespace``: prefix of every subject, isolating systems that share a NATS server
      (``"happen"`` when left out). Settings left out may be filled in before start with
      ``apply_defaults`` (the ``happen`` command does, from its options and environment).
    - ``codec``: ``"msgpack"`` (default) or ``"json"``.
    - ``max_depth``: nesting limit of decoded messages (default 64).
    - ``stream_window``: credit a stream consumer grants, in items (default 256).
    - ``stream_idle_timeout``: seconds a producer waits for credit before closing, and a
      streamed broadcast's subscriber waits for its next item or end (60).
    - ``worker_threads``: how many sync handlers may run at once in threads (40).
    - ``process_workers``: how many handlers registered with ``executor="process"`` may run
      at once, each in a worker process (default ``os.cpu_count()``).
    - ``drain_timeout``: seconds ``stop()`` lets in-flight handlers finish (10).
    - ``liveness_timeout``: seconds within which a call whose serving host died, froze or
      became unreachable ends with ``HostLostError``, even without a ``timeout`` (5). The
      system pings the hosts of calls silent for a quarter of it; a producer whose
      consumer's system stopped answering gives its slot back within it too.

    Every setting is validated here: a bad value raises ``InvalidConfigError`` naming it.

    Use it as an async context manager; ``stop()`` may also be awaited inside the
    ``async with`` block. Without ``async with``, ``start()`` and ``stop()`` must be awaited
    from the same task and cancel-scope level (the system's task group lives between them).
    """

    def __init__(
        self,
        *,
        concurrency: Mapping[str, Any] | None = None,
        delivery: Mapping[str, Any] | None = None,
        transport: Transport | str | None = None,
        namespace: str | None = None,
        codec: str = "msgpack",
        max_depth: int = 64,
        stream_window: int = 256,
        stream_idle_timeout: float = 60.0,
        worker_threads: int = 40,
        drain_timeout: float = 10.0,
        process_workers: int | None = None,
        liveness_timeout: float = 5.0,
    ) -> None:
        self._config = ConcurrencyConfig(
            dict(concurrency) if isinstance(concurrency, Mapping) else concurrency
        )
        self._delivery = DeliveryConfig(delivery)
        #: The settings left to their defaults in code (``apply_defaults`` may fill them).
        self._unset = {
            name
            for name, value in (("transport", transport), ("namespace", namespace))
            if value is None
        }
        transport = _checked_transport("memory" if transport is None else transport)
        namespace = _checked_namespace("happen" if namespace is None else namespace)
        self._codec = make_codec(codec, max_depth)
        self._window: int = _positive("stream_window", stream_window, int)
        self._idle_timeout: float = _positive("stream_idle_timeout", stream_idle_timeout, float)
        self._threads: int = _positive("worker_threads", worker_threads, int)
        self._drain_timeout: float = _positive("drain_timeout", drain_timeout, float)
        processes: int = (
            os.cpu_count() or 1
            if process_workers is None
            else _positive("process_workers", process_workers, int)
        )
        self._liveness_timeout: float = _positive("liveness_timeout", liveness_timeout, float)
        self._transport_spec = transport
        self._transport: Transport | None = None
        self.namespace = namespace
        self.id = os.urandom(8).hex()
        self._ids = IdGenerator()
        self._nodes: dict[str, Node] = {}
        self._mailboxes: dict[str, Mailbox[Any]] = {}
        self._listeners: dict[str, list[Mailbox[Any]]] = {}  # by broadcast event type
        self._runtime = Runtime(worker_threads=self._threads, process_workers=processes)
        self._wire = Wire(self._codec, namespace)
        self._broadcast_streams = LocalBroadcastStreams()
        self._middleware = MiddlewareStack()
        self._state = StateStore(
            codec=self._codec, namespace=namespace, transport=self._state_transport
        )
        self._durable = DurableLogs(
            namespace=namespace,
            settings_for=self._delivery.resolve,
            queue_limit_for=lambda node_id: self._config.resolve(node_id).queue_limit,
            any_durable=self._delivery.any_durable,
            transport=self._state_transport,
        )
        self._caller = Caller(
            wire=self._wire,
            runtime=self._runtime,
            ids=self._ids,
            system_id=self.id,
            window=self._window,
            local_mailbox=self._mailboxes.get,
            local_listeners=self._local_listeners,
            broadcast_streams=self._broadcast_streams,
            durable=self._durable,
        )
        self._dead_letters = DeadLetters(self._caller)
        self._liveness = LivenessMonitor(
            wire=self._wire,
            runtime=self._runtime,
            system_id=self.id,
            timeout=self._liveness_timeout,
        )
        self._context_managed = False
        self._stopped: anyio.Event | None = None

    def __repr__(self) -> str:
        return f"<happen.System {self.namespace!r} {self._runtime.state}>"

    def apply_defaults(
        self, *, transport: Transport | str | None = None, namespace: str | None = None
    ) -> None:
        """Fill in the settings this system was not given when it was made: each one given
        here replaces the built-in default (``"memory"``, ``"happen"``) unless the code that
        made the system set it. The ``happen`` command uses this, so settings not given in
        code come from its command line, then the environment.

        Raises ``RuntimeError`` once the system has started, and ``InvalidConfigError`` for
        a malformed setting.
        """
        if self._runtime.state != "new":
            raise RuntimeError(
                f"settings are fixed once a system starts; this one is {self._runtime.state}"
            )
        if transport is not None and "transport" in self._unset:
            self._transport_spec = _checked_transport(transport)
            self._unset.discard("transport")
        if namespace is not None and "namespace" in self._unset:
            self.namespace = _checked_namespace(namespace)
            self._wire.rename(self.namespace)
            self._state.rename(self.namespace)
            self._durable.rename(self.namespace)
            self._unset.discard("namespace")

    def settings_given(self) -> frozenset[str]:
        """Which of ``transport`` and ``namespace`` the code that made this system set (the
        others are defaults that ``apply_defaults`` may still fill)."""
        return frozenset({"transport", "namespace"} - self._unset)

    @property
    def bad_inputs(self) -> int:
        """Malformed frames this system received (all nodes together), and frames that break
        the protocol (a cancel without the call's secret, credit never earned): refused and
        counted."""
        return self._wire.bad_inputs

    @property
    def stray_frames(self) -> int:
        """Well-formed frames for a call or stream no longer here (late answers), counted."""
        return self._wire.stray_frames

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
        """Connect the transport and subscribe every node.

        Raises ``TransportError`` when the transport cannot start, and ``RuntimeError`` when
        the system was started before.
        """
        runtime = self._runtime
        if runtime.state != "new":
            raise RuntimeError(f"a system starts once; this one is {runtime.state}")
        transport = self._resolve_transport(self._transport_spec)
        runtime.state = "starting"
        self._stopped = anyio.Event()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        runtime.bind(tg)
        try:
            transport.set_listener(_ConnectionEvents(self._wire, self._nodes))
            await transport.start()
            self._transport = transport
            await self._wire.attach(transport)
            await transport.subscribe(f"{self.namespace}.stats", self._answer_stats)
            runtime.state = "running"
            runtime.accepting = True
            runtime.spawn(self._liveness.run)
            for node in list(self._nodes.values()):
                await node.subscribe(transport)
        except BaseException:
            runtime.state = "stopped"
            runtime.accepting = False
            self._stopped.set()
            with anyio.CancelScope(shield=True):
                await runtime.cancel_tasks()
            runtime.unbind()
            await tg.__aexit__(None, None, None)
            with anyio.CancelScope(shield=True):
                try:
                    await transport.stop()
                except Exception:
                    log.debug("stopping the transport after a failed start", exc_info=True)
            raise

    async def ready(self) -> None:
        """Return once every node and handler registered so far is reachable from other
        hosts: its subscriptions are live on the server."""
        runtime = self._runtime
        if runtime.state != "running":
            raise SystemStoppedError(f"the system is {runtime.state}, not running")
        await runtime.settled()
        await self._caller.round_trip()

    async def idle(self) -> None:
        """Return once no node of this system runs, queues or waits to retry an event (or
        to deliver its dead letter) and no call or stream of this system is open. Bound it
        with ``anyio.fail_after`` when it may never be."""
        while True:
            for mailbox in list(self._mailboxes.values()):
                await mailbox.wait_drained()
            if not self._wire.routes and all(mailbox.idle for mailbox in self._mailboxes.values()):
                return
            await anyio.sleep(0.005)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop: refuse new events, let in-flight handlers finish, then cancel the rest.

        Handlers get ``timeout`` seconds (default: the ``drain_timeout`` setting) to finish;
        queued events still waiting then fail with ``unavailable``, running handlers are
        cancelled, and every open stream and pending call of this system fails.

        A second call returns once the system has stopped. Called from inside one of this
        system's handlers, it starts stopping and returns at once, so that the handler can
        finish within the drain.
        """
        runtime = self._runtime
        stopped = self._stopped
        if runtime.state in ("new",) or stopped is None:
            return
        if runtime.state != "running":
            await stopped.wait()
            if not self._context_managed and not runtime.inside_task():
                await self._close_task_group()
            return
        runtime.state = "stopping"
        runtime.accepting = False
        if runtime.inside_task():
            runtime.start_outside(self._stop, timeout)
            return
        await self._stop(timeout)
        if not self._context_managed:
            await self._close_task_group()

    async def _stop(self, timeout: float | None) -> None:
        runtime = self._runtime
        transport = self._transport
        assert transport is not None and self._stopped is not None
        nodes = list(self._nodes.values())
        with anyio.CancelScope(shield=True):
            for node in nodes:
                await node.hand_over_keys()
            for node in nodes:
                await node.unsubscribe()
            with anyio.move_on_after(self._drain_timeout if timeout is None else timeout):
                for mailbox in list(self._mailboxes.values()):
                    await mailbox.wait_drained()
            for node in nodes:
                await node.fail_pending()
            for node in nodes:
                await node.release_keys()
            await runtime.cancel_tasks()
            runtime.processes.shutdown()
            for node in nodes:
                await node.close()
            # Replies our own nodes published to our own callers may still be in flight.
            with anyio.move_on_after(2.0):
                await self._caller.wait_answers(self._nodes)
            self._wire.fail_routes(SystemStoppedError("the system stopped"))
            runtime.state = "stopped"
            try:
                await transport.stop()
            except Exception:
                log.warning("the transport failed to stop cleanly", exc_info=True)
            self._stopped.set()

    async def _close_task_group(self) -> None:
        tg = self._runtime.unbind()
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
        if self._runtime.state in ("stopping", "stopped"):
            raise SystemStoppedError(f"cannot create node {node_id!r}: the system is stopped")
        mailbox: Mailbox[Any] = Mailbox(
            self._config.resolve(node_id), self._runtime.spawn, self._runtime.new_signal
        )
        node = Node(
            node_id,
            mailbox,
            system_id=self.id,
            wire=self._wire,
            caller=self._caller,
            runtime=self._runtime,
            ids=self._ids,
            broadcast_streams=self._broadcast_streams,
            idle_timeout=self._idle_timeout,
            handlers_changed=self._handlers_changed,
            state=self._state,
            middleware=MiddlewareStack(self._middleware),
            liveness_timeout=self._liveness_timeout,
            delivery=self._delivery.resolve(node_id),
            dead_letters=self._dead_letters,
            durable=self._durable if self._durable.durable(node_id) else None,
        )
        self._nodes[node_id] = node
        self._mailboxes[node_id] = mailbox
        node.sync_subscriptions()
        return node

    def use(self, middleware: M) -> M:
        """Run ``middleware`` around every handler execution of every node of this system,
        nodes created later included; returns it unchanged (``@system.use`` works too).

        ``async def middleware(event, context, call_next)``, as for ``Node.use``. System
        middleware wraps node middleware; each list runs in registration order, the first
        registered outermost. Raises ``TypeError`` for anything but an async function.
        """
        self._middleware.add(middleware)
        return middleware

    def observe_calls(self, observer: CallObserver | None) -> None:
        """Tell ``observer`` of every ``send``, ``stream`` and ``broadcast`` this system's
        nodes make, from start to end (``None`` removes it). ``happen.otel`` uses this for
        its client spans; see ``happen.CallObserver``.

        Raises ``RuntimeError`` when another observer is set already.
        """
        current = self._caller.observer
        if observer is not None and current is not None and current is not observer:
            raise RuntimeError(
                "this system has a call observer already: remove it with observe_calls(None) first"
            )
        self._caller.observer = observer

    def concurrency_for(self, node_id: str) -> ConcurrencySettings:
        """The concurrency settings that apply to ``node_id``."""
        return self._config.resolve(validate_node_id(node_id))

    def delivery_for(self, node_id: str) -> DeliverySettings:
        """The delivery settings (attempts, backoff, errors, dead letters) that apply to
        ``node_id``. Raises ``InvalidIdError`` for a malformed id."""
        return self._delivery.resolve(validate_node_id(node_id))

    def stats(self) -> dict[str, NodeStats]:
        """A snapshot of every node's stats, by node id."""
        return {node_id: node.stats() for node_id, node in self._nodes.items()}

    async def _answer_stats(self, msg: Message) -> None:
        """Answer a stats query (``happen stats``): this system's nodes and their counters,
        as JSON, whatever the codec (documented in docs/PROTOCOL.md)."""
        if not msg.reply or self._transport is None:
            return
        report = {
            "system": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "nodes": {
                node_id: msgspec.structs.asdict(stats) for node_id, stats in self.stats().items()
            },
        }
        try:
            await self._transport.publish(msg.reply, msgspec.json.encode(report))
        except Exception as exc:  # too many nodes for one frame, or the connection is gone
            log.warning("could not answer a stats query: %s", exc)

    def _state_transport(self) -> Transport:
        """The transport node state uses: there while the system runs or drains."""
        state = self._runtime.state
        if self._transport is None or state not in ("running", "stopping"):
            raise SystemStoppedError(
                f"the system is {state}: node state needs a running system "
                "(async with happen.System() as system: ...)"
            )
        return self._transport

    def _local_listeners(self, event_type: str) -> list[Mailbox[Any]]:
        listeners = self._listeners.get(event_type)
        if listeners is None:
            if len(self._listeners) > 4096:
                self._listeners.clear()
            listeners = self._listeners[event_type] = [
                self._mailboxes[node_id]
                for node_id, node in self._nodes.items()
                if node.hears(event_type)
            ]
        return listeners

    def _handlers_changed(self) -> None:
        self._listeners.clear()


class _ConnectionEvents:
    """What the transport reports about its connection, applied to the system's wire and
    nodes (the transport's listener)."""

    def __init__(self, wire: Wire, nodes: Mapping[str, Node]) -> None:
        self._wire = wire
        self._nodes = nodes

    def on_disconnected(self) -> None:
        self._wire.fail_routes(TransportError("the connection to the transport was lost"))

    def on_reconnected(self) -> None:
        log.info("transport reconnected")

    def on_closed(self, error: BaseException | None) -> None:
        if error is not None or self._wire.routes:
            reason = f": {error}" if error else ""
            self._wire.fail_routes(TransportError(f"the transport closed{reason}"))

    def on_dropped(self, subscription: Subscription, count: int) -> None:
        for node in self._nodes.values():
            if node.owns(subscription):
                node.count_dropped(count)
                return
        log.warning("the transport dropped %d message(s) on %s", count, subscription.subject)
