"""Per-key order: ``key=`` on ``send`` and ``stream``, ``event.key`` in the handler.

At most one event of a key runs at a time on a node, across all its instances; keys run in
parallel; the events of a key run in the order the node accepted them. In one process this
is exact (memory transport, asyncio and trio); across instances (several systems on one
memory broker, or over NATS) key partitions are owned by one instance at a time, and a
handover never reorders a key. A killed instance is in ``test_keys_crash.py``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest

import happen
from happen._config import ConcurrencySettings
from happen._errors import TransportError
from happen._keys import PARTITIONS, partition_of
from happen._mailbox import Mailbox
from happen._transport import Message, Subscription, Transport, TransportListener
from tests.helpers import (
    authorization,
    eventually,
    make_system,
    signed_in,
    subscriptions_live,
    unique_namespace,
)

pytestmark = pytest.mark.anyio

WAIT = 10  # seconds; a test that needs this long has failed


class Recorder:
    """A keyed handler that records when each event starts and ends, and which instance ran
    it; it waits at ``gate`` for events whose payload asks to be held."""

    def __init__(self) -> None:
        self.starts: list[tuple[str | None, Any]] = []
        self.spans: dict[str | None, list[tuple[float, float, Any, str]]] = defaultdict(list)
        self.running: dict[str | None, Any] = {}
        self.overlaps: list[tuple[str | None, Any, Any]] = []
        self.gate = anyio.Event()

    def handler(self, instance: str = "", jitter: float = 0.0) -> Any:
        async def handle(event: happen.Event, context: dict[str, Any]) -> Any:
            key, payload = event.key, event.payload
            if key is not None and key in self.running:
                self.overlaps.append((key, self.running[key], payload))
            if key is not None:
                self.running[key] = payload
            began = anyio.current_time()
            self.starts.append((key, payload))
            try:
                if isinstance(payload, dict) and payload.get("hold"):
                    await self.gate.wait()
                elif jitter:
                    await anyio.sleep(random.random() * jitter)
                else:
                    await anyio.lowlevel.checkpoint()
            finally:
                if key is not None:
                    del self.running[key]
                self.spans[key].append((began, anyio.current_time(), payload, instance))
            return {"key": key, "payload": payload, "instance": instance}

        return handle

    def order(self, key: str | None) -> list[Any]:
        return [payload for k, payload in self.starts if k == key]


def keyed_node(system: happen.System, recorder: Recorder, **config: Any) -> happen.Node:
    node = system.create_node("ledger")
    node.on("op", recorder.handler())
    return node


def one_system(transport_url: str, **concurrency: Any) -> happen.System:
    return make_system(transport_url, concurrency={"patterns": {"ledger": concurrency}})


async def send(node: happen.Node, payload: Any, key: str | None, **kwargs: Any) -> Any:
    return await node.send("ledger", {"type": "op", "payload": payload}, key=key, **kwargs)


# ----- one process: exact ---------------------------------------------------------------


async def test_a_keys_events_run_one_at_a_time_in_the_order_accepted(transport_url: str) -> None:
    """Two keys, each with a running event held open and five more waiting: the waiting ones
    hold no slot, count in ``queued`` and ``keyed_waiting``, and then run in the order the
    node accepted them; unkeyed events and other keys are not held up."""
    recorder = Recorder()
    async with one_system(transport_url, max_concurrent=4) as system:
        ledger = keyed_node(system, recorder)
        client = system.create_node("client")
        async with anyio.create_task_group() as tg:
            for key in ("a", "b"):
                tg.start_soon(functools.partial(send, client, {"n": 0, "hold": True}, key))
            await eventually(lambda: ledger.stats().keys_active == 2)
            waiting = 0
            for n in range(1, 6):
                for key in ("a", "b"):
                    tg.start_soon(functools.partial(send, client, {"n": n}, key))
                    waiting += 1
                    await eventually(lambda w=waiting: ledger.stats().keyed_waiting == w)
            stats = ledger.stats()
            assert (stats.active, stats.queued, stats.keyed_waiting) == (2, 10, 10)
            assert stats.keys_active == 2
            # Slots are free for other keys and for unkeyed events meanwhile.
            assert (await send(client, "free", "c"))["payload"] == "free"
            assert (await send(client, "plain", None))["payload"] == "plain"
            recorder.gate.set()
        await eventually(lambda: ledger.stats().completed == 14)
    for key in ("a", "b"):
        assert [p["n"] for p in recorder.order(key)] == [0, 1, 2, 3, 4, 5]
    assert recorder.overlaps == []
    stats = ledger.stats()
    assert (stats.accepted, stats.completed, stats.keys_active, stats.keyed_waiting) == (
        14,
        14,
        0,
        0,
    )


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        # a1 ends: a2 (its key now free) is older than b3; then b3 is older than a4.
        ("fifo", ["a1", "a2", "b3", "a4"]),
        # by priority among the events whose key is free: b3 (5), then a2 (0, older than
        # a4, which must wait for it anyway).
        ("priority", ["a1", "b3", "a2", "a4"]),
    ],
)
async def test_a_free_slot_goes_to_the_oldest_event_whose_key_is_free(
    strategy: str, expected: list[str]
) -> None:
    recorder = Recorder()
    async with make_system(
        "memory",
        concurrency={"patterns": {"ledger": {"max_concurrent": 1, "queue_strategy": strategy}}},
    ) as system:
        ledger = keyed_node(system, recorder)
        client = system.create_node("client")
        sends = [
            ({"n": "a1", "hold": True}, "a", 0),
            ({"n": "a2"}, "a", 0),
            ({"n": "b3"}, "b", 5),
            ({"n": "a4"}, "a", 0),
        ]
        async with anyio.create_task_group() as tg:
            for count, (payload, key, priority) in enumerate(sends, start=1):
                tg.start_soon(functools.partial(send, client, payload, key, priority=priority))
                await eventually(lambda c=count: ledger.stats().accepted == c)
            stats = ledger.stats()
            assert stats.keyed_waiting == 2  # a2 and a4; b3 waits for the slot
            assert stats.keys_active == 1  # a; b is held by an event that has no slot yet
            recorder.gate.set()
    assert [p["n"] for _, p in recorder.starts] == expected
    assert (ledger.stats().keys_active, ledger.stats().keyed_waiting) == (0, 0)


async def test_keyed_events_waiting_count_against_the_queue_limit(transport_url: str) -> None:
    recorder = Recorder()
    async with one_system(
        transport_url, max_concurrent=1, queue_limit=3, backpressure_threshold=1.0
    ) as system:
        ledger = keyed_node(system, recorder)
        client = system.create_node("client")
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(send, client, {"hold": True}, "a"))
            await eventually(lambda: ledger.stats().active == 1)
            for n in range(3):
                tg.start_soon(functools.partial(send, client, n, "a"))
                await eventually(lambda n=n: ledger.stats().keyed_waiting == n + 1)
            with pytest.raises(happen.QueueFullError) as full:
                await send(client, "one too many", "a")
            assert full.value.queued == 3
            with pytest.raises(happen.QueueFullError):  # no slot and no place: any key
                await send(client, "another key", "b")
            recorder.gate.set()
    stats = ledger.stats()
    assert (stats.accepted, stats.rejected, stats.completed) == (4, 2, 4)


async def test_a_caller_that_gives_up_frees_its_place_and_the_key_moves_on(
    transport_url: str,
) -> None:
    """Two ways out of the queue: a keyed event waiting behind its key (its caller's
    timeout), and one holding its key while it waits for a slot (its caller cancelled)."""
    recorder = Recorder()
    async with one_system(transport_url, max_concurrent=1) as system:
        ledger = keyed_node(system, recorder)
        client = system.create_node("client")
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(send, client, {"n": "u", "hold": True}, None))
            await eventually(lambda: ledger.stats().active == 1)
            cancelled = anyio.CancelScope()

            async def given_up() -> None:
                with cancelled:
                    await send(client, {"n": "a1"}, "a")

            tg.start_soon(given_up)  # holds key a, waits for the slot
            await eventually(lambda: ledger.stats().queued == 1)
            tg.start_soon(functools.partial(send, client, {"n": "a2"}, "a"))
            await eventually(lambda: ledger.stats().keyed_waiting == 1)
            with pytest.raises(happen.SendTimeout):
                await send(client, {"n": "a3"}, "a", timeout=0.2)
            cancelled.cancel()
            await eventually(lambda: ledger.stats().queued == 1)  # a2 holds the key now
            assert ledger.stats().keyed_waiting == 0
            recorder.gate.set()
        await eventually(lambda: ledger.stats().completed == 2)
    assert [p["n"] for _, p in recorder.starts] == ["u", "a2"]
    stats = ledger.stats()
    assert (stats.accepted, stats.completed, stats.failed) == (4, 2, 2)


async def test_a_streaming_handler_holds_its_key_until_it_ends(transport_url: str) -> None:
    async with one_system(transport_url) as system:
        ledger = system.create_node("ledger")
        order: list[str] = []
        more = anyio.Event()

        @ledger.on("history")
        async def history(event: happen.Event, context: dict[str, Any]) -> AsyncIterator[int]:
            order.append(f"start {event.payload}")
            yield 0
            await more.wait()
            yield 1
            yield 2
            order.append(f"end {event.payload}")

        client = system.create_node("client")
        second: list[int] = []

        async def read_second() -> None:
            event = {"type": "history", "payload": 2}
            async with client.stream("ledger", event, key="a") as stream:
                second.extend([item async for item in stream])

        async with client.stream("ledger", {"type": "history", "payload": 1}, key="a") as s:
            assert await anext(s) == 0
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_second)
                await eventually(lambda: ledger.stats().keyed_waiting == 1)
                assert order == ["start 1"]
                more.set()
                assert [item async for item in s] == [1, 2]
        assert order == ["start 1", "end 1", "start 2", "end 2"]
        assert second == [0, 1, 2]


async def test_the_handler_sees_the_key(transport_url: str) -> None:
    recorder = Recorder()
    key = "compte é/7 : ✓ " + "x" * 200
    async with one_system(transport_url) as system:
        keyed_node(system, recorder)
        client = system.create_node("client")
        assert (await send(client, 1, key))["key"] == key
        assert (await send(client, 2, None))["key"] is None
        longest = "k" * 256
        assert (await send(client, 3, longest))["key"] == longest


# ----- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "error", "words"),
    [
        ("", happen.InvalidIdError, "of 0 characters"),
        ("k" * 257, happen.InvalidIdError, "of 257 characters"),
        ("\ud800", happen.InvalidIdError, "UTF-8"),
        (7, TypeError, "not int"),
        (b"account-7", TypeError, "not bytes"),
        (["a"], TypeError, "not list"),
    ],
)
async def test_a_bad_key_is_refused_at_the_sender(key: Any, error: type, words: str) -> None:
    async with make_system("memory") as system:
        ledger = system.create_node("ledger")
        ledger.on("op", lambda event, context: None)
        client = system.create_node("client")
        with pytest.raises(error, match="key") as refused:
            await client.send("ledger", {"type": "op"}, key=key)
        assert words in str(refused.value)
        with pytest.raises(error):
            client.stream("ledger", {"type": "op"}, key=key)
        assert ledger.stats().accepted == 0


async def test_a_key_met_before_is_checked_again_when_it_is_not_a_str() -> None:
    """A sender remembers the valid keys it met; something that only equals one (a str
    subclass) is still refused, by its type."""

    class Account(str):
        pass

    async with make_system("memory") as system:
        ledger = system.create_node("ledger")
        ledger.on("op", lambda event, context: event.key)
        client = system.create_node("client")
        assert await client.send("ledger", {"type": "op"}, key="account-7") == "account-7"
        with pytest.raises(TypeError, match="not Account"):
            await client.send("ledger", {"type": "op"}, key=Account("account-7"))
        assert (ledger.stats().accepted, ledger.stats().rejected) == (1, 0)


async def test_a_bad_key_from_a_foreign_client_is_a_bad_request(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    async with happen.System(transport=make_transport(), namespace=ns) as system:
        ledger = system.create_node("ledger")
        ledger.on("op", lambda event, context: "ran")
        await subscriptions_live(ledger)
        raw = make_transport()
        await raw.start()
        inbox = raw.new_inbox()
        replies: list[dict[str, Any]] = []
        answered = anyio.Event()

        async def on_reply(msg: Message) -> None:
            replies.append(msgspec.msgpack.decode(msg.data))
            if len(replies) == 3:
                answered.set()

        await raw.subscribe(inbox + ".*", on_reply)
        for n, key in enumerate(["", "k" * 257, 7]):
            frame = {"k": "req", "type": "op", "key": key}
            await raw.publish(
                f"{ns}.node.ledger", msgspec.msgpack.encode(frame), reply=f"{inbox}.{n}"
            )
        with anyio.fail_after(WAIT):
            await answered.wait()
    assert [reply["code"] for reply in replies] == ["bad_request"] * 3
    assert ledger.stats().rejected == 3 and ledger.stats().accepted == 0


# ----- the interface of retries and durable intake -----------------------------------------


async def test_a_retry_keeps_its_key_while_it_waits(transport_url: str) -> None:
    """A failed attempt waits its backoff without a slot but keeps its key: the key's next
    event waits for the retry to end; other keys run meanwhile."""
    backoff = {"initial": 0.2, "jitter": "none"}
    config = {"patterns": {"ledger": {"max_attempts": 2, "on_error": "retry", "backoff": backoff}}}
    async with make_system(
        transport_url, delivery=config, concurrency={"patterns": {"ledger": {"max_concurrent": 1}}}
    ) as system:
        ledger = system.create_node("ledger")
        order: list[str] = []

        @ledger.on("op")
        async def op(event: happen.Event, context: dict[str, Any]) -> str:
            order.append(f"{event.payload}/{event.delivery}")
            if event.payload == "a1" and event.delivery == 1:
                raise ConnectionError("try again")
            return str(event.payload)

        client = system.create_node("client")
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(send, client, "a1", "a"))
            await eventually(lambda: ledger.stats().retrying == 1)
            tg.start_soon(functools.partial(send, client, "a2", "a"))
            await eventually(lambda: ledger.stats().keyed_waiting == 1)
            stats = ledger.stats()
            assert (stats.active, stats.keys_active) == (0, 1), "no slot, but the key"
            assert await send(client, "b1", "b") == "b1"  # another key runs meanwhile
        assert order == ["a1/1", "b1/1", "a1/2", "a2/1"]


async def test_a_dead_letter_releases_the_key_once_delivered(transport_url: str) -> None:
    config = {"patterns": {"ledger": {"max_attempts": 1, "dead_letter": "dlq"}}}
    async with make_system(transport_url, delivery=config) as system:
        ledger = system.create_node("ledger")
        order: list[str] = []

        @ledger.on("op")
        async def op(event: happen.Event, context: dict[str, Any]) -> str:
            order.append(str(event.payload))
            if event.payload == "a1":
                raise ValueError("bad")
            return str(event.payload)

        dlq = system.create_node("dlq")
        letter_may_land = anyio.Event()

        @dlq.on("happen.dead_letter")
        async def dead(event: happen.Event, context: dict[str, Any]) -> None:
            await letter_may_land.wait()
            order.append("dead letter of " + str(event.payload["event"]["payload"]))

        client = system.create_node("client")
        async with anyio.create_task_group() as tg:

            async def first() -> None:
                with pytest.raises(happen.HandlerError):
                    await send(client, "a1", "a")

            tg.start_soon(first)
            await eventually(lambda: ledger.stats().dead_letters_pending == 1)
            tg.start_soon(functools.partial(send, client, "a2", "a"))
            await eventually(lambda: ledger.stats().keyed_waiting == 1)
            assert ledger.stats().keys_active == 1  # held until the dead letter is delivered
            letter_may_land.set()
        assert order == ["a1", "dead letter of a1", "a2"]
        stats = ledger.stats()
        assert (stats.dead_lettered, stats.completed, stats.keys_active) == (1, 1, 0)


async def test_a_durable_nodes_keyed_events_run_one_at_a_time_in_order(
    transport_url: str,
) -> None:
    """``enqueue(..., key=)`` and ``send(..., key=)`` to a durable node: stored with their
    key; the instance that fetches them runs a key's events one at a time, in log order."""
    recorder = Recorder()
    config = {"patterns": {"ledger": {"durable": True, "ack_wait": 5.0}}}
    async with make_system(
        transport_url, delivery=config, concurrency={"patterns": {"ledger": {"max_concurrent": 8}}}
    ) as system:
        ledger = system.create_node("ledger")
        ledger.on("op", recorder.handler(jitter=0.003))
        client = system.create_node("client")
        for n in range(30):
            receipt = await client.enqueue("ledger", {"type": "op", "payload": n}, key=f"k{n % 3}")
            assert not receipt.duplicate
        assert (await send(client, "last", "k0"))["key"] == "k0"
        await eventually(lambda: ledger.stats().completed == 31, WAIT)
        with pytest.raises(happen.InvalidIdError):
            await client.enqueue("ledger", {"type": "op"}, key="")
        with pytest.raises(TypeError):
            await client.enqueue("ledger", {"type": "op"}, key=7)  # type: ignore[arg-type]
    assert recorder.overlaps == []
    for k in range(3):
        assert recorder.order(f"k{k}")[:10] == list(range(k, 30, 3))
    assert recorder.order("k0")[-1] == "last"


