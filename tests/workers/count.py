"""A worker process for the state tests: adds to node ``counter``'s state ``total`` with
``update``, from TASKS tasks, UPDATES times each, as a second host of that node would.

Usage: python count.py NATS_URL NAMESPACE TASKS UPDATES ATTEMPTS
Prints ``ready`` once its system runs, waits for a line on stdin, counts, then prints its
node's stats as one JSON line and exits 0.
"""

from __future__ import annotations

import sys

import anyio
import msgspec

import happen


async def main(url: str, namespace: str, tasks: int, updates: int, attempts: int) -> None:
    async with happen.System(transport=url, namespace=namespace) as system:
        counter = system.create_node("counter")
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)

        async def add() -> None:
            for _ in range(updates):
                await counter.state.update("total", lambda n: (n or 0) + 1, attempts=attempts)

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(add)
        print(msgspec.json.encode(counter.stats()).decode(), flush=True)


if __name__ == "__main__":
    url, namespace, tasks, updates, attempts = sys.argv[1:]
    anyio.run(main, url, namespace, int(tasks), int(updates), int(attempts))
