"""Durable delivery: the logs that keep the events of durable nodes, and a node's intake.

Every durable node has a log of its own, ``happen_{namespace}_node_{node_id}`` (work-queue
retention: an event is kept until an instance of the node settles it, however long none
runs), bounded by the node's ``queue_limit`` and deduplicating event ids within its
``dedup_window``. Its instances share one consumer, named after the node, and fetch only as
many events as they have free slots. Broadcasts heard durably go to one namespace log,
``happen_{namespace}_broadcasts`` (interest retention: kept until every durable node's
consumer settled its copy), read by a consumer per durable node.

A request stored in a log is the frame a caller would publish (``Request``), its reply
subject in the ``Happen-Reply`` header (none for ``enqueue``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
import msgspec

from happen._errors import QueueFullError, TransportError
from happen._transport import (
    ConsumerSettings,
    Delivery,
    DurableLog,
    LogConsumer,
    LogFullError,
    LogSettings,
    Retention,
    Transport,
    durable_transport,
)

__all__ = [
    "BROADCASTS",
    "EVENTS",
    "REPLY_HEADER",
    "DurableLogs",
    "Intake",
    "Receipt",
    "broadcast_log_name",
    "node_log_name",
]

log = logging.getLogger("happen")

#: The header of a stored request that names the caller's reply subject.
REPLY_HEADER = "Happen-Reply"
#: The log subject of a node log's events.
EVENTS = "events"
#: The log subject prefix of stored broadcasts (followed by the event type).
BROADCASTS = "bcast"
#: Longest a fetch waits for an event before it checks again (and before a stopping
#: instance has let go of its consumer).
FETCH_WAIT = 0.25
#: Longest an instance waits before fetching again after the transport failed a fetch.
RETRY_WAIT = 1.0


class Receipt(msgspec.Struct, frozen=True):
    """What ``enqueue`` did: the event's sequence in its node's log, and whether its id was
    already stored within the node's ``dedup_window`` (``duplicate``: nothing new was stored,
    and ``seq`` is the first copy's)."""

    seq: int
    duplicate: bool


class DurableSettings(Protocol):
    """The delivery settings durable logs read (``happen.DeliverySettings`` has them)."""

    @property
    def durable(self) -> bool: ...

    @property
    def ack_wait(self) -> float: ...

    @property
    def dedup_window(self) -> float: ...


def node_log_name(namespace: str, node_id: str) -> str:
    """The log of a durable node's events."""
    return f"happen_{namespace}_node_{node_id}"


def broadcast_log_name(namespace: str) -> str:
    """The log of the broadcasts durable nodes hear."""
    return f"happen_{namespace}_broadcasts"


