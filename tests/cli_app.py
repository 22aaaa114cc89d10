"""The application the command-line tests serve with ``happen run`` (copied as ``app.py``).

- ``app:setup``: a function that registers node ``svc`` on the System the command makes.
- ``app:system``: a System configured in code, its transport and namespace taken from
  ``APP_TRANSPORT`` and ``APP_NAMESPACE`` (read by this code, not by the command).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio

import happen


def setup(system: happen.System) -> None:
    svc = system.create_node("svc")

    @svc.on("echo")
    async def echo(event: happen.Event, context: dict[str, Any]) -> Any:
        return event.payload

    @svc.on("pid")
    async def pid(event: happen.Event, context: dict[str, Any]) -> int:
        return os.getpid()

    @svc.on("slow")
    async def slow(event: happen.Event, context: dict[str, Any]) -> str:
        print(f"slow started in {os.getpid()}", file=sys.stderr, flush=True)
        await anyio.sleep(event.payload)
        return "done"

    @svc.on("gated")
    async def gated(event: happen.Event, context: dict[str, Any]) -> AsyncIterator[int]:
        # The first item, then the rest once the file named in the payload exists: the
        # caller can only create it after it has seen the first item.
        yield 0
        gate = anyio.Path(event.payload)
        with anyio.fail_after(20):
            while not await gate.exists():  # noqa: ASYNC110 (a file another process creates)
                await anyio.sleep(0.01)
        yield 1
        yield 2

    @svc.on("progress")
    async def progress(event: happen.Event, context: dict[str, Any]) -> AsyncIterator[Any]:
        steps = event.payload
        for i in range(steps):
            yield {"step": i, "progress": (i + 1) / steps, "message": f"step {i + 1}"}
            await anyio.sleep(0.01)

    @svc.on("fail")
    async def fail(event: happen.Event, context: dict[str, Any]) -> None:
        raise ValueError("boom")


system = happen.System(
    transport=os.environ.get("APP_TRANSPORT", "memory"),
    namespace=os.environ.get("APP_NAMESPACE", "happen"),
)
setup(system)

#: A System configured in code that leaves its transport and namespace to the command.
open_system = happen.System(concurrency={"patterns": {"svc": {"max_concurrent": 4}}})
setup(open_system)

not_an_app = 42


def two_arguments(system: happen.System, other: int) -> None:
    pass
