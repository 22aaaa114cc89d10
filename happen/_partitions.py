"""Key partitions across the instances of a node: which instance runs which keys.

A node's keys fall into ``PARTITIONS`` partitions (``happen._keys``). Each partition is run by
one instance of the node at a time, its *owner*, which orders the partition's keys exactly in
its mailbox. A keyed request that reaches another instance is passed on to the owner.

**The record.** Ownership is one value per node in the key-value bucket
``happen_{namespace}_keys`` (key: the node id), an ``Ownership``: the live instances (system
ids) with a heartbeat count each, those leaving, and per partition its owner and the instance
it is being handed to (``incoming``). Every change is a compare-and-set on the value's
revision, so instances never overwrite each other; each rewrites it from what it read.

**Leases.** Every instance that has used keys rewrites the record every ``lease / 5`` seconds,
counting its heartbeat up. An instance whose heartbeat another has not seen change for a whole
``lease`` (measured on the observer's own clock: no clocks are compared) is dead: it is taken
out, and its partitions go at once to their new owners. An owner whose last successful renewal
began more than ``0.6 * lease`` ago stops starting keyed events (its partitions close) until it
renews again, so it has stopped before anyone can find it dead. The lease is the hosting
system's ``liveness_timeout``, written into the record by the first instance.

**Who owns what.** Rendezvous hashing over the live instances (not leaving) gives each
partition its wanted owner. A partition whose owner is not a member any more (dead, gone) goes
to it at once. A partition whose owner is alive but is not the wanted one is *handed over*:
``incoming`` names the new owner; the old owner stops admitting the partition's events (it
passes them on to the incoming one, which queues them without starting them), lets the
events it admitted reach their final outcome (retries included), then writes the new owner
into the record and tells the instances (``{ns}.keys.{node_id}``); the new owner then opens
the partition. So no event of a key starts on the new owner before every event of that key
the old owner admitted has ended.

**Passing requests on.** A keyed request is published to the owner's own subject with its
caller's reply subject in ``reply_to`` and the passing instance's inbox as the reply: if the
owner is gone (no subscriber: "no responders"), the status comes back to the passing
instance, which holds the request until the partition has a live owner again, rather than
failing the call. Held requests are answered in the liveness protocol (their callers are not
lost), can be abandoned, and keep their deadline.

**Durable nodes.** Their keyed events are not requests but stored events, one log subject per
partition (``happen._durable``): the owner *fetches* a partition's events rather than being
passed them, and an intake asks ``may_fetch(p)`` (owned, not being handed over, opened) and
is told when that changes. A partition being handed over goes once no fetch of it is in
flight and its events here have ended. A partition taken from an owner found dead opens only
``durable_takeover_delay`` after that owner's last heartbeat, when the events it had fetched
are due again (fetches return those first); one left by an instance that stopped cleanly
(``departed`` in the record) opens at once.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import anyio
import msgspec

from happen import _wire as p
from happen._errors import HappenError, NodeNotFoundError
from happen._keys import PARTITIONS, keys_bucket, partition_of
from happen._mailbox import Mailbox
from happen._runtime import Runtime
from happen._transport import Entry, KeyValue, RevisionMismatch, durable_transport

__all__ = ["KeyRouter", "Ownership", "durable_takeover_delay", "rebalance"]

log = logging.getLogger("happen")

#: Renewals per lease.
BEATS = 5
#: Fraction of the lease after the start of its last renewal at which an owner stops starting
#: keyed events (it must stop before any other instance can find it dead, after a lease).
FENCE = 0.6
#: The part of the lease during which a request passed on to an owner may still come back
#: with "no responders" (a round trip; meanwhile the passing instance answers for it).
RELAY_WAIT = 0.25
#: Times a keyed request may be passed between instances (each instance reads the record
#: before it passes on a request passed to it, so views agree again within a hop or two).
MAX_ROUTED = 16
#: Compare-and-set attempts of one rewrite of the record.
ATTEMPTS = 16
#: Held requests wait at most this many leases for their partition to get a live owner.
HOLD_LEASES = 3
#: Instances that left cleanly, remembered in the record (their partitions open at once on
#: the instances that take them: nothing of theirs waits to be delivered again).
DEPARTED = 16
#: Seconds a durable node's partition taken from a dead owner waits, beyond ``ack_wait``
#: and a renewal period, before it opens (the log's redelivery timer may fire a little late).
TAKEOVER_MARGIN = 0.5


def durable_takeover_delay(ack_wait: float, lease: float) -> float:
    """How long after a dead owner's last heartbeat (as seen) a durable node's partition
    opens on the instance that takes it over: the owner kept its events from redelivery
    until it died, at most a renewal period after that heartbeat, and they come back
    ``ack_wait`` later. Opened then, the partition's fetches get them first."""
    return ack_wait + lease / BEATS + TAKEOVER_MARGIN


