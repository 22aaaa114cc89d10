"""Instances of one node on several hosts share its load by capacity, not by chance."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import pytest

import happen
from happen._transport import Message, Transport
from tests.helpers import drained, eventually, subscriptions_live, unique_namespace

pytestmark = pytest.mark.anyio

WAIT = 10  # seconds; a test that needs this long has failed


def host(make_transport: Callable[[], Transport], ns: str, **kwargs: Any) -> happen.System:
    return happen.System(transport=make_transport(), namespace=ns, **kwargs)


def blocking_worker(system: happen.System, name: str, release: anyio.Event) -> happen.Node:
    worker = system.create_node("worker")

    @worker.on("job")
    async def job(event: happen.Event, context: dict) -> str:
        await release.wait()
        return name

    return worker


def arrived(stats: happen.NodeStats) -> int:
    return stats.accepted + stats.rejected + stats.dropped + stats.forwarded


async def test_a_burst_that_fits_an_idle_twin_is_not_refused(
    make_transport: Callable[[], Transport],
) -> None:
    """Instance A is busy with a full queue, its twin B is idle: a burst of 20 from another
    host fits B's capacity, and none of it is refused."""
    ns = unique_namespace()
    config = {
        "patterns": {
            "worker": {"max_concurrent": 4, "queue_limit": 16, "backpressure_threshold": 1.0}
        }
    }
    a = host(make_transport, ns, concurrency=config)
    b = host(make_transport, ns, concurrency=config)
    c = host(make_transport, ns)
    release = anyio.Event()
    worker_a = blocking_worker(a, "a", release)
    worker_b = blocking_worker(b, "b", release)
    client = c.create_node("client")
    served: Counter[str] = Counter()
    refused: list[BaseException] = []

    async def one() -> None:
        try:
            served[await client.send("worker", {"type": "job"}, timeout=WAIT)] += 1
        except happen.QueueFullError as exc:
            refused.append(exc)

    async with a, c, anyio.create_task_group() as tg:
        await subscriptions_live(worker_a)
        for _ in range(20):  # A alone: 4 run, 16 wait, the queue is full
            tg.start_soon(one)
        await eventually(lambda: worker_a.stats().queued == 16, timeout=WAIT)
        async with b:
            await subscriptions_live(worker_b)
            for _ in range(20):
                tg.start_soon(one)
            await eventually(lambda: worker_b.stats().accepted + len(refused) == 20, timeout=WAIT)
            assert refused == [], f"{len(refused)} of 20 refused while the twin had room"
            assert worker_a.stats().accepted == 20, "A took nothing more"
            release.set()
            await drained(worker_a, worker_b)
    assert refused == []
    assert served == {"a": 20, "b": 20}
    stats_a, stats_b = worker_a.stats(), worker_b.stats()
    assert (stats_a.accepted, stats_a.rejected) == (stats_b.accepted, stats_b.rejected) == (20, 0)
    # Every request that reached A was accepted, refused or passed on to B (and counted there).
    assert stats_b.forwarded == 0
    assert stats_a.accepted + stats_a.rejected + stats_b.accepted + stats_b.rejected == 40
    assert stats_a.completed == stats_b.completed == 20


