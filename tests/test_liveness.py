"""Liveness: nobody waits on the dead.

Several "hosts" are systems sharing one memory broker or one nats-server. A host "dies" when
its transport is stopped abruptly while its handlers still run (over NATS, a worker process is
also killed for real, with SIGKILL), and "freezes" when it keeps its subscriptions but answers
nothing (a silent subscriber in its place; over NATS, a worker process stopped with SIGSTOP).
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest

import happen
from happen._transport import Message, Transport
from tests.conftest import NatsServer
from tests.helpers import eventually, running_process, subscriptions_live, unique_namespace

pytestmark = pytest.mark.anyio

T = 1.0  # the liveness_timeout of the calling systems in these tests
SHORT = 0.4  # theirs where a test waits for something not to happen
SLACK = 0.5  # for the scheduler of a busy machine
WAIT = 10  # seconds; a test that needs this long has failed


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


async def live(transport: Transport, namespace: str) -> None:
    """Return once the subscriptions ``transport`` made so far are live on the server (a
    request nobody hears comes back as "no responders" after them)."""
    inbox = transport.new_inbox()
    back = anyio.Event()

    async def on_reply(msg: Message) -> None:
        back.set()

    sub = await transport.subscribe(inbox, on_reply)
    await transport.publish(f"{namespace}.node.zz-nobody", b"", reply=inbox)
    with anyio.fail_after(WAIT):
        await back.wait()
    await sub.unsubscribe()


def raw_frame(data: bytes) -> dict[str, Any]:
    frame: dict[str, Any] = msgspec.msgpack.decode(data)
    return frame


# ----- validation -------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1.0, "5", None, True])
def test_liveness_timeout_must_be_a_positive_number(value: Any) -> None:
    with pytest.raises(happen.InvalidConfigError, match="liveness_timeout"):
        happen.System(liveness_timeout=value)


def test_host_lost_error_is_a_transport_error() -> None:
    assert issubclass(happen.HostLostError, happen.TransportError)
    assert "HostLostError" in happen.__all__
    error = happen.HostLostError("gone", node_id="worker")
    assert error.node_id == "worker" and type(error).__module__ == "happen"


# ----- a host that dies ---------------------------------------------------------------


async def test_a_call_to_a_host_that_dies_ends_with_host_lost(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    caller = happen.System(transport=make_transport(), namespace=ns, liveness_timeout=T)
    victim_transport = make_transport()
    victim = happen.System(transport=victim_transport, namespace=ns)
    worker = victim.create_node("worker")
    started = anyio.Event()

    @worker.on("hang")
    async def hang(event: happen.Event, context: dict) -> None:
        started.set()
        await anyio.sleep_forever()

    client = caller.create_node("client")
    ended: list[tuple[BaseException, float]] = []

    async def call() -> None:
        try:
            await client.send("worker", {"type": "hang"})  # no timeout
        except happen.HappenError as exc:
            ended.append((exc, now()))

    async with doomed(victim), caller:
        await subscriptions_live(worker)
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(WAIT):
                await started.wait()
            died = now()
            await victim_transport.stop()
        error, at = ended[0]
        assert isinstance(error, happen.HostLostError), error
        assert error.node_id == "worker"
        assert at - died < T + SLACK, "lost within the caller's liveness_timeout"
        with anyio.fail_after(1):
            await caller.idle()  # nothing of the call is left


async def test_a_stream_half_read_from_a_host_that_dies_ends_with_host_lost(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    caller = happen.System(transport=make_transport(), namespace=ns, liveness_timeout=T)
    victim_transport = make_transport()
    victim = happen.System(transport=victim_transport, namespace=ns)
    worker = victim.create_node("worker")
    started = anyio.Event()

    @worker.on("items")
    async def items(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
        for i in range(3):
            yield i
        started.set()
        await anyio.sleep_forever()

    client = caller.create_node("client")
    async with doomed(victim), caller:
        await subscriptions_live(worker)
        async with client.stream("worker", {"type": "items"}) as stream:
            assert [await anext(stream) for _ in range(3)] == [0, 1, 2]
            with anyio.fail_after(WAIT):
                await started.wait()
            died = now()
            await victim_transport.stop()
            with anyio.fail_after(WAIT), pytest.raises(happen.HostLostError, match="worker"):
                await anext(stream)
            assert now() - died < T + SLACK


async def test_calls_to_a_live_host_are_never_lost(
    make_transport: Callable[[], Transport],
) -> None:
    """A long handler and a stream whose reader pauses: both sides are pinged, both live."""
    ns = unique_namespace()
    caller = happen.System(
        transport=make_transport(), namespace=ns, liveness_timeout=SHORT, stream_window=2
    )
    server = happen.System(transport=make_transport(), namespace=ns, liveness_timeout=SHORT)
    worker = server.create_node("worker")

    @worker.on("slow")
    async def slow(event: happen.Event, context: dict) -> str:
        await anyio.sleep(3 * SHORT)  # three liveness timeouts
        return "done"

    @worker.on("items")
    async def items(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
        for i in range(6):
            yield i

    client = caller.create_node("client")
    async with server, caller:
        await subscriptions_live(worker)
        assert await client.send("worker", {"type": "slow"}) == "done"
        got = []
        async with client.stream("worker", {"type": "items"}) as stream:
            async for item in stream:
                got.append(item)
                if item == 1:
                    await anyio.sleep(3 * SHORT)  # the producer waits for credit meanwhile
        assert got == list(range(6))
        await eventually(lambda: worker.stats().completed == 2)
        stats = worker.stats()
        assert (stats.accepted, stats.completed, stats.failed) == (2, 2, 0)


# ----- a host that freezes -------------------------------------------------------------


async def test_a_call_to_a_frozen_host_is_lost_once_the_bound_passes(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    caller = happen.System(transport=make_transport(), namespace=ns, liveness_timeout=T)
    server = happen.System(transport=make_transport(), namespace=ns)
    worker = server.create_node("worker")
    started = anyio.Event()

    @worker.on("hang")
    async def hang(event: happen.Event, context: dict) -> None:
        started.set()
        await anyio.sleep_forever()

    client = caller.create_node("client")
    ice = make_transport()  # keeps the frozen host's ping subject, answers nothing
    pings: list[bytes] = []

    async def silent(msg: Message) -> None:
        pings.append(msg.data)

    async with doomed(server), caller:
        await subscriptions_live(worker)
        async with anyio.create_task_group() as tg:
            ended: list[float] = []

            async def call() -> None:
                with pytest.raises(happen.HostLostError, match="frozen or unreachable"):
                    await client.send("worker", {"type": "hang"})
                ended.append(now())

            tg.start_soon(call)
            with anyio.fail_after(WAIT):
                await started.wait()
            await ice.start()
            await ice.subscribe(f"{ns}.ping.worker", silent)
            await live(ice, ns)
            frozen = now()
            await worker.unsubscribe()  # the host hears nothing any more...
            await worker.close()
        assert pings, "the caller asked the frozen host"
        assert 0.5 * T < ended[0] - frozen < 1.25 * T + SLACK


# ----- nodes that do not take part ------------------------------------------------------


@pytest.mark.parametrize("presence", ["answered", "silent"])
async def test_a_foreign_node_is_bounded_by_timeouts_only(
    make_transport: Callable[[], Transport], presence: str
) -> None:
    """A node served by a program that does not answer pings: no HostLostError while it
    serves; the call's own timeout bounds it."""
    ns = unique_namespace()
    caller = happen.System(transport=make_transport(), namespace=ns, liveness_timeout=SHORT)
    client = caller.create_node("client")
    foreign = make_transport()
    waiting: list[str] = []  # reply subjects of requests it holds
    arrived = anyio.Event()

    async def serve(msg: Message) -> None:
        frame = raw_frame(msg.data)
        if frame["type"] == "happen.presence":
            if presence == "answered":
                answer = {"k": "err", "code": "no_handler", "message": "what is that?"}
                await foreign.publish(msg.reply, msgspec.msgpack.encode(answer))
            return
        waiting.append(msg.reply)
        arrived.set()

    async with caller:
        await foreign.start()
        await foreign.subscribe(f"{ns}.node.legacy", serve, queue="legacy")
        await live(foreign, ns)
        result: list[Any] = []
        done = anyio.Event()

        async def call() -> None:
            try:
                result.append(await client.send("legacy", {"type": "slow"}))
            finally:
                done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(WAIT):
                await arrived.wait()
            with anyio.move_on_after(3 * SHORT):  # three liveness timeouts: still waiting
                await done.wait()
            assert not done.is_set()
            await foreign.publish(waiting[0], msgspec.msgpack.encode({"k": "res", "value": 7}))
        assert result == [7]
        began = now()
        with pytest.raises(happen.SendTimeout):
            await client.send("legacy", {"type": "never"}, timeout=2 * SHORT)
        assert now() - began < 2 * SHORT + SLACK


