"""Durable delivery: the logs that keep the events of durable nodes, and a node's intake.

Every durable node has a log of its own, ``happen_{namespace}_node_{node_id}`` (work-queue
retention: an event is kept until an instance of the node settles it, however long none
runs), bounded by the node's ``queue_limit`` and deduplicating event ids within its
``dedup_window``. Unkeyed events are stored under the log subject ``events``; its instances
share one consumer of it, named after the node, and fetch only as many events as they have
free slots. A keyed event is stored under ``keyed.<p>``, ``p`` its key's partition
(``happen._keys``), read by the consumer ``<node_id>_k<p>``: only the instance that owns the
partition (``happen._partitions``) fetches from it, so a key's events reach one instance at a
time, in log order. Broadcasts heard durably go to one namespace log,
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
from happen._keys import PARTITIONS, partition_of
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
    "KEYED",
    "REPLY_HEADER",
    "DurableLogs",
    "Intake",
    "Receipt",
    "broadcast_log_name",
    "keyed_subject",
    "node_log_name",
    "partition_consumer_name",
]

log = logging.getLogger("happen")

#: The header of a stored request that names the caller's reply subject.
REPLY_HEADER = "Happen-Reply"
#: The log subject of a node log's events.
EVENTS = "events"
#: The log subject prefix of keyed events (followed by the key's partition).
KEYED = "keyed"
#: The log subject prefix of stored broadcasts (followed by the event type).
BROADCASTS = "bcast"
#: Longest a fetch waits for an event before it checks again (and before a stopping
#: instance has let go of its consumer).
FETCH_WAIT = 0.25
#: Longest a fetch of a key partition waits: a partition's fetches wait longer each time
#: they come back empty (FETCH_WAIT, doubled up to this), so that idle partitions cost few
#: requests. A new event is delivered at once either way.
PARTITION_FETCH_WAIT = 1.0
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


def keyed_subject(partition: int) -> str:
    """The log subject of the keyed events of ``partition``."""
    return f"{KEYED}.{partition}"


def partition_consumer_name(node_id: str, partition: int) -> str:
    """The consumer of the keyed events of ``partition`` in ``node_id``'s log."""
    return f"{node_id}_k{partition}"


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
        self._keyed: set[str] = set()  # nodes this process stored keyed events for
        self._by_node: dict[str, DurableLog] = {}  # node id -> its log, once opened

    def rename(self, namespace: str) -> None:
        """Use the logs of ``namespace`` (before the system starts)."""
        self.namespace = namespace
        self._by_node.clear()

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
        self,
        node_id: str,
        data: bytes,
        *,
        msg_id: str,
        reply: str | None = None,
        key: str | None = None,
    ) -> Receipt:
        """Store a request for the durable node ``node_id`` (under its key's partition when
        ``key`` is given).

        Raises ``QueueFullError`` when its log holds ``queue_limit`` events (nothing was
        stored), and what the log's ``append`` raises.
        """
        node_log = self._by_node.get(node_id)
        if node_log is None:
            node_log = self._by_node[node_id] = await self.node_log(node_id)
        headers = {REPLY_HEADER: reply} if reply else None
        subject = EVENTS if key is None else keyed_subject(partition_of(key))
        try:
            appended = await node_log.append(subject, data, msg_id=msg_id, headers=headers)
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

    def first_keyed(self, node_id: str) -> bool:
        """True the first time this process stores a keyed event for ``node_id`` (the
        caller then tells its running instances, so that they take part in its key
        partitions; an instance that starts later finds the keyed events in the log)."""
        if node_id in self._keyed:
            return False
        if len(self._keyed) > 4096:
            self._keyed.clear()
        self._keyed.add(node_id)
        return True

    async def keyed_stored(self, node_id: str) -> int:
        """How many keyed events ``node_id``'s log holds (of every partition)."""
        return await (await self.node_log(node_id)).stored(f"{KEYED}.>")

    async def consumers(self, node_id: str) -> tuple[LogConsumer, LogConsumer]:
        """The consumers an instance of ``node_id`` reads: its unkeyed events, its
        broadcasts."""
        settings = ConsumerSettings(subjects=(EVENTS,), ack_wait=self._ack_wait(node_id))
        events = await (await self.node_log(node_id)).consumer(node_id, settings)
        settings = ConsumerSettings(ack_wait=self._ack_wait(node_id))
        broadcasts = await (await self.broadcast_log()).consumer(node_id, settings)
        return events, broadcasts

    async def partition_consumer(self, node_id: str, partition: int) -> LogConsumer:
        """The consumer of the keyed events of ``partition`` in ``node_id``'s log."""
        settings = ConsumerSettings(
            subjects=(keyed_subject(partition),), ack_wait=self._ack_wait(node_id)
        )
        node_log = await self.node_log(node_id)
        return await node_log.consumer(partition_consumer_name(node_id, partition), settings)

    def _ack_wait(self, node_id: str) -> float:
        return self._settings_for(node_id).ack_wait


