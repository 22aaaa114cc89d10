"""Node state: get / put / delete / update with revisions and compare-and-set, shared by every
instance of a node, on the memory transport (asyncio and trio) and over NATS."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

import happen
from happen._transport import Message, Subscription, Transport, TransportListener
from tests.conftest import NatsServer, granting
from tests.helpers import authorization, make_system, signed_in, unique_namespace

pytestmark = pytest.mark.anyio

WORKERS = Path(__file__).parent / "workers"
#: Each system updates the shared counter from this many tasks, this many times each.
TASKS, UPDATES = 10, 10
#: The attempts each of those updates may take. One name that two processes update without
#: pause is the worst case of compare-and-set: the process that wrote last compares against
#: its own write and keeps winning while it has updates queued, so the other one's update
#: waits out that burst (measured over NATS: the default 5 attempts fail ~1 update in 200).
CONTENDED_ATTEMPTS = 100


async def test_get_put_delete_and_revisions(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        state = system.create_node("inventory").state
        assert await state.get("apples") is None

        first = await state.put("apples", 3)
        assert await state.get("apples") == happen.Versioned(3, first)
        second = await state.put("apples", 5)
        assert second > first, "revisions only increase"
        assert await state.get("apples") == happen.Versioned(5, second)

        await state.delete("apples")
        assert await state.get("apples") is None
        await state.delete("apples")  # a missing name: nothing happens
        await state.delete("never-written")
        third = await state.put("apples", 1)
        assert third > second, "a write after a delete gets a new revision too"


async def test_each_node_has_its_own_names(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        a, b = system.create_node("a"), system.create_node("b")
        await a.state.put("total", "a's")
        await b.state.put("total", "b's")
        got_a, got_b = await a.state.get("total"), await b.state.get("total")
        assert got_a is not None and got_a.value == "a's"
        assert got_b is not None and got_b.value == "b's"


async def test_a_put_with_a_stale_revision_is_refused_with_the_current_value(
    transport_url: str,
) -> None:
    async with make_system(transport_url) as system:
        state = system.create_node("account").state
        read = await state.put("balance", 100)
        now = await state.put("balance", 90, expect=read)  # compare-and-set

        with pytest.raises(happen.StateConflict) as info:
            await state.put("balance", 80, expect=read)  # stale
        conflict = info.value
        assert isinstance(conflict, happen.HappenError)
        assert (conflict.name, conflict.node_id, conflict.expected) == ("balance", "account", read)
        assert conflict.current == happen.Versioned(90, now)
        assert "balance" in str(conflict) and "account" in str(conflict)
        assert await state.get("balance") == happen.Versioned(90, now), "nothing was written"


async def test_expect_zero_means_the_name_must_not_exist(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        state = system.create_node("locks").state
        mine = await state.put("leader", "host-a", expect=0)

        with pytest.raises(happen.StateConflict) as info:
            await state.put("leader", "host-b", expect=0)
        assert info.value.expected == 0
        assert info.value.current == happen.Versioned("host-a", mine)

        await state.delete("leader", expect=mine)
        assert await state.put("leader", "host-b", expect=0) > mine, "free again after delete"


async def test_put_with_a_revision_on_a_missing_name_is_refused(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        state = system.create_node("n").state
        revision = await state.put("other", 1)
        with pytest.raises(happen.StateConflict) as info:
            await state.put("missing", 1, expect=revision)
        assert info.value.current is None
        assert await state.get("missing") is None


async def test_delete_with_expect(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        state = system.create_node("n").state
        stale = await state.put("k", "v1")
        current = await state.put("k", "v2")

        with pytest.raises(happen.StateConflict) as info:
            await state.delete("k", expect=stale)
        assert info.value.current == happen.Versioned("v2", current)
        with pytest.raises(happen.StateConflict):
            await state.delete("k", expect=0)  # it exists
        assert await state.get("k") == happen.Versioned("v2", current), "still there"

        await state.delete("k", expect=current)
        assert await state.get("k") is None
        await state.delete("k", expect=0)  # missing, as expected: nothing happens
        with pytest.raises(happen.StateConflict) as missing:
            await state.delete("k", expect=current)
        assert missing.value.current is None


async def test_values_round_trip(transport_url: str) -> None:
    values: list[Any] = [
        {"name": "ada", "tags": ["a", "b"], "nested": {"n": 1, "f": 2.5, "none": None}},
        [1, "two", [3.0], {"four": 4}],
        "text with ünïcode",
        b"\x00\x01raw bytes\xff",
        0,
        -(2**63),
        True,
        None,
    ]
    async with make_system(transport_url) as system:
        state = system.create_node("store").state
        for i, value in enumerate(values):
            revision = await state.put(f"v{i}", value)
            assert await state.get(f"v{i}") == happen.Versioned(value, revision)
        stored_none = await state.get(f"v{len(values) - 1}")
        assert stored_none is not None and stored_none.value is None, "None is a value"


async def test_values_follow_the_system_codec(transport_url: str) -> None:
    async with make_system(transport_url, codec="json") as system:
        state = system.create_node("store").state
        revision = await state.put("doc", {"a": [1, 2], "b": "c"})
        assert await state.get("doc") == happen.Versioned({"a": [1, 2], "b": "c"}, revision)
        with pytest.raises(happen.CodecError):
            await state.put("nan", float("nan"))  # JSON cannot carry it


async def test_too_large_and_unencodable_values_are_refused(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        state = system.create_node("store").state
        with pytest.raises(happen.PayloadTooLargeError, match="'big' of node 'store'"):
            await state.put("big", b"x" * (2 * 1024 * 1024))
        with pytest.raises(happen.CodecError, match="'odd' of node 'store'"):
            await state.put("odd", object())
        with pytest.raises(happen.PayloadTooLargeError):
            await state.update("big", lambda _: "x" * (2 * 1024 * 1024))
        assert await state.get("big") is None and await state.get("odd") is None
        assert system.stats()["store"].state_writes == 0


async def test_invalid_names_and_arguments_are_refused(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("n")
        state = node.state
        longest = "a:b." + "x" * 252
        assert await state.put(longest, 1) > 0
        assert await state.put("order:7.total_eur-net", 1) > 0
        for bad in ("", "a b", "a..b", ".a", "a.", "a*", "a>", "é", "x" * 257, 7, None):
            with pytest.raises(happen.InvalidIdError, match="state name"):
                await state.get(bad)  # type: ignore[arg-type]
            with pytest.raises(happen.InvalidIdError):
                await state.put(bad, 1)  # type: ignore[arg-type]
            with pytest.raises(happen.InvalidIdError):
                await state.delete(bad)  # type: ignore[arg-type]
            with pytest.raises(happen.InvalidIdError):
                await state.update(bad, lambda v: v)  # type: ignore[arg-type]
        for bad_id in ("", "a.b", "a b", "x" * 129):
            with pytest.raises(happen.InvalidIdError):
                node.view(bad_id)
        with pytest.raises(ValueError):
            await state.put("k", 1, expect=-1)
        with pytest.raises(ValueError):
            await state.update("k", lambda v: v, attempts=0)
        with pytest.raises(TypeError):
            await state.update("k", 5)  # type: ignore[arg-type]
        assert node.stats().state_reads == 0, "refused before anything was read"


async def test_a_view_reads_another_node_and_cannot_write(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        owner, reader = system.create_node("owner"), system.create_node("reader")
        revision = await owner.state.put("config", {"limit": 10})

        view = reader.view("owner")
        assert view.node_id == "owner"
        assert await view.get("config") == happen.Versioned({"limit": 10}, revision)
        assert await reader.view(owner).get("config") == happen.Versioned({"limit": 10}, revision)
        assert await view.get("other") is None
        for attribute in ("put", "delete", "update"):
            assert not hasattr(view, attribute)
            with pytest.raises(AttributeError, match="read-only"):
                getattr(view, attribute)
        with pytest.raises(AttributeError):
            view.anything  # type: ignore[attr-defined]  # noqa: B018
        assert reader.stats().state_reads == 3, "a view's reads count at the reader"
        assert owner.stats().state_reads == 0


async def test_update_applies_sync_and_async_functions(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        state = system.create_node("n").state
        seen: list[Any] = []

        def first(value: Any) -> list[int]:
            seen.append(value)
            return [1]

        async def then(value: Any) -> list[int]:
            seen.append(value)
            await anyio.lowlevel.checkpoint()
            return [*value, 2]

        created = await state.update("items", first)
        assert created.value == [1]
        updated = await state.update("items", then)
        assert updated.value == [1, 2] and updated.revision != created.revision
        assert seen == [None, [1]], "None when the name does not exist"
        assert await state.get("items") == updated


async def test_update_raises_what_its_function_raises_and_writes_nothing(
    transport_url: str,
) -> None:
    async with make_system(transport_url) as system:
        state = system.create_node("n").state
        revision = await state.put("k", 1)

        def fail(value: Any) -> Any:
            raise KeyError("nope")

        with pytest.raises(KeyError):
            await state.update("k", fail)
        assert await state.get("k") == happen.Versioned(1, revision)


async def test_update_gives_up_after_its_attempts(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node, rival = system.create_node("n"), system.create_node("rival")
        # The rival node's system shares the bucket; a write that always gets in between
        # makes every compare fail. The same node's state, written through put (not update).
        rivals: list[int] = []

        async def always_beaten(value: Any) -> Any:
            rivals.append(await node.state.put("k", f"rival-{len(rivals)}"))
            return "mine"

        with pytest.raises(happen.StateConflict) as info:
            await node.state.update("k", always_beaten, attempts=3)
        assert len(rivals) == 3
        assert info.value.current == happen.Versioned("rival-2", rivals[-1])
        stats = node.stats()
        assert (stats.state_conflicts, stats.state_writes) == (3, 3)
        assert rival.stats().state_writes == 0


async def test_counters_are_exact(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("n")
        state = node.state
        await state.get("a")  # read 1
        first = await state.put("a", 1)  # write 1
        await state.put("a", 2)  # write 2
        with pytest.raises(happen.StateConflict):
            await state.put("a", 3, expect=first)  # conflict 1
        await state.update("a", lambda v: v + 1)  # write 3; this system saw "a": no read
        await state.update("b", lambda v: 1)  # read 2 (never seen), write 4
        with pytest.raises(happen.StateConflict):
            await state.delete("a", expect=first)  # conflict 2
        await state.delete("b")  # write 5
        await state.delete("missing")  # write 6 (a no-op, but a delete that succeeded)
        await node.view("other").get("x")  # read 3
        stats = node.stats()
        assert (stats.state_reads, stats.state_writes, stats.state_conflicts) == (3, 6, 2)
        assert stats.accepted == 0, "state operations are not events"


async def test_updates_of_one_name_take_turns_and_a_cancelled_one_gives_its_turn_on(
    transport_url: str,
) -> None:
    async with make_system(transport_url) as system:
        state = system.create_node("n").state
        release = anyio.Event()
        order: list[str] = []

        async def first(value: Any) -> str:
            order.append("first runs")
            await release.wait()
            return "first"

        def later(label: str) -> Callable[[Any], str]:
            def apply(value: Any) -> str:
                order.append(f"{label} saw {value}")
                return label

            return apply

        async with anyio.create_task_group() as tg:
            tg.start_soon(state.update, "k", first)
            await anyio.wait_all_tasks_blocked()
            with anyio.CancelScope() as waiting:  # waits for its turn, then gives up
                waiting.cancel()
                await state.update("k", later("cancelled"))
            tg.start_soon(state.update, "k", later("second"))
            await anyio.wait_all_tasks_blocked()
            assert order == ["first runs"], "the second waits for the first"
            release.set()
        assert order == ["first runs", "second saw first"]
        got = await state.get("k")
        assert got is not None and got.value == "second"
        assert system.stats()["n"].state_conflicts == 0, "turns, not collisions"


async def test_a_state_operation_lets_other_tasks_run(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        state = system.create_node("n").state
        ran = anyio.Event()

        async def other() -> None:
            ran.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(other)
            await state.put("k", 1)  # a round trip, in memory too: the other task runs
            assert ran.is_set()


async def test_update_after_another_process_wrote_retries_with_its_value(
    make_transport: Callable[[], Transport],
) -> None:
    namespace = unique_namespace()
    async with (
        happen.System(transport=make_transport(), namespace=namespace) as one,
        happen.System(transport=make_transport(), namespace=namespace) as two,
    ):
        here, there = one.create_node("counter"), two.create_node("counter")
        await here.state.update("total", lambda n: (n or 0) + 1)
        await there.state.update("total", lambda n: (n or 0) + 10)  # behind `here`'s back
        result = await here.state.update("total", lambda n: (n or 0) + 100)
        assert result.value == 111
        # `here` compared against the revision it wrote: refused once, then the refusal's
        # value was used without another read.
        stats = here.stats()
        assert (stats.state_reads, stats.state_writes, stats.state_conflicts) == (1, 2, 1)


async def add_concurrently(node: happen.Node, tasks: int, updates: int) -> None:
    """``tasks`` tasks each add 1 to the node's ``total``, ``updates`` times."""

    async def slow_increment(value: Any) -> int:
        await anyio.lowlevel.checkpoint()  # the other tasks and systems go in between
        return int(value or 0) + 1

    async def add() -> None:
        for _ in range(updates):
            await node.state.update("total", slow_increment, attempts=CONTENDED_ATTEMPTS)

    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(add)


