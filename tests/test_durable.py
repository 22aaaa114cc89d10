"""Durable nodes: events stored before anything else, handled at least once.

Several "hosts" are systems sharing one memory broker or one nats-server (``make_transport``).
A host "dies" when its transport is stopped abruptly while its handlers still run: it can no
longer settle what it holds, which the log then delivers again after ``ack_wait``, as it
would for a killed process (over NATS, worker processes are also killed for real, with
SIGKILL, in ``test_durable_processes.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import happen
from happen._transport import Transport, durable_transport
from tests.helpers import eventually, subscriptions_live, unique_namespace

pytestmark = pytest.mark.anyio

ACK = 0.5  # the ack_wait of the durable nodes in these tests
WAIT = 10  # seconds; a test that needs this long has failed


def durable(ack_wait: float = ACK, **more: Any) -> dict[str, Any]:
    return {"patterns": {"worker*": {"durable": True, "ack_wait": ack_wait, **more}}}


def now() -> float:
    return anyio.current_time()


@asynccontextmanager
async def doomed(system: happen.System) -> AsyncIterator[happen.System]:
    """Run a host that will die: stopped without draining when the test is done."""
    await system.start()
    try:
        yield system
    finally:
        await system.stop(timeout=0)


def accounted(node: happen.Node) -> happen.NodeStats:
    stats = node.stats()
    assert stats.active == 0 and stats.queued == 0, stats
    assert stats.accepted == stats.completed + stats.failed, stats
    return stats


# ----- the basics ---------------------------------------------------------------------


async def test_send_stores_then_returns_the_result_and_enqueue_returns_a_receipt(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    async with happen.System(
        transport=make_transport(), namespace=ns, delivery=durable()
    ) as system:
        worker = system.create_node("worker")
        ran: list[Any] = []
        done = anyio.Event()

        @worker.on("double")
        async def double(event: happen.Event, context: dict[str, Any]) -> int:
            ran.append((event.payload, event.context.id))
            if len(ran) == 3:
                done.set()
            return int(event.payload) * 2

        client = system.create_node("client")
        assert await client.send("worker", {"type": "double", "payload": 21}) == 42
        receipt = await client.enqueue("worker", {"type": "double", "payload": 1})
        assert isinstance(receipt, happen.Receipt) and not receipt.duplicate
        second = await client.enqueue("worker", {"type": "double", "payload": 2}, id="job-2")
        assert second.seq > receipt.seq
        with anyio.fail_after(WAIT):
            await done.wait()
        assert sorted(payload for payload, _ in ran) == [1, 2, 21]
        assert "job-2" in {event_id for _, event_id in ran}, "id= is the event's id"
        await system.idle()
        stats = accounted(worker)
        assert (stats.accepted, stats.completed, stats.redelivered) == (3, 3, 0)


async def test_enqueue_to_a_node_that_is_not_durable_is_refused_naming_it(
    transport_url: str,
) -> None:
    async with happen.System(
        transport=transport_url, namespace=unique_namespace(), delivery=durable()
    ) as system:
        system.create_node("plain").on("x", lambda event, context: None)
        client = system.create_node("client")
        with pytest.raises(happen.InvalidConfigError, match="'plain' is not durable"):
            await client.enqueue("plain", {"type": "x"})


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("", happen.InvalidIdError),
        ("a b", happen.InvalidIdError),
        ("x" * 257, happen.InvalidIdError),
        (7, TypeError),
    ],
)
async def test_a_bad_event_id_is_refused_at_the_sender(bad: Any, error: type) -> None:
    async with happen.System(namespace=unique_namespace(), delivery=durable()) as system:
        system.create_node("worker").on("x", lambda event, context: None)
        client = system.create_node("client")
        with pytest.raises(error, match="event id"):
            await client.enqueue("worker", {"type": "x"}, id=bad)
        with pytest.raises(error, match="event id"):
            await client.send("worker", {"type": "x"}, id=bad)


async def test_a_durable_node_streams_its_results(
    make_transport: Callable[[], Transport],
) -> None:
    async with happen.System(
        transport=make_transport(), namespace=unique_namespace(), delivery=durable()
    ) as system:
        worker = system.create_node("worker")

        @worker.on("count")
        async def count(event: happen.Event, context: dict[str, Any]):  # type: ignore[no-untyped-def]
            for i in range(int(event.payload)):
                yield i

        client = system.create_node("client")
        async with client.stream("worker", {"type": "count", "payload": 50}) as stream:
            assert [item async for item in stream] == list(range(50))
        await system.idle()
        assert accounted(worker).completed == 1


# ----- dedup ----------------------------------------------------------------------------


async def test_a_resent_event_id_is_stored_once_and_runs_once(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    async with happen.System(
        transport=make_transport(), namespace=ns, delivery=durable()
    ) as system:
        worker = system.create_node("worker")
        runs: list[str] = []
        ran = anyio.Event()

        @worker.on("charge")
        async def charge(event: happen.Event, context: dict[str, Any]) -> str:
            runs.append(event.context.id)
            ran.set()
            return "charged"

        client = system.create_node("client")
        first = await client.enqueue("worker", {"type": "charge"}, id="order-7-charge")
        with anyio.fail_after(WAIT):
            await ran.wait()
        await system.idle()
        again = await client.enqueue("worker", {"type": "charge"}, id="order-7-charge")
        assert (again.duplicate, again.seq) == (True, first.seq), "handled already: still seen"
        with pytest.raises(happen.DuplicateEventError) as caught:
            await client.send("worker", {"type": "charge"}, id="order-7-charge")
        assert (caught.value.event_id, caught.value.node_id) == ("order-7-charge", "worker")
        other = await client.send("worker", {"type": "charge"}, id="order-8-charge")
        assert other == "charged"
        await system.idle()
        assert runs == ["order-7-charge", "order-8-charge"]


# ----- a host that dies -------------------------------------------------------------------


async def test_an_event_whose_host_dies_runs_again_on_the_twin_and_the_caller_gets_it(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    victim_transport = make_transport()
    victim = happen.System(transport=victim_transport, namespace=ns, delivery=durable())
    twin = happen.System(transport=make_transport(), namespace=ns, delivery=durable())
    caller = happen.System(
        transport=make_transport(), namespace=ns, delivery=durable(), liveness_timeout=0.4
    )
    started = anyio.Event()

    @victim.create_node("worker").on("job")
    async def hang(event: happen.Event, context: dict[str, Any]) -> None:
        started.set()
        await anyio.sleep_forever()

    async with doomed(victim), caller:
        client = caller.create_node("client")
        got: list[Any] = []

        async def call() -> None:
            got.append(await client.send("worker", {"type": "job", "payload": 7}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(WAIT):
                await started.wait()
            await victim_transport.stop()  # dies holding the event
            died = now()
            deliveries: list[int] = []
            worker = twin.create_node("worker")

            @worker.on("job")
            async def job(event: happen.Event, context: dict[str, Any]) -> int:
                deliveries.append(event.delivery)
                return int(event.payload) + 1

            async with twin:
                with anyio.fail_after(WAIT):
                    while not got:  # noqa: ASYNC110 (the call's task ends it)
                        await anyio.sleep(0.01)
                waited = now() - died
                await twin.idle()
                stats = accounted(worker)
        assert got == [8], "the caller waited through the death (liveness does not end it)"
        assert deliveries == [2]
        assert (stats.accepted, stats.completed, stats.redelivered) == (1, 1, 1)
        assert waited >= ACK * 0.8, "redelivered after ack_wait, not before"


async def test_a_hundred_events_held_by_a_dying_host_all_complete_on_the_twin(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    config = {"default": {"max_concurrent": 10}}
    victim_transport = make_transport()
    victim = happen.System(
        transport=victim_transport, namespace=ns, delivery=durable(), concurrency=config
    )
    twin = happen.System(
        transport=make_transport(), namespace=ns, delivery=durable(), concurrency=config
    )
    caller = happen.System(transport=make_transport(), namespace=ns, delivery=durable())
    running = 0
    full = anyio.Event()

    @victim.create_node("worker").on("job")
    async def hang(event: happen.Event, context: dict[str, Any]) -> None:
        nonlocal running
        running += 1
        if running == 10:
            full.set()
        await anyio.sleep_forever()

    seen: set[int] = set()
    worker = twin.create_node("worker")

    @worker.on("job")
    async def job(event: happen.Event, context: dict[str, Any]) -> int:
        seen.add(int(event.payload))
        return int(event.payload)

    async with doomed(victim), caller:
        client = caller.create_node("client")
        results: list[int] = []

        async def call(i: int) -> None:
            results.append(await client.send("worker", {"type": "job", "payload": i}))

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(call, i)
            with anyio.fail_after(WAIT):
                await full.wait()  # ten run on the victim; the rest wait in the log
            await victim_transport.stop()
            async with twin:
                with anyio.fail_after(WAIT * 2):
                    while len(results) < 100:  # noqa: ASYNC110 (the calls end it)
                        await anyio.sleep(0.01)
                await twin.idle()
        assert sorted(results) == list(range(100))
        assert seen == set(range(100))
        stats = accounted(worker)
        assert stats.completed == 100 and stats.redelivered == 10


async def test_a_handler_running_longer_than_ack_wait_is_not_delivered_again(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    one = happen.System(transport=make_transport(), namespace=ns, delivery=durable(0.2))
    two = happen.System(transport=make_transport(), namespace=ns, delivery=durable(0.2))
    runs: list[str] = []
    for system in (one, two):
        node = system.create_node("worker")

        @node.on("slow")
        async def slow(event: happen.Event, context: dict[str, Any], who: str = system.id) -> str:
            runs.append(who)
            await anyio.sleep(0.8)  # four ack_waits
            return "done"

    async with one, two:
        client = one.create_node("client")
        with anyio.fail_after(WAIT):
            assert await client.send("worker", {"type": "slow"}) == "done"
        await one.idle()
        await two.idle()
    assert len(runs) == 1


async def test_an_instance_that_stops_cleanly_hands_its_events_back_at_once(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    slow_ack = 30.0  # a redelivery after ack_wait would fail the test's bound
    leaving = happen.System(
        transport=make_transport(),
        namespace=ns,
        delivery=durable(slow_ack),
        concurrency={"default": {"max_concurrent": 2}},
    )
    staying = happen.System(transport=make_transport(), namespace=ns, delivery=durable(slow_ack))
    started = 0
    busy = anyio.Event()

    leaving_worker = leaving.create_node("worker")

    @leaving_worker.on("job")
    async def hang(event: happen.Event, context: dict[str, Any]) -> None:
        nonlocal started
        started += 1
        if started == 2:
            busy.set()
        await anyio.sleep_forever()

    async with leaving:
        client = leaving.create_node("client")
        for i in range(5):
            await client.enqueue("worker", {"type": "job", "payload": i})
        with anyio.fail_after(WAIT):
            await busy.wait()
        await leaving.stop(timeout=0.1)  # two run (cancelled at the drain's end), three wait
    stopped = now()
    handed = leaving_worker.stats()
    assert (handed.accepted, handed.handed_back, handed.completed, handed.failed) == (2, 2, 0, 0)
    got: list[int] = []
    all_in = anyio.Event()
    worker = staying.create_node("worker")

    @worker.on("job")
    async def job(event: happen.Event, context: dict[str, Any]) -> None:
        got.append(int(event.payload))
        if len(got) == 5:
            all_in.set()

    async with staying:
        with anyio.fail_after(WAIT):
            await all_in.wait()
        assert now() - stopped < 5.0, "handed back, not left to ack_wait"
    assert sorted(got) == [0, 1, 2, 3, 4]


# ----- intake paced by free slots -----------------------------------------------------------


async def test_intake_holds_max_concurrent_and_the_backlog_shows_in_stats(
    make_transport: Callable[[], Transport],
) -> None:
    async with happen.System(
        transport=make_transport(),
        namespace=unique_namespace(),
        delivery=durable(),
        concurrency={"default": {"max_concurrent": 3}},
    ) as system:
        worker = system.create_node("worker")
        gate = anyio.Event()
        peak = running = 0

        @worker.on("job")
        async def job(event: happen.Event, context: dict[str, Any]) -> None:
            nonlocal peak, running
            running += 1
            peak = max(peak, running)
            await gate.wait()
            running -= 1

        client = system.create_node("client")
        for i in range(20):
            await client.enqueue("worker", {"type": "job", "payload": i})
        await eventually(lambda: running == 3, WAIT)
        await eventually(lambda: worker.stats().backlog == 20, WAIT)
        stats = worker.stats()
        assert (stats.active, stats.queued) == (3, 0), "the rest wait in the log, not here"
        gate.set()
        await eventually(lambda: worker.stats().completed == 20, WAIT)
        assert peak == 3, peak
        await eventually(lambda: worker.stats().backlog == 0, WAIT)


async def test_events_go_to_the_instance_with_free_slots(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    one_slot = {"default": {"max_concurrent": 1}}
    slow = happen.System(
        transport=make_transport(), namespace=ns, delivery=durable(), concurrency=one_slot
    )
    fast = happen.System(
        transport=make_transport(),
        namespace=ns,
        delivery=durable(),
        concurrency={"default": {"max_concurrent": 8}},
    )
    ran = {"slow": 0, "fast": 0}
    for name, system, pause in (("slow", slow, 0.5), ("fast", fast, 0.002)):
        node = system.create_node("worker")

        @node.on("job")
        async def job(
            event: happen.Event, context: dict[str, Any], name: str = name, pause: float = pause
        ) -> None:
            ran[name] += 1
            await anyio.sleep(pause)

    async with slow, fast:
        client = fast.create_node("client")
        start = now()
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(client.send, "worker", {"type": "job", "payload": i})
        took = now() - start
    assert ran["slow"] + ran["fast"] == 200
    assert ran["slow"] <= took / 0.5 + 1, "the slow instance takes one at a time"
    assert took < 5.0


async def test_queue_limit_bounds_the_stored_backlog_and_nothing_more_is_stored(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    limits = {"patterns": {"worker": {"queue_limit": 5}}}
    async with happen.System(
        transport=make_transport(), namespace=ns, delivery=durable(), concurrency=limits
    ) as system:
        client = system.create_node("client")  # no instance of "worker" runs
        for i in range(5):
            await client.enqueue("worker", {"type": "job", "payload": i})
        with pytest.raises(happen.QueueFullError) as caught:
            await client.enqueue("worker", {"type": "job", "payload": 5})
        assert caught.value.node_id == "worker" and caught.value.queued == 5
        with pytest.raises(happen.QueueFullError):
            await client.send("worker", {"type": "job", "payload": 6}, timeout=2)
        got: list[int] = []
        worker = system.create_node("worker")
        worker.on("job", lambda event, context: got.append(event.payload))
        await eventually(lambda: len(got) == 5, WAIT)
        await system.idle()
        assert sorted(got) == [0, 1, 2, 3, 4]


# ----- broadcasts --------------------------------------------------------------------------


async def test_a_broadcast_while_every_instance_is_down_is_handled_when_one_comes_back(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    config = durable()
    heard: dict[str, list[Any]] = {"worker-a": [], "worker-b": []}

    def host() -> happen.System:
        system = happen.System(transport=make_transport(), namespace=ns, delivery=config)
        for name in heard:
            system.create_node(name).on(
                "tick", lambda event, context, name=name: heard[name].append(event.payload)
            )
        return system

    async with host():  # the durable nodes existed once: their copies are kept for them
        pass
    async with happen.System(transport=make_transport(), namespace=ns, delivery=config) as sender:
        await sender.create_node("clock").broadcast({"type": "tick", "payload": 1})
        async with host() as back:
            await eventually(lambda: all(heard.values()), WAIT)
            await back.idle()
    assert heard == {"worker-a": [1], "worker-b": [1]}, "each durable node gets its own copy"


async def test_durable_and_plain_nodes_each_hear_a_broadcast_once(
    make_transport: Callable[[], Transport],
) -> None:
    async with happen.System(
        transport=make_transport(), namespace=unique_namespace(), delivery=durable()
    ) as system:
        heard: list[str] = []
        for name in ("worker", "plain"):
            system.create_node(name).on(
                "tick", lambda event, context, name=name: heard.append(name)
            )
        await system.ready()
        await system.create_node("clock").broadcast({"type": "tick"})
        await eventually(lambda: len(heard) == 2, WAIT)
        await system.idle()
        assert sorted(heard) == ["plain", "worker"]


# ----- poison input ---------------------------------------------------------------------------


async def test_events_a_durable_node_cannot_run_are_settled_and_counted(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    transport = make_transport()
    async with happen.System(transport=transport, namespace=ns, delivery=durable()) as system:
        worker = system.create_node("worker")
        worker.on("known", lambda event, context: "ok")
        client = system.create_node("client")
        log = await durable_transport(transport).durable_log(f"happen_{ns}_node_worker")
        await log.append("events", b"\xc1 not a frame", msg_id="garbage")
        await client.enqueue("worker", {"type": "unknown"})
        with pytest.raises(happen.NoHandlerError):
            await client.send("worker", {"type": "also-unknown"}, timeout=WAIT)
        assert await client.send("worker", {"type": "known"}) == "ok"
        await eventually(lambda: worker.stats().rejected == 3, WAIT)
        consumer = await log.consumer("worker")
        await eventually(lambda: worker.stats().backlog == 0, WAIT)
        assert await consumer.pending() == 0, "settled, never delivered again"
        stats = accounted(worker)
        assert (stats.accepted, stats.completed) == (1, 1)


# ----- restarts -------------------------------------------------------------------------------


async def test_a_system_started_again_finds_its_stored_events(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    async with happen.System(transport=make_transport(), namespace=ns, delivery=durable()) as first:
        client = first.create_node("client")
        for i in range(5):
            await client.enqueue("worker", {"type": "job", "payload": i})
    got: list[int] = []
    async with happen.System(transport=make_transport(), namespace=ns, delivery=durable()) as again:
        again.create_node("worker").on("job", lambda event, context: got.append(event.payload))
        await eventually(lambda: len(got) == 5, WAIT)
    assert sorted(got) == [0, 1, 2, 3, 4]


async def test_subscriptions_of_a_durable_node_are_live(
    make_transport: Callable[[], Transport],
) -> None:
    async with happen.System(
        transport=make_transport(), namespace=unique_namespace(), delivery=durable()
    ) as system:
        worker = system.create_node("worker")
        worker.on("x", lambda event, context: 1)
        await subscriptions_live(worker)


# ----- retries and dead letters of durable nodes --------------------------------------------


def retrying(**more: Any) -> dict[str, Any]:
    backoff = {"initial": 0.01, "factor": 1.0, "jitter": "none"}
    return durable(max_attempts=3, backoff=backoff, **more)


async def test_a_durable_event_failing_twice_then_succeeding_gives_the_caller_its_result(
    make_transport: Callable[[], Transport],
) -> None:
    async with happen.System(
        transport=make_transport(), namespace=unique_namespace(), delivery=retrying()
    ) as system:
        worker = system.create_node("worker")
        attempts: list[int] = []

        @worker.on("flaky")
        async def flaky(event: happen.Event, context: dict[str, Any]) -> str:
            attempts.append(event.delivery)
            if len(attempts) < 3:
                raise RuntimeError("not yet")
            return "done"

        client = system.create_node("client")
        assert await client.send("worker", {"type": "flaky"}) == "done"
        await system.idle()
        stats = accounted(worker)
        assert attempts == [1, 2, 3]
        assert (stats.accepted, stats.completed, stats.retried) == (1, 1, 2)
        await eventually(lambda: worker.stats().backlog == 0, WAIT)


async def test_a_rejected_durable_event_is_stored_for_a_durable_dead_letter_node_then_settled(
    make_transport: Callable[[], Transport],
) -> None:
    config = {
        "patterns": {
            "worker": {"durable": True, "ack_wait": ACK, "dead_letter": "worker-dlq"},
            "worker-dlq": {"durable": True, "ack_wait": ACK},
        }
    }
    async with happen.System(
        transport=make_transport(), namespace=unique_namespace(), delivery=config
    ) as system:
        worker = system.create_node("worker")

        @worker.on("charge")
        async def charge(event: happen.Event, context: dict[str, Any]) -> None:
            raise happen.Reject("card expired")

        client = system.create_node("client")
        with pytest.raises(happen.HandlerError) as caught:
            await client.send("worker", {"type": "charge", "payload": {"n": 1}}, id="c-1")
        assert caught.value.attempts == 1
        assert worker.stats().dead_lettered == 1
        letters: list[happen.Event] = []
        dlq = system.create_node("worker-dlq")  # stored meanwhile: handled once it runs
        dlq.on("happen.dead_letter", lambda event, context: letters.append(event))
        await eventually(lambda: len(letters) == 1, WAIT)
        letter = letters[0]
        assert letter.context.id == "c-1:dead"
        assert letter.payload["event"]["type"] == "charge"
        assert letter.payload["event"]["context"]["id"] == "c-1"
        assert letter.payload["error"]["type"] == "Reject"
        assert (letter.payload["node"], letter.payload["attempts"]) == ("worker", 1)
        await system.idle()
        stats = worker.stats()
        assert stats.accepted == stats.completed + stats.failed + stats.dead_lettered
        await eventually(lambda: worker.stats().backlog == 0, WAIT)


async def test_a_durable_event_whose_dead_letter_cannot_be_sent_is_kept_not_dropped(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    config = {"patterns": {"worker": {"durable": True, "ack_wait": 30.0, "dead_letter": "dlq"}}}
    first = happen.System(transport=make_transport(), namespace=ns, delivery=config)
    worker = first.create_node("worker")

    @worker.on("charge")
    async def charge(event: happen.Event, context: dict[str, Any]) -> None:
        raise happen.Reject("no")

    async with first:
        client = first.create_node("client")
        await client.enqueue("worker", {"type": "charge"})
        await eventually(lambda: worker.stats().dead_letters_pending == 1, WAIT)
    stats = worker.stats()
    assert (stats.dead_lettered, stats.failed, stats.handed_back) == (0, 0, 1)
    letters: list[Any] = []
    second = happen.System(transport=make_transport(), namespace=ns, delivery=config)
    again = second.create_node("worker")
    again.on("charge", lambda event, context: "ran again, and succeeded")
    second.create_node("dlq").on("happen.dead_letter", lambda e, c: letters.append(e))
    async with second:
        await eventually(lambda: again.stats().completed == 1, WAIT)
    assert letters == [], "the event itself ran again (it was kept), no letter was needed"


async def test_events_a_durable_node_cannot_run_are_dead_lettered_when_it_has_a_dead_letter_node(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    transport = make_transport()
    config = {"patterns": {"worker": {"durable": True, "ack_wait": ACK, "dead_letter": "dlq"}}}
    async with happen.System(transport=transport, namespace=ns, delivery=config) as system:
        letters: list[happen.Event] = []
        system.create_node("dlq").on("happen.dead_letter", lambda e, c: letters.append(e))
        worker = system.create_node("worker")
        worker.on("known", lambda event, context: "ok")
        client = system.create_node("client")
        await system.ready()
        log = await durable_transport(transport).durable_log(f"happen_{ns}_node_worker")
        await client.enqueue("worker", {"type": "unknown", "payload": 7}, id="u-1")
        await log.append("events", b"\xc1 not a frame", msg_id="garbage")
        await eventually(lambda: len(letters) == 2, WAIT)
        by_error = {letter.payload["error"]["type"]: letter for letter in letters}
        unknown = by_error["NoHandlerError"]
        assert unknown.context.id == "u-1:dead" and unknown.context.causation_id == "u-1"
        assert unknown.payload["event"]["type"] == "unknown"
        assert unknown.payload["event"]["payload"] == 7
        garbage = by_error["CodecError"]
        assert garbage.payload["event"]["payload"] == b"\xc1 not a frame"
        assert garbage.context.id == "garbage:dead"
        consumer = await log.consumer("worker")
        await eventually(lambda: worker.stats().rejected == 2, WAIT)
        with anyio.fail_after(WAIT):
            while await consumer.pending():  # noqa: ASYNC110 (server state, bounded)
                await anyio.sleep(0.01)
        stats = accounted(worker)
        assert (stats.accepted, stats.dead_lettered) == (0, 0), "rejected, never accepted"
