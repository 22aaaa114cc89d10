"""Per-key order inside one instance: which keys are held, and the events waiting for them.

A keyed event *holds* its key from the moment it may take a slot (it runs, or waits next in
line for a slot) until its final outcome: completed, failed, or dead-lettered, and also while
a retry waits out its backoff. Events of a held key wait behind the holder in arrival order,
without a slot; when the holder releases the key, the next one holds it and becomes
eligible for a slot. The mailbox owns the slots and the queue; this table owns the keys.

Keys are grouped into ``PARTITIONS`` partitions by a hash every process computes alike
(CRC-32 of the key's UTF-8 bytes). Across the instances of a node a partition is run by one
instance at a time (``happen._partitions``); inside an instance a partition can be *closed*:
its events are admitted and wait, but none starts, until it opens (the instance is taking the
partition over from another one). The table counts the events of each partition, so that an
instance handing a partition over knows when the last one has reached its final outcome.
"""

from __future__ import annotations

import functools
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["PARTITIONS", "KeyTable", "Keyed", "keys_bucket", "partition_of"]

#: Key partitions of every node (the unit of ownership across instances). Every instance and
#: every version must agree on it: changing it moves keys between partitions.
PARTITIONS = 64


def keys_bucket(namespace: str) -> str:
    """The key-value bucket of a namespace's key partitions (``happen._partitions``)."""
    return f"happen_{namespace}_keys"


# Keys repeat (an account's events): remember the recent ones.
@functools.lru_cache(maxsize=4096)
def partition_of(key: str) -> int:
    """The partition of ``key``: CRC-32 of its UTF-8 bytes, modulo ``PARTITIONS``."""
    return zlib.crc32(key.encode()) % PARTITIONS


class Keyed(Protocol):
    """What the mailbox queues: anything with a ``key`` (``None``: unkeyed)."""

    @property
    def key(self) -> str | None: ...


#: A waiting event: its arrival sequence, its priority, the event.
Entry = tuple[int, int, Any]