async def test_a_hot_keys_backlog_does_not_hold_back_a_durable_nodes_other_keys(
    transport_url: str,
) -> None:
    """A durable node with 2 slots: while one hot key's event runs (held open) and 20 more
    of it wait, the node still fetches and runs another key's event; the hot key's events
    then run in order."""
    recorder = Recorder()
    config = {"patterns": {"ledger": {"durable": True, "ack_wait": 5.0}}}
    concurrency = {"patterns": {"ledger": {"max_concurrent": 2, "queue_limit": 50}}}
    async with make_system(transport_url, delivery=config, concurrency=concurrency) as system:
        ledger = system.create_node("ledger")
        ledger.on("op", recorder.handler())
        client = system.create_node("client")
        await client.enqueue("ledger", {"type": "op", "payload": {"n": 0, "hold": True}}, key="hot")
        for n in range(1, 21):
            await client.enqueue("ledger", {"type": "op", "payload": {"n": n}}, key="hot")
        await eventually(lambda: ledger.stats().keyed_waiting == 20, WAIT)
        with anyio.fail_after(WAIT):
            assert (await send(client, "cold", "cold"))["payload"] == "cold"
        assert ledger.stats().active == 1  # the hot key's first event, still held open
        recorder.gate.set()
        await eventually(lambda: ledger.stats().completed == 22, WAIT)
    assert [p["n"] for p in recorder.order("hot")] == list(range(21))
    assert recorder.overlaps == []


