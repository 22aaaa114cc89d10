"""A sending system's view of a remote node that signalled pressure.

A node that admits a remote request while under pressure answers ``hold`` and owes an
``ack`` for when it is below its threshold again. While any of its holds are outstanding,
the sending system publishes nothing more to that node. When they are released, the waiting
senders go one at a time as *probes*: a probe asks the node to answer at once, ``ack`` if it
was admitted below the threshold or ``hold`` if not, and the next sender goes only then. So
senders released together cannot overflow the node's queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from happen._signal import Signal

__all__ = ["RemoteGate"]


class RemoteGate:
    """Orders the sends of one system to one remote node through a pressure episode."""

    __slots__ = ("_waiters", "held", "probing")

    def __init__(self) -> None:
        self.held = 0  # holds not yet acknowledged
        self.probing = False  # a probe is in flight
        self._waiters: deque[Signal] = deque()

    def _closed(self) -> bool:
        return bool(self.held or self.probing)

    async def admit(self, signal: Callable[[], Signal]) -> bool:
        """Wait for this sender's turn; True when it must go as a probe."""
        if not self._closed() and not self._waiters:
            return False
        wake = signal()
        self._waiters.append(wake)
        try:
            while True:
                await wake.wait()
                if not self._closed():
                    break
                wake = signal()  # not free after all: keep our place at the front
                self._waiters.appendleft(wake)
        except BaseException:
            if wake in self._waiters:
                self._waiters.remove(wake)
            else:
                self._next()  # we were woken but will not send: pass the turn on
            raise
        self.probing = True
        return True

    def hold(self) -> None:
        self.held += 1

    def release(self) -> None:
        self.held -= 1
        self._next()

    def probe_done(self) -> None:
        self.probing = False
        self._next()

    def _next(self) -> None:
        if not self._closed() and self._waiters:
            self._waiters.popleft().set()
