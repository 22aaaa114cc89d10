"""A worker process: hosts the node "worker" on NATS, next to any number of copies of itself.

Every process running this file subscribes to the same node id, so NATS shares the requests
for "worker" between them (a queue group). Run two or more, then ``producer.py``.

    python examples/multihost/worker.py [nats://127.0.0.1:4222]

The URL comes from the first argument, else ``HAPPEN_NATS_URL``, else nats://127.0.0.1:4222.
Stop it with Ctrl-C (or SIGTERM); it prints what it handled.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio

import happen

NAME = f"worker-{os.getpid()}"


def nats_url() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    return os.environ.get("HAPPEN_NATS_URL", "nats://127.0.0.1:4222")


def say(text: str) -> None:
    print(f"[{NAME}] {text}", flush=True)


async def main() -> None:
    handled = {"jobs": 0, "streams": 0}
    async with happen.System(transport=nats_url(), namespace="multihost-demo") as system:
        worker = system.create_node("worker")

        @worker.on("job")
        async def job(event: happen.Event, context: dict[str, Any]) -> dict[str, Any]:
            handled["jobs"] += 1
            say(f"job {event.payload} from {event.context.sender}")
            return {"job": event.payload, "square": event.payload**2, "served_by": NAME}

        @worker.on("count")
        async def count(
            event: happen.Event, context: dict[str, Any]
        ) -> AsyncIterator[dict[str, Any]]:
            handled["streams"] += 1
            say(f"streaming {event.payload} items")
            try:
                for i in range(event.payload):
                    yield {"i": i, "served_by": NAME}
            finally:
                say("stream closed")

        @worker.on("ping")
        async def ping(event: happen.Event, context: dict[str, Any]) -> str:
            return NAME

        # A round trip through the server: our subscriptions are live once it answers.
        await worker.send("worker", {"type": "ping"}, timeout=10)
        say("ready")
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
    say(f"handled {handled['jobs']} jobs and {handled['streams']} streams")


if __name__ == "__main__":
    anyio.run(main)