class Item:
    def __init__(self, name: str, key: str | None) -> None:
        self.name = name
        self.key = key


async def test_the_mailbox_keeps_a_key_across_retries_and_dead_letters() -> None:
    """The mailbox's key interface, as retries and dead letters use it: an item held to run
    again (``later``) keeps its key, without a slot; a run marked ``keep_key`` (its dead
    letter is on its way) keeps it until ``release_key``. The key's later items wait."""
    ran: list[str] = []
    async with anyio.create_task_group() as tg:

        def spawn(fn: Any, *args: Any) -> None:
            tg.start_soon(fn, *args)

        mailbox: Mailbox[Item] = Mailbox(ConcurrencySettings(max_concurrent=2), spawn)

        async def run(item: Item, scope: anyio.CancelScope) -> None:
            ran.append(item.name)
            if item.name == "a1" and ran.count("a1") == 1:
                mailbox.later(item, 0.05)  # a retry, after its backoff
            elif item.name == "b1":
                mailbox.keep_key(item)  # dead-lettered: settled once the letter is delivered
            await anyio.lowlevel.checkpoint()

        mailbox.serve(run, _nothing)
        a1, a2, b1, b2 = Item("a1", "a"), Item("a2", "a"), Item("b1", "b"), Item("b2", "b")
        for item in (a1, a2, b1, b2):
            assert mailbox.offer(item)
        await eventually(lambda: sorted(ran) == ["a1", "b1"] and mailbox.active == 0)
        stats = mailbox.stats()
        assert (stats.active, stats.queued, stats.keyed_waiting, stats.keys_active) == (
            0,
            2,
            2,
            2,
        ), "no slot is held, both keys are, a2 and b2 wait"
        await eventually(lambda: ran[-2:] == ["a1", "a2"])  # the retry ran, then a2
        assert "b2" not in ran
        mailbox.release_key(b1)  # b1's dead letter was delivered: b2 may run
        await eventually(lambda: ran[-1] == "b2")
        tg.cancel_scope.cancel()
    stats = mailbox.stats()
    assert (stats.queued, stats.keyed_waiting, stats.keys_active) == (0, 0, 0)
    assert stats.accepted == 4, "a retry is not accepted again"


