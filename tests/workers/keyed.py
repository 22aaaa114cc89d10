"""A worker process for the per-key crash tests: hosts node ``ledger`` until it is killed.

Usage: python keyed.py NATS_URL NAMESPACE LIVENESS_TIMEOUT [ACK_WAIT]
- with ``ACK_WAIT``, ``ledger`` is durable with that ``ack_wait``;
- ``op``: answers ``{"pid": <this process's pid>, "n": payload["n"]}``; with
  ``payload["hang"]`` it first tells node ``observer`` its pid, then never finishes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio

import happen


async def main(url: str, namespace: str, liveness: float, ack_wait: float | None) -> None:
    delivery = None
    if ack_wait is not None:
        delivery = {"patterns": {"ledger": {"durable": True, "ack_wait": ack_wait}}}
    async with happen.System(
        transport=url, namespace=namespace, liveness_timeout=liveness, delivery=delivery
    ) as system:
        ledger = system.create_node("ledger")

        @ledger.on("op")
        async def op(event: happen.Event, context: dict[str, Any]) -> dict[str, Any]:
            if event.payload.get("hang"):
                await ledger.send("observer", {"type": "started", "payload": os.getpid()})
                await anyio.sleep_forever()
            return {"pid": os.getpid(), "n": event.payload["n"]}

        await anyio.sleep_forever()


if __name__ == "__main__":
    ack_wait = float(sys.argv[4]) if len(sys.argv) > 4 else None
    anyio.run(main, sys.argv[1], sys.argv[2], float(sys.argv[3]), ack_wait)