async def test_concurrent_updates_from_two_systems_add_up(
    make_transport: Callable[[], Transport], transport_kind: str
) -> None:
    namespace = unique_namespace()
    async with (
        happen.System(transport=make_transport(), namespace=namespace) as one,
        happen.System(transport=make_transport(), namespace=namespace) as two,
    ):
        nodes = [one.create_node("counter"), two.create_node("counter")]
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for node in nodes:
                    tg.start_soon(add_concurrently, node, TASKS, UPDATES)
        total = await nodes[0].state.get("total")
        assert total is not None and total.value == 2 * TASKS * UPDATES
        for node in nodes:
            assert node.stats().state_writes == TASKS * UPDATES
        if transport_kind == "memory":  # the systems took turns at every sleep(0): they met
            assert sum(node.stats().state_conflicts for node in nodes) > 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the NATS transport needs asyncio
async def test_a_second_process_updates_the_same_counter(nats_server: NatsServer) -> None:
    url, namespace = nats_server.start().url, unique_namespace()
    script = [sys.executable, str(WORKERS / "count.py"), url, namespace]
    args = [*script, str(TASKS), str(UPDATES), str(CONTENDED_ATTEMPTS)]
    with anyio.fail_after(30):
        async with (
            await anyio.open_process(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as other,
            happen.System(transport=url, namespace=namespace) as system,
        ):
            assert other.stdin is not None and other.stdout is not None
            lines = other.stdout
            assert (await lines.receive()).strip() == b"ready"
            counter = system.create_node("counter")
            await other.stdin.send(b"go\n")
            await add_concurrently(counter, TASKS, UPDATES)
            output = b""
            async for chunk in lines:
                output += chunk
            assert await other.wait() == 0
            theirs = msgspec.json.decode(output.strip().splitlines()[-1], type=happen.NodeStats)
            total = await counter.state.get("total")
    assert total is not None and total.value == 2 * TASKS * UPDATES
    assert theirs.state_writes == counter.stats().state_writes == TASKS * UPDATES


class BareTransport:
    """A transport with the core Protocol only: no durable logs, no key-value buckets."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.max_payload = inner.max_payload

    async def start(self) -> None:
        await self._inner.start()

    async def stop(self) -> None:
        await self._inner.stop()

    async def publish(self, subject: str, data: bytes, **kwargs: Any) -> None:
        await self._inner.publish(subject, data, **kwargs)

    async def subscribe(
        self, subject: str, callback: Callable[[Message], Any], *, queue: str | None = None
    ) -> Subscription:
        return await self._inner.subscribe(subject, callback, queue=queue)  # type: ignore[no-any-return]

    def new_inbox(self) -> str:
        return self._inner.new_inbox()  # type: ignore[no-any-return]

    def set_listener(self, listener: TransportListener | None) -> None:
        self._inner.set_listener(listener)


async def test_state_is_opened_on_first_use_only() -> None:
    from happen.transports.memory import MemoryTransport

    transport = MemoryTransport()
    async with happen.System(transport=transport, namespace="shop") as system:
        node = system.create_node("n")
        node.on("ping", lambda event, context: "pong")
        assert await node.send("n", {"type": "ping"}) == "pong"
        assert transport.broker.buckets == {}, "a system that uses no state opens nothing"
        await node.state.put("k", 1)
        assert set(transport.broker.buckets) == {"happen_shop_state"}


async def test_a_transport_without_buckets_fails_clearly_on_first_use() -> None:
    from happen.transports.memory import MemoryTransport

    async with happen.System(transport=BareTransport(MemoryTransport())) as system:
        node = system.create_node("n")
        node.on("ping", lambda event, context: "pong")
        assert await node.send("n", {"type": "ping"}) == "pong", "it serves without state"
        with pytest.raises(happen.TransportError, match="BareTransport"):
            await node.state.get("k")
        with pytest.raises(happen.TransportError, match="key-value"):
            await node.state.put("k", 1)


async def test_state_needs_a_running_system(transport_url: str) -> None:
    system = make_system(transport_url)
    node = system.create_node("n")
    with pytest.raises(happen.SystemStoppedError, match="new"):
        await node.state.get("k")
    async with system:
        await node.state.put("k", 1)
    with pytest.raises(happen.SystemStoppedError, match="stopped"):
        await node.state.get("k")
    with pytest.raises(happen.SystemStoppedError):
        await node.view("other").get("k")


async def test_a_handler_uses_its_node_state(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        visits = system.create_node("visits")

        @visits.on("visit")
        async def visit(event: happen.Event, context: dict[str, Any]) -> int:
            counted = await visits.state.update(event.payload, lambda n: (n or 0) + 1)
            return int(counted.value)

        client = system.create_node("client")
        results = [await client.send("visits", {"type": "visit", "payload": "home"})]
        results.append(await client.send("visits", {"type": "visit", "payload": "home"}))
        assert results == [1, 2]
        assert await client.view("visits").get("home") is not None


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_nats_state_is_one_kv_bucket_per_namespace(nats_server: NatsServer) -> None:
    import nats
    import nats.js.errors

    url, namespace = nats_server.start().url, unique_namespace()
    bucket = f"happen_{namespace}_state"
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        async with happen.System(transport=url, namespace=namespace) as system:
            node = system.create_node("billing")
            node.on("ping", lambda event, context: "pong")
            assert await node.send("billing", {"type": "ping"}) == "pong"
            with pytest.raises(nats.js.errors.NotFoundError):
                await js.stream_info(f"KV_{bucket}")  # nothing until state is used

            revision = await node.state.put("total:eur", {"cents": 1250})
            kv = await js.key_value(bucket)
            raw = await kv.get("billing=2Etotal=3Aeur")  # "billing.total:eur", escaped
            assert raw.revision == revision and raw.value is not None
            assert msgspec.msgpack.decode(raw.value) == {"cents": 1250}
            info = await js.stream_info(f"KV_{bucket}")
            assert info.config.max_msgs_per_subject == 1, "one revision kept per name"
    finally:
        await client.close()


def state_grants(namespace: str) -> str:
    """The nats-server users docs/keys-and-state.md describes: ``writer`` may use its nodes'
    state (and create the bucket), ``reader`` may only read it; both get the namespace's core
    subjects and any inbox, so only the JetStream grants are under test."""
    bucket = f"happen_{namespace}_state"
    read = [f"$JS.API.STREAM.INFO.KV_{bucket}", f"$JS.API.STREAM.MSG.GET.KV_{bucket}"]
    write = [*read, f"$JS.API.STREAM.CREATE.KV_{bucket}", f"$KV.{bucket}.>"]
    return authorization(namespace, {"writer": write, "reader": read})


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_documented_state_grants_are_enough(tmp_path: Path) -> None:
    from happen.transports.nats import NatsTransport

    namespace = unique_namespace()
    with granting(tmp_path, state_grants(namespace)) as server:

        def as_user(name: str) -> NatsTransport:
            # a request the server refuses goes unanswered: fail after a short wait
            return signed_in(server.url, name, jetstream_timeout=0.5)

        async with (
            happen.System(transport=as_user("writer"), namespace=namespace) as writing,
            happen.System(transport=as_user("reader"), namespace=namespace) as reading,
        ):
            owner = writing.create_node("owner")
            revision = await owner.state.put("k", 1, expect=0)  # creates the bucket
            updated = await owner.state.update("k", lambda n: n + 1)
            await owner.state.delete("k", expect=updated.revision)
            await owner.state.put("k", 3)

            reader = reading.create_node("reader")
            got = await reader.view("owner").get("k")
            assert got is not None and got.value == 3 and got.revision > revision
            with pytest.raises(happen.TransportError):  # and nothing more
                await reader.state.put("mine", 1)