async def test_a_call_to_a_foreign_node_that_vanishes_ends_with_host_lost(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    caller = happen.System(transport=make_transport(), namespace=ns, liveness_timeout=T)
    client = caller.create_node("client")
    foreign = make_transport()
    arrived = anyio.Event()

    async def serve(msg: Message) -> None:
        arrived.set()

    async with caller:
        await foreign.start()
        sub = await foreign.subscribe(f"{ns}.node.legacy", serve, queue="legacy")
        await live(foreign, ns)
        async with anyio.create_task_group() as tg:
            ended: list[float] = []

            async def call() -> None:
                with pytest.raises(happen.HostLostError, match="nobody serves node 'legacy'"):
                    await client.send("legacy", {"type": "job"})
                ended.append(now())

            tg.start_soon(call)
            with anyio.fail_after(WAIT):
                await arrived.wait()
            vanished = now()
            await sub.unsubscribe()
        assert ended[0] - vanished < T + SLACK


async def test_a_node_answers_pings_and_presence_probes_without_counting_them(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    server = happen.System(transport=make_transport(), namespace=ns)
    node = server.create_node("any")
    release = anyio.Event()
    handled: list[str] = []

    @node.on("**")
    async def everything(event: happen.Event, context: dict) -> None:
        handled.append(event.type)
        await release.wait()

    raw = make_transport()
    frames: list[dict[str, Any]] = []
    changed = anyio.Event()

    async def on_reply(msg: Message) -> None:
        nonlocal changed
        frames.append(raw_frame(msg.data))
        changed.set()

    async def until(count: int) -> None:
        nonlocal changed
        with anyio.fail_after(WAIT):
            while len(frames) < count:
                changed = anyio.Event()
                await changed.wait()

    async with server:
        await raw.start()
        inbox = raw.new_inbox()
        await raw.subscribe(inbox + ".*", on_reply)
        await live(raw, ns)
        held = inbox + ".held"
        request = {"k": "req", "type": "job"}
        await raw.publish(f"{ns}.node.any", msgspec.msgpack.encode(request), reply=held)
        await eventually(lambda: handled == ["job"])
        presence = {"k": "req", "type": "happen.presence"}
        await raw.publish(f"{ns}.node.any", msgspec.msgpack.encode(presence), reply=inbox + ".p")
        await until(1)
        assert frames[0] == {"k": "ack"}
        ping = {"k": "ping", "calls": [held, inbox + ".unknown"]}
        await raw.publish(f"{ns}.ping.any", msgspec.msgpack.encode(ping), reply=inbox + ".q")
        await until(2)
        assert frames[1] == {"k": "pong", "calls": [held], "instance": server.id}
        assert handled == ["job"], "the presence probe ran no handler"
        release.set()
        await until(3)
        stats = node.stats()
        assert (stats.accepted, stats.completed, stats.rejected) == (1, 1, 0)


# ----- a producer whose consumer is gone ------------------------------------------------

ONE_SLOT = {"patterns": {"numbers": {"max_concurrent": 1}}}


def numbers_node(system: happen.System) -> happen.Node:
    numbers = system.create_node("numbers")

    @numbers.on("count")
    async def count(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
        i = 0
        while True:
            yield i
            i += 1

    numbers.on("ping", lambda e, c: "pong")
    return numbers


async def test_a_producer_whose_consumer_host_dies_gives_its_slot_back(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    producer = happen.System(
        transport=make_transport(), namespace=ns, liveness_timeout=T, concurrency=ONE_SLOT
    )
    numbers = numbers_node(producer)
    asker = producer.create_node("asker")
    victim_transport = make_transport()
    victim = happen.System(transport=victim_transport, namespace=ns, stream_window=2)
    reader = victim.create_node("reader")
    async with producer, doomed(victim):
        await subscriptions_live(reader)
        stream = reader.stream("numbers", {"type": "count"})
        await stream.__aenter__()
        assert await anext(stream) == 0
        await eventually(lambda: numbers.stats().active == 1)
        died = now()
        await victim_transport.stop()
        with anyio.fail_after(WAIT):  # needs the one slot the stream held
            assert await asker.send("numbers", {"type": "ping"}) == "pong"
        assert now() - died < T + SLACK, "the slot came back within liveness_timeout"
        stats = numbers.stats()
        assert (stats.accepted, stats.completed, stats.failed) == (2, 1, 1)


@pytest.mark.parametrize("consumer", ["silent", "gone"])
async def test_a_producer_stops_when_its_consumer_does_not_answer_or_is_gone(
    make_transport: Callable[[], Transport], consumer: str
) -> None:
    """A happen consumer (``origin`` set) that stops answering pings, or answers that it no
    longer reads the stream: the producer stops within liveness_timeout."""
    ns = unique_namespace()
    producer = happen.System(
        transport=make_transport(), namespace=ns, liveness_timeout=T, concurrency=ONE_SLOT
    )
    numbers = numbers_node(producer)
    asker = producer.create_node("asker")
    raw = make_transport()
    kinds: list[str] = []
    started = anyio.Event()

    async def on_frame(msg: Message) -> None:
        frame = raw_frame(msg.data)
        kinds.append(frame["k"])
        started.set()
        if frame["k"] == "ping" and consumer == "gone":
            await raw.publish(msg.reply, msgspec.msgpack.encode({"k": "pong", "gone": True}))

    async with producer:
        await raw.start()
        inbox = raw.new_inbox()
        await raw.subscribe(inbox, on_frame)
        await live(raw, ns)
        request = {"k": "req", "type": "count", "window": 2, "origin": "0123456789abcdef"}
        await raw.publish(f"{ns}.node.numbers", msgspec.msgpack.encode(request), reply=inbox)
        with anyio.fail_after(WAIT):
            await started.wait()
        await eventually(lambda: numbers.stats().active == 1)
        began = now()
        with anyio.fail_after(WAIT):
            assert await asker.send("numbers", {"type": "ping"}) == "pong"
        assert now() - began < T + SLACK
        assert "ping" in kinds
        stats = numbers.stats()
        assert (stats.accepted, stats.completed, stats.failed) == (2, 1, 1)


async def test_a_foreign_consumer_is_bounded_by_the_idle_timeout_only(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    idle = 3 * SHORT
    producer = happen.System(
        transport=make_transport(),
        namespace=ns,
        liveness_timeout=SHORT,
        stream_idle_timeout=idle,
        concurrency=ONE_SLOT,
    )
    numbers = numbers_node(producer)
    raw = make_transport()
    kinds: list[str] = []

    async def on_frame(msg: Message) -> None:
        kinds.append(raw_frame(msg.data)["k"])

    async with producer:
        await raw.start()
        inbox = raw.new_inbox()
        await raw.subscribe(inbox, on_frame)
        await live(raw, ns)
        request = {"k": "req", "type": "count", "window": 2}  # no origin: not happen
        await raw.publish(f"{ns}.node.numbers", msgspec.msgpack.encode(request), reply=inbox)
        await eventually(lambda: numbers.stats().active == 1)
        began = now()
        await eventually(lambda: numbers.stats().failed == 1, timeout=WAIT)
        assert now() - began > idle - SLACK, "held until the idle timeout"
        await eventually(lambda: kinds[-1:] == ["err"])
        assert "ping" not in kinds


# ----- a pressure hold from a host that died --------------------------------------------

PRESSURE = {
    "patterns": {"worker": {"max_concurrent": 1, "queue_limit": 2, "backpressure_threshold": 0.5}}
}


async def test_a_hold_from_a_host_that_died_does_not_block_its_twin(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    caller = happen.System(transport=make_transport(), namespace=ns, liveness_timeout=T)
    victim_transport = make_transport()
    victim = happen.System(transport=victim_transport, namespace=ns, concurrency=PRESSURE)
    twin = happen.System(transport=make_transport(), namespace=ns)
    held = victim.create_node("worker")

    @held.on("hang")
    async def hang_forever(event: happen.Event, context: dict) -> None:
        await anyio.sleep_forever()

    echo = victim.create_node("echo")
    echo.on("ping", lambda e, c: "pong")
    twin.create_node("worker").on("who", lambda e, c: "twin")
    client = caller.create_node("client")
    lost: list[BaseException] = []

    async def hang() -> None:
        try:
            await client.send("worker", {"type": "hang"})
        except happen.HappenError as exc:
            lost.append(exc)

    async with doomed(victim), caller, anyio.create_task_group() as tg:
        await subscriptions_live(held)
        for i in range(2):  # one runs, one waits: under pressure, the second is held
            tg.start_soon(hang)
            await eventually(lambda i=i: held.stats().accepted == i + 1, timeout=WAIT)
        assert held.stats().under_pressure
        assert await client.send("echo", {"type": "ping"}) == "pong"  # the hold is back
        async with twin:
            await twin.ready()
            died = now()
            await victim_transport.stop()
            with anyio.fail_after(WAIT):
                assert await client.send("worker", {"type": "who"}) == "twin"
            assert now() - died < T + SLACK
        await eventually(lambda: len(lost) == 2)
        assert all(isinstance(exc, happen.HostLostError) for exc in lost), lost


# ----- real processes over NATS ----------------------------------------------------------

WORKER = str(Path(__file__).parent / "workers" / "serve.py")


def worker_process(
    url: str, ns: str, concurrency: dict[str, Any] | None = None
) -> AbstractAsyncContextManager[anyio.abc.Process]:
    args = [sys.executable, WORKER, url, ns]
    if concurrency is not None:
        args.append(json.dumps(concurrency))
    return running_process(args)


async def until_serving(client: happen.Node) -> int:
    """The worker process's pid, once it serves (retried: no sleeps to guess)."""
    with anyio.fail_after(30):
        while True:
            try:
                pid: int = await client.send("worker", {"type": "who"}, timeout=2)
                return pid
            except (happen.NodeNotFoundError, happen.SendTimeout):
                await anyio.sleep(0.05)


def observer_of(system: happen.System) -> tuple[happen.Node, list[int], anyio.Event]:
    observer = system.create_node("observer")
    started: list[int] = []
    changed = anyio.Event()

    @observer.on("started")
    async def on_started(event: happen.Event, context: dict) -> None:
        started.append(event.payload)
        changed.set()

    return observer, started, changed


@pytest.mark.nats
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_killed_worker_process_fails_calls_and_streams_with_host_lost(
    nats_server: NatsServer,
) -> None:
    url = nats_server.start().url
    ns = unique_namespace()
    async with (
        worker_process(url, ns) as process,
        happen.System(transport=url, namespace=ns, liveness_timeout=T) as system,
    ):
        _, started, _ = observer_of(system)
        client = system.create_node("client")
        await until_serving(client)
        ended: dict[str, tuple[BaseException, float]] = {}

        async def call() -> None:
            try:
                await client.send("worker", {"type": "hang"})
            except happen.HappenError as exc:
                ended["send"] = (exc, now())

        async def read() -> None:
            async with client.stream("worker", {"type": "items"}) as stream:
                assert [await anext(stream) for _ in range(3)] == [0, 1, 2]
                try:
                    await anext(stream)
                except happen.HappenError as exc:
                    ended["stream"] = (exc, now())

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            tg.start_soon(read)
            await eventually(lambda: len(started) == 2, timeout=WAIT)
            process.send_signal(signal.SIGKILL)
            await process.wait()
            died = now()
        for name, (error, at) in ended.items():
            assert isinstance(error, happen.HostLostError), (name, error)
            assert at - died < T + SLACK, name
        assert sorted(ended) == ["send", "stream"]


@pytest.mark.nats
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_stopped_worker_process_counts_as_lost_once_the_bound_passes(
    nats_server: NatsServer,
) -> None:
    url = nats_server.start().url
    ns = unique_namespace()
    async with (
        worker_process(url, ns) as process,
        happen.System(transport=url, namespace=ns, liveness_timeout=T) as system,
    ):
        _, started, _ = observer_of(system)
        client = system.create_node("client")
        await until_serving(client)
        ended: list[float] = []

        async def call() -> None:
            with pytest.raises(happen.HostLostError, match="frozen or unreachable"):
                await client.send("worker", {"type": "hang"})
            ended.append(now())

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await eventually(lambda: len(started) == 1, timeout=WAIT)
            process.send_signal(signal.SIGSTOP)  # frozen: connected, answering nothing
            frozen = now()
        assert 0.5 * T < ended[0] - frozen < 1.25 * T + SLACK


@pytest.mark.nats
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_producer_whose_consumer_process_is_killed_gives_its_slot_back(
    nats_server: NatsServer,
) -> None:
    url = nats_server.start().url
    ns = unique_namespace()
    async with (
        worker_process(url, ns) as process,
        happen.System(
            transport=url, namespace=ns, liveness_timeout=T, concurrency=ONE_SLOT
        ) as system,
    ):
        _, started, _ = observer_of(system)
        numbers = numbers_node(system)
        client = system.create_node("client")
        await until_serving(client)
        async with anyio.create_task_group() as tg:

            async def consume() -> None:
                with pytest.raises(happen.HostLostError):
                    await client.send("worker", {"type": "consume"})

            tg.start_soon(consume)
            await eventually(lambda: len(started) == 1, timeout=WAIT)
            assert numbers.stats().active == 1
            process.send_signal(signal.SIGKILL)
            await process.wait()
            died = now()
            with anyio.fail_after(WAIT):  # needs the one slot the stream held
                assert await client.send("numbers", {"type": "ping"}) == "pong"
            assert now() - died < T + SLACK
        stats = numbers.stats()
        assert (stats.accepted, stats.completed, stats.failed) == (2, 1, 1)


@pytest.mark.nats
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_hold_from_a_killed_worker_process_does_not_block_its_twin(
    nats_server: NatsServer,
) -> None:
    url = nats_server.start().url
    ns = unique_namespace()
    async with (
        worker_process(url, ns, PRESSURE) as process,
        happen.System(transport=url, namespace=ns, liveness_timeout=T) as system,
    ):
        _, started, _ = observer_of(system)
        client = system.create_node("client")
        await until_serving(client)
        lost: list[BaseException] = []

        async def hang() -> None:
            try:
                await client.send("worker", {"type": "hang"})
            except happen.HappenError as exc:
                lost.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hang)  # runs
            await eventually(lambda: len(started) == 1, timeout=WAIT)
            tg.start_soon(hang)  # waits in the queue: the node is under pressure, holds it
            await anyio.wait_all_tasks_blocked()  # (published)
            # The hold comes back before the answer to a later call to the same process.
            assert await client.send("echo", {"type": "ping"}) == "pong"
            async with happen.System(transport=url, namespace=ns) as twin_host:
                twin_host.create_node("worker").on("who", lambda e, c: "twin")
                await twin_host.ready()
                process.send_signal(signal.SIGKILL)
                await process.wait()
                died = now()
                with anyio.fail_after(WAIT):
                    assert await client.send("worker", {"type": "who"}) == "twin"
                assert now() - died < T + SLACK
            await eventually(lambda: len(lost) == 2, timeout=WAIT)
        assert all(isinstance(exc, happen.HostLostError) for exc in lost), lost
