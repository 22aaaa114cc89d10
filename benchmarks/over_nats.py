"""NATS scenarios: happen over NATS against plain nats-py on the same nats-server.

Both sides use two connections in one process: a responder (happen: the server node's system)
and a requester (happen: the client node's system). Both encode and decode the payload with
msgspec's msgpack, as a real nats-py service would. Each round opens fresh connections and uses
fresh subjects (a fresh namespace for happen), so rounds do not see each other's traffic.
(Named ``over_nats`` so that ``import nats`` never finds this module.)
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
from benchmarks._drive import Arrivals, closed_loop, flood
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
TIMEOUT = 30.0


@asynccontextmanager
async def connections(config: Config) -> AsyncIterator[tuple[Any, Any, str]]:
    """(responder, requester, a fresh subject prefix)."""
    import nats

    if config.nats_url is None:
        raise Unavailable("no nats-server")
    async with AsyncExitStack() as stack:
        responder = await nats.connect(config.nats_url)
        stack.push_async_callback(responder.close)
        requester = await nats.connect(config.nats_url)
        stack.push_async_callback(requester.close)
        yield responder, requester, f"bench.{uuid.uuid4().hex[:12]}"


async def until_answered(requester: Any, subject: str, data: bytes, within: float = 10.0) -> None:
    """Request until a responder answers, as the happen side waits for its server node."""
    from nats.errors import NoRespondersError

    with anyio.fail_after(within):
        while True:
            try:
                await requester.request(subject, data, timeout=within)
                return
            except NoRespondersError:
                await anyio.sleep(0.01)


async def raw_request(config: Config, *, workers: int) -> Sample:
    """``request`` against a responder that decodes the payload and replies with it re-encoded."""
    async with connections(config) as (responder, requester, prefix):

        async def echo(msg: Any) -> None:
            await responder.publish(msg.reply, encode(decode(msg.data)))

        await responder.subscribe(f"{prefix}.rpc", cb=echo)
        await responder.flush()
        data = encode(PAYLOAD)
        await until_answered(requester, f"{prefix}.rpc", data)

        async def one() -> int:
            reply = await requester.request(f"{prefix}.rpc", data, timeout=TIMEOUT)
            decode(reply.data)
            return 1

        return await closed_loop(one, config.duration, workers)


async def raw_broadcast(config: Config) -> Sample:
    """``publish`` to a subject whose subscriber callback decodes and counts."""
    async with connections(config) as (subscriber, publisher, prefix):
        arrivals = Arrivals()

        async def on_tick(msg: Any) -> None:
            decode(msg.data)
            arrivals.arrived()

        await subscriber.subscribe(f"{prefix}.tick", cb=on_tick)
        await subscriber.flush()
        data = encode(PAYLOAD)
        return await flood(
            lambda: publisher.publish(f"{prefix}.tick", data),
            arrivals,
            config.duration,
            settle=publisher.flush,
        )


async def raw_stream(config: Config) -> Sample:
    """The responder publishes N chunks to the request's reply inbox (no flow control), then an
    empty end marker. The requester counts them in its inbox subscription's callback (nats-py's
    fastest path: ``sub.messages`` would start a task per message)."""
    async with connections(config) as (responder, requester, prefix):

        async def produce(msg: Any) -> None:
            for _ in range(decode(msg.data)["n"]):
                await responder.publish(msg.reply, encode(PAYLOAD))
            await responder.publish(msg.reply, b"")

        await responder.subscribe(f"{prefix}.stream", cb=produce)
        await responder.flush()
        request = encode({"n": _happen.STREAM_CHUNKS})

        async def one() -> int:
            count = 0
            ended = anyio.Event()

            async def on_chunk(msg: Any) -> None:
                nonlocal count
                if not msg.data:
                    ended.set()
                    return
                decode(msg.data)
                count += 1

            inbox = requester.new_inbox()
            sub = await requester.subscribe(inbox, cb=on_chunk)
            await requester.publish(f"{prefix}.stream", request, reply=inbox)
            await ended.wait()
            await sub.unsubscribe()
            return count

        return await closed_loop(one, config.duration)


def happen_side(measure: Any, **kwargs: Any) -> Side:
    return Side("happen", partial(measure, transport="nats", **kwargs))


SCENARIOS = [
    Scenario(
        key="nats.request.seq",
        title="NATS send→reply, sequential",
        unit="rt/s",
        happen=happen_side(_happen.request, workers=1),
        baseline=Side("nats-py", partial(raw_request, workers=1)),
        target=0.8,
        loops=NATS_LOOPS,
    ),
    Scenario(
        key="nats.request.100",
        title=f"NATS send→reply, {IN_FLIGHT} in flight",
        unit="rt/s",
        happen=happen_side(_happen.request, workers=IN_FLIGHT),
        baseline=Side("nats-py", partial(raw_request, workers=IN_FLIGHT)),
        target=0.8,
        loops=NATS_LOOPS,
    ),
    Scenario(
        key="nats.broadcast",
        title="NATS broadcast, events/s at the subscriber",
        unit="ev/s",
        happen=happen_side(_happen.broadcast),
        baseline=Side("nats-py", raw_broadcast),
        target=0.7,
        loops=NATS_LOOPS,
    ),
    Scenario(
        key="nats.stream",
        title="NATS streamed reply (happen: with flow control)",
        unit="chunks/s",
        happen=happen_side(_happen.stream),
        baseline=Side("nats-py", raw_stream),
        target=0.7,
        loops=NATS_LOOPS,
    ),
]
