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


class _Watch:
    """What the monitor knows about one open call."""

    __slots__ = ("claimed", "heard", "missed", "quiet", "unanswered", "unheard")

    def __init__(self, heard: int) -> None:
        self.heard = heard  # the call's frame count at the last tick
        self.quiet = 0  # whole ticks without a frame
        self.unheard = 0  # whole ticks without a frame or a claim
        self.claimed = False  # a pong claimed it since the last tick
        self.missed = 0  # answered rounds in a row that did not claim it
        self.unanswered = 0  # rounds in a row that nobody answered at all


class _Round:
    """One ping: the route its pongs (or its "no responders" status) come back to."""

    __slots__ = ("answered", "calls", "claims", "monitor", "no_responders", "target", "token")
    abandoned = False
    secret = ""  # the route protocol's field: nothing to prove

    def __init__(self, monitor: LivenessMonitor, target: str, calls: dict[str, str]) -> None:
        self.monitor = monitor
        self.target = target
        self.calls = calls  # reply subject -> inbox token
        self.token = ""
        self.claims: set[str] = set()  # the reply subjects some pong listed
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
        self._watches: dict[str, _Watch] = {}  # by inbox token
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
        silent: dict[str, dict[str, str]] = {}
        watches: dict[str, _Watch] = {}
        old = self._watches
        for token, route in list(wire.routes.items()):
            if type(route) is not Call or (route.durable and route.waiting):
                continue  # (a durable call waits for whichever instance runs its event)
            watch = old.get(token)
            if watch is None:
                watches[token] = _Watch(route.heard)  # new since the last tick
                continue
            watches[token] = watch
            if route.heard != watch.heard:
                watch.heard = route.heard
                watch.quiet = watch.unheard = 0
            else:
                watch.quiet += 1
                watch.unheard = 0 if watch.claimed else watch.unheard + 1
            watch.claimed = False
            if watch.unheard >= 4 and watch.unanswered >= 2:
                self._lose(
                    token,
                    f"node {route.target!r} did not answer for {self.timeout} s "
                    "(liveness_timeout): its host is frozen or unreachable",
                )
                continue
            if watch.quiet >= 1 and self._foreign.get(route.target, 0) < self._epoch:
                silent.setdefault(route.target, {})[wire.inbox_prefix + token] = token
        self._watches = watches
        for target, calls in silent.items():
            subjects = list(calls)
            for i in range(0, len(subjects), PING_BATCH):
                batch = {subject: calls[subject] for subject in subjects[i : i + PING_BATCH]}
                await self._ping(target, batch)

    async def _ping(self, target: str, calls: dict[str, str]) -> None:
        wire = self._wire
        sent = _Round(self, target, calls)
        sent.token = wire.register_probe(sent)
        self._rounds.append(sent)
        try:
            await wire.publish(
                wire.ping_subject(target),
                p.Ping(list(calls)),
                reply=wire.inbox_prefix + sent.token,
            )
        except Exception as exc:  # disconnected: the transport fails the calls itself
            log.debug("could not ping node %r: %s", target, exc)

    def _judge(self, sent: _Round) -> None:
        """A round is over: count it against the calls it did not claim."""
        for subject, token in sent.calls.items():
            watch = self._watches.get(token)
            if watch is None or token not in self._wire.routes:
                continue
            if not sent.answered:
                watch.unanswered += 1
                continue
            watch.unanswered = 0
            if subject in sent.claims:
                continue
            watch.missed += 1
            if watch.missed >= 2:
                self._lose(
                    token,
                    f"node {sent.target!r} lost the call: no instance of it holds it any "
                    "more (its host died or restarted)",
                )

    # ----- answers, as they arrive --------------------------------------------------

    def claimed(self, sent: _Round, calls: list[str]) -> None:
        """A pong: the calls it lists are alive."""
        self._participants.add(sent.target)
        self._foreign.pop(sent.target, None)
        for subject in calls:
            token = sent.calls.get(subject)
            if token is None:
                continue
            sent.claims.add(subject)
            watch = self._watches.get(token)
            if watch is not None:
                watch.claimed = True
                watch.missed = 0

    def unheard_of(self, sent: _Round) -> None:
        """A ping got "no responders": no instance of the node hears pings."""
        target = sent.target
        if target in self._participants:
            for token in sent.calls.values():
                self._lose(
                    token,
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
            for call_token in sent.calls.values():
                self._lose(call_token, f"nobody serves node {target!r} any more: its host is gone")
        else:
            self._foreign[target] = self._epoch + FOREIGN_TICKS

    def _lose(self, token: str, message: str) -> None:
        route = self._wire.routes.get(token)
        if type(route) is not Call:
            return
        self._wire.forget(token)
        self._watches.pop(token, None)
        route.feed(HostLostError(message, node_id=route.target))
