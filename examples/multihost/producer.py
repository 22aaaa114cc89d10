"""Sends jobs to the node "worker" and reads a streamed reply, showing who served what.

    python examples/multihost/producer.py [nats://127.0.0.1:4222] [jobs]

With two or more worker processes running (``happen run worker:setup --workers 2``), the jobs
are shared between them.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import anyio

import happen


def nats_url() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    return os.environ.get("HAPPEN_NATS_URL", "nats://127.0.0.1:4222")


async def main() -> None:
    jobs = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    served: Counter[str] = Counter()
    async with happen.System(transport=nats_url(), namespace="multihost-demo") as system:
        producer = system.create_node("producer")

        async def one(i: int) -> None:
            result = await producer.send("worker", {"type": "job", "payload": i}, timeout=10)
            print(f"job {i:3} -> {result['square']:5}  served by {result['served_by']}")
            served[result["served_by"]] += 1

        async with anyio.create_task_group() as tg:
            for i in range(jobs):
                tg.start_soon(one, i)

        print("streaming 5 items:")
        async with producer.stream("worker", {"type": "count", "payload": 5}) as stream:
            async for item in stream:
                print(f"  item {item['i']} from {item['served_by']}")

    print("served:", ", ".join(f"{name}: {n}" for name, n in sorted(served.items())))
    if len(served) < 2:
        print("(only one worker answered: run more workers to see the load shared)")


if __name__ == "__main__":
    try:
        anyio.run(main)
    except happen.NodeNotFoundError:
        sys.exit("no worker is running: start them first (happen run worker:setup --workers 2)")