class Ownership(msgspec.Struct, kw_only=True):
    """The record of one node's key partitions (see the module's doc)."""

    partitions: int
    lease: float
    members: dict[str, int]  # instance -> heartbeat count
    leaving: list[str] = []
    owners: list[str]  # per partition: the owning instance, "" for none
    incoming: list[str]  # per partition: the instance it is being handed to, or ""
    departed: list[str] = []  # the last instances that left cleanly (not found dead)


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Ownership).decode


@functools.lru_cache(maxsize=4096)
def _weight(member: str, partition: int) -> bytes:
    return hashlib.blake2b(f"{member}/{partition}".encode(), digest_size=8).digest()


def rebalance(
    table: Ownership, me: str, *, dead: set[str], completed: set[int], beat: bool, mode: str
) -> Ownership:
    """The record ``table`` rewritten by instance ``me``: ``dead`` members taken out, its
    heartbeat counted (``beat``), the handovers of ``completed`` partitions finished, and
    every partition given its wanted owner (at once when its owner is gone, else by a
    handover). ``mode``: ``"member"``, ``"leaving"`` (hand every partition over), or
    ``"gone"`` (out of the record: every partition it still owns goes on now)."""
    members = {m: n for m, n in table.members.items() if m not in dead}
    leaving = [m for m in table.leaving if m in members]
    owners = list(table.owners)
    incoming = list(table.incoming)
    departed = list(table.departed)
    if mode == "gone":
        if me in members:
            departed = [*departed[-(DEPARTED - 1) :], me]
        members.pop(me, None)
        leaving = [m for m in leaving if m != me]
        for q in range(table.partitions):
            if owners[q] == me:
                owners[q], incoming[q] = incoming[q], ""
    else:
        if beat or me not in members:
            members[me] = members.get(me, 0) + 1
        if mode == "leaving" and me not in leaving:
            leaving.append(me)
        for q in completed:
            if owners[q] == me and incoming[q]:
                owners[q], incoming[q] = incoming[q], ""
    live = sorted(m for m in members if m not in leaving)
    for q in range(table.partitions):
        want = max(live, key=lambda m: _weight(m, q)) if live else ""
        owner, coming = owners[q], incoming[q]
        if coming and coming not in live:
            coming = ""  # the receiver died or is leaving: choose again
        if owner not in members:  # nobody, or an instance found dead or gone: at once
            owners[q], incoming[q] = want, ""
            continue
        if not coming and want and want != owner:
            coming = want
        incoming[q] = coming
    return Ownership(
        partitions=table.partitions,
        lease=table.lease,
        members=members,
        leaving=leaving,
        owners=owners,
        incoming=incoming,
        departed=departed,
    )


class Role(enum.Enum):
    """What an instance does with one partition."""

    OWN = "own"  # admits and runs its events
    CLOSING = "closing"  # owns it, hands it over: passes new events on, finishes its own
    INCOMING = "incoming"  # receives it: admits its events, starts none yet
    ELSEWHERE = "elsewhere"  # passes its events on to the owner


class Held:
    """A keyed request waiting at this instance for its partition to have a live owner."""

    __slots__ = ("gone", "partition", "reply", "request", "since")

    def __init__(self, request: p.Request, reply: str, partition: int, since: float) -> None:
        self.request = request
        self.reply = reply
        self.partition = partition
        self.since = since
        self.gone = False  # answered while held (abandoned, expired)


