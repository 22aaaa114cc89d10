"""Node state: named values every instance of a node shares, with revisions and
compare-and-set (``node.state``, ``node.view(other)``).

A system keeps its nodes' state in one key-value bucket of its namespace,
``happen_{namespace}_state``, opened through the transport's durable seam the first time a
node uses its state (JetStream KV over NATS, the broker's buckets in memory): a system that
never uses state opens nothing. The name ``n`` of node ``x`` is the key ``"x.n"`` (node ids
hold no ``.``, so the first one separates), which the seam escapes into the KV key alphabet.
Values travel through the system's codec.

A compare-and-set is atomic per name; revisions come from the bucket, so they never go back
and are never reused. ``update`` serialises the updates of one name within a system (they
would only collide with each other) and compares against the revision the system last saw,
so an uncontended update is one round trip; another process's write since then costs one
refused compare, whose answer carries the value to retry with.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import anyio
import msgspec

from happen._codec import Codec
from happen._errors import CodecError, HappenError, InvalidIdError, PayloadTooLargeError
from happen._ids import EVENT_TYPE_RULE, validate_event_type, validate_node_id
from happen._transport import (
    Entry,
    KeyValue,
    RevisionMismatch,
    Transport,
    durable_transport,
)

__all__ = ["NodeState", "StateConflict", "StateCounts", "StateStore", "StateView", "Versioned"]

#: The wait before the third attempt of an ``update``; each later one doubles, up to
#: ``BACKOFF_MAX`` (seconds). A wait is jittered between half of it and all of it, and is
#: followed by a fresh read. The second attempt goes at once: the refused compare brought
#: the value to retry with.
BACKOFF_INITIAL = 0.005
BACKOFF_MAX = 0.2
#: What a system remembers of the names it read and wrote (for ``update``), at most.
SEEN_ENTRIES = 4096
SEEN_BYTES = 8 * 1024 * 1024


class Versioned(msgspec.Struct, frozen=True):
    """A state value and the revision that wrote it, as ``node.state.get`` returns it.

    Revisions come from the bucket: every write gets a new one, never reused. Compare them
    for equality (``put(..., expect=v.revision)``), not for order.
    """

    value: Any
    revision: int


class StateConflict(HappenError):
    """A compare-and-set on node state was refused: nothing was written.

    ``node_id`` and ``name`` say which state, ``expected`` is the revision the write
    expected (``0``: that the name did not exist), ``current`` the name's value now (a
    ``happen.Versioned``), or ``None`` when it does not exist.
    """

    __module__ = "happen"

    def __init__(self, node_id: str, name: str, expected: int, current: Versioned | None) -> None:
        wanted = "no value" if expected == 0 else f"revision {expected}"
        found = "no value" if current is None else f"revision {current.revision}"
        super().__init__(
            f"state {name!r} of node {node_id!r}: expected {wanted}, found {found}; "
            f"nothing was written (read it again, or use update())"
        )
        self.node_id = node_id
        self.name = name
        self.expected = expected
        self.current = current


class StateCounts(Protocol):
    """Where a node counts its state operations (its mailbox keeps the counters)."""

    state_reads: int
    state_writes: int
    state_conflicts: int


def _check_name(name: object) -> str:
    try:
        return validate_event_type(name)
    except InvalidIdError:
        text = repr(name)
        text = text if len(text) <= 60 else text[:57] + "..."
        raise InvalidIdError(
            f"invalid state name {text}: a state name, like an event type, is {EVENT_TYPE_RULE}"
        ) from None


def _check_expect(expect: object) -> None:
    if expect is not None and (type(expect) is not int or expect < 0):
        raise ValueError(f"expect must be None, 0 or a revision read before, not {expect!r}")


class StateStore:
    """A system's node state: the bucket (opened on first use), the codec, and what the
    system last saw of each name. Every node of the system is handed the same store; its
    ``NodeState`` and ``StateView`` objects run the operations with these helpers.

    ``transport`` returns the system's running transport, or raises when there is none.
    """

    def __init__(self, *, codec: Codec, namespace: str, transport: Callable[[], Transport]) -> None:
        self.rename(namespace)
        self._codec = codec
        self.decode = codec.decoder(object).decode
        # For bytes this system encoded itself: the codec refused them if nested too deeply.
        self.decode_own = (
            msgspec.json.Decoder() if codec.name == "json" else msgspec.msgpack.Decoder()
        ).decode
        self._transport = transport
        self._kv: KeyValue | None = None
        self._opening: anyio.Lock | None = None
        self._updating: dict[str, deque[anyio.Event]] = {}  # names being updated: waiters
        self._seen: OrderedDict[str, Entry] = OrderedDict()
        self._seen_bytes = 0

    # ----- the bucket ----------------------------------------------------------------

    def rename(self, namespace: str) -> None:
        """Use the bucket of ``namespace`` (before the system starts)."""
        self.bucket_name = f"happen_{namespace}_state"

    def bucket(self) -> KeyValue | None:
        """The bucket if it is open (``None``: ``open()`` it). Raises unless the system
        runs (or drains)."""
        self._transport()
        return self._kv

    async def open(self) -> KeyValue:
        """Open the bucket (once, whoever asks first), through the transport's seam."""
        transport = self._transport()
        if self._opening is None:
            self._opening = anyio.Lock()
        async with self._opening:
            if self._kv is None:
                self._kv = await durable_transport(transport).key_value(self.bucket_name)
            return self._kv

    # ----- names and values ----------------------------------------------------------

    @staticmethod
    def key(node_id: str, name: object) -> str:
        """The bucket key of ``name`` in ``node_id``'s state (``InvalidIdError`` for a
        malformed name)."""
        return f"{node_id}.{_check_name(name)}"

    def encode(self, node_id: str, name: str, value: Any) -> bytes:
        try:
            return self._codec.encode(value)
        except CodecError as exc:
            raise CodecError(f"state {name!r} of node {node_id!r}: {exc}") from None

    def versioned(self, entry: Entry | None) -> Versioned | None:
        if entry is None:
            return None
        return Versioned(self.decode(entry.value), entry.revision)

    def conflict(self, node_id: str, name: str, mismatch: RevisionMismatch) -> StateConflict:
        """The ``StateConflict`` for ``mismatch``; remembers the current entry it carries."""
        current = self.versioned(mismatch.current)
        self.remember(self.key(node_id, name), mismatch.current)
        return StateConflict(node_id, name, mismatch.expected, current)

    # ----- what this system last saw of each name (a guess for update) ---------------

    def seen(self, key: str) -> Entry | None:
        return self._seen.get(key)

    def remember(self, key: str, entry: Entry | None) -> None:
        seen = self._seen
        old = seen.get(key)
        if entry is None:
            if old is not None:
                self._seen_bytes -= len(seen.pop(key).value)
            return
        if old is not None:
            if old.revision > entry.revision:  # a slower answer about an older write
                return
            self._seen_bytes -= len(old.value)
            seen.move_to_end(key)
        seen[key] = entry
        self._seen_bytes += len(entry.value)
        if len(seen) > SEEN_ENTRIES or self._seen_bytes > SEEN_BYTES:
            while seen and (len(seen) > SEEN_ENTRIES or self._seen_bytes > SEEN_BYTES):
                self._seen_bytes -= len(seen.popitem(last=False)[1].value)

    # ----- one update of a name at a time in this system -----------------------------

    def try_turn(self, key: str) -> bool:
        """Take the turn on ``key`` if no other update of it runs in this system (then it
        is ours until ``end_turn``); False otherwise: ``wait_turn``."""
        if key in self._updating:
            return False
        self._updating[key] = deque()
        return True

    async def wait_turn(self, key: str) -> None:
        """Wait until the updates of ``key`` before this one have ended; then the turn is
        ours until ``end_turn``."""
        turn = anyio.Event()
        self._updating[key].append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():  # it was handed to us as we were cancelled: pass it on
                self.end_turn(key)
            else:
                self._updating[key].remove(turn)
            raise

    def end_turn(self, key: str) -> None:
        waiters = self._updating[key]
        if waiters:
            waiters.popleft().set()
        else:
            del self._updating[key]

    # ----- reading -------------------------------------------------------------------

    async def read(self, node_id: str, name: str, counts: StateCounts) -> Versioned | None:
        """The value of ``name`` in ``node_id``'s state, or ``None`` (``get``)."""
        key = self.key(node_id, name)
        kv = self.bucket() or await self.open()
        entry = await kv.get(key)
        counts.state_reads += 1
        versioned = self.versioned(entry)  # decoded (depth-checked) before it is remembered
        self.remember(key, entry)
        return versioned


