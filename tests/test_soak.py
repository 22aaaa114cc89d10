"""Soak: 60 s at 80 % of a node's measured capacity over NATS, streams, broadcasts and requests
mixed. Not in the default run: ``python -m pytest -m soak -s`` (prints its figures)."""

from __future__ import annotations

import itertools
import math
import time

import anyio
import pytest

import happen
from tests.conftest import NatsServer
from tests.helpers import drained, eventually, unique_namespace

pytestmark = [pytest.mark.soak, pytest.mark.nats, pytest.mark.anyio]

SECONDS = 60.0
WARMUP = 10.0


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.timeout(SECONDS * 3)
async def test_soak_at_eighty_percent_of_capacity(nats_server: NatsServer) -> None:
    url = nats_server.start().url
    ns = unique_namespace()
    async with (
        happen.System(transport=url, namespace=ns) as a,
        happen.System(transport=url, namespace=ns) as b,
    ):
        service = b.create_node("service")
        heard = 0

        @service.on("ping")
        async def ping(event: happen.Event, context: dict) -> object:
            return event.payload

        @service.on("count")
        async def count(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
            for i in range(event.payload):
                yield i

        @service.on("tick")
        async def tick(event: happen.Event, context: dict) -> None:
            nonlocal heard
            heard += 1

        client = a.create_node("client")
        payload = {"id": 1, "name": "widget", "tags": ["a", "b"], "note": "x" * 40}
        with anyio.fail_after(10):
            while True:
                try:
                    await client.send("service", {"type": "ping", "payload": 1}, timeout=1)
                    break
                except (happen.NodeNotFoundError, happen.SendTimeout):
                    await anyio.sleep(0.05)

        errors: dict[str, int] = {}
        sent = {"ping": 0, "count": 0, "tick": 0}
        chunks = 0

        async def step(i: int) -> None:
            """One step of the mix: a request; every 50th a 50-item stream too; every 10th a
            broadcast too."""
            nonlocal chunks
            try:
                sent["ping"] += 1
                await client.send("service", {"type": "ping", "payload": payload}, timeout=10)
                if i % 50 == 0:
                    sent["count"] += 1
                    async with client.stream(
                        "service", {"type": "count", "payload": 50}, timeout=10
                    ) as stream:
                        async for _ in stream:
                            chunks += 1
                if i % 10 == 0:
                    sent["tick"] += 1
                    await client.broadcast({"type": "tick", "payload": payload})
            except happen.HappenError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        # capacity of the mix: 100 steps in flight for 3 s
        steps = itertools.count(1)
        done = 0

        async def closed_loop(until: float) -> None:
            nonlocal done
            while time.monotonic() < until:
                await step(next(steps))
                done += 1

        began = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(closed_loop, began + 3)
        capacity = done / (time.monotonic() - began)
        rate = 0.8 * capacity
        issue_send, issue_receive = anyio.create_memory_object_stream[int](math.inf)

        async def worker() -> None:
            async for i in issue_receive:
                await step(i)

        samples: list[tuple[float, int]] = []
        backlog = 0
        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(worker)
            with issue_send:
                start = time.monotonic()
                issued = 0
                while (now := time.monotonic()) - start < SECONDS:
                    while issued < (now - start) * rate:
                        issued += 1
                        issue_send.send_nowait(next(steps))
                    if not samples or now - samples[-1][0] >= 1:
                        samples.append((now, rss()))
                        backlog = max(backlog, issue_send.statistics().current_buffer_used)
                    await anyio.sleep(0.005)
        await drained(service, timeout=30)
        await eventually(lambda: heard >= sent["tick"], timeout=10)
        ended = time.monotonic() - start

        warm = [r for t, r in samples if t - start >= WARMUP]
        growth = (warm[-1] - warm[0]) / warm[0]
        stats = service.stats()
        print(
            f"\nsoak {SECONDS:.0f} s over NATS (done in {ended:.0f} s): mix capacity "
            f"{capacity:,.0f} steps/s, driven at {rate:,.0f}/s, largest backlog {backlog}; "
            f"sent {sent}; chunks read {chunks:,}; broadcasts heard {heard:,};"
            f" errors {errors}; RSS after warm-up {warm[0] / 2**20:.1f} -> "
            f"{warm[-1] / 2**20:.1f} MB ({growth:+.1%}); node stats {stats}"
        )
        assert not errors
        assert chunks == 50 * sent["count"]
        assert heard == sent["tick"]
        total = sent["ping"] + sent["count"] + sent["tick"] + 1  # + the first ping
        assert stats.accepted == stats.completed == total
        assert stats.rejected == stats.dropped == stats.failed == 0
        assert backlog < rate, "the load stayed below capacity (under a second of backlog)"
        assert growth < 0.10, f"RSS grew {growth:.1%} after warm-up"
        with anyio.fail_after(5):
            await a.idle()
            await b.idle()