class Relay:
    """The route of a request passed on to an owner: a "no responders" status means the
    owner is gone, and the request is held here again."""

    __slots__ = (
        "bounced",
        "counted",
        "instance",
        "reply",
        "request",
        "router",
        "target",
        "token",
    )
    abandoned = False
    secret = ""  # the route protocol's field: nothing to prove

    def __init__(self, router: KeyRouter, request: p.Request, reply: str, instance: str) -> None:
        self.router = router
        self.request = request
        self.reply = reply
        self.instance = instance
        self.token = ""
        self.bounced = False
        self.counted = False  # counted in ``forwarded``
        self.target = router.node_id

    def feed(self, frame: Any) -> None:
        if isinstance(frame, NodeNotFoundError):
            self.router.bounced(self)


class PartitionIntake(Protocol):
    """A durable node's intake (``happen._durable.Intake``): it fetches the keyed events of
    the partitions ``may_fetch`` allows, and is told when they change."""

    def fetching(self, partition: int) -> bool: ...

    def partitions_changed(self) -> None: ...


#: What a keyed request should do: "" admit it here, None hold it, else pass it on to the
#: instance named.
Where = str | None


class KeyRouter:
    """The key partitions of one node at one instance: the record, the lease, the roles,
    and the keyed requests held or passed on.

    Made with the node, idle until the first keyed request: then it reads (or creates) the
    record and keeps its lease until the system stops. ``accept(request, reply)`` admits a
    keyed request here (the node's path for a request it runs); ``answer(reply, failure)``
    answers one that will not run. A transport without key-value buckets runs every
    partition here (order within this instance only, logged once).
    """

    def __init__(
        self,
        *,
        node_id: str,
        system_id: str,
        mailbox: Mailbox[Any],
        wire: p.Wire,
        runtime: Runtime,
        lease: float,
        accept: Callable[[p.Request, str], Awaitable[None]],
        answer: Callable[[str, p.Failure], Coroutine[Any, Any, None]],
        takeover_delay: float = 0.0,
    ) -> None:
        self.node_id = node_id
        self._me = system_id
        self._mailbox = mailbox
        self._wire = wire
        self._runtime = runtime
        self._lease = lease
        self._accept = accept
        self._answer = answer
        #: Seconds after the last sign of life of a dead owner before its partitions open on
        #: the instance that takes them over (durable nodes: their redeliveries come first).
        self.takeover_delay = takeover_delay
        self.started = False
        self._intake: PartitionIntake | None = None  # a durable node's intake, fetching partitions
        self._unfetched: set[int] = set()  # closing partitions a fetch may still be bringing
        self._kv: KeyValue | None = None
        self._view: Ownership | None = None
        self._roles = [Role.ELSEWHERE] * PARTITIONS
        self._where: list[Where] = [None] * PARTITIONS
        # Every partition's requests are admitted here (while no request is held and the
        # system accepts: the check ``route`` makes first, written out by its caller).
        self.all_here = False
        self._gated = [False] * PARTITIONS  # closed in the mailbox by this router
        self._opens_at: dict[int, float] = {}  # taken-over partitions opening later
        self._seen: dict[str, tuple[int, float]] = {}  # member -> (heartbeat, when it changed)
        self._suspects: set[str] = set()  # owners a request bounced off
        self._completed: set[int] = set()  # handed-over partitions whose events all ended
        self._mode = "member"
        self._lease_until = 0.0
        self._fenced = False
        self.held_requests: deque[Held] = deque()  # held until their partition has an owner
        self._held_parts = [0] * PARTITIONS
        self._dispatching = False
        self._relays: deque[tuple[float, str, Relay]] = deque()
        self._lock: anyio.Lock | None = None
        self._wake: Any = None
        self._wanted = False  # a sync is wanted (news arrived while one ran)
        self._failure: tuple[float, str] | None = None  # (until, why) the bucket failed
        self._solo = False
        self._closed = False  # the system stopped: nothing held is sent on any more

    # ----- the hot path -----------------------------------------------------------------

    def route(self, request: p.Request) -> Where:
        """Where the keyed ``request`` goes: ``""`` admit it here, an instance id to pass it
        on, ``None`` to hold it (``hold``)."""
        if self.all_here and not self.held_requests and self._runtime.accepting:
            return ""  # (every partition is this instance's: the common case of one host)
        if not self.started:
            self._start()
        partition = partition_of(request.key)  # (a keyed request)
        if self._held_parts[partition]:
            return None  # earlier requests of the partition are held: keep their order
        where = self._where[partition]
        if not where:
            if where == "" and not self._runtime.accepting and not self._solo:
                return None  # the system stops: held until its partitions are handed over
            return where  # "": ours; None: no owner known yet
        if request.handed and self._roles[partition] is Role.INCOMING:
            return None  # from the owner handing it over: held here until the handover
        if where in self._suspects:
            return None
        if request.routed:
            # Passed to us, yet ours says someone else: read the record before passing it
            # on again (a handover may be news to one of us).
            self._want_sync()
            return None
        return where

    def hold(self, request: p.Request, reply: str) -> bool:
        """Hold ``request`` until its partition has a live owner; False when this instance's
        queue has no room for it (the caller is then refused as by a full queue)."""
        if self._failure is not None and self._failure[0] > anyio.current_time():
            return False
        if len(self.held_requests) >= self._mailbox.room():  # (free slots and queue places)
            return False
        partition = partition_of(request.key)
        self.held_requests.append(Held(request, reply, partition, anyio.current_time()))
        self._held_parts[partition] += 1
        return True

    @property
    def held(self) -> int:
        """Keyed requests held here (not admitted yet): waiting for their partition."""
        return len(self.held_requests)

    def failure(self) -> str | None:
        """Why keyed requests cannot be held now (the bucket failed recently), if so."""
        if self._failure is not None and self._failure[0] > anyio.current_time():
            return self._failure[1]
        return None

    async def forward(self, request: p.Request, reply: str, instance: str) -> None:
        """Pass ``request`` on to ``instance`` (the owner of its key, or the one receiving it);
        answers of the owner go to the caller directly."""
        wire = self._wire
        if request.routed >= MAX_ROUTED:
            self._mailbox.rejected += 1
            message = (
                f"node {self.node_id!r}: the keyed event was passed between instances "
                f"{request.routed} times without finding the owner of its key; send it again"
            )
            await self._answer(reply, p.Failure(p.UNAVAILABLE, message))
            return
        relay = Relay(self, request, reply, instance)
        relay.token = token = wire.register_probe(relay)
        now = anyio.current_time()
        self._sweep(now)
        self._relays.append((now + RELAY_WAIT * self._lease, token, relay))
        handed = self._roles[partition_of(request.key)] is Role.CLOSING
        frame = msgspec.structs.replace(
            request, reply_to=reply, routed=request.routed + 1, handed=handed
        )
        try:
            await wire.publish(
                wire.instance_subject(self.node_id, instance),
                frame,
                reply=wire.inbox_prefix + token,
            )
        except HappenError as exc:
            log.debug("node %r could not pass a keyed request on: %s", self.node_id, exc)
            wire.forget(token)
            if not self.hold(request, reply):
                self._mailbox.rejected += 1
                await self._answer(reply, p.Failure(p.UNAVAILABLE, _describe(exc)))
            return
        if not relay.bounced:
            relay.counted = True
            self._mailbox.forwarded += 1

    def bounced(self, relay: Relay) -> None:
        """The owner ``relay`` went to is gone: hold its request until the partition has a
        live owner (the lease tells)."""
        if relay.bounced:
            return
        relay.bounced = True
        if self._closed:  # stopped: nobody here would send it on again
            self._wire.forget(relay.token)
            if relay.counted:
                self._mailbox.forwarded -= 1
            self._mailbox.rejected += 1
            self._runtime.start_outside(self._answer, relay.reply, p.stopped(self.node_id))
            return
        if relay.counted:  # it did not reach the owner after all: it arrives here again
            self._mailbox.forwarded -= 1
        self._wire.forget(relay.token)
        self._suspects.add(relay.instance)
        request, reply = relay.request, relay.reply
        partition = partition_of(request.key)
        held = Held(request, reply, partition, anyio.current_time())
        self.held_requests.appendleft(held)  # it came before the partition's others held since
        self._held_parts[partition] += 1
        self._want_sync()

    def claims(self, replies: list[str]) -> list[str]:
        """Which of ``replies`` this router holds (held, or passed on a moment ago)."""
        if not self.held_requests and not self._relays:
            return []
        self._sweep(anyio.current_time())  # (a relay answers for its request a moment only)
        mine = {h.reply for h in self.held_requests if not h.gone}
        mine.update(relay.reply for _, _, relay in self._relays if not relay.bounced)
        return [reply for reply in replies if reply in mine]

    async def abandon(self, reply: str, secret: str) -> bool:
        """The caller of ``reply`` gave up: a held request of it is answered and dropped.
        True if one was held (its secret checked)."""
        for held in self.held_requests:
            if held.reply == reply and not held.gone:
                seal = held.request.seal
                if seal and not p.seal_matches(seal, secret):
                    return False
                held.gone = True
                self._mailbox.rejected += 1
                await self._answer(reply, p.abandoned(self.node_id))
                return True
        return False

    # ----- starting ---------------------------------------------------------------------

    def join(self) -> None:
        """Take part in the node's key partitions now (its twins use keys)."""
        if not self.started and self._runtime.accepting:
            self._start()

    def news(self) -> None:
        """Another instance changed the record: read it (joining if this one has not)."""
        if self.started:
            self._want_sync()
        else:
            self.join()

    # ----- durable nodes: the partitions an intake fetches --------------------------------

    def attach(self, intake: PartitionIntake) -> None:
        """A durable node's ``intake`` fetches the keyed events of the partitions this
        instance owns and has opened (``may_fetch``); it is told when they change."""
        self._intake = intake

    def may_fetch(self, partition: int) -> bool:
        """Whether this instance may fetch the keyed events of ``partition`` now: it owns
        the partition, is not handing it over, and has opened it (its lease is current and
        a dead owner's events have had time to be delivered again)."""
        return (
            self.started
            and self._roles[partition] is Role.OWN
            and not self._gated[partition]
            and self._runtime.accepting
        )

    def fetch_stopped(self, partition: int) -> None:
        """No fetch of ``partition`` is in flight any more: if it is being handed over, it
        goes once its last event here has ended."""
        if partition in self._unfetched:
            self._unfetched.discard(partition)
            if self._roles[partition] is Role.CLOSING:
                self._mailbox.keys.watch(partition, self._idle)

    async def join_if_keyed(self, keyed: Callable[[], Awaitable[int]]) -> None:
        """Join if ``keyed()`` counts keyed events stored for this (durable) node. Never
        raises (a failure is logged: the node joins when it hears of keys)."""
        try:
            if await keyed():
                self.join()
        except HappenError as exc:
            log.warning("node %r could not tell whether it has keyed events: %s", self.node_id, exc)

    def _start(self) -> None:
        self.started = True
        self._lock = anyio.Lock()
        self._wake = self._runtime.signal()
        try:
            durable_transport(self._wire.transport)  # type: ignore[arg-type]
        except HappenError:
            self._go_solo()
            return
        self._runtime.spawn(self._keep)

    def _go_solo(self) -> None:
        """No bucket: this instance runs every partition (order within it only)."""
        log.warning(
            "node %r: the transport has no key-value buckets, so keyed events are ordered "
            "within each instance only, not across the node's instances",
            self.node_id,
        )
        self._solo = True
        self._roles = [Role.OWN] * PARTITIONS
        self._where = [""] * PARTITIONS
        self.all_here = True
        if self._intake is not None:
            self._intake.partitions_changed()

    # ----- the keeper -------------------------------------------------------------------

    async def _keep(self) -> None:
        """Renew the lease, follow the record, finish handovers, until the system stops."""
        next_beat = 0.0
        while True:
            now = anyio.current_time()
            beat = now >= next_beat
            if beat:
                next_beat = now + self._lease / BEATS
            self._wanted = False
            try:
                await self._sync(beat=beat)
            except HappenError as exc:
                await self._sync_failed(exc)
            except Exception:  # a bug of ours: logged; the lease is renewed at the next beat
                log.exception("node %r failed to follow its key partitions", self.node_id)
            now = anyio.current_time()
            self._sweep(now)
            self._fence(now)
            self._open_due(now)
            await self._redispatch()
            if self._wanted:
                continue
            wake_at = min(next_beat, self._lease_until if not self._fenced else next_beat)
            if self._opens_at:
                wake_at = min(wake_at, *self._opens_at.values())
            self._wake = self._runtime.signal()
            with anyio.move_on_after(max(0.0, wake_at - anyio.current_time())):
                await self._wake.wait()

    def _want_sync(self) -> None:
        self._wanted = True
        if self._wake is not None:
            self._wake.set()

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            transport = durable_transport(self._wire.transport)  # type: ignore[arg-type]
            self._kv = await transport.key_value(keys_bucket(self._wire.namespace))
        return self._kv

    async def _sync(self, *, beat: bool) -> None:
        """Read the record, rewrite it if this instance has news for it, follow it."""
        assert self._lock is not None
        async with self._lock:
            kv = await self._bucket()
            began = anyio.current_time()
            entry = await kv.get(self.node_id)
            completed = set(self._completed)
            for _ in range(ATTEMPTS):
                table = self._decode(entry)
                now = anyio.current_time()
                self._observe(table, now)
                dead = {m for m in table.members if m != self._me and self._is_dead(m, now)}
                new = rebalance(
                    table, self._me, dead=dead, completed=completed, beat=beat, mode=self._mode
                )
                if new == table and entry is not None:
                    break
                try:
                    await kv.put(self.node_id, _encode(new), expect=entry.revision if entry else 0)
                except RevisionMismatch as exc:
                    entry = exc.current
                    continue
                if _structure(new) != _structure(table):
                    await self._tell()
                table = new
                break
            else:
                log.debug("node %r: the key record kept changing; trying later", self.node_id)
                return
            self._completed -= completed
            self._failure = None
            if self._me in table.members and (beat or self._lease_until == 0.0):
                self._lease_until = began + FENCE * table.lease
            self._apply(table)

    def _decode(self, entry: Entry | None) -> Ownership:
        if entry is not None:
            try:
                table = _decode(entry.value)
            except msgspec.DecodeError:
                log.error("node %r: the key record is unreadable; writing it anew", self.node_id)
            else:
                if table.partitions == PARTITIONS:
                    return table
                log.error(
                    "node %r: the key record has %d partitions, this version %d; writing it anew",
                    self.node_id,
                    table.partitions,
                    PARTITIONS,
                )
        return Ownership(
            partitions=PARTITIONS,
            lease=self._lease,
            members={},
            owners=[""] * PARTITIONS,
            incoming=[""] * PARTITIONS,
        )

    def _observe(self, table: Ownership, now: float) -> None:
        seen = self._seen
        for member, beats in table.members.items():
            known = seen.get(member)
            if known is None or known[0] != beats:
                seen[member] = (beats, now)
                if known is not None:  # a sign of life
                    self._suspects.discard(member)
        for member in [m for m in seen if m not in table.members]:
            del seen[member]
            self._suspects.discard(member)

    def _is_dead(self, member: str, now: float) -> bool:
        seen = self._seen.get(member)
        lease = self._view.lease if self._view is not None else self._lease
        return seen is not None and now - seen[1] > lease

    async def _tell(self) -> None:
        wire = self._wire
        try:
            await wire.publish(wire.keys_subject(self.node_id), p.Owners(self._me))
        except HappenError as exc:
            log.debug("node %r could not tell of a key partition change: %s", self.node_id, exc)

    async def _sync_failed(self, exc: HappenError) -> None:
        """The bucket could not be read or written: held requests fail if this instance
        never had a record (keys cannot be ordered across instances without it); an owner
        keeps its partitions until its lease runs out (then they close)."""
        if self._view is None:
            why = (
                f"node {self.node_id!r} cannot order keys across its instances: the key-value "
                f"bucket {keys_bucket(self._wire.namespace)} failed: {_describe(exc)}"
            )
            log.error("%s", why)
            self._failure = (anyio.current_time() + 1.0, why)
            held, self.held_requests = self.held_requests, deque()
            self._held_parts = [0] * PARTITIONS
            for entry in held:
                if not entry.gone:
                    self._mailbox.rejected += 1
                    await self._answer(entry.reply, p.Failure(p.UNAVAILABLE, why))
            self._kv = None
        else:
            log.warning("node %r could not renew its key partitions: %s", self.node_id, exc)

    # ----- following the record ----------------------------------------------------------

    def _apply(self, table: Ownership) -> None:
        """Take the roles ``table`` gives this instance; open and close partitions."""
        me = self._me
        before = self._view
        self._view = table
        mailbox = self._mailbox
        now = anyio.current_time()
        for q in range(PARTITIONS):
            owner, coming = table.owners[q], table.incoming[q]
            was = self._roles[q]
            if owner == me and not coming:
                role = Role.OWN
                self._where[q] = ""
                if (
                    was in (Role.ELSEWHERE, Role.INCOMING)
                    and before is not None
                    and self.takeover_delay > 0
                ):
                    previous = before.owners[q]
                    if (
                        previous
                        and previous != me
                        and previous not in table.members
                        and previous not in table.departed  # (it handed its events back)
                    ):
                        seen = self._seen_at(previous, now)
                        self._opens_at[q] = seen + self.takeover_delay
            elif owner == me:
                role = Role.CLOSING
                self._where[q] = coming
            elif coming == me:
                # Events reach it through the owner only, and wait here (not admitted) until
                # the handover is done: so the owner's order is the only order there is.
                role = Role.INCOMING
                self._where[q] = owner or None
            else:
                role = Role.ELSEWHERE
                self._where[q] = owner or None
            if role is not Role.OWN:
                self._opens_at.pop(q, None)
            self._roles[q] = role
            if was is Role.CLOSING and role is not Role.CLOSING:
                mailbox.keys.unwatch(q)
                self._completed.discard(q)
                self._unfetched.discard(q)
            elif role is Role.CLOSING and was is not Role.CLOSING:
                if self._intake is not None and self._intake.fetching(q):
                    self._unfetched.add(q)  # watched once the fetch in flight has ended
                else:
                    mailbox.keys.watch(q, self._idle)  # (calls back at once when idle already)
        self.all_here = all(where == "" for where in self._where)
        self._gate_all()

    def _seen_at(self, member: str, now: float) -> float:
        seen = self._seen.get(member)
        return seen[1] if seen is not None else now

    def _idle(self, partition: int) -> None:
        """The last event of a partition being handed over ended (called by the mailbox)."""
        if self._roles[partition] is Role.CLOSING:
            self._completed.add(partition)
            self._want_sync()

    def _gate_all(self) -> None:
        """Open or close each partition in the mailbox as the roles, the lease and the
        takeover delays say; events parked for a partition this instance will not run are
        answered ``unavailable``."""
        for q in range(PARTITIONS):
            role = self._roles[q]
            closed = q in self._opens_at or (self._fenced and role in (Role.OWN, Role.CLOSING))
            self._gate(q, closed, stranded=role is Role.ELSEWHERE)
        if self._intake is not None:
            self._intake.partitions_changed()

    def _gate(self, q: int, closed: bool, *, stranded: bool = False) -> None:
        mailbox = self._mailbox
        if closed and not self._gated[q]:
            self._gated[q] = True
            mailbox.close_partition(q)
        elif not closed and self._gated[q]:
            self._gated[q] = False
            if stranded:
                self._runtime.spawn(self._strand, mailbox.take_waiting(q))
            mailbox.open_partition(q)

    async def _strand(self, works: list[Any]) -> None:
        """Events admitted for a partition this instance was to receive, and will not."""
        for work in works:
            self._mailbox.failed += 1
            await self._answer(
                work.reply,
                p.Failure(
                    p.UNAVAILABLE,
                    f"node {self.node_id!r}: the instance that admitted this keyed event "
                    "did not receive its key's partition after all; send it again",
                ),
            )

    def _fence(self, now: float) -> None:
        """Close the partitions this instance runs once its lease ran out; open them again
        after a renewal."""
        fenced = self._view is not None and now >= self._lease_until and not self._solo
        if fenced != self._fenced:
            self._fenced = fenced
            if fenced:
                log.warning(
                    "node %r could not renew its key partitions in time: it starts no keyed "
                    "event until it does",
                    self.node_id,
                )
            self._gate_all()

    def _open_due(self, now: float) -> None:
        due = [q for q, at in self._opens_at.items() if at <= now]
        for q in due:
            del self._opens_at[q]
        if due:
            self._gate_all()

    def _target(self, request: p.Request, partition: int) -> Where:
        """Where a held request goes now (``None``: it stays held)."""
        if self._view is None and not self._solo:
            return None
        if self._fenced and self._roles[partition] is not Role.ELSEWHERE:
            return None
        where = self._where[partition]
        if where == "" and not self._runtime.accepting and self._mode == "member":
            return None  # the system stops, and has not handed its partitions over yet
        if request.handed and self._roles[partition] is Role.INCOMING:
            return None  # the handover is not done yet
        if where is None or where in self._suspects:
            return None
        return where

    async def _redispatch(self) -> None:
        """Send held requests on where their partitions now go, in the order they came."""
        if self._dispatching or not self.held_requests:
            return
        self._dispatching = True
        now = anyio.current_time()
        limit = HOLD_LEASES * (self._view.lease if self._view is not None else self._lease)
        skipped: deque[Held] = deque()
        waiting: set[int] = set()
        try:
            while self.held_requests:
                held = self.held_requests.popleft()
                q = held.partition
                if held.gone:
                    self._held_parts[q] -= 1
                    continue
                where = None if q in waiting else self._target(held.request, q)
                if where is None and now - held.since < limit:
                    skipped.append(held)
                    waiting.add(q)
                    continue
                try:
                    await self._send_held(held, where, now)
                finally:
                    self._held_parts[q] -= 1
        finally:
            self.held_requests.extendleft(reversed(skipped))
            self._dispatching = False

    async def _send_held(self, held: Held, where: Where, now: float) -> None:
        request, reply = held.request, held.reply
        mailbox = self._mailbox
        if where is None:
            mailbox.rejected += 1
            message = (
                f"node {self.node_id!r}: the partition of key {request.key!r} had no live "
                "owner for too long; send it again"
            )
            await self._answer(reply, p.Failure(p.UNAVAILABLE, message))
            return
        if request.timeout_ms is not None:
            left = request.timeout_ms - int((now - held.since) * 1000)
            if left <= 0:
                mailbox.rejected += 1
                message = f"node {self.node_id!r}: keyed event {request.type!r} timed out"
                await self._answer(reply, p.Failure(p.TIMEOUT, message))
                return
            request = msgspec.structs.replace(request, timeout_ms=left)
        if where == "":
            await self._accept(request, reply)
        else:
            await self.forward(request, reply, where)

    def _sweep(self, now: float) -> None:
        relays = self._relays
        while relays and relays[0][0] <= now:
            _, token, _ = relays.popleft()
            self._wire.forget(token)

    # ----- stopping ---------------------------------------------------------------------

    async def leave(self) -> None:
        """The system stops: hand every partition over (new events go to the new owners;
        the ones admitted here finish first). Never raises."""
        if not self.started or self._solo:
            return
        self._mode = "leaving"
        await self._sync_quietly()

    async def finish(self) -> None:
        """The drain is over: every event admitted here has ended. Give up what is left
        (the record forgets this instance), and answer what is still held. Never raises."""
        if not self.started:
            return
        if not self._solo:
            self._mode = "gone"
            await self._sync_quietly()
            await self._redispatch()  # to the new owners
        self._closed = True
        for held in self.held_requests:
            if not held.gone:
                held.gone = True
                self._mailbox.rejected += 1
                await self._answer(held.reply, p.stopped(self.node_id))
        self.held_requests.clear()
        self._held_parts = [0] * PARTITIONS

    async def _sync_quietly(self) -> None:
        with anyio.move_on_after(self._lease):
            try:
                await self._sync(beat=True)
            except HappenError as exc:
                log.warning("node %r could not hand its key partitions over: %s", self.node_id, exc)


def _structure(table: Ownership) -> tuple[Any, ...]:
    """What instances must hear of at once: everything but the heartbeats."""
    return (sorted(table.members), table.leaving, table.owners, table.incoming)


def _describe(exc: BaseException) -> str:
    return p.describe(exc)