class StateView:
    """Another node's state, read-only: ``node.view(node_id)``. Only ``get``; a view has no
    ``put``, ``delete`` or ``update`` (only the node's own ``node.state`` writes).

    Its reads count in the ``state_reads`` of the node that made the view.
    """

    __slots__ = ("_counts", "_node_id", "_store")

    def __init__(self, store: StateStore, node_id: str, counts: StateCounts) -> None:
        self._store = store
        self._node_id = validate_node_id(node_id)
        self._counts = counts

    @property
    def node_id(self) -> str:
        """The node whose state this view reads."""
        return self._node_id

    def __repr__(self) -> str:
        return f"<happen.StateView of node {self._node_id!r}>"

    if not TYPE_CHECKING:  # hidden from type checkers, which then flag view.put(...) too

        def __getattr__(self, attribute: str) -> NoReturn:
            if attribute in ("put", "delete", "update"):
                raise AttributeError(
                    f"a view of the state of node {self._node_id!r} is read-only: it has no "
                    f"{attribute}(); only that node's own node.state writes"
                )
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {attribute!r}")

    async def get(self, name: str) -> Versioned | None:
        """The value of ``name`` and its revision, or ``None`` if it does not exist.

        Raises ``InvalidIdError`` for a malformed name, ``CodecError`` for a stored value
        the system's codec cannot decode, ``TransportError`` when the transport has no
        key-value buckets or fails, ``SystemStoppedError`` when the system is not running.
        """
        return await self._store.read(self._node_id, name, self._counts)


