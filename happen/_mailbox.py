"""A node's mailbox: the concurrency cap, the bounded queue, pressure, and exact counts."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import anyio
import msgspec

from happen._config import ConcurrencySettings
from happen._keys import Entry, Keyed, KeyTable

__all__ = ["Mailbox", "NodeStats"]

Item = TypeVar("Item", bound=Keyed)


async def _unbound(item: Any, scope: anyio.CancelScope) -> None:
    raise RuntimeError("this mailbox serves nothing yet")


async def _nothing() -> None:
    pass


def _due_time(entry: tuple[float, int, Any]) -> tuple[float, int]:
    return entry[0], entry[1]


class NodeStats(msgspec.Struct, frozen=True):
    """A snapshot of a node's flow control and counts, on this instance.

    ``accepted + rejected + dropped + forwarded`` is every event that reached this
    instance; ``completed + failed + dead_lettered`` equals ``accepted`` once the node is
    idle (an event is accepted once, however many times it runs, and has one outcome).
    ``forwarded`` counts requests this instance passed on, its queue full, to a twin
    instance of the node (on another host) that had room: the twin counts them again as
    they reach it.

    Attempts and errors (``System(delivery=...)``): ``retried`` counts executions after
    the first that the retry policy scheduled; ``redelivered`` counts deliveries of a
    durable node's events after a crash or an expired ``ack_wait``; ``dead_lettered``
    counts events that failed for good and whose dead letter was delivered (an outcome of
    its own, not counted in ``failed``); ``suppressed`` counts events completed with
    ``None`` by ``on_error="suppress"`` (they count in ``completed`` too). ``retrying`` is
    how many events wait to run again now (holding no slot and no queue place), and
    ``dead_letters_pending`` how many wait for their dead letter to be delivered.

    Node state (``node.state``, and views this node made with ``node.view``):
    ``state_reads`` counts reads of the state bucket (each ``get``, and each read an
    ``update`` makes: none when this system wrote or read the name recently, one more after
    each wait between its attempts);
    ``state_writes`` counts ``put``, ``delete`` and ``update`` calls that succeeded;
    ``state_conflicts`` counts compare-and-sets that were refused (each ``StateConflict``
    raised, and each refused attempt an ``update`` retried).

    Per-key order (``key=`` on ``send``, ``stream`` and ``enqueue``): ``keys_active`` is how
    many keys are held by an event that has a slot (running, or about to) or has started
    (waiting between attempts, or for its dead letter to be delivered), not by one waiting
    for a slot; ``keyed_waiting`` how many keyed events
    wait for their key: behind an earlier event of the key (these are part of ``queued`` and
    hold no slot), or, not admitted yet, for their key's partition to come to this instance
    or to have a live owner again (during a handover or after a crash: counted in
    ``accepted`` or ``forwarded`` once they go on).
    """

    active: int
    queued: int
    max_concurrent: int
    queue_limit: int
    under_pressure: bool
    accepted: int
    completed: int
    failed: int
    rejected: int
    dropped: int
    forwarded: int = 0
    state_reads: int = 0
    state_writes: int = 0
    state_conflicts: int = 0
    retried: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    suppressed: int = 0
    retrying: int = 0
    dead_letters_pending: int = 0
    handed_back: int = 0
    backlog: int = 0
    keys_active: int = 0
    keyed_waiting: int = 0


class Mailbox(Generic[Item]):
    """Runs at most ``max_concurrent`` items at once; queues up to ``queue_limit`` more.

    An admitted item takes a slot (``active``) and waits in ``_ready`` for a worker. Workers
    are spawned on demand (up to the cap) and then stay, idle, until the system stops. At
    most one wake-up is in flight at a time: a worker that starts while more items are ready
    wakes the next one, so a burst is served without a task switch per item while handlers
    that wait on I/O still spread over the workers. ``run`` must not raise (except
    cancellation): it counts its own outcome.

    Keyed items (``item.key`` set) run one at a time per key, in arrival order: an item
    whose key is held waits in its key's queue (counted in ``queued``, without a slot) until
    the holder's final outcome; a free slot goes to the oldest queued item whose key is
    free (by priority first under the ``priority`` strategy). ``keys`` is the key table. An
    item keeps its key while it waits to run again (``later``) and past a run that
    ``keep_key`` marked, until ``release_key``.
    """

    def __init__(
        self,
        settings: ConcurrencySettings,
        spawn: Callable[..., None],
        signal: Callable[[], Any] = anyio.Event,
    ) -> None:
        self._signal = signal
        self.settings = settings
        self._max = settings.max_concurrent
        self._limit = settings.queue_limit
        self._pressure_at = settings.backpressure_threshold * settings.queue_limit
        self._priority = settings.queue_strategy == "priority"
        # Items that may take the next free slot (their key, if any, is theirs), oldest
        # first: FIFO keeps arrivals in a deque and keyed items whose key came free later in
        # a heap by arrival, and takes the older head; the priority strategy keeps one heap.
        self._fifo: deque[tuple[int, Item]] = deque()
        self._released: list[tuple[int, Item]] = []
        self._heap: list[tuple[int, int, Item]] = []
        self._seq = itertools.count()
        self.keys = KeyTable()
        self._run: Callable[[Item, anyio.CancelScope], Awaitable[None]] = _unbound
        self._spawn = spawn
        self._relieved: Callable[[], Awaitable[None]] = _nothing
        self._ready: deque[Item] = deque()  # admitted, holding a slot, waiting for a worker
        self._later: list[tuple[float, int, Item]] = []  # waiting to run again, by due time
        self._due: deque[Item] = deque()  # due to run again, waiting for a slot
        self._later_wake: Any = None  # a signal while the timer sleeps
        self._timing = False  # the timer task runs
        self._idle: list[Any] = []  # signals of idle workers
        self._workers = 0
        self._waking = False
        self._relief: anyio.Event | None = None
        self._drained: anyio.Event | None = None
        self.owes_acks = False
        self.in_transit = 0  # local sends published but not yet received
        self.queued = 0
        self.active = 0
        self.accepted = 0
        self.completed = 0
        self.failed = 0
        self.rejected = 0
        self.dropped = 0
        self.forwarded = 0
        self.state_reads = 0
        self.state_writes = 0
        self.state_conflicts = 0
        self.retried = 0
        self.redelivered = 0  # durable events delivered again (a host died, ack_wait passed)
        self.dead_lettered = 0
        self.suppressed = 0
        self.dead_letters_pending = 0
        self.handed_back = 0  # durable events given back to the log when this instance stopped
        self.backlog = 0  # events the node's durable log holds (read periodically)
        self._slot_freed: anyio.Event | None = None

    def serve(
        self,
        run: Callable[[Item, anyio.CancelScope], Awaitable[None]],
        relieved: Callable[[], Awaitable[None]],
    ) -> None:
        """Set what runs an admitted item, and what to call once pressure is relieved."""
        self._run = run
        self._relieved = relieved

    @property
    def under_pressure(self) -> bool:
        return self._pressure_at <= self.queued < self._limit

    @property
    def holds_senders(self) -> bool:
        """Whether an event admitted now must have its acknowledgment withheld: the queue is
        at or past the threshold (full included, so a sender following the rules stops
        before it meets ``queue_full``). Never with a threshold of 1.0."""
        return self._pressure_at < self._limit and self.queued >= self._pressure_at

    def withdraw(self, item: Item) -> bool:
        """Take a queued item out (its caller gave up): True if it was still queued, or
        waiting to run again."""
        key = item.key
        if (self._later or self._due) and self._withdraw_later(item):
            if key is not None:
                self.release_key(item)
            return True
        if key is not None and self.keys.holders.get(key) is not item:
            if not self.keys.withdraw(key, item):
                return False
        elif not self._unqueue(item):
            return False
        self.queued -= 1
        if key is not None:  # it held its key, waiting for a slot: the next one holds it
            entry = self.keys.release(key, item)
            if entry is not None:
                self._start_or_queue(entry)
        self._wake_waiters()
        return True

    def _unqueue(self, item: Item) -> bool:
        """Remove ``item`` from the queues of items eligible for a slot."""
        if self._priority:
            return _remove_from_heap(self._heap, item, 2)
        for index, fifo_entry in enumerate(self._fifo):
            if fifo_entry[1] is item:
                del self._fifo[index]
                return True
        return _remove_from_heap(self._released, item, 1)

    def _withdraw_later(self, item: Item) -> bool:
        for index, entry in enumerate(self._later):
            if entry[2] is item:
                self._later[index] = self._later[-1]
                self._later.pop()
                heapq.heapify(self._later)
                return True
        try:
            self._due.remove(item)
        except ValueError:
            return False
        return True

    def later(self, item: Item, delay: float) -> None:
        """Hold an admitted item that is to run again in ``delay`` seconds (a retry).

        Meanwhile it holds no slot and no queue place, and is counted in ``retrying``, not
        in ``queued``; when it is due it takes the next free slot, before the queued items.
        It is never refused: it was admitted already (and is not counted again). A keyed item
        keeps its key meanwhile (called while it runs: the run's end does not release it).
        """
        if item.key is not None:
            self.keys.keep(item)
        due = anyio.current_time() + delay
        later = self._later
        heapq.heappush(later, (due, next(self._seq), item))
        if later[0][2] is item and self._later_wake is not None:
            self._later_wake.set()  # earlier than the one the timer sleeps for
        if not self._timing:
            self._timing = True
            self._spawn(self._release_later)

    async def _release_later(self) -> None:
        """The timer: items held by ``later`` go back to run, each when it is due."""
        later = self._later
        try:
            while later:
                delay = later[0][0] - anyio.current_time()
                if delay > 0:
                    self._later_wake = wake = self._signal()
                    with anyio.move_on_after(delay):
                        await wake.wait()
                    self._later_wake = None
                    continue
                item = heapq.heappop(later)[2]
                if self.active < self._max:
                    self.active += 1
                    self._ready.append(item)
                    if not self._waking:
                        self._wake_one()
                else:
                    self._due.append(item)
        finally:
            self._timing = False
            self._later_wake = None

    @property
    def idle(self) -> bool:
        """Whether nothing runs, waits in the queue, waits to run again, or waits for its
        dead letter to be delivered."""
        return not (
            self.active or self.queued or self._later or self._due or self.dead_letters_pending
        )

    def holds_local_senders(self) -> bool:
        """Whether a sender in this process must wait before publishing to this node.

        Counts the events local senders have published that have not arrived yet, so that
        senders released together cannot overflow the queue. No band at threshold 1.0.
        """
        return self._pressure_at < self._limit and (
            self._pressure_at <= self.queued + self.in_transit and self.queued < self._limit
        )

    def room(self) -> int:
        """How many more events this mailbox would admit now: free slots and queue places."""
        return max(0, self._max - self.active) + max(0, self._limit - self.queued)

    def free_slots(self) -> int:
        """Slots no item holds or is queued for: what a durable intake may fetch now.

        Keyed items waiting for their key hold no slot and are not counted (so a hot key's
        backlog does not hold back other keys' events), but they take queue places: the
        answer is never more than the queue has room for while some wait."""
        waiting = self.keys.waiting
        free = self._max - self.active - self.queued + waiting
        if waiting:
            free = min(free, self._limit - self.queued)
        return free

    async def wait_free_slot(self) -> None:
        """Wait until a slot is released (check ``free_slots`` again after)."""
        if self._slot_freed is None:
            self._slot_freed = anyio.Event()
        await self._slot_freed.wait()

    def arrived(self) -> None:
        """A local send reserved with ``in_transit`` reached the node (or was given up)."""
        self.in_transit -= 1
        self._wake_waiters()

    def stats(self) -> NodeStats:
        return NodeStats(
            active=self.active,
            queued=self.queued,
            max_concurrent=self._max,
            queue_limit=self._limit,
            under_pressure=self.under_pressure,
            accepted=self.accepted,
            completed=self.completed,
            failed=self.failed,
            rejected=self.rejected,
            dropped=self.dropped,
            forwarded=self.forwarded,
            state_reads=self.state_reads,
            state_writes=self.state_writes,
            state_conflicts=self.state_conflicts,
            retried=self.retried,
            redelivered=self.redelivered,
            dead_lettered=self.dead_lettered,
            suppressed=self.suppressed,
            retrying=len(self._later) + len(self._due),
            dead_letters_pending=self.dead_letters_pending,
            handed_back=self.handed_back,
            backlog=self.backlog,
            keys_active=len(self.keys.holders) - self._waiting_holders(),
            keyed_waiting=self.keys.waiting,
        )

    def offer(self, item: Item, priority: int = 0, force: bool = False) -> bool:
        """Admit ``item`` (run now or queue it) and count it; False when the queue is full,
        unless ``force`` (an event taken from a durable log, which bounds it)."""
        key = item.key
        if key is not None:
            # (``_offer_keyed`` for its two common cases written out, while the key table is
            # plain: a free key and a free slot, and a busy key)
            keys = self.keys
            holder = keys.holders.get(key)
            if holder is None:
                if keys.plain and self.active < self._max:
                    keys.holders[key] = item  # it holds its key and takes a slot
                    self.active += 1
                    self.accepted += 1
                    self._ready.append(item)
                    if not self._waking:
                        self._wake_one()
                    return True
            elif holder is not item and keys.plain:  # it waits behind, without a slot
                if self.queued >= self._limit and not force:
                    return False
                try:
                    keys.queues[key].append((next(self._seq), priority, item))
                except KeyError:
                    keys.queues[key] = deque([(next(self._seq), priority, item)])
                keys.waiting += 1
                self.queued += 1
                self.accepted += 1
                return True
            return self._offer_keyed(item, key, priority, force)
        if self.active < self._max:
            self.active += 1
            self.accepted += 1
            self._ready.append(item)
            if not self._waking:
                self._wake_one()
            return True
        if self.queued >= self._limit and not force:
            return False
        if self._priority:
            heapq.heappush(self._heap, (-priority, next(self._seq), item))
        else:
            self._fifo.append((next(self._seq), item))
        self.queued += 1
        self.accepted += 1
        return True

    def _offer_keyed(self, item: Item, key: str, priority: int, force: bool) -> bool:
        keys = self.keys
        holder = keys.holders.get(key)
        full = self.queued >= self._limit and not force
        if holder is None or holder is item:
            if full and self.active >= self._max:
                return False
            if keys.take(key, item):
                if self.active < self._max:  # (then nothing eligible is queued)
                    self.active += 1
                    self.accepted += 1
                    self._ready.append(item)
                    if not self._waking:
                        self._wake_one()
                    return True
                self._queue((next(self._seq), priority, item))
                self.queued += 1
                self.accepted += 1
                return True
        # The key is busy (or its partition closed): it waits behind, without a slot.
        if full:
            return False
        keys.wait(key, (next(self._seq), priority, item))
        self.queued += 1
        self.accepted += 1
        return True

    def _queue(self, entry: Entry) -> None:
        """Queue an item that holds its key, by its arrival: it takes a slot in turn."""
        seq, priority, item = entry
        if self._priority:
            heapq.heappush(self._heap, (-priority, seq, item))
        else:
            heapq.heappush(self._released, (seq, item))

    def _start_or_queue(self, entry: Entry) -> None:
        """A queued item came to hold its key: it takes a free slot, or queues for one."""
        if self.active < self._max:
            self.queued -= 1
            self.active += 1
            self._ready.append(entry[2])
            if not self._waking:
                self._wake_one()
        else:
            self._queue(entry)

    # ----- keys: the interface of retries, dead letters and key partitions ---------------

    def keep_key(self, item: Item) -> None:
        """Called while ``item`` runs: it keeps its key when this run ends, because it will
        settle later (``release_key``: its dead letter is on its way). Its key's later events
        wait meanwhile. (``later`` keeps the key of an item that runs again by itself.)"""
        self.keys.keep(item)

    def release_key(self, item: Item) -> None:
        """``item``, which kept its key past its run, reached its final outcome (dead-lettered,
        or failed for good, between runs): the key's next event may run."""
        key = item.key
        if key is not None:
            entry = self.keys.release(key, item)
            if entry is not None:
                self._start_or_queue(entry)

    def close_partition(self, partition: int) -> None:
        """No keyed item of ``partition`` starts until ``open_partition`` (they queue)."""
        self.keys.close(partition)

    def open_partition(self, partition: int) -> None:
        """Let the queued items of ``partition`` run, each key's oldest first."""
        for entry in self.keys.open(partition):
            self._start_or_queue(entry)

    def take_waiting(self, partition: int) -> list[Item]:
        """Remove and return the items of ``partition`` that wait for their key, oldest
        first (a closed partition's, when this instance will not run it after all)."""
        items = self.keys.take_waiting(partition)
        self.queued -= len(items)
        self._wake_waiters()
        return items

    def take_pending(self) -> list[Item]:
        """Remove and return every item not yet running, those waiting to run again
        included (used when the system stops)."""
        if self._priority:
            eligible = [entry[2] for entry in sorted(self._heap)]
        else:
            eligible = [entry[1] for entry in sorted([*self._fifo, *self._released])]
        items = list(self._ready) + eligible + self.keys.take_waiting()
        items += [*self._due, *(entry[2] for entry in sorted(self._later, key=_due_time))]
        self.active -= len(self._ready)
        self._ready.clear()
        self._fifo.clear()
        self._released.clear()
        self._heap.clear()
        self._due.clear()
        self._later.clear()
        if self._later_wake is not None:
            self._later_wake.set()
        self.queued = 0
        self._wake_waiters()
        if self._slot_freed is not None:
            event, self._slot_freed = self._slot_freed, None
            event.set()
        return items

    async def wait_relief(self) -> None:
        """Wait until the queue drops below the pressure threshold (check again after)."""
        if self._relief is None:
            self._relief = anyio.Event()
        await self._relief.wait()

    async def wait_drained(self) -> None:
        """Wait until nothing runs and nothing is queued."""
        while self.active or self.queued:
            if self._drained is None:
                self._drained = anyio.Event()
            await self._drained.wait()

    def _take(self) -> Item:
        self.queued -= 1
        if self._priority:
            return heapq.heappop(self._heap)[2]
        released = self._released
        fifo = self._fifo
        if released and (not fifo or released[0][0] < fifo[0][0]):
            return heapq.heappop(released)[1]
        return fifo.popleft()[1]

    def _wake_waiters(self) -> None:
        if self._relief is not None and self.queued + self.in_transit < self._pressure_at:
            event, self._relief = self._relief, None
            event.set()

    def _wake_one(self) -> None:
        if self._idle:
            self._waking = True
            self._idle.pop().set()
        elif self._workers < self._max:
            self._waking = True
            self._workers += 1
            self._spawn(self._worker)
        # else every worker is busy: each takes ready items before it goes idle

    async def _worker(self) -> None:
        # One cancel scope for the worker's whole life (a scope per item would cost more
        # than the rest of a round trip). Cancelling it abandons the item being run; the
        # worker then retires and another takes over.
        scope = anyio.CancelScope()
        try:
            with scope:
                await self._serve(scope)
        finally:
            self._workers -= 1
        if self._ready and not self._waking:
            self._wake_one()

    async def _serve(self, scope: anyio.CancelScope) -> None:
        while True:
            self._waking = False
            while self._ready:
                item = self._ready.popleft()
                if self._ready and not self._waking:
                    self._wake_one()
                while True:
                    try:
                        await self._run(item, scope)
                    except BaseException:  # (cancelled, or a bug of ours)
                        self._ran(item)
                        raise
                    # However the item ended (done, abandoned, stopped), its slot is free.
                    key = item.key
                    if key is None:
                        self._free_slot()
                        break
                    keys = self.keys
                    queue = keys.queues.get(key)
                    if (
                        queue is not None
                        and keys.plain
                        and self.queued == keys.waiting
                        and not self._due
                        and not scope.cancel_called
                        and not self.owes_acks
                        and keys.holders.get(key) is item
                    ):
                        # (``_key_ran`` for a busy key written out: nothing else waits for
                        # a slot, so the key and the slot pass to its next item, which this
                        # worker runs now)
                        entry = queue.popleft()
                        if not queue:
                            del keys.queues[key]
                        keys.waiting -= 1
                        item = keys.holders[key] = entry[2]
                        self.queued -= 1
                        if self._relief is not None and self.queued < self._pressure_at:
                            self._wake_waiters()
                        continue
                    if queue is None and keys.plain and keys.holders.get(key) is item:
                        del keys.holders[key]  # (``_key_ran`` for a key nobody waits for)
                        self._free_slot()
                    else:
                        self._key_ran(key, item)
                    break
                if scope.cancel_called:
                    return  # the item was abandoned as it finished: this worker retires
                if self.owes_acks and self.queued < self._pressure_at:
                    self.owes_acks = False
                    await self._relieved()
            signal = self._signal()
            self._idle.append(signal)
            try:
                await signal.wait()
            except BaseException:
                if signal in self._idle:
                    self._idle.remove(signal)
                raise

    def _waiting_holders(self) -> int:
        """Items that hold their key but wait for a slot (``_queue``)."""
        if self._priority:
            return sum(1 for entry in self._heap if entry[2].key is not None)
        return len(self._released)

    def _ran(self, item: Item) -> None:
        """The run of ``item`` ended: its slot (and its key) pass on, or are free."""
        key = item.key
        if key is None:
            self._free_slot()
        else:
            self._key_ran(key, item)

    def _key_ran(self, key: str, item: Item) -> None:
        """The run of the keyed ``item`` ended: its key passes on, or stays (``keep_key``,
        ``later``), or is free; and its slot is freed, or passes to the key's next item."""
        entry = self.keys.ran(key, item)
        if entry is None:
            self._free_slot()
        elif self._due or self.queued - self.keys.waiting > 1:
            # The key's next item holds it now and queues by its arrival, so the slot freed
            # goes to the oldest eligible item.
            self._queue(entry)
            self._free_slot()
        else:  # it is the only eligible item: the slot passes straight to it
            self.queued -= 1
            self._ready.append(entry[2])
            if self._relief is not None and self.queued < self._pressure_at:
                self._wake_waiters()

    def _free_slot(self) -> None:
        """An item finished: its slot goes to the next item due to run again, else to the
        next queued item, or is released."""
        if self._due:
            self._ready.append(self._due.popleft())
        elif self.queued > self.keys.waiting:
            self._ready.append(self._take())
            if self._relief is not None and self.queued < self._pressure_at:
                self._wake_waiters()
        else:
            self.active -= 1
            if self._drained is not None and not self.active:  # (``_signal_drained``)
                event, self._drained = self._drained, None
                event.set()
            if self._slot_freed is not None:
                event, self._slot_freed = self._slot_freed, None
                event.set()

    def _signal_drained(self) -> None:
        if self._drained is not None and not self.active:
            event, self._drained = self._drained, None
            event.set()


def _remove_from_heap(heap: list[Any], item: Any, at: int) -> bool:
    for index, entry in enumerate(heap):
        if entry[at] is item:
            heap[index] = heap[-1]
            heap.pop()
            heapq.heapify(heap)
            return True
    return False