async def _nothing() -> None:
    pass


def test_partitions_are_the_same_in_every_process() -> None:
    # CRC-32 of the UTF-8 bytes modulo PARTITIONS, never Python's (salted) hash(): every
    # instance and every sender's host computes the same partition for a key.
    assert PARTITIONS == 64
    assert [partition_of(k) for k in ("a", "account-7", "é")] == [3, 5, 62]


# ----- across instances -------------------------------------------------------------------


#: Node ``ledger`` durable: its events are stored, and each key partition's events are
#: fetched by the instance that owns it.
DURABLE = {"patterns": {"ledger": {"durable": True, "ack_wait": 2.0}}}


def hosts(
    make_transport: Callable[[], Transport], ns: str, n: int, *, durable: bool = False
) -> list[happen.System]:
    return [
        happen.System(
            transport=make_transport(),
            namespace=ns,
            liveness_timeout=2.0,
            delivery=DURABLE if durable else None,
        )
        for _ in range(n)
    ]


def ledgers(systems: list[happen.System], recorder: Recorder, jitter: float) -> list[happen.Node]:
    """The node ``ledger`` on each of ``systems``, its handler ``recorder``'s, labelled
    ``i0``, ``i1``... by instance."""
    nodes = []
    for index, system in enumerate(systems):
        node = system.create_node("ledger")
        node.on("op", recorder.handler(f"i{index}", jitter=jitter))
        nodes.append(node)
    return nodes