class KeyTable:
    """The keys of one mailbox: their holders, the events waiting behind them, the closed
    partitions, and counts.

    - ``holders``: key -> the event holding it.
    - ``queues``: key -> the entries waiting for it, oldest first.
    - ``waiting``: how many events wait for their key (behind its holder, or in a closed
      partition); the mailbox counts them in ``queued``.
    - ``plain``: no partition is closed or watched and no holder keeps its key past its run:
      the mailbox may then pass a key from its holder to the next entry itself (its hot
      path, written out there).

    Partitions cost nothing until one is closed or watched: only then are keys hashed.
    """

    __slots__ = (
        "_closed",
        "_counts",
        "_idle",
        "_kept",
        "_watched",
        "holders",
        "plain",
        "queues",
        "waiting",
    )

    def __init__(self) -> None:
        self.holders: dict[str, Any] = {}
        self.waiting = 0
        self.queues: dict[str, deque[Entry]] = {}
        self.plain = True
        self._kept: set[int] = set()  # ids of holders whose key outlives their current run
        self._closed: set[int] = set()
        self._watched: set[int] = set()
        self._counts: dict[int, int] = {}  # events of each watched partition
        self._idle: Callable[[int], None] | None = None

    # ----- admission ------------------------------------------------------------------

    def take(self, key: str, item: Any) -> bool:
        """``item`` holds ``key`` now if it is free (nobody holds it and its partition is
        open), or holds it already (a retry); False: it must ``wait``."""
        holder = self.holders.get(key)
        if holder is None:
            if self._closed or self._watched:
                partition = partition_of(key)
                if partition in self._closed:
                    return False
                if partition in self._watched:
                    self._counts[partition] += 1
            self.holders[key] = item
            return True
        return holder is item

    def wait(self, key: str, entry: Entry) -> None:
        """``entry`` waits for ``key``."""
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = deque()
        queue.append(entry)
        self.waiting += 1
        if self._watched:
            partition = partition_of(key)
            if partition in self._watched:
                self._counts[partition] += 1

    # ----- the end of a holder --------------------------------------------------------

    def keep(self, item: Any) -> None:
        """``item`` keeps its key when its current run ends (a retry will follow)."""
        self._kept.add(id(item))
        self.plain = False

    def ran(self, key: str, item: Any) -> Entry | None:
        """A run of ``item`` ended: it releases its key unless it keeps it (``keep``); see
        ``release`` for what is returned."""
        if self._kept:
            marked = id(item)
            if marked in self._kept:
                self._kept.discard(marked)
                self._recheck()
                return None
        holders = self.holders
        if holders.get(key) is not item:
            return None
        queue = self.queues.get(key)
        if queue is not None and not (self._closed and partition_of(key) in self._closed):
            entry = queue.popleft()
            if not queue:
                del self.queues[key]
            self.waiting -= 1
            holders[key] = entry[2]
            if self._watched:  # the holder ended; its successor was counted already
                partition = partition_of(key)
                if partition in self._watched:
                    self._counts[partition] -= 1
            return entry
        del holders[key]
        if self._watched:
            self._ended(partition_of(key))
        return None

    def release(self, key: str, item: Any) -> Entry | None:
        """``item`` reached its final outcome (whether or not it kept its key): its key
        passes to the next waiting event, which is returned (it now holds the key), or is
        free. Nothing if ``item`` does not hold it."""
        if self._kept:
            self._kept.discard(id(item))
            self._recheck()
        return self.ran(key, item)

    def withdraw(self, key: str, item: Any) -> bool:
        """Take a waiting ``item`` out (its caller gave up): True if it was waiting."""
        queue = self.queues.get(key)
        if queue is None:
            return False
        for index, entry in enumerate(queue):
            if entry[2] is item:
                del queue[index]
                if not queue:
                    del self.queues[key]
                self.waiting -= 1
                if self._watched:
                    self._ended(partition_of(key))
                return True
        return False

    def _recheck(self) -> None:
        self.plain = not (self._closed or self._watched or self._kept)

    def _ended(self, partition: int) -> None:
        if partition in self._watched:
            self._counts[partition] -= 1
            if not self._counts[partition] and self._idle is not None:
                self._idle(partition)

    # ----- partitions -----------------------------------------------------------------

    def count(self, partition: int) -> int:
        """Events of ``partition`` in this table: holding their key or waiting for it."""
        held = sum(1 for key in self.holders if partition_of(key) == partition)
        return held + sum(
            len(queue) for key, queue in self.queues.items() if partition_of(key) == partition
        )

    def watch(self, partition: int, idle: Callable[[int], None]) -> None:
        """Call ``idle(partition)`` once its last event has reached its final outcome (at
        once if it has none)."""
        self._idle = idle
        if partition not in self._watched:
            self._watched.add(partition)
            self._counts[partition] = self.count(partition)
            self.plain = False
        if not self._counts[partition]:
            idle(partition)

    def unwatch(self, partition: int) -> None:
        self._watched.discard(partition)
        self._counts.pop(partition, None)
        self._recheck()

    def close(self, partition: int) -> None:
        """No event of ``partition`` takes a slot until it opens (holders already running
        finish; their successors wait)."""
        self._closed.add(partition)
        self.plain = False

    def is_closed(self, partition: int) -> bool:
        return partition in self._closed

    def open(self, partition: int) -> list[Entry]:
        """Open ``partition``: the first waiting event of each of its free keys now holds its
        key; they are returned, oldest first."""
        if partition not in self._closed:
            return []
        self._closed.discard(partition)
        self._recheck()
        promoted: list[Entry] = []
        for key, queue in list(self.queues.items()):
            if key in self.holders or partition_of(key) != partition:
                continue
            entry = queue.popleft()
            if not queue:
                del self.queues[key]
            self.waiting -= 1
            self.holders[key] = entry[2]
            promoted.append(entry)
        promoted.sort(key=_arrival)
        return promoted

    def take_waiting(self, partition: int | None = None) -> list[Any]:
        """Remove and return the waiting events (of ``partition``, or all), oldest first;
        with no partition, forget every holder too (the system stops)."""
        taken: list[Entry] = []
        for key in list(self.queues):
            if partition is not None and partition_of(key) != partition:
                continue
            queue = self.queues.pop(key)
            taken.extend(queue)
            self.waiting -= len(queue)
            if self._watched:
                for _ in queue:
                    self._ended(partition_of(key))
        if partition is None:
            self.holders.clear()
            self._kept.clear()
            self._recheck()
        taken.sort(key=_arrival)
        return [entry[2] for entry in taken]


def _arrival(entry: Entry) -> int:
    return entry[0]