class NodeState:
    """A node's state: named values shared by every instance of the node (in every process
    that hosts it), each with a revision, written with compare-and-set (``node.state``).

    Names follow the event-type rule (1-256 of letters, digits, ``-``, ``_``, ``:``,
    ``.``); values are anything the system's codec carries. Each call is one operation on
    the namespace's state bucket: a compare-and-set is atomic per name, revisions never go
    back, and there are no transactions across names.
    """

    __slots__ = ("_counts", "_node_id", "_store")

    def __init__(self, store: StateStore, node_id: str, counts: StateCounts) -> None:
        self._store = store
        self._node_id = node_id
        self._counts = counts

    def __repr__(self) -> str:
        return f"<happen.NodeState of node {self._node_id!r}>"

    async def get(self, name: str) -> Versioned | None:
        """The value of ``name`` and its revision, or ``None`` if it does not exist.

        Raises ``InvalidIdError`` for a malformed name, ``CodecError`` for a stored value
        the system's codec cannot decode, ``TransportError`` when the transport has no
        key-value buckets or fails, ``SystemStoppedError`` when the system is not running.
        """
        return await self._store.read(self._node_id, name, self._counts)

    async def put(self, name: str, value: Any, *, expect: int | None = None) -> int:
        """Write ``value`` under ``name`` and return its new revision.

        ``expect=None`` writes whatever is there; ``expect=0`` only if ``name`` does not
        exist; ``expect=rev`` only if ``rev`` is the revision of its current value
        (compare-and-set: pass the revision you read, never a predicted next one).

        Raises ``StateConflict`` (carrying the current value) when the compare fails,
        ``CodecError`` for a value the codec cannot encode, ``PayloadTooLargeError`` for a
        value over the bucket's limit (the transport's ``max_payload`` less 64 bytes),
        ``InvalidIdError`` for a malformed name, ``ValueError`` for a negative ``expect``,
        and ``TransportError`` as ``get`` does. Nothing is written when it raises.
        """
        store = self._store
        node_id = self._node_id
        key = store.key(node_id, name)
        _check_expect(expect)
        data = store.encode(node_id, name, value)
        kv = store.bucket() or await store.open()
        try:
            revision = await kv.put(key, data, expect=expect)
        except RevisionMismatch as mismatch:
            self._counts.state_conflicts += 1
            raise store.conflict(node_id, name, mismatch) from None
        except PayloadTooLargeError as exc:
            raise PayloadTooLargeError(f"state {name!r} of node {node_id!r}: {exc}") from None
        self._counts.state_writes += 1
        store.remember(key, Entry(data, revision))
        return revision

    async def delete(self, name: str, *, expect: int | None = None) -> None:
        """Delete ``name``. A missing name is left as it is, unless ``expect`` is given:
        then the delete happens only if ``expect`` matches (``0``: the name must not exist;
        ``rev``: its current revision), else ``StateConflict``. Raises as ``put`` does."""
        store = self._store
        key = store.key(self._node_id, name)
        _check_expect(expect)
        kv = store.bucket() or await store.open()
        try:
            await kv.delete(key, expect=expect)
        except RevisionMismatch as mismatch:
            self._counts.state_conflicts += 1
            raise store.conflict(self._node_id, name, mismatch) from None
        self._counts.state_writes += 1
        store.remember(key, None)

    async def update(
        self, name: str, fn: Callable[[Any], Any | Awaitable[Any]], *, attempts: int = 5
    ) -> Versioned:
        """Apply ``fn`` to the current value of ``name`` (``None`` if it does not exist) and
        store what it returns, with compare-and-set; returns the stored ``Versioned``.

        ``fn`` may be sync or async. It may run more than once: when another writer got in
        first, the compare is refused and ``fn`` is applied again to that writer's value,
        up to ``attempts`` times in all (at once the first time, then after a short
        jittered wait and a fresh read). Updates of one name in one system run one at a
        time. What ``fn`` raises is raised at once, and nothing is written.

        Raises ``StateConflict`` when every attempt was refused: a name that several
        processes update all the time (give it more ``attempts``, or send its updates to
        one place), ``ValueError`` for ``attempts`` below 1, and what ``put`` raises.
        """
        store = self._store
        node_id = self._node_id
        counts = self._counts
        key = store.key(node_id, name)
        if type(attempts) is not int or attempts < 1:
            raise ValueError(f"attempts must be an int of at least 1, not {attempts!r}")
        if not callable(fn):
            raise TypeError(f"update needs a function of the current value, not {fn!r}")
        kv = store.bucket() or await store.open()
        if not store.try_turn(key):
            await store.wait_turn(key)
        try:
            base = store.seen(key)  # remembered entries were decoded once already
            value = None if base is None else store.decode_own(base.value)
            if base is None:
                base = await kv.get(key)
                counts.state_reads += 1
                value = store.decode(base.value) if base is not None else None
            for attempt in range(1, attempts + 1):
                new = fn(value)
                if hasattr(type(new), "__await__"):
                    new = await new
                data = store.encode(node_id, name, new)
                try:
                    revision = await kv.put(key, data, expect=0 if base is None else base.revision)
                except RevisionMismatch as mismatch:
                    counts.state_conflicts += 1
                    if attempt == attempts:
                        raise store.conflict(node_id, name, mismatch) from None
                    base = mismatch.current
                    if attempt > 1:  # contended: wait, then read it again (fresher)
                        ceiling = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (attempt - 2))
                        await anyio.sleep(ceiling / 2 + random.uniform(0, ceiling / 2))
                        base = await kv.get(key)
                        counts.state_reads += 1
                    value = store.decode(base.value) if base is not None else None
                    store.remember(key, base)
                    continue
                except PayloadTooLargeError as exc:
                    raise PayloadTooLargeError(
                        f"state {name!r} of node {node_id!r}: {exc}"
                    ) from None
                counts.state_writes += 1
                store.remember(key, Entry(data, revision))
                return Versioned(store.decode_own(data), revision)
        finally:
            store.end_turn(key)
        raise AssertionError("unreachable: the last attempt returns or raises")