async def rounds(
    senders: list[happen.Node],
    instances: list[happen.Node],
    *,
    rounds: int,
    keys: int,
    between: Callable[[int], Any] | None = None,
) -> list[BaseException]:
    """``rounds`` rounds of one event per key, spread over the senders. A round is sent
    once every event of the rounds before has been accepted somewhere: so the order in
    which the node accepted a key's events is the order of the rounds."""
    errors: list[BaseException] = []

    async def one(sender: happen.Node, key: int, n: int) -> None:
        try:
            await sender.send("ledger", {"type": "op", "payload": n}, key=f"k{key}", timeout=WAIT)
        except happen.HappenError as exc:
            errors.append(exc)

    def settled() -> int:
        return sum(node.stats().accepted + node.stats().rejected for node in instances)

    async with anyio.create_task_group() as tg:
        for n in range(rounds):
            for key in range(keys):
                tg.start_soon(one, senders[(key + n) % len(senders)], key, n)
            await eventually(lambda n=n: settled() >= keys * (n + 1), timeout=WAIT)
            if between is not None:
                await between(n)
    return errors


def no_overlap_and_in_order(recorder: Recorder, keys: int, rounds: int) -> None:
    assert recorder.overlaps == []
    for key in range(keys):
        spans = sorted(recorder.spans[f"k{key}"])
        assert [payload for _, _, payload, _ in spans] == list(range(rounds)), key
        for (_, end, _, _), (start, _, _, _) in itertools.pairwise(spans):
            assert start >= end, f"k{key}: two events ran at once"


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
@pytest.mark.parametrize("instances", [2, 3])
async def test_keys_are_ordered_across_instances(
    make_transport: Callable[[], Transport], instances: int, durable: bool
) -> None:
    """1,000 events over 50 keys from 3 senders to a node hosted 2 or 3 times (durable or
    not): no key runs twice at once, each key runs in the order its events were accepted
    (stored, for a durable node), every instance runs some keys, and every event is
    counted once."""
    ns = unique_namespace()
    recorder = Recorder()
    systems = hosts(make_transport, ns, instances, durable=durable)
    nodes = ledgers(systems, recorder, jitter=0.002)
    client_system = happen.System(
        transport=make_transport(), namespace=ns, delivery=DURABLE if durable else None
    )
    senders = [client_system.create_node(f"sender-{n}") for n in range(3)]
    async with _all(*systems, client_system):
        for node in nodes:
            await subscriptions_live(node)
        errors = await rounds(senders, nodes, rounds=20, keys=50)
        await eventually(lambda: sum(n.stats().completed for n in nodes) == 1000, WAIT)
    assert errors == []
    no_overlap_and_in_order(recorder, keys=50, rounds=20)
    ran_on = {instance for spans in recorder.spans.values() for *_, instance in spans}
    assert ran_on == {f"i{index}" for index in range(instances)}, "every instance runs keys"
    stats = [node.stats() for node in nodes]
    assert sum(s.accepted for s in stats) == sum(s.completed for s in stats) == 1000
    assert sum(s.rejected + s.failed + s.dropped for s in stats) == 0
    # Every request reached an instance from a sender, or was passed on by another one.
    arrived = sum(s.accepted + s.forwarded for s in stats)
    assert arrived == 1000 + sum(s.forwarded for s in stats)


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
async def test_an_instance_stopped_cleanly_hands_its_keys_over_in_order(
    make_transport: Callable[[], Transport], durable: bool
) -> None:
    """One of three instances stops cleanly halfway through the rounds: the events it had
    accepted end there, its keys go on elsewhere with no overlap and no reorder."""
    ns = unique_namespace()
    recorder = Recorder()
    systems = hosts(make_transport, ns, 3, durable=durable)
    nodes = ledgers(systems, recorder, jitter=0.004)
    client_system = happen.System(
        transport=make_transport(), namespace=ns, delivery=DURABLE if durable else None
    )
    senders = [client_system.create_node(f"sender-{n}") for n in range(3)]
    leave = anyio.Event()

    async def host_first(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with systems[0]:
            task_status.started()
            await leave.wait()  # then it stops (cleanly) while the rounds go on

    async def stop_first(n: int) -> None:
        if n == 9:
            leave.set()

    async with _all(*systems[1:], client_system), anyio.create_task_group() as tg:
        await tg.start(host_first)
        for node in nodes:
            await subscriptions_live(node)
        errors = await rounds(senders, nodes, rounds=20, keys=50, between=stop_first)
        await eventually(lambda: sum(n.stats().completed for n in nodes) == 1000, WAIT)
    assert errors == []
    no_overlap_and_in_order(recorder, keys=50, rounds=20)
    first = nodes[0].stats()
    assert first.accepted == first.completed and first.failed == first.rejected == 0
    late = [span for spans in recorder.spans.values() for span in spans if span[2] >= 12]
    assert late and all(instance != "i0" for *_, instance in late), "its keys moved"


class _all:
    """Enter several systems (an async context manager)."""

    def __init__(self, *systems: happen.System) -> None:
        self.systems = systems

    async def __aenter__(self) -> None:
        for system in self.systems:
            await system.start()

    async def __aexit__(self, *exc: object) -> None:
        for system in reversed(self.systems):
            await system.stop()


# ----- without a key-value bucket -------------------------------------------------------


class PlainTransport:
    """A transport without key-value buckets (only the NATS-shaped core of the seam)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.max_payload = inner.max_payload

    async def start(self) -> None:
        await self._inner.start()

    async def stop(self) -> None:
        await self._inner.stop()

    async def publish(
        self, subject: str, data: bytes, *, reply: str | None = None, headers: Any = None
    ) -> None:
        await self._inner.publish(subject, data, reply=reply, headers=headers)

    async def subscribe(
        self, subject: str, callback: Any, *, queue: str | None = None
    ) -> Subscription:
        sub: Subscription = await self._inner.subscribe(subject, callback, queue=queue)
        return sub

    def new_inbox(self) -> str:
        inbox: str = self._inner.new_inbox()
        return inbox

    def set_listener(self, listener: TransportListener | None) -> None:
        self._inner.set_listener(listener)


async def test_without_a_bucket_keys_are_ordered_within_the_instance(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from happen.transports.memory import MemoryTransport

    recorder = Recorder()
    caplog.set_level(logging.WARNING, logger="happen")
    async with happen.System(transport=PlainTransport(MemoryTransport())) as system:
        ledger = keyed_node(system, recorder)
        client = system.create_node("client")
        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(functools.partial(send, client, n, f"k{n % 3}"))
        assert ledger.stats().completed == 20
    assert recorder.overlaps == []
    assert "ordered within each instance only" in caplog.text


async def test_a_bucket_that_fails_fails_keyed_calls_with_the_reason() -> None:
    from happen.transports.memory import MemoryTransport

    class Broken(MemoryTransport):
        async def key_value(self, bucket: str) -> Any:
            raise TransportError(f"no access to bucket {bucket}")

    async with happen.System(transport=Broken(), namespace="broken") as system:
        ledger = system.create_node("ledger")
        ledger.on("op", lambda event, context: "ran")
        client = system.create_node("client")
        with pytest.raises(happen.TransportError, match="happen_broken_keys") as failed:
            await client.send("ledger", {"type": "op"}, key="a", timeout=WAIT)
        assert "cannot order keys across its instances" in str(failed.value)
        assert await client.send("ledger", {"type": "op"}) == "ran"  # unkeyed: as ever
    assert ledger.stats().rejected >= 1


# ----- the grants of docs/keys-and-state.md ---------------------------------------------------


def key_bucket_grants(ns: str, node: str) -> list[str]:
    """What docs/keys-and-state.md lists for the key bucket, for a host serving ``node``."""
    bucket = f"KV_happen_{ns}_keys"
    return [
        f"$JS.API.STREAM.INFO.{bucket}",
        f"$JS.API.STREAM.CREATE.{bucket}",
        f"$JS.API.STREAM.MSG.GET.{bucket}",
        f"$KV.happen_{ns}_keys.{node}",
    ]


def key_grants(ns: str, node: str) -> str:
    """nats-server users: ``host`` has what docs/keys-and-state.md lists for serving ``node``
    with keys (and ``NS.>`` / any inbox for the rest), ``nokeys`` the same without the
    JetStream grants of the key bucket."""
    return authorization(ns, {"host": key_bucket_grants(ns, node), "nokeys": []})


async def two_hosts_keep_key_order(as_host: Callable[[], happen.System]) -> None:
    """Node ``ledger`` hosted by two systems made by ``as_host``, a third sending: 4 rounds
    over 40 keys keep each key's order, and both instances run some keys."""
    recorder = Recorder()
    hosts = [as_host(), as_host()]
    nodes = []
    for index, system in enumerate(hosts):
        node = system.create_node("ledger")
        node.on("op", recorder.handler(f"i{index}"))
        nodes.append(node)
    client_system = as_host()
    senders = [client_system.create_node("sender")]
    async with _all(*hosts, client_system):
        for node in nodes:
            await subscriptions_live(node)
        assert await rounds(senders, nodes, rounds=4, keys=40) == []
    no_overlap_and_in_order(recorder, keys=40, rounds=4)
    ran_on = {instance for spans in recorder.spans.values() for *_, instance in spans}
    assert ran_on == {"i0", "i1"}


@pytest.mark.nats
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_documented_key_grants_are_enough(tmp_path: Any) -> None:
    from tests.conftest import granting

    ns = unique_namespace()
    with granting(tmp_path, key_grants(ns, "ledger")) as server:

        def as_user(name: str) -> happen.System:
            transport = signed_in(server.url, name, jetstream_timeout=0.5)
            return happen.System(transport=transport, namespace=ns, liveness_timeout=2.0)

        await two_hosts_keep_key_order(functools.partial(as_user, "host"))

        async with as_user("nokeys") as denied:  # without the grants of the key bucket
            other = denied.create_node("ledger")
            other.on("op", lambda event, context: "ran")
            client = denied.create_node("client")
            assert await client.send("ledger", {"type": "op"}) == "ran"
            with pytest.raises(happen.TransportError, match=f"happen_{ns}_keys"):
                await client.send("ledger", {"type": "op"}, key="a", timeout=WAIT)


def durable_key_grants(ns: str, node: str) -> str:
    """A nats-server user ``host`` with what docs/permissions.md and docs/keys-and-state.md
    list for running, and sending keyed events to, the durable node ``node`` (and ``NS.>`` /
    any inbox for the rest)."""
    log_name = f"happen_{ns}_node_{node}"
    broadcasts = f"happen_{ns}_broadcasts"
    publish = []
    for stream, consumer in ((log_name, node), (log_name, "*"), (broadcasts, node)):
        publish += [
            f"$HAPPEN.log.{stream}.>",
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.STREAM.UPDATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}",
            f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
            f"$JS.API.CONSUMER.INFO.{stream}.{consumer}",
            f"$JS.ACK.{stream}.{consumer}.>",
        ]
    return authorization(ns, {"host": [*publish, *key_bucket_grants(ns, node)]})