class DurableLogs:
    """A system's access to its namespace's durable logs, opened on first use.

    ``settings_for(node_id)`` gives a node's delivery settings, ``queue_limit_for(node_id)``
    the queue limit that bounds its log; ``any_durable`` says whether the namespace has
    durable nodes at all (then every broadcast is stored too); ``transport()`` the running
    transport.
    """

    def __init__(
        self,
        *,
        namespace: str,
        settings_for: Callable[[str], DurableSettings],
        queue_limit_for: Callable[[str], int],
        any_durable: bool,
        transport: Callable[[], Transport],
    ) -> None:
        self.namespace = namespace
        self._settings_for = settings_for
        self._queue_limit_for = queue_limit_for
        self.any_durable = any_durable
        self._transport = transport
        self._durable: dict[str, bool] = {}
        self._logs: dict[str, DurableLog] = {}
        self._opening: dict[str, anyio.Lock] = {}

    def rename(self, namespace: str) -> None:
        """Use the logs of ``namespace`` (before the system starts)."""
        self.namespace = namespace

    def durable(self, node_id: str) -> bool:
        """Whether ``node_id`` is a durable node (by the namespace's delivery config)."""
        durable = self._durable.get(node_id)
        if durable is None:
            if len(self._durable) > 4096:
                self._durable.clear()
            durable = self._durable[node_id] = bool(self._settings_for(node_id).durable)
        return durable

    def settings(self, node_id: str) -> DurableSettings:
        return self._settings_for(node_id)

    async def node_log(self, node_id: str) -> DurableLog:
        """The log of the durable node ``node_id``, opened (and made) on first use."""
        name = node_log_name(self.namespace, node_id)
        found = self._logs.get(name)
        if found is not None:
            return found
        limit = max(1, self._queue_limit_for(node_id))
        settings = LogSettings(
            retention=Retention.WORK_QUEUE,
            max_msgs=limit,
            dedup_window=self._settings_for(node_id).dedup_window,
        )
        return await self._open(name, settings)

    async def broadcast_log(self) -> DurableLog:
        """The log of stored broadcasts, opened (and made) on first use."""
        name = broadcast_log_name(self.namespace)
        found = self._logs.get(name)
        if found is not None:
            return found
        return await self._open(name, LogSettings(retention=Retention.INTEREST))

    async def _open(self, name: str, settings: LogSettings) -> DurableLog:
        lock = self._opening.setdefault(name, anyio.Lock())
        async with lock:
            found = self._logs.get(name)
            if found is None:
                transport = durable_transport(self._transport())
                found = self._logs[name] = await transport.durable_log(name, settings)
        return found

    async def append(
        self, node_id: str, data: bytes, *, msg_id: str, reply: str | None = None
    ) -> Receipt:
        """Store a request for the durable node ``node_id``.

        Raises ``QueueFullError`` when its log holds ``queue_limit`` events (nothing was
        stored), and what the log's ``append`` raises.
        """
        node_log = await self.node_log(node_id)
        headers = {REPLY_HEADER: reply} if reply else None
        try:
            appended = await node_log.append(EVENTS, data, msg_id=msg_id, headers=headers)
        except LogFullError as exc:
            raise QueueFullError(
                f"durable node {node_id!r} stores {exc.limit} events (its queue_limit): "
                f"nothing was stored",
                node_id=node_id,
                queued=exc.limit,
            ) from None
        return Receipt(appended.seq, appended.duplicate)

    async def append_broadcast(self, event_type: str, data: bytes, *, msg_id: str) -> None:
        """Store a broadcast for every durable node's consumer."""
        broadcasts = await self.broadcast_log()
        await broadcasts.append(f"{BROADCASTS}.{event_type}", data, msg_id=msg_id)

    async def consumers(self, node_id: str) -> tuple[LogConsumer, LogConsumer]:
        """The consumers an instance of ``node_id`` reads: its events, its broadcasts."""
        ack_wait = self._settings_for(node_id).ack_wait
        settings = ConsumerSettings(ack_wait=ack_wait)
        events = await (await self.node_log(node_id)).consumer(node_id, settings)
        broadcasts = await (await self.broadcast_log()).consumer(node_id, settings)
        return events, broadcasts


class Slots(Protocol):
    """The free capacity an intake fetches for (the node's mailbox)."""

    def free_slots(self) -> int: ...

    async def wait_free_slot(self) -> None: ...


