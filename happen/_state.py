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

import inspect
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
    system last saw of each name. Every node of the system is handed the same store.

    ``transport`` returns the system's running transport, or raises when there is none.
    """

    def __init__(self, *, codec: Codec, namespace: str, transport: Callable[[], Transport]) -> None:
        self.bucket_name = f"happen_{namespace}_state"
        self._codec = codec
        self._decoder = codec.decoder(object)
        self._transport = transport
        self._kv: KeyValue | None = None
        self._opening: anyio.Lock | None = None
        self._updating: dict[str, deque[anyio.Event]] = {}  # names being updated: waiters
        self._seen: OrderedDict[str, Entry] = OrderedDict()
        self._seen_bytes = 0

    # ----- the bucket ----------------------------------------------------------------

    async def _bucket(self) -> KeyValue:
        transport = self._transport()  # raises unless the system runs (or drains)
        kv = self._kv
        if kv is not None:
            return kv
        if self._opening is None:
            self._opening = anyio.Lock()
        async with self._opening:
            if self._kv is None:
                self._kv = await durable_transport(transport).key_value(self.bucket_name)
            return self._kv

    # ----- values --------------------------------------------------------------------

    def _encode(self, node_id: str, name: str, value: Any) -> bytes:
        try:
            return self._codec.encode(value)
        except CodecError as exc:
            raise CodecError(f"state {name!r} of node {node_id!r}: {exc}") from None

    def _versioned(self, entry: Entry | None) -> Versioned | None:
        if entry is None:
            return None
        return Versioned(self._decoder.decode(entry.value), entry.revision)

    def _conflict(self, node_id: str, name: str, mismatch: RevisionMismatch) -> StateConflict:
        return StateConflict(node_id, name, mismatch.expected, self._versioned(mismatch.current))

    # ----- what this system last saw of each name (a guess for update) ---------------

    def _remember(self, key: str, entry: Entry | None) -> None:
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
        seen[key] = entry
        seen.move_to_end(key)
        self._seen_bytes += len(entry.value)
        while len(seen) > SEEN_ENTRIES or self._seen_bytes > SEEN_BYTES:
            self._seen_bytes -= len(seen.popitem(last=False)[1].value)

    async def _take_turn(self, key: str) -> None:
        """Wait until no other update of ``key`` runs in this system; then it is ours until
        ``_end_turn``. No checkpoint when nobody else updates it (the common case)."""
        waiters = self._updating.get(key)
        if waiters is None:
            self._updating[key] = deque()
            return
        turn = anyio.Event()
        waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():  # it was handed to us as we were cancelled: pass it on
                self._end_turn(key)
            else:
                waiters.remove(turn)
            raise

    def _end_turn(self, key: str) -> None:
        waiters = self._updating[key]
        if waiters:
            waiters.popleft().set()
        else:
            del self._updating[key]

    # ----- operations ----------------------------------------------------------------

    async def get(self, node_id: str, name: str, counts: StateCounts) -> Versioned | None:
        """The value of ``name`` in ``node_id``'s state, or ``None``."""
        key = f"{node_id}.{_check_name(name)}"
        kv = await self._bucket()
        entry = await kv.get(key)
        counts.state_reads += 1
        self._remember(key, entry)
        return self._versioned(entry)

    async def put(
        self, node_id: str, name: str, value: Any, expect: int | None, counts: StateCounts
    ) -> int:
        """Write ``value`` (conditionally with ``expect``); returns its revision."""
        key = f"{node_id}.{_check_name(name)}"
        _check_expect(expect)
        data = self._encode(node_id, name, value)
        kv = await self._bucket()
        try:
            revision = await kv.put(key, data, expect=expect)
        except RevisionMismatch as mismatch:
            counts.state_conflicts += 1
            self._remember(key, mismatch.current)
            raise self._conflict(node_id, name, mismatch) from None
        except PayloadTooLargeError as exc:
            raise PayloadTooLargeError(f"state {name!r} of node {node_id!r}: {exc}") from None
        counts.state_writes += 1
        self._remember(key, Entry(data, revision))
        return revision

    async def delete(
        self, node_id: str, name: str, expect: int | None, counts: StateCounts
    ) -> None:
        """Delete ``name`` (conditionally with ``expect``)."""
        key = f"{node_id}.{_check_name(name)}"
        _check_expect(expect)
        kv = await self._bucket()
        try:
            await kv.delete(key, expect=expect)
        except RevisionMismatch as mismatch:
            counts.state_conflicts += 1
            self._remember(key, mismatch.current)
            raise self._conflict(node_id, name, mismatch) from None
        counts.state_writes += 1
        self._remember(key, None)

    async def update(
        self,
        node_id: str,
        name: str,
        fn: Callable[[Any], Any],
        attempts: int,
        counts: StateCounts,
    ) -> Versioned:
        """Read, apply ``fn``, compare-and-set; retry on conflict (see ``NodeState.update``)."""
        key = f"{node_id}.{_check_name(name)}"
        if type(attempts) is not int or attempts < 1:
            raise ValueError(f"attempts must be an int of at least 1, not {attempts!r}")
        if not callable(fn):
            raise TypeError(f"update needs a function of the current value, not {fn!r}")
        kv = await self._bucket()
        await self._take_turn(key)
        try:
            base = self._seen.get(key)
            if base is None:
                base = await kv.get(key)
                counts.state_reads += 1
            for attempt in range(1, attempts + 1):
                new = fn(None if base is None else self._decoder.decode(base.value))
                if inspect.isawaitable(new):
                    new = await new
                data = self._encode(node_id, name, new)
                expect = 0 if base is None else base.revision
                try:
                    revision = await kv.put(key, data, expect=expect)
                except RevisionMismatch as mismatch:
                    counts.state_conflicts += 1
                    base = mismatch.current
                    self._remember(key, base)
                    if attempt == attempts:
                        raise self._conflict(node_id, name, mismatch) from None
                    if attempt > 1:  # contended: wait, then read it again (fresher)
                        ceiling = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (attempt - 2))
                        await anyio.sleep(ceiling / 2 + random.uniform(0, ceiling / 2))
                        base = await kv.get(key)
                        counts.state_reads += 1
                    continue
                except PayloadTooLargeError as exc:
                    raise PayloadTooLargeError(
                        f"state {name!r} of node {node_id!r}: {exc}"
                    ) from None
                counts.state_writes += 1
                entry = Entry(data, revision)
                self._remember(key, entry)
                return Versioned(self._decoder.decode(data), revision)
        finally:
            self._end_turn(key)
        raise AssertionError("unreachable: the last attempt returns or raises")


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
        return await self._store.get(self._node_id, name, self._counts)


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
        return await self._store.get(self._node_id, name, self._counts)

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
        return await self._store.put(self._node_id, name, value, expect, self._counts)

    async def delete(self, name: str, *, expect: int | None = None) -> None:
        """Delete ``name``. A missing name is left as it is, unless ``expect`` is given:
        then the delete happens only if ``expect`` matches (``0``: the name must not exist;
        ``rev``: its current revision), else ``StateConflict``. Raises as ``put`` does."""
        await self._store.delete(self._node_id, name, expect, self._counts)

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
        return await self._store.update(self._node_id, name, fn, attempts, self._counts)
