"""A worker process for the fault tests: hosts node ``worker`` until it is killed.

Usage: python serve.py NATS_URL NAMESPACE
- ``who``: answers this process's pid.
- ``hang``: tells node ``observer`` its pid, then never finishes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio

import happen


async def main(url: str, namespace: str) -> None:
    async with happen.System(transport=url, namespace=namespace) as system:
        worker = system.create_node("worker")

        @worker.on("who")
        async def who(event: happen.Event, context: dict[str, Any]) -> int:
            return os.getpid()

        @worker.on("hang")
        async def hang(event: happen.Event, context: dict[str, Any]) -> None:
            await worker.send("observer", {"type": "started", "payload": os.getpid()})
            await anyio.sleep_forever()

        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
