"""Liveness: the calling system notices a host that died, froze or became unreachable.

One monitor task per system ticks every ``liveness_timeout / 4`` seconds. Calls that heard
no frame during the last whole tick are *silent*; for each target node, the monitor
publishes one ``ping`` listing their reply subjects to ``{ns}.ping.{node_id}``, which every
instance of the node hears. Each instance answers a ``pong`` with the calls it holds
(queued, running, producing a stream, or looking for a twin with room). Then:

- a call claimed by a pong is alive;
- a call unclaimed by two rounds in a row in which some instance answered is lost;
- a round nobody answers at all (frozen or unreachable instances) changes nothing, until
  the call has had no sign of life for ``liveness_timeout``: then it is lost;
- a ping that gets the "no responders" status means no happen instance of the node hears
  pings any more. If one answered before, the calls are lost. If none ever did, the node
  may be served by a program that does not take part in liveness: one ``happen.presence``
  request to ``{ns}.node.{node_id}`` tells. "No responders" again: nobody serves the node,
  the calls are lost. Any answer, or none within a tick: a foreign node is there, and its
  calls are bounded by their own timeouts only (checked again a few ticks later).

A lost call ends with ``HostLostError``, which also gives back what it held (a pressure
hold on its target, a local reservation).
"""

from __future__ import annotations

import logging
from typing import Any

import anyio

from happen import _wire as p
from happen._calls import Call
from happen._errors import HostLostError, NodeNotFoundError
from happen._runtime import Runtime
from happen._signal import Signal

__all__ = ["LivenessMonitor"]

log = logging.getLogger("happen")

#: Reply subjects listed in one ping frame at most (a ping must fit ``max_payload``).
PING_BATCH = 256
#: Ticks a node found to be foreign (served, but not answering pings) is not pinged.
FOREIGN_TICKS = 4


class _Round:
    """One ping: the route its pongs (or its "no responders" status) come back to."""

    __slots__ = ("answered", "calls", "monitor", "no_responders", "target", "token")
    abandoned = False
    secret = ""  # the route protocol's field: nothing to prove

    def __init__(self, monitor: LivenessMonitor, target: str, calls: dict[str, Call]) -> None:
        self.monitor = monitor
        self.target = target
        self.calls = calls  # by inbox token (the call's own string: no reply subjects kept)
        self.token = ""
        self.answered = False
        self.no_responders = False

    def feed(self, frame: Any) -> None:
        if type(frame) is p.Pong:
            self.answered = True
            self.monitor.claimed(self, frame.calls)
        elif isinstance(frame, NodeNotFoundError):
            self.no_responders = True
            self.monitor.unheard_of(self)


class _Presence:
    """The route of a ``happen.presence`` request: any answer, or "no responders"."""

    __slots__ = ("done", "nobody", "target")
    abandoned = False
    secret = ""  # the route protocol's field: nothing to prove

    def __init__(self, target: str, done: Signal) -> None:
        self.target = target
        self.done = done
        self.nobody = False

    def feed(self, frame: Any) -> None:
        if isinstance(frame, NodeNotFoundError):
            self.nobody = True
        self.done.set()