@pytest.mark.nats
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_documented_durable_key_grants_are_enough(tmp_path: Any) -> None:
    from tests.conftest import granting

    ns = unique_namespace()
    with granting(tmp_path, durable_key_grants(ns, "ledger")) as server:

        def as_host() -> happen.System:
            transport = signed_in(server.url, "host", jetstream_timeout=1.0)
            return happen.System(
                transport=transport, namespace=ns, liveness_timeout=2.0, delivery=DURABLE
            )

        await two_hosts_keep_key_order(as_host)


async def test_a_durable_nodes_keyed_events_stored_while_none_ran_are_ordered_across_instances(
    make_transport: Callable[[], Transport],
) -> None:
    """Keyed events enqueued while no instance of the durable node runs: two instances then
    start, find keyed events in the log, take part in the key partitions, and run each key's
    events one at a time in the order they were stored."""
    ns = unique_namespace()
    recorder = Recorder()
    client_system = happen.System(transport=make_transport(), namespace=ns, delivery=DURABLE)
    systems = hosts(make_transport, ns, 2, durable=True)
    nodes = ledgers(systems, recorder, jitter=0.002)
    async with client_system:
        sender = client_system.create_node("sender")
        for n in range(10):
            for key in range(20):
                await sender.enqueue("ledger", {"type": "op", "payload": n}, key=f"k{key}")
        async with _all(*systems):
            await eventually(lambda: sum(n.stats().completed for n in nodes) == 200, WAIT)
    no_overlap_and_in_order(recorder, keys=20, rounds=10)
    stats = [node.stats() for node in nodes]
    assert sum(s.accepted for s in stats) == sum(s.completed for s in stats) == 200
