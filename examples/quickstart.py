"""A short tour of happen on the in-memory transport.

Request/reply, a streamed reply shown as it arrives, a broadcast, and a node under pressure.
Run it with ``python examples/quickstart.py`` (add ``trio`` to run it under trio).
"""

from __future__ import annotations

import sys
from typing import Any

import anyio

import happen


async def main() -> None:
    concurrency = {
        "default": {"max_concurrent": 100, "queue_limit": 10_000},
        "patterns": {"slow-*": {"max_concurrent": 1, "queue_limit": 4,
                                "backpressure_threshold": 0.5}},
    }
    async with happen.System(concurrency=concurrency) as system:
        # 1. Request / reply
        orders = system.create_node("order-service")

        @orders.on("process-order")
        async def process(event: happen.Event, context: dict[str, Any]) -> dict[str, Any]:
            return {"ok": True, "id": event.payload["id"], "by": event.context.sender}

        client = system.create_node("client")
        result = await client.send("order-service", {"type": "process-order",
                                                     "payload": {"id": 7}})
        print("1. request/reply:", result)

        # 2. A streamed reply, read as it arrives
        writer = system.create_node("writer")

        @writer.on("write")
        async def write(event: happen.Event, context: dict[str, Any]):  # type: ignore[no-untyped-def]
            for word in event.payload.split():
                await anyio.sleep(0.05)  # e.g. tokens from a model
                yield word

        print("2. streamed reply:", end=" ", flush=True)
        async with client.stream("writer", {"type": "write",
                                            "payload": "streams arrive word by word"}) as words:
            async for word in words:
                print(word, end=" ", flush=True)
        print()

        # 3. A broadcast to every node with a matching handler
        heard = anyio.Event()
        audit = system.create_node("audit")

        @audit.on("order.*")
        async def record(event: happen.Event, context: dict[str, Any]) -> None:
            print(f"3. broadcast: audit heard {event.type} {event.payload}")
            heard.set()

        await client.broadcast({"type": "order.shipped", "payload": {"id": 7}})
        await heard.wait()

        # 4. A node under pressure: one slot, a queue of 4, pressure from 2 queued
        slow = system.create_node("slow-archive")

        @slow.on("archive")
        async def archive(event: happen.Event, context: dict[str, Any]) -> int:
            await anyio.sleep(0.02)
            return int(event.payload)

        peak = {"queued": 0, "pressure": False}

        async def watch() -> None:
            while True:
                stats = slow.stats()
                peak["queued"] = max(peak["queued"], stats.queued)
                peak["pressure"] |= stats.under_pressure
                await anyio.sleep(0.001)

        done: list[int] = []

        async def archive_one(i: int) -> None:
            done.append(await client.send("slow-archive", {"type": "archive", "payload": i}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            async with anyio.create_task_group() as senders:
                for i in range(20):
                    senders.start_soon(archive_one, i)
            tg.cancel_scope.cancel()
        stats = slow.stats()
        print(
            f"4. pressure: 20 concurrent senders, {len(done)} done, peak queue "
            f"{peak['queued']} of {stats.queue_limit}, under pressure seen: {peak['pressure']}, "
            f"rejected: {stats.rejected} (senders were held, not refused)"
        )
        print("   stats:", stats)


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