class Slots(Protocol):
    """The free capacity an intake fetches for (the node's mailbox)."""

    def free_slots(self) -> int: ...

    async def wait_free_slot(self) -> None: ...


class Partitions(Protocol):
    """Which key partitions this instance may fetch (``happen._partitions.KeyRouter``): the
    ones it owns and has opened. ``fetch_stopped(p)`` is told once no fetch of ``p`` is in
    flight any more, after ``may_fetch(p)`` turned false (or the intake stopped)."""

    def may_fetch(self, partition: int) -> bool: ...

    def fetch_stopped(self, partition: int) -> None: ...


class _Loop:
    """One fetch loop: its scope, and the waits that a stop (or, for a key partition, the
    partition leaving this instance) may cut short."""

    __slots__ = ("fetch", "idle", "scope")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.idle: anyio.CancelScope | None = None  # waiting for a slot, or after a failure
        self.fetch: anyio.CancelScope | None = None  # a fetch that may be cancelled

    def wake(self, *, fetch: bool) -> None:
        if self.idle is not None:
            self.idle.cancel()
        if fetch and self.fetch is not None:
            self.fetch.cancel()


class Intake:
    """One instance's intake of a durable node: fetches events (and stored broadcasts) only
    while it has free slots, and keeps the ones it holds from being redelivered.

    Three kinds of fetch loop: unkeyed events, stored broadcasts, and one per key partition
    this instance may fetch (``partitions``; ``partitions_changed()`` starts and stops
    them). Each asks for as many events as there are free slots; when several get events at
    once, the ones beyond the free slots wait in the node's queue.

    ``admit(delivery, broadcast)`` hands each delivery to the node; ``held()`` gives the
    deliveries the instance holds (queued, running, or waiting for a retry), which are told
    ``in_progress`` every third of ``ack_wait``; ``backlog(n)`` is told how many events the
    node's log holds (its unkeyed events not yet settled, and its keyed events once this
    instance reads key partitions).
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
        partitions: Partitions | None = None,
    ) -> None:
        self.node_id = node_id
        self._logs = logs
        self._slots = slots
        self._admit = admit
        self._held = held
        self._backlog = backlog
        self._spawn = spawn
        self._partitions = partitions
        self._consumers: tuple[LogConsumer, ...] = ()
        self._loops: list[_Loop] = []  # the unkeyed and broadcast loops
        self._keyed: dict[int, _Loop] = {}  # partition -> its loop
        self._keyed_consumers: dict[int, LogConsumer] = {}
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
        self.partitions_changed()

    def fetching(self, partition: int) -> bool:
        """Whether a fetch loop of ``partition`` still runs here."""
        return partition in self._keyed

    def partitions_changed(self) -> None:
        """The partitions this instance may fetch changed: start the loops of the new ones,
        and wake those of the ones it lost (they end after the fetch in flight)."""
        gate = self._partitions
        if gate is None or not self._consumers or self._stopping:
            return
        cancellable = self._consumers[0].fetch_cancellable
        for partition in range(PARTITIONS):
            loop = self._keyed.get(partition)
            if gate.may_fetch(partition):
                if loop is None:
                    loop = self._keyed[partition] = _Loop()
                    self._running += 1
                    self._spawn(self._partition_loop, partition, loop)
            elif loop is not None:
                loop.wake(fetch=cancellable)

    async def stop(self) -> None:
        """Stop fetching: fetches in flight end (their events are admitted, to be handed
        back by the node), then the consumers are closed."""
        if not self._consumers or self._stopping:
            return
        self._stopping = True
        loops = [*self._loops, *self._keyed.values()]
        cancellable = all(consumer.fetch_cancellable for consumer in self._consumers)
        for loop in loops:
            # (a fetch in flight that cannot be cancelled is let finish: what it got is
            # handed back)
            loop.wake(fetch=cancellable)
        with anyio.move_on_after(PARTITION_FETCH_WAIT + FETCH_WAIT * 4):
            assert self._stopped is not None
            await self._stopped.wait()
        for loop in [*self._loops, *self._keyed.values()]:
            loop.scope.cancel()
        for consumer in [*self._consumers, *self._keyed_consumers.values()]:
            try:
                await consumer.close()
            except Exception:
                log.debug("closing a consumer of node %r failed", self.node_id, exc_info=True)

    async def _fetch_loop(self, consumer: LogConsumer, broadcast: bool) -> None:
        loop = _Loop()
        self._loops.append(loop)
        try:
            with loop.scope:
                while not self._stopping:
                    deliveries = await self._fetch(consumer, loop, FETCH_WAIT)
                    for delivery in deliveries:
                        await self._admit(delivery, broadcast)
        finally:
            self._loop_ended()

    async def _partition_loop(self, partition: int, loop: _Loop) -> None:
        gate = self._partitions
        assert gate is not None
        wait = FETCH_WAIT
        try:
            with loop.scope:
                while not self._stopping and gate.may_fetch(partition):
                    consumer = self._keyed_consumers.get(partition)
                    if consumer is None:
                        try:
                            consumer = await self._logs.partition_consumer(self.node_id, partition)
                        except TransportError as exc:
                            log.warning(
                                "node %r could not open the consumer of key partition %d: %s",
                                self.node_id,
                                partition,
                                exc,
                            )
                            await self._pause(anyio.sleep(RETRY_WAIT), loop)
                            continue
                        self._keyed_consumers[partition] = consumer
                    deliveries = await self._fetch(consumer, loop, wait)
                    for delivery in deliveries:
                        await self._admit(delivery, False)
                    wait = FETCH_WAIT if deliveries else min(wait * 2, PARTITION_FETCH_WAIT)
        finally:
            del self._keyed[partition]
            self._loop_ended()
            gate.fetch_stopped(partition)
            if not self._stopping and gate.may_fetch(partition):
                self.partitions_changed()  # it came back meanwhile

    async def _fetch(self, consumer: LogConsumer, loop: _Loop, wait: float) -> list[Delivery]:
        """One fetch of as many events as there are free slots (``[]`` when there are none
        yet, or the transport failed: after a pause)."""
        slots = self._slots
        free = slots.free_slots()
        if free < 1:
            await self._pause(slots.wait_free_slot(), loop)
            return []
        try:
            if not consumer.fetch_cancellable:
                return await consumer.fetch(free, timeout=wait)
            with anyio.CancelScope() as scope:
                loop.fetch = scope
                try:
                    return await consumer.fetch(free, timeout=wait)
                finally:
                    loop.fetch = None
            return []
        except TransportError as exc:
            log.warning("node %r could not fetch its durable events: %s", self.node_id, exc)
            await self._pause(anyio.sleep(RETRY_WAIT), loop)
            return []

    async def _pause(self, wait: Awaitable[None], loop: _Loop) -> None:
        """Wait for ``wait``, unless the intake stops (or the loop is woken) meanwhile."""
        with anyio.CancelScope() as idle:
            loop.idle = idle
            try:
                await wait
            finally:
                loop.idle = None

    def _loop_ended(self) -> None:
        self._running -= 1
        if self._running == 0 and self._stopping and self._stopped is not None:
            self._stopped.set()

    async def _keep_alive(self, events: LogConsumer) -> None:
        """Every third of ``ack_wait``: tell the log the held events are still being worked
        on, and read how many the node's log holds."""
        ack_wait = self._logs.settings(self.node_id).ack_wait
        period = ack_wait / 3 if math.isfinite(ack_wait) else 1.0
        loop = _Loop()
        self._loops.append(loop)
        with loop.scope:
            while not self._stopping:
                for delivery in self._held():
                    try:
                        await delivery.in_progress()
                    except TransportError as exc:
                        log.debug("in_progress for node %r failed: %s", self.node_id, exc)
                try:
                    backlog = await events.pending()
                    if self._keyed:  # (the partitions' events: one request for all)
                        backlog += await self._logs.keyed_stored(self.node_id)
                    self._backlog(backlog)
                except TransportError as exc:
                    log.debug("reading node %r's backlog failed: %s", self.node_id, exc)
                await anyio.sleep(period)
