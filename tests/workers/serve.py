"""A worker process for the fault tests: hosts node ``worker`` until it is killed.

Usage: python serve.py NATS_URL NAMESPACE [CONCURRENCY_JSON]
- ``who``: answers this process's pid.
- ``hang``: tells node ``observer`` its pid, then never finishes.
- ``items``: streams 0, 1, 2, tells node ``observer`` its pid, then never yields again.
- ``consume``: opens a stream of ``count`` from node ``numbers``, reads one item, tells
  node ``observer`` its pid, then never reads again.

It also hosts node ``echo``, which answers ``ping`` with ``"pong"``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio

import happen


async def main(url: str, namespace: str, concurrency: dict[str, Any] | None) -> None:
    async with happen.System(transport=url, namespace=namespace, concurrency=concurrency) as system:
        worker = system.create_node("worker")

        @worker.on("who")
        async def who(event: happen.Event, context: dict[str, Any]) -> int:
            return os.getpid()

        @worker.on("hang")
        async def hang(event: happen.Event, context: dict[str, Any]) -> None:
            await worker.send("observer", {"type": "started", "payload": os.getpid()})
            await anyio.sleep_forever()

        @worker.on("items")
        async def items(event: happen.Event, context: dict[str, Any]) -> AsyncIterator[int]:
            for i in range(3):
                yield i
            await worker.send("observer", {"type": "started", "payload": os.getpid()})
            await anyio.sleep_forever()

        @worker.on("consume")
        async def consume(event: happen.Event, context: dict[str, Any]) -> None:
            async with worker.stream("numbers", {"type": "count"}) as stream:
                async for _ in stream:
                    await worker.send("observer", {"type": "started", "payload": os.getpid()})
                    await anyio.sleep_forever()

        system.create_node("echo").on("ping", lambda event, context: "pong")
        await anyio.sleep_forever()


if __name__ == "__main__":
    config = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    anyio.run(main, sys.argv[1], sys.argv[2], config)
