"""Several hosts: systems with one namespace on transports that reach each other.

On memory the hosts share one broker; on NATS each has its own connection to the server.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest

import happen
from happen._transport import Transport
from tests.conftest import NatsServer
from tests.helpers import (
    assert_accounted,
    drained,
    eventually,
    subscriptions_live,
    unique_namespace,
)

pytestmark = pytest.mark.anyio

WAIT = 10  # seconds; a test that needs this long has failed


@asynccontextmanager
async def running(*hosts: tuple[happen.System, happen.Node]) -> AsyncIterator[None]:
    """Start every host; return once each one's subscriptions are live on the server."""
    async with AsyncExitStack() as stack:
        for system, _ in hosts:
            await stack.enter_async_context(system)
        for _, node in hosts:
            await subscriptions_live(node)
        yield


def host(make_transport: Callable[[], Transport], namespace: str, **kwargs: Any) -> happen.System:
    return happen.System(transport=make_transport(), namespace=namespace, **kwargs)


async def test_a_node_hosted_twice_shares_the_requests(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    a, b, c = (host(make_transport, ns) for _ in range(3))
    workers = {}
    for name, system in (("a", a), ("b", b)):
        workers[name] = worker = system.create_node("worker")
        worker.on("job", lambda e, c, name=name: {"job": e.payload, "host": name})
    client = c.create_node("client")
    async with running((a, workers["a"]), (b, workers["b"]), (c, client)):
        served: Counter[str] = Counter()

        async def one(i: int) -> None:
            result = await client.send("worker", {"type": "job", "payload": i}, timeout=WAIT)
            assert result["job"] == i
            served[result["host"]] += 1

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(one, i)
        assert sum(served.values()) == 40
        assert served["a"] > 0 and served["b"] > 0, served
        await drained(*workers.values())
        for name, worker in workers.items():
            assert assert_accounted(worker, sent=served[name]).completed == served[name]


async def test_a_broadcast_reaches_matching_nodes_on_every_host(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    a, b = host(make_transport, ns), host(make_transport, ns)
    got: list[tuple[str, str, Any]] = []

    def record(where: str) -> Callable[[happen.Event, dict], None]:
        return lambda event, context: got.append((where, event.type, event.payload))

    audit_a = a.create_node("audit")
    audit_a.on("order.*", record("a/audit"))
    sender = a.create_node("shop")  # no handler: does not receive its own broadcast
    b.create_node("audit").on("order.created", record("b/audit"))
    billing = b.create_node("billing")
    billing.on("order.**", record("b/billing"))
    b.create_node("unrelated").on("payment.*", record("b/unrelated"))
    async with running((a, sender), (b, billing)):
        await sender.broadcast({"type": "order.created", "payload": {"id": 1}})
        await eventually(lambda: len(got) >= 3, timeout=WAIT)
        # a later round trip to host b: anything else would have arrived by now
        with pytest.raises(happen.NoHandlerError):
            await sender.send("billing", {"type": "ping"}, timeout=WAIT)
        await drained(audit_a, billing)
        assert sorted(got) == [
            ("a/audit", "order.created", {"id": 1}),
            ("b/audit", "order.created", {"id": 1}),
            ("b/billing", "order.created", {"id": 1}),
        ]


async def test_a_stream_across_hosts_is_held_within_one_window(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    window = 8
    consumer_host = host(make_transport, ns, stream_window=window)
    producer_host = host(make_transport, ns)
    producer = producer_host.create_node("numbers")
    produced: list[int] = []

    @producer.on("count")
    async def count(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
        for i in range(event.payload):
            produced.append(i)
            yield i

    client = consumer_host.create_node("client")
    async with running((consumer_host, client), (producer_host, producer)):
        async with client.stream("numbers", {"type": "count", "payload": 200}) as stream:
            # Nothing read yet: the producer fills exactly one window, then waits.
            await eventually(lambda: len(produced) == window, timeout=WAIT)
            with pytest.raises(happen.NoHandlerError):  # a round trip to the producer's host
                await client.send("numbers", {"type": "ping"}, timeout=WAIT)
            assert len(produced) == window
            consumed: list[int] = []
            ahead = 0
            async for item in stream:
                consumed.append(item)
                ahead = max(ahead, len(produced) - len(consumed))
                assert len(produced) <= len(consumed) + window, "more than a window ahead"
            assert consumed == list(range(200))
            assert ahead > 0, "the producer did run ahead of the reader, within the window"
        await drained(producer)
        stats = assert_accounted(producer, sent=2)  # the stream and the ping
        assert (stats.completed, stats.rejected) == (1, 1)


async def test_a_consumer_leaving_early_closes_the_remote_generator(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    a, b = host(make_transport, ns), host(make_transport, ns)
    producer = b.create_node("ticker")
    finalised = anyio.Event()
    produced: list[int] = []

    @producer.on("tick")
    async def tick(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            finalised.set()

    client = a.create_node("client")
    async with running((a, client), (b, producer)):
        got = []
        async with client.stream("ticker", {"type": "tick"}) as stream:
            async for item in stream:
                got.append(item)
                if len(got) == 3:
                    break
        with anyio.fail_after(WAIT):
            await finalised.wait()
        assert got == [0, 1, 2]
        await drained(producer)
        assert assert_accounted(producer, sent=1).completed == 1
        stopped_at = len(produced)
        with pytest.raises(happen.NoHandlerError):  # a round trip: the generator stays stopped
            await client.send("ticker", {"type": "ping"}, timeout=WAIT)
        assert len(produced) == stopped_at


PRESSURE = {
    "patterns": {"busy": {"max_concurrent": 1, "queue_limit": 10, "backpressure_threshold": 0.5}}
}


async def held_senders(make_transport: Callable[[], Transport]) -> tuple[Counter[str], Any]:
    """Thirty senders on host A, a blocked node under pressure on host B.

    Six sends are admitted one by one (one runs, five queue: the sixth puts the node under
    pressure and gets a ``hold``); then 24 more senders start. Returns how the 30 sends
    ended and the node's stats while its handler was still blocked.
    """
    ns = unique_namespace()
    a, b = host(make_transport, ns), host(make_transport, ns, concurrency=PRESSURE)
    busy = b.create_node("busy")
    release = anyio.Event()

    @busy.on("job")
    async def job(event: happen.Event, context: dict) -> int:
        await release.wait()
        return int(event.payload)

    client = a.create_node("client")
    outcomes: Counter[str] = Counter()

    async def one(i: int) -> None:
        try:
            assert await client.send("busy", {"type": "job", "payload": i}, timeout=WAIT) == i
            outcomes["ok"] += 1
        except happen.QueueFullError:
            outcomes["queue_full"] += 1

    async with running((a, client), (b, busy)), anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(one, i)
            await eventually(lambda i=i: busy.stats().accepted == i + 1, timeout=WAIT)
        assert busy.stats().under_pressure
        # The hold travels back to A ahead of any later reply from B to A.
        other = b.create_node("echo")
        other.on("ping", lambda e, c: "pong")
        await subscriptions_live(other)
        assert await client.send("echo", {"type": "ping"}, timeout=WAIT) == "pong"
        for i in range(6, 30):
            tg.start_soon(one, i)
        await anyio.wait_all_tasks_blocked()
        assert await client.send("echo", {"type": "ping"}, timeout=WAIT) == "pong"
        await anyio.wait_all_tasks_blocked()
        while_blocked = busy.stats()
        release.set()
    await drained(busy)
    return outcomes, (while_blocked, busy)


async def test_remote_senders_are_held_while_the_node_is_under_pressure(
    make_transport: Callable[[], Transport],
) -> None:
    outcomes, (while_blocked, busy) = await held_senders(make_transport)
    # While the handler was blocked the later senders waited on host A: not enqueued on B,
    # not rejected.
    assert (while_blocked.accepted, while_blocked.queued, while_blocked.rejected) == (6, 5, 0)
    assert while_blocked.under_pressure
    # Every send ended with its result or QueueFullError, and the node counted each event.
    assert sum(outcomes.values()) == 30
    stats = assert_accounted(busy, sent=30)
    assert stats.completed == outcomes["ok"] and stats.rejected == outcomes["queue_full"]
    assert outcomes["ok"] >= 6, "the sends admitted before the hold all completed"


async def test_senders_released_by_ack_are_not_rejected(
    make_transport: Callable[[], Transport],
) -> None:
    outcomes, (_, busy) = await held_senders(make_transport)
    assert outcomes == {"ok": 30}
    assert assert_accounted(busy, sent=30).rejected == 0


async def test_queue_full_reaches_a_remote_sender(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    config = {
        "patterns": {
            "tight": {"max_concurrent": 1, "queue_limit": 2, "backpressure_threshold": 1.0}
        }
    }
    a, b = host(make_transport, ns), host(make_transport, ns, concurrency=config)
    tight = b.create_node("tight")
    release = anyio.Event()

    @tight.on("job")
    async def job(event: happen.Event, context: dict) -> int:
        await release.wait()
        return int(event.payload)

    client = a.create_node("client")
    results: list[int] = []

    async def one(i: int) -> None:
        results.append(await client.send("tight", {"type": "job", "payload": i}, timeout=WAIT))

    async with running((a, client), (b, tight)), anyio.create_task_group() as tg:
        for i in range(3):  # one runs, two queue: the queue is full
            tg.start_soon(one, i)
            await eventually(lambda i=i: tight.stats().accepted == i + 1, timeout=WAIT)
        with anyio.fail_after(WAIT), pytest.raises(happen.QueueFullError, match="tight"):
            await client.send("tight", {"type": "job", "payload": 3}, timeout=WAIT)
        release.set()
    assert sorted(results) == [0, 1, 2]
    await drained(tight)
    stats = assert_accounted(tight, sent=4)
    assert (stats.completed, stats.rejected) == (3, 1)


async def test_an_unknown_node_fails_at_once_on_any_host(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    a, b = host(make_transport, ns), host(make_transport, ns)
    client = a.create_node("client")
    only_on_b = b.create_node("only-on-b")
    only_on_b.on("x", lambda e, c: "here")
    async with running((a, client)):
        async with b:
            await subscriptions_live(only_on_b)
            assert await client.send("only-on-b", {"type": "x"}) == "here"
        # b stopped: its node is gone from the namespace. No timeout: it must not hang.
        began = time.monotonic()
        with anyio.fail_after(WAIT):
            for target in ("only-on-b", "never-existed"):
                with pytest.raises(happen.NodeNotFoundError, match=target):
                    await client.send(target, {"type": "x"})
        assert time.monotonic() - began < 2


@pytest.mark.nats
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_server_restart_fails_calls_in_flight_then_recovers(
    nats_server: NatsServer,
) -> None:
    url = nats_server.start().url
    ns = unique_namespace()
    a = happen.System(transport=url, namespace=ns)
    b = happen.System(transport=url, namespace=ns)
    slow = b.create_node("slow")
    started = anyio.Event()
    release = anyio.Event()
    handled: list[str] = []

    @slow.on("*")
    async def handle(event: happen.Event, context: dict) -> str:
        handled.append(event.type)
        if event.type == "wait":
            started.set()
            await release.wait()
        return event.type

    client = a.create_node("client")
    try:
        async with running((a, client), (b, slow)):
            assert await client.send("slow", {"type": "first"}, timeout=WAIT) == "first"
            failed: list[BaseException] = []
            elapsed: list[float] = []

            async def in_flight() -> None:
                began = time.monotonic()
                try:
                    await client.send("slow", {"type": "wait"}, timeout=30)
                except happen.HappenError as exc:
                    failed.append(exc)
                elapsed.append(time.monotonic() - began)

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_flight)
                with anyio.fail_after(WAIT):
                    await started.wait()
                nats_server.stop()
            assert len(failed) == 1 and isinstance(failed[0], happen.TransportError), failed
            assert elapsed[0] < 5, "failed when the connection dropped, not at its timeout"

            nats_server.start()
            attempts = 0
            with anyio.fail_after(20):
                while True:  # both hosts reconnect on their own; retry until they have
                    attempts += 1
                    try:
                        result = await client.send("slow", {"type": "after"}, timeout=1)
                        break
                    except (happen.TransportError, happen.NodeNotFoundError, happen.SendTimeout):
                        await anyio.sleep(0.05)
            assert result == "after"
            release.set()
            await drained(slow)
            # Every request that reached the node is counted once and finished.
            stats = assert_accounted(slow, sent=len(handled))
            assert stats.rejected == 0 and stats.completed == len(handled)
            assert handled[:2] == ["first", "wait"] and handled[-1] == "after"
            assert 3 <= len(handled) <= 2 + attempts
    finally:
        nats_server.start()  # later tests share this server


@pytest.mark.nats
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_server_restarts_mid_stream_fail_the_stream_and_close_the_generator(
    nats_server: NatsServer,
) -> None:
    url = nats_server.start().url
    ns = unique_namespace()
    a = happen.System(transport=url, namespace=ns)
    b = happen.System(transport=url, namespace=ns)
    producer = b.create_node("ticker")
    closed: list[anyio.Event] = []

    @producer.on("ticks")
    async def ticks(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
        done = anyio.Event()
        closed.append(done)
        try:
            i = 0
            while True:
                yield i
                i += 1
                await anyio.sleep(0.005)
        finally:
            done.set()

    producer.on("ping", lambda e, c: "pong")
    client = a.create_node("client")
    try:
        async with running((a, client), (b, producer)):
            for _ in range(3):  # several times in a row
                got = 0
                began = 0.0
                with pytest.raises(happen.TransportError, match="lost"):
                    async with client.stream("ticker", {"type": "ticks"}, timeout=30) as stream:
                        async for _ in stream:
                            got += 1
                            if got == 5:
                                nats_server.stop()
                                began = time.monotonic()
                assert got == 5
                assert time.monotonic() - began < 5, "failed when the connection dropped"
                with anyio.fail_after(WAIT):
                    await closed[-1].wait()  # the producer's generator was closed
                nats_server.start()
                assert await _until_served(client, "ticker", {"type": "ping"}) == "pong"
            await drained(producer)
            stats = producer.stats()
            # each cut stream counted failed, each ping completed; nothing lost
            assert stats.accepted == stats.completed + stats.failed + stats.dead_lettered
            assert stats.failed == 3 and stats.rejected == 0
    finally:
        nats_server.start()  # later tests share this server


async def _until_served(client: happen.Node, target: str, event: dict[str, Any]) -> Any:
    """Retry until the hosts have reconnected and resubscribed on their own (bounded)."""
    retry = (happen.TransportError, happen.NodeNotFoundError, happen.SendTimeout)
    with anyio.fail_after(20):
        while True:
            try:
                return await client.send(target, event, timeout=1)
            except retry:
                await anyio.sleep(0.05)
