"""The happen side's plumbing: import happen, open systems, wait until a node answers.

Over NATS the server node and the client node live in two ``happen.System``s (two NATS
connections) in this one process, as the raw nats-py baselines use a responder connection and a
requester connection: every message crosses the nats-server, and the two sides are symmetric.
In memory there is one system (there is no server to cross).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import ModuleType
from typing import Any

import anyio

from benchmarks._drive import Arrivals, closed_loop, flood
from benchmarks._harness import PAYLOAD, Config, Sample, Unavailable

PING: dict[str, Any] = {"type": "ping", "payload": PAYLOAD}


def load() -> ModuleType:
    """The happen package, or :class:`Unavailable` saying what is missing."""
    try:
        import happen
    except ImportError as exc:
        raise Unavailable(f"import happen failed: {exc}") from exc
    for name in ("System", "QueueFullError", "NodeNotFoundError"):
        if not hasattr(happen, name):
            raise Unavailable(f"happen.{name} does not exist yet")
    return happen


def transport_url(config: Config, transport: str) -> str:
    if transport == "memory":
        return "memory"
    if config.nats_url is None:
        raise Unavailable("no nats-server")
    return config.nats_url


@asynccontextmanager
async def systems(
    config: Config, transport: str, concurrency: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Any, Any]]:
    """(server system, client system): one system in memory, two over NATS."""
    happen = load()
    url = transport_url(config, transport)
    # A fresh namespace per round isolates rounds that share the nats-server.
    namespace = f"bench{uuid.uuid4().hex[:12]}"
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            happen.System(transport=url, namespace=namespace, concurrency=concurrency)
        )
        if transport == "memory":
            yield server, server
            return
        client = await stack.enter_async_context(
            happen.System(transport=url, namespace=namespace, concurrency=concurrency)
        )
        yield server, client


def serve(node: Any) -> None:
    """The server's handlers: ``ping`` echoes its payload, ``chunks`` streams ``n`` payloads."""

    @node.on("ping")
    async def ping(event: Any, context: dict[str, Any]) -> Any:
        return event.payload

    @node.on("chunks")
    async def chunks(event: Any, context: dict[str, Any]) -> AsyncIterator[Any]:
        for _ in range(event.payload["n"]):
            yield PAYLOAD


async def until_reachable(client: Any, target: str, within: float = 10.0) -> None:
    """Send pings until one is answered (a remote node's subscription may still be on its way)."""
    happen = load()
    deadline = time.monotonic() + within
    while True:
        try:
            await client.send(target, PING, timeout=within)
            return
        except happen.NodeNotFoundError:
            if time.monotonic() > deadline:
                raise
            await anyio.sleep(0.01)


# --- measurements (transport is "memory" or "nats") --------------------------------------------

STREAM_CHUNKS = 1000


async def request(config: Config, *, transport: str, workers: int) -> Sample:
    """send -> reply round trips per second, ``workers`` senders in flight."""
    async with systems(config, transport) as (server_system, client_system):
        serve(server_system.create_node("server"))
        client = client_system.create_node("client")
        await until_reachable(client, "server")

        async def one() -> int:
            await client.send("server", PING)
            return 1

        return await closed_loop(one, config.duration, workers)


async def stream(config: Config, *, transport: str) -> Sample:
    """Chunks per second read by ``async for`` from streams of STREAM_CHUNKS chunks."""
    event = {"type": "chunks", "payload": {"n": STREAM_CHUNKS}}
    async with systems(config, transport) as (server_system, client_system):
        serve(server_system.create_node("server"))
        client = client_system.create_node("client")
        await until_reachable(client, "server")

        async def one() -> int:
            count = 0
            async with client.stream("server", event) as chunks:
                async for _ in chunks:
                    count += 1
            if count != STREAM_CHUNKS:
                raise AssertionError(f"stream yielded {count} chunks, expected {STREAM_CHUNKS}")
            return count

        return await closed_loop(one, config.duration)


async def broadcast(config: Config, *, transport: str) -> Sample:
    """Broadcast events per second handled at one subscriber node."""
    tick = {"type": "tick", "payload": PAYLOAD}
    arrivals = Arrivals()
    async with systems(config, transport) as (server_system, client_system):
        sink = server_system.create_node("sink")

        @sink.on("tick")
        async def on_tick(event: Any, context: dict[str, Any]) -> None:
            arrivals.arrived()

        client = client_system.create_node("client")
        deadline = time.monotonic() + 10
        while arrivals.count == 0:  # the subscriber's subscription may still be on its way
            if time.monotonic() > deadline:
                raise AssertionError("no broadcast reached the subscriber within 10 s")
            await client.broadcast(tick)
            await anyio.sleep(0.01)

        def lost() -> int:
            stats = sink.stats()
            return int(stats.dropped + stats.rejected)

        sample = await flood(lambda: client.broadcast(tick), arrivals, config.duration, lost=lost)
        stats = sink.stats()
        sample.notes["stats"] = stats_dict(stats)
        return sample


def stats_dict(stats: Any) -> dict[str, Any]:
    names = ("accepted", "completed", "failed", "rejected", "dropped", "queued", "active")
    return {name: getattr(stats, name, None) for name in names}
