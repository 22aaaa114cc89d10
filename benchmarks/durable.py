"""Durable nodes: happen's stored events against raw nats-py JetStream doing the same work.

- ``enqueue``: happen's ``node.enqueue`` to a durable node (stored, not run: no instance of
  the node runs) against nats-py's ``js.publish`` with its ack awaited, to a work-queue
  stream, from the same number of tasks in flight.
- ``request``: happen's ``send`` to a durable node and back, against a raw pipeline doing the
  same work: the requester publishes to a work-queue stream with its ack awaited (its reply
  subject in a header), a responder fetches from a durable pull consumer only as many as it
  has free slots (``IN_FLIGHT``), replies on core NATS, then acks.
- ``memory``: a durable ``send`` on the memory transport against a plain ``send`` on it.

Each round uses a fresh namespace (happen) or a fresh stream (raw); happen's durable node
has a queue limit large enough for a whole round.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import anyio
import msgspec

from benchmarks import _happen
from benchmarks._drive import closed_loop
from benchmarks._harness import (
    IN_FLIGHT,
    NATS_LOOPS,
    PAYLOAD,
    Config,
    Sample,
    Scenario,
    Side,
    Unavailable,
)

encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder().decode
PING = {"type": "ping", "payload": PAYLOAD}
ROOMY = {"patterns": {"worker": {"queue_limit": 100_000_000, "max_concurrent": IN_FLIGHT}}}
TIMEOUT = 30.0


def durable_config(durable: bool = True) -> dict[str, Any]:
    return {"patterns": {"worker": {"durable": durable, "ack_wait": 30.0}}}


# --- happen ---------------------------------------------------------------------------------


async def happen_enqueue(config: Config) -> Sample:
    happen = _happen.load()
    url = _happen.transport_url(config, "nats")
    namespace = f"bench{uuid.uuid4().hex[:12]}"
    async with happen.System(
        transport=url, namespace=namespace, delivery=durable_config(), concurrency=ROOMY
    ) as system:
        client = system.create_node("client")
        await client.enqueue("worker", PING)  # makes the log outside the timed phase

        async def one() -> int:
            await client.enqueue("worker", PING)
            return 1

        return await closed_loop(one, config.duration, IN_FLIGHT)


async def happen_request(config: Config, *, transport: str, durable: bool = True) -> Sample:
    happen = _happen.load()
    url = _happen.transport_url(config, transport)
    namespace = f"bench{uuid.uuid4().hex[:12]}"
    delivery = durable_config(durable)
    async with happen.System(
        transport=url, namespace=namespace, delivery=delivery, concurrency=ROOMY
    ) as server:
        worker = server.create_node("worker")
        worker.on("ping", _echo)
        async with AsyncExitStack() as stack:
            client_system = server  # in memory: one system (one broker), as _happen.systems
            if transport != "memory":
                client_system = await stack.enter_async_context(
                    happen.System(
                        transport=url, namespace=namespace, delivery=delivery, concurrency=ROOMY
                    )
                )
            client = client_system.create_node("client")
            with anyio.fail_after(10):
                await client.send("worker", PING)

            async def one() -> int:
                await client.send("worker", PING)
                return 1

            return await closed_loop(one, config.duration, IN_FLIGHT)


async def _echo(event: Any, context: dict[str, Any]) -> Any:
    return event.payload


async def twins(config: Config, *, with_slow: bool) -> Sample:
    """Durable send→reply on memory to a fast instance (100 slots), with or without a slow twin
    (one slot, 20 ms a handler) beside it: intake paced by free slots sends the load to the
    one with room, so the pair should be about as fast as the fast one alone."""
    happen = _happen.load()
    from happen.transports.memory import MemoryBroker, MemoryTransport

    broker = MemoryBroker()
    namespace = f"bench{uuid.uuid4().hex[:12]}"
    delivery = durable_config()
    slow_slots = {"patterns": {"worker": {"max_concurrent": 1, "queue_limit": 100_000_000}}}

    async def slow(event: Any, context: dict[str, Any]) -> Any:
        await anyio.sleep(0.02)
        return event.payload

    def system(concurrency: dict[str, Any]) -> Any:
        return happen.System(
            transport=MemoryTransport(broker=broker),
            namespace=namespace,
            delivery=delivery,
            concurrency=concurrency,
        )

    async with AsyncExitStack() as stack:
        fast = await stack.enter_async_context(system(ROOMY))
        fast.create_node("worker").on("ping", _echo)
        if with_slow:
            slow_system = await stack.enter_async_context(system(slow_slots))
            slow_system.create_node("worker").on("ping", slow)
        client = fast.create_node("client")
        await client.send("worker", PING)

        async def one() -> int:
            await client.send("worker", PING)
            return 1

        return await closed_loop(one, config.duration, IN_FLIGHT)


# --- raw nats-py JetStream ------------------------------------------------------------------


@asynccontextmanager
async def raw_stream(config: Config) -> AsyncIterator[tuple[Any, Any, str, str]]:
    """(responder connection, requester connection, stream name, subject)."""
    import nats
    from nats.js.api import RetentionPolicy, StreamConfig

    if config.nats_url is None:
        raise Unavailable("no nats-server")
    responder = await nats.connect(config.nats_url)
    requester = await nats.connect(config.nats_url)
    name = f"bench{uuid.uuid4().hex[:12]}"
    subject = f"{name}.events"
    js = requester.jetstream()
    await js.add_stream(
        StreamConfig(name=name, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE)
    )
    try:
        yield responder, requester, name, subject
    finally:
        try:
            await js.delete_stream(name)
        finally:
            await requester.close()
            await responder.close()


async def raw_enqueue(config: Config) -> Sample:
    async with raw_stream(config) as (_, requester, _name, subject):
        js = requester.jetstream()
        data = encode(PING)

        async def one() -> int:
            await js.publish(subject, data, headers={"Nats-Msg-Id": uuid.uuid4().hex})
            return 1

        return await closed_loop(one, config.duration, IN_FLIGHT)


async def raw_request(config: Config) -> Sample:
    from nats.js.api import AckPolicy, ConsumerConfig

    async with raw_stream(config) as (responder, requester, name, subject):
        rjs = responder.jetstream()
        await rjs.add_consumer(
            name,
            ConsumerConfig(durable_name="worker", ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0),
        )
        pull = await rjs.pull_subscribe_bind(consumer="worker", stream=name)
        waiting: dict[str, anyio.Event] = {}
        inbox = requester.new_inbox()

        async def on_reply(msg: Any) -> None:
            decode(msg.data)
            event = waiting.pop(msg.subject, None)
            if event is not None:
                event.set()

        await requester.subscribe(f"{inbox}.*", cb=on_reply)
        await requester.flush()
        js = requester.jetstream()
        data = encode(PING)

        async with anyio.create_task_group() as tg:
            free = IN_FLIGHT
            slot = anyio.Event()

            async def handle(msg: Any) -> None:
                nonlocal free, slot
                frame = decode(msg.data)
                await responder.publish(msg.headers["Reply"], encode(frame["payload"]))
                await msg.ack()
                free += 1
                slot.set()

            async def fetcher() -> None:
                nonlocal free, slot
                while True:
                    if free < 1:
                        slot = anyio.Event()
                        await slot.wait()
                        continue
                    try:
                        msgs = await pull.fetch(free, timeout=0.25)
                    except TimeoutError:
                        continue
                    for msg in msgs:
                        free -= 1
                        tg.start_soon(handle, msg)

            tg.start_soon(fetcher)

            async def one() -> int:
                token = f"{inbox}.{uuid.uuid4().hex}"
                done = waiting[token] = anyio.Event()
                await js.publish(subject, data, headers={"Nats-Msg-Id": token, "Reply": token})
                with anyio.fail_after(TIMEOUT):
                    await done.wait()
                return 1

            await one()
            sample = await closed_loop(one, config.duration, IN_FLIGHT)
            tg.cancel_scope.cancel()
        return sample


SCENARIOS = [
    Scenario(
        key="nats.durable.enqueue.100",
        title=f"NATS durable enqueue, {IN_FLIGHT} in flight",
        unit="ev/s",
        happen=Side("happen", happen_enqueue),
        baseline=Side("nats-py JetStream", raw_enqueue),
        target=0.8,
        loops=NATS_LOOPS,
    ),
    Scenario(
        key="nats.durable.request.100",
        title=f"NATS durable send→reply, {IN_FLIGHT} in flight",
        unit="rt/s",
        happen=Side("happen", partial(happen_request, transport="nats")),
        baseline=Side("nats-py JetStream", raw_request),
        target=0.7,
        loops=NATS_LOOPS,
    ),
    Scenario(
        key="memory.durable.slow_twin",
        title=f"memory durable send→reply, {IN_FLIGHT} in flight, a fast and a slow instance",
        unit="rt/s",
        happen=Side("happen (fast + slow)", partial(twins, with_slow=True)),
        baseline=Side("happen (fast alone)", partial(twins, with_slow=False)),
        target=0.8,
    ),
    Scenario(
        key="memory.durable.request.100",
        title=f"memory durable send→reply, {IN_FLIGHT} in flight",
        unit="rt/s",
        happen=Side("happen", partial(happen_request, transport="memory")),
        baseline=Side(
            "happen (not durable)", partial(happen_request, transport="memory", durable=False)
        ),
        target=0.5,
    ),
]