async def test_a_full_instance_refuses_when_no_twin_has_room(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    config = {
        "patterns": {
            "worker": {"max_concurrent": 1, "queue_limit": 1, "backpressure_threshold": 1.0}
        }
    }
    a = host(make_transport, ns, concurrency=config)
    b = host(make_transport, ns, concurrency=config)
    c = host(make_transport, ns)
    release = anyio.Event()
    worker_a = blocking_worker(a, "a", release)
    worker_b = blocking_worker(b, "b", release)
    client = c.create_node("client")
    outcomes: Counter[str] = Counter()

    async def one() -> None:
        try:
            await client.send("worker", {"type": "job"}, timeout=WAIT)
            outcomes["ok"] += 1
        except happen.QueueFullError:
            outcomes["full"] += 1

    async with a, b, c, anyio.create_task_group() as tg:
        await subscriptions_live(worker_a)
        await subscriptions_live(worker_b)
        for _ in range(4):  # two on each host
            tg.start_soon(one)
        await eventually(lambda: worker_a.stats().accepted + worker_b.stats().accepted == 4)
        began = time.monotonic()
        with anyio.fail_after(WAIT):
            for _ in range(6):
                await one()
        assert outcomes == {"full": 6}
        # each twin said it has no room: refused after one round trip, not a timed wait
        assert time.monotonic() - began < 6 * 0.2
        release.set()
    stats_a, stats_b = worker_a.stats(), worker_b.stats()
    assert outcomes == {"ok": 4, "full": 6}
    assert stats_a.rejected + stats_b.rejected == 6
    # (the first four may have been passed on once, while one instance was full)
    assert arrived(stats_a) + arrived(stats_b) == 10 + stats_a.forwarded + stats_b.forwarded
    for stats in (stats_a, stats_b):
        assert stats.accepted == stats.completed == 2


async def test_a_node_with_no_twin_refuses_an_excess_request_at_once(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    config = {"patterns": {"worker": {"max_concurrent": 1, "queue_limit": 0}}}
    a = host(make_transport, ns, concurrency=config)
    c = host(make_transport, ns)
    release = anyio.Event()
    worker = blocking_worker(a, "a", release)
    client = c.create_node("client")
    async with a, c, anyio.create_task_group() as tg:
        await subscriptions_live(worker)
        tg.start_soon(client.send, "worker", {"type": "job"})
        await eventually(lambda: worker.stats().active == 1)
        for _ in range(5):
            began = time.monotonic()
            with pytest.raises(happen.QueueFullError):
                await client.send("worker", {"type": "job"}, timeout=WAIT)
            assert time.monotonic() - began < 0.2, "no twin to ask: refused at once"
        release.set()
    assert worker.stats().rejected == 5 and worker.stats().forwarded == 0


async def test_a_forwarded_request_is_never_forwarded_again(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    config = {
        "patterns": {
            "worker": {"max_concurrent": 1, "queue_limit": 0, "backpressure_threshold": 1.0}
        }
    }
    a, b = host(make_transport, ns, concurrency=config), host(make_transport, ns)
    release = anyio.Event()
    worker_a = blocking_worker(a, "a", release)
    worker_b = blocking_worker(b, "b", release)
    raw = make_transport()
    replies: list[dict[str, Any]] = []
    answered = anyio.Event()

    async def on_reply(msg: Message) -> None:
        replies.append(msgspec.msgpack.decode(msg.data))
        answered.set()

    async with a, b:
        await subscriptions_live(worker_a)
        await subscriptions_live(worker_b)
        await raw.start()
        inbox = raw.new_inbox()
        await raw.subscribe(inbox + ".*", on_reply)
        to_a = f"{ns}.inst.worker.{a.id}"  # A's own subject: A alone hears it
        await raw.publish(to_a, msgspec.msgpack.encode({"k": "req", "type": "job"}))
        await eventually(lambda: worker_a.stats().active == 1)  # A is full now
        forwarded = {"k": "req", "type": "job", "forwarded": True}
        began = anyio.current_time()
        await raw.publish(to_a, msgspec.msgpack.encode(forwarded), reply=inbox + ".1")
        with anyio.fail_after(WAIT):
            await answered.wait()
        assert anyio.current_time() - began < 0.2, "refused at once, no twin asked"
        assert replies[0]["k"] == "err" and replies[0]["code"] == "queue_full"
        release.set()
        await drained(worker_a)
    stats_a = worker_a.stats()
    assert (stats_a.accepted, stats_a.rejected, stats_a.forwarded) == (1, 1, 0)
    assert worker_b.stats().accepted == 0


PRESSURE = {
    "patterns": {"worker": {"max_concurrent": 50, "queue_limit": 5, "backpressure_threshold": 0.8}}
}


async def test_calls_a_twin_serves_do_not_hold_local_senders(
    make_transport: Callable[[], Transport],
) -> None:
    """A sender whose host also hosts the node: long calls do not block its later sends
    while both instances' queues are empty (they are sent to its own instance)."""
    ns = unique_namespace()
    local = host(make_transport, ns, concurrency=PRESSURE)
    remote = host(make_transport, ns, concurrency=PRESSURE)
    release = anyio.Event()
    here = blocking_worker(local, "local", release)
    there = blocking_worker(remote, "remote", release)
    here.on("quick", lambda e, c: "quick")
    there.on("quick", lambda e, c: "quick")
    client = local.create_node("client")
    served: Counter[str] = Counter()

    async def long_call() -> None:
        served[await client.send("worker", {"type": "job"}, timeout=WAIT)] += 1

    async with local, remote, anyio.create_task_group() as tg:
        await subscriptions_live(here)
        await subscriptions_live(there)
        for _ in range(20):
            tg.start_soon(long_call)
        await eventually(lambda: here.stats().active + there.stats().active == 20, timeout=WAIT)
        assert here.stats().queued == there.stats().queued == 0
        with anyio.fail_after(WAIT):
            assert await client.send("worker", {"type": "quick"}) == "quick"
        release.set()
    assert served == {"local": 20}, "a local sender's calls go to its own instance"
    assert there.stats().accepted == 0


async def test_a_local_senders_overflow_goes_to_the_twin(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    config = {
        "patterns": {
            "worker": {"max_concurrent": 1, "queue_limit": 2, "backpressure_threshold": 1.0}
        }
    }
    local = host(make_transport, ns, concurrency=config)
    remote = host(make_transport, ns)
    release = anyio.Event()
    here = blocking_worker(local, "local", release)
    there = blocking_worker(remote, "remote", release)
    client = local.create_node("client")
    served: Counter[str] = Counter()

    async def one() -> None:
        served[await client.send("worker", {"type": "job"}, timeout=WAIT)] += 1

    async with local, remote, anyio.create_task_group() as tg:
        await subscriptions_live(here)
        await subscriptions_live(there)
        for _ in range(10):
            tg.start_soon(one)
        await eventually(lambda: there.stats().accepted == 7, timeout=WAIT)
        release.set()
    assert served == {"local": 3, "remote": 7}
    stats = here.stats()
    assert (stats.accepted, stats.rejected, stats.forwarded) == (3, 0, 7)
    assert arrived(stats) == 10