class Intake:
    """One instance's intake of a durable node: fetches events (and stored broadcasts) only
    while it has free slots, and keeps the ones it holds from being redelivered.

    The two consumers are read by two fetch loops, each asking for as many events as there
    are free slots; when both get events at once, the ones beyond the free slots wait in the
    node's queue (so an instance holds at most twice ``max_concurrent`` durable events).

    ``admit(delivery, broadcast)`` hands each delivery to the node; ``held()`` gives the
    deliveries the instance holds (queued, running, or waiting for a retry), which are told
    ``in_progress`` every third of ``ack_wait``; ``backlog(n)`` is told how many events the
    node's log holds for it.
    """

    def __init__(
        self,
        *,
        node_id: str,
        logs: DurableLogs,
        slots: Slots,
        admit: Callable[[Delivery, bool], Awaitable[None]],
        held: Callable[[], list[Delivery]],
        backlog: Callable[[int], None],
        spawn: Callable[..., None],
    ) -> None:
        self.node_id = node_id
        self._logs = logs
        self._slots = slots
        self._admit = admit
        self._held = held
        self._backlog = backlog
        self._spawn = spawn
        self._consumers: tuple[LogConsumer, ...] = ()
        self._scopes: list[anyio.CancelScope] = []
        self._idle: set[anyio.CancelScope] = set()  # waits a stop may cut short
        self._stopping = False
        self._running = 0  # fetch loops still running
        self._stopped: anyio.Event | None = None

    async def start(self) -> None:
        """Open the consumers (made on first use) and start fetching."""
        if self._consumers:
            return
        self._consumers = await self._logs.consumers(self.node_id)
        self._stopped = anyio.Event()
        events, broadcasts = self._consumers
        self._running = 2
        self._spawn(self._fetch_loop, events, False)
        self._spawn(self._fetch_loop, broadcasts, True)
        self._spawn(self._keep_alive, events)

    async def stop(self) -> None:
        """Stop fetching: fetches in flight end (their events are admitted, to be handed
        back by the node), then the consumers are closed."""
        if not self._consumers or self._stopping:
            return
        self._stopping = True
        if all(consumer.fetch_cancellable for consumer in self._consumers):
            for scope in self._scopes:
                scope.cancel()
        for idle in self._idle:
            idle.cancel()  # (a fetch in flight is let finish: what it got is handed back)
        with anyio.move_on_after(FETCH_WAIT * 4):
            assert self._stopped is not None
            await self._stopped.wait()
        for scope in self._scopes:
            scope.cancel()
        for consumer in self._consumers:
            try:
                await consumer.close()
            except Exception:
                log.debug("closing a consumer of node %r failed", self.node_id, exc_info=True)

    async def _fetch_loop(self, consumer: LogConsumer, broadcast: bool) -> None:
        slots = self._slots
        scope = anyio.CancelScope()
        self._scopes.append(scope)
        with scope:
            try:
                while not self._stopping:
                    free = slots.free_slots()
                    if free < 1:
                        await self._pause(slots.wait_free_slot())
                        continue
                    try:
                        deliveries = await consumer.fetch(free, timeout=FETCH_WAIT)
                    except TransportError as exc:
                        log.warning(
                            "node %r could not fetch its durable events: %s", self.node_id, exc
                        )
                        await self._pause(anyio.sleep(RETRY_WAIT))
                        continue
                    for delivery in deliveries:
                        await self._admit(delivery, broadcast)
            finally:
                self._running -= 1
                if self._running == 0 and self._stopped is not None:
                    self._stopped.set()

    async def _pause(self, wait: Awaitable[None]) -> None:
        """Wait for ``wait``, unless the intake stops meanwhile."""
        with anyio.CancelScope() as idle:
            self._idle.add(idle)
            try:
                await wait
            finally:
                self._idle.discard(idle)

    async def _keep_alive(self, events: LogConsumer) -> None:
        """Every third of ``ack_wait``: tell the log the held events are still being worked
        on, and read how many the node's log holds."""
        ack_wait = self._logs.settings(self.node_id).ack_wait
        period = ack_wait / 3
        scope = anyio.CancelScope()
        self._scopes.append(scope)
        with scope:
            while not self._stopping:
                for delivery in self._held():
                    try:
                        await delivery.in_progress()
                    except TransportError as exc:
                        log.debug("in_progress for node %r failed: %s", self.node_id, exc)
                try:
                    self._backlog(await events.pending())
                except TransportError as exc:
                    log.debug("reading node %r's backlog failed: %s", self.node_id, exc)
                await anyio.sleep(period if math.isfinite(period) else 1.0)
