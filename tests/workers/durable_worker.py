"""A worker process for the durable tests: hosts the durable node ``worker`` until killed.

Usage: python durable_worker.py NATS_URL NAMESPACE DELIVERY_JSON CONCURRENCY_JSON
- ``job``: tells node ``observer`` its payload (``started``), then never finishes.
Prints ``ready`` once its node fetches events.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio

import happen


async def main(url: str, namespace: str, delivery: Any, concurrency: Any) -> None:
    async with happen.System(
        transport=url, namespace=namespace, delivery=delivery, concurrency=concurrency
    ) as system:
        worker = system.create_node("worker")

        @worker.on("job")
        async def job(event: happen.Event, context: dict[str, Any]) -> None:
            await worker.send("observer", {"type": "started", "payload": event.payload})
            await anyio.sleep_forever()

        await system.ready()
        print("ready", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]))
