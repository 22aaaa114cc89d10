"""A worker process for the per-key crash tests: hosts node ``ledger`` until it is killed.

Usage: python keyed.py NATS_URL NAMESPACE LIVENESS_TIMEOUT
- ``op``: answers ``{"pid": <this process's pid>, "n": payload["n"]}``; with
  ``payload["hang"]`` it first tells node ``observer`` its pid, then never finishes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio

import happen


async def main(url: str, namespace: str, liveness: float) -> None:
    async with happen.System(
        transport=url, namespace=namespace, liveness_timeout=liveness
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
    anyio.run(main, sys.argv[1], sys.argv[2], float(sys.argv[3]))