class LivenessMonitor:
    """Fails the calls of one system whose serving host is gone (see the module's doc)."""

    def __init__(self, *, wire: p.Wire, runtime: Runtime, system_id: str, timeout: float) -> None:
        self._wire = wire
        self._runtime = runtime
        self._system_id = system_id
        self.timeout = timeout
        self.tick = timeout / 4
        self._epoch = 0
        self._rounds: list[_Round] = []  # sent at the last tick
        self._participants: set[str] = set()  # nodes an instance of which answered a ping
        self._foreign: dict[str, int] = {}  # node -> epoch until which it is not pinged
        self._probing: set[str] = set()  # nodes a presence probe is out for

    async def run(self) -> None:
        """The monitor task: tick until the system stops (cancelled then)."""
        next_at = anyio.current_time() + self.tick
        while True:
            await anyio.sleep_until(next_at)
            next_at += self.tick
            now = anyio.current_time()
            if next_at <= now:  # fell behind: a tick stays a whole tick, for pongs to come
                next_at = now + self.tick
            self._epoch += 1
            try:
                await self._round()
            except Exception:  # never let the monitor take the system down
                log.exception("the liveness monitor failed a round")

    # ----- one tick -----------------------------------------------------------------

    async def _round(self) -> None:
        wire = self._wire
        for sent in self._rounds:
            wire.forget(sent.token)
            if not sent.no_responders:
                self._judge(sent)
        self._rounds = []
        # What the monitor knows of a call is kept on the call itself: a tick allocates
        # nothing per open call, whatever their number.
        silent: dict[str, list[Call]] = {}
        for call in list(wire.routes.values()):
            if type(call) is not Call or (call.durable and call.waiting):
                continue  # (a durable call waits for whichever instance runs its event)
            if call.live_seen < 0:  # new since the last tick
                call.live_seen = call.heard
                call.live_quiet = call.live_unheard = call.live_missed = 0
                call.live_unanswered = 0
                call.live_claimed = False
                continue
            if call.heard != call.live_seen:
                call.live_seen = call.heard
                call.live_quiet = call.live_unheard = 0
            else:
                call.live_quiet += 1
                call.live_unheard = 0 if call.live_claimed else call.live_unheard + 1
            call.live_claimed = False
            if call.live_unheard >= 4 and call.live_unanswered >= 2:
                self._lose(
                    call,
                    f"node {call.target!r} did not answer for {self.timeout} s "
                    "(liveness_timeout): its host is frozen or unreachable",
                )
                continue
            if call.live_quiet >= 1 and self._foreign.get(call.target, 0) < self._epoch:
                silent.setdefault(call.target, []).append(call)
        for target, calls in silent.items():
            for i in range(0, len(calls), PING_BATCH):
                await self._ping(target, {call.token: call for call in calls[i : i + PING_BATCH]})

    async def _ping(self, target: str, calls: dict[str, Call]) -> None:
        wire = self._wire
        sent = _Round(self, target, calls)
        sent.token = wire.register_probe(sent)
        self._rounds.append(sent)
        prefix = wire.inbox_prefix
        try:
            await wire.publish(
                wire.ping_subject(target),
                p.Ping([prefix + token for token in calls]),
                reply=prefix + sent.token,
            )
        except Exception as exc:  # disconnected: the transport fails the calls itself
            log.debug("could not ping node %r: %s", target, exc)

    def _judge(self, sent: _Round) -> None:
        """A round is over: count it against the calls it did not claim (a call is in one
        round a tick, so its ``live_claimed`` says whether this round's pongs claimed it)."""
        routes = self._wire.routes
        for token, call in sent.calls.items():
            if routes.get(token) is not call:
                continue  # answered (or lost) since
            if not sent.answered:
                call.live_unanswered += 1
                continue
            call.live_unanswered = 0
            if call.live_claimed:
                continue
            call.live_missed += 1
            if call.live_missed >= 2:
                self._lose(
                    call,
                    f"node {sent.target!r} lost the call: no instance of it holds it any "
                    "more (its host died or restarted)",
                )

    # ----- answers, as they arrive --------------------------------------------------

    def claimed(self, sent: _Round, calls: list[str]) -> None:
        """A pong: the calls it lists are alive."""
        self._participants.add(sent.target)
        self._foreign.pop(sent.target, None)
        prefix = self._wire.inbox_prefix
        for subject in calls:
            if not subject.startswith(prefix):
                continue
            call = sent.calls.get(subject[len(prefix) :])
            if call is None:
                continue  # not one this round asked about
            call.live_claimed = True
            call.live_missed = 0

    def unheard_of(self, sent: _Round) -> None:
        """A ping got "no responders": no instance of the node hears pings."""
        target = sent.target
        if target in self._participants:
            for call in sent.calls.values():
                self._lose(
                    call,
                    f"node {target!r} is gone: no instance of it answers any more "
                    "(its host died or stopped)",
                )
        elif target not in self._probing and self._runtime.running:
            self._probing.add(target)
            self._runtime.spawn(self._probe_presence, sent)

    async def _probe_presence(self, sent: _Round) -> None:
        """Does anyone serve the node at all (a program that does not answer pings)?"""
        wire = self._wire
        target = sent.target
        probe = _Presence(target, self._runtime.signal())
        token = wire.register_probe(probe)
        try:
            frame = p.Request(p.PRESENCE, origin=self._system_id)
            await wire.publish(wire.node_subject(target), frame, reply=wire.inbox_prefix + token)
            with anyio.move_on_after(self.tick):
                await probe.done.wait()
        except Exception as exc:
            log.debug("could not probe the presence of node %r: %s", target, exc)
            return
        finally:
            wire.forget(token)
            self._probing.discard(target)
        if probe.nobody:
            for call in sent.calls.values():
                self._lose(call, f"nobody serves node {target!r} any more: its host is gone")
        else:
            self._foreign[target] = self._epoch + FOREIGN_TICKS

    def _lose(self, call: Call, message: str) -> None:
        if self._wire.routes.get(call.token) is not call:
            return  # answered, or lost already
        self._wire.forget(call.token)
        call.feed(HostLostError(message, node_id=call.target))
