"""Peers: the NATS scenarios with FastStream (when importable), same server, same payload.

FastStream's figures go in the baseline column; happen's figures are the ones measured for the
matching NATS scenario in this run (not measured twice). Two brokers per round, a responder
and a requester, as on the other NATS sides. FastStream's per-message logging is turned off
(``logger=None``) so it is measured at its fastest. FastStream has no streamed reply, so there
is no stream row.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

from benchmarks import over_nats
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

TIMEOUT = 30.0


def available() -> bool:
    try:
        import faststream.nats  # noqa: F401
    except ImportError:
        return False
    return True


@asynccontextmanager
async def brokers(config: Config) -> AsyncIterator[tuple[Any, Any, str]]:
    """(responder broker, not started yet; requester broker, started; a fresh subject prefix)."""
    try:
        from faststream.nats import NatsBroker
    except ImportError as exc:
        raise Unavailable(f"faststream[nats] is not installed: {exc}") from exc
    if config.nats_url is None:
        raise Unavailable("no nats-server")
    async with AsyncExitStack() as stack:
        responder = NatsBroker(config.nats_url, logger=None)
        requester = NatsBroker(config.nats_url, logger=None)
        stack.push_async_callback(requester.stop)
        stack.push_async_callback(responder.stop)
        await requester.start()
        yield responder, requester, f"bench.{uuid.uuid4().hex[:12]}"


async def request(config: Config, *, workers: int) -> Sample:
    """``broker.request`` against a FastStream subscriber that returns the body it got."""
    async with brokers(config) as (responder, requester, prefix):

        @responder.subscriber(f"{prefix}.rpc")
        async def echo(body: dict[str, Any]) -> dict[str, Any]:
            return body

        await responder.start()

        async def one() -> int:
            reply = await requester.request(PAYLOAD, f"{prefix}.rpc", timeout=TIMEOUT)
            await reply.decode()
            return 1

        return await closed_loop(one, config.duration, workers)


async def broadcast(config: Config) -> Sample:
    """``broker.publish`` to a FastStream subscriber that counts."""
    async with brokers(config) as (subscriber, publisher, prefix):
        arrivals = Arrivals()

        @subscriber.subscriber(f"{prefix}.tick")
        async def on_tick(body: dict[str, Any]) -> None:
            arrivals.arrived()

        await subscriber.start()
        return await flood(
            lambda: publisher.publish(PAYLOAD, f"{prefix}.tick"), arrivals, config.duration
        )


def _happen_of(key: str) -> Side:
    """The happen side of the NATS scenario ``key`` (its figure is reused when already measured)."""
    return next(s.happen for s in over_nats.SCENARIOS if s.key == key)


SCENARIOS = [
    Scenario(
        key="peers.request.seq",
        title="NATS send→reply, sequential, vs FastStream request",
        unit="rt/s",
        happen=_happen_of("nats.request.seq"),
        baseline=Side("faststream", partial(request, workers=1)),
        target=None,
        loops=NATS_LOOPS,
        reuse_happen="nats.request.seq",
    ),
    Scenario(
        key="peers.request.100",
        title=f"NATS send→reply, {IN_FLIGHT} in flight, vs FastStream request",
        unit="rt/s",
        happen=_happen_of("nats.request.100"),
        baseline=Side("faststream", partial(request, workers=IN_FLIGHT)),
        target=3.0,
        loops=NATS_LOOPS,
        reuse_happen="nats.request.100",
    ),
    Scenario(
        key="peers.broadcast",
        title="NATS broadcast vs FastStream publish → subscriber",
        unit="ev/s",
        happen=_happen_of("nats.broadcast"),
        baseline=Side("faststream", broadcast),
        target=None,
        loops=NATS_LOOPS,
        reuse_happen="nats.broadcast",
    ),
]
