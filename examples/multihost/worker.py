"""The worker application: hosts the node "worker", next to any number of copies of itself.

Served by the ``happen`` command, as many processes as you like:

    happen run worker:setup --workers 2 --transport nats://127.0.0.1:4222 \
        --namespace multihost-demo

Every process subscribes to the same node id, so NATS shares the requests for "worker"
between them (a queue group). Run ``producer.py`` to see it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import happen

NAME = f"worker-{os.getpid()}"


def say(text: str) -> None:
    print(f"[{NAME}] {text}", flush=True)


def setup(system: happen.System) -> None:
    """Register the node "worker" on the system that ``happen run`` makes."""
    worker = system.create_node("worker")

    @worker.on("job")
    async def job(event: happen.Event, context: dict[str, Any]) -> dict[str, Any]:
        say(f"job {event.payload} from {event.context.sender}")
        return {"job": event.payload, "square": event.payload**2, "served_by": NAME}

    @worker.on("count")
    async def count(event: happen.Event, context: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        say(f"streaming {event.payload} items")
        try:
            for i in range(event.payload):
                yield {"i": i, "served_by": NAME}
        finally:
            say("stream closed")
