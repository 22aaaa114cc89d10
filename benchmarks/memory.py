"""In-memory scenarios: happen's memory transport against raw anyio memory object streams.

The raw baselines do the least two tasks can do to pass the same payload object around:
no encoding, no routing, no queue accounting. happen encodes every message with its codec
(the memory transport passes bytes, as NATS would), so a ratio near 1 is the goal, not a floor.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from benchmarks import _happen
from benchmarks._drive import Arrivals, Operation, closed_loop, flood
from benchmarks._harness import IN_FLIGHT, PAYLOAD, Config, Sample, Scenario, Side

#: Buffer of the raw broadcast stream (happen's queue holds up to 10 000 by default).
BROADCAST_BUFFER = 1000
#: Buffer of the raw streamed reply: the same as happen's default credit window.
STREAM_WINDOW = 256


async def raw_ping_pong(config: Config, *, pairs: int) -> Sample:
    """``pairs`` requester tasks, each with its own responder task, bouncing PAYLOAD."""
    async with anyio.create_task_group() as tg:
        operations = []
        for _ in range(pairs):
            to_server, server_in = anyio.create_memory_object_stream[Any](1)
            to_client, client_in = anyio.create_memory_object_stream[Any](1)
            tg.start_soon(_echo, server_in, to_client)
            operations.append(_requester(to_server, client_in))
        sample = await closed_loop(operations, config.duration)
        tg.cancel_scope.cancel()
    return sample


async def _echo(inbox: MemoryObjectReceiveStream[Any], outbox: MemoryObjectSendStream[Any]) -> None:
    async for item in inbox:
        await outbox.send(item)


def _requester(
    outbox: MemoryObjectSendStream[Any], inbox: MemoryObjectReceiveStream[Any]
) -> Operation:
    async def one() -> int:
        await outbox.send(PAYLOAD)
        await inbox.receive()
        return 1

    return one


async def raw_broadcast(config: Config) -> Sample:
    """One producer, one consumer, one bounded memory object stream."""
    send, receive = anyio.create_memory_object_stream[Any](BROADCAST_BUFFER)
    arrivals = Arrivals()

    async def consume() -> None:
        async for _ in receive:
            arrivals.arrived()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        sample = await flood(lambda: send.send(PAYLOAD), arrivals, config.duration)
        send.close()
    return sample


async def raw_stream(config: Config) -> Sample:
    """Per stream: a producer task sends STREAM_CHUNKS payloads; the consumer ``async for``s."""

    async def produce(send: MemoryObjectSendStream[Any]) -> None:
        async with send:
            for _ in range(_happen.STREAM_CHUNKS):
                await send.send(PAYLOAD)

    async def one() -> int:
        send, receive = anyio.create_memory_object_stream[Any](STREAM_WINDOW)
        count = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce, send)
            async with receive:
                async for _ in receive:
                    count += 1
        return count

    return await closed_loop(one, config.duration)


SCENARIOS = [
    Scenario(
        key="memory.request.seq",
        title="in-memory send→reply, sequential",
        unit="rt/s",
        happen=Side("happen", partial(_happen.request, transport="memory", workers=1)),
        baseline=Side("anyio", partial(raw_ping_pong, pairs=1)),
        target=1.0,
    ),
    Scenario(
        key="memory.request.100",
        title=f"in-memory send→reply, {IN_FLIGHT} in flight",
        unit="rt/s",
        happen=Side("happen", partial(_happen.request, transport="memory", workers=IN_FLIGHT)),
        baseline=Side("anyio", partial(raw_ping_pong, pairs=IN_FLIGHT)),
        target=1.0,
    ),
    Scenario(
        key="memory.broadcast",
        title="in-memory broadcast to one subscriber",
        unit="ev/s",
        happen=Side("happen", partial(_happen.broadcast, transport="memory")),
        baseline=Side("anyio", raw_broadcast),
        target=0.5,
    ),
    Scenario(
        key="memory.stream",
        title="in-memory streamed reply",
        unit="chunks/s",
        happen=Side("happen", partial(_happen.stream, transport="memory")),
        baseline=Side("anyio", raw_stream),
        target=0.5,
    ),
]
