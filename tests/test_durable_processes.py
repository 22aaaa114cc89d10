"""Durable nodes over NATS with worker processes killed for real (SIGKILL)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import happen
from tests.conftest import NatsServer
from tests.helpers import unique_namespace

pytestmark = [pytest.mark.anyio, pytest.mark.nats]

WORKER = str(Path(__file__).parent / "workers" / "durable_worker.py")
ACK = 1.0
DELIVERY = {"patterns": {"worker": {"durable": True, "ack_wait": ACK}}}
SLOTS = {"patterns": {"worker": {"max_concurrent": 10}}}
WAIT = 20


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_events_of_a_killed_worker_process_all_complete_on_the_twin(
    nats_server: NatsServer,
) -> None:
    url = nats_server.start().url
    ns = unique_namespace()
    process = await anyio.open_process(
        [sys.executable, WORKER, url, ns, json.dumps(DELIVERY), json.dumps(SLOTS)]
    )
    try:
        assert process.stdout is not None
        with anyio.fail_after(WAIT):
            assert b"ready" in await process.stdout.receive()
        async with happen.System(
            transport=url,
            namespace=ns,
            delivery=DELIVERY,
            concurrency=SLOTS,
            liveness_timeout=0.4,
        ) as system:
            started: set[int] = set()
            ten = anyio.Event()

            @system.create_node("observer").on("started")
            async def observe(event: happen.Event, context: dict[str, Any]) -> None:
                started.add(int(event.payload))
                if len(started) == 10:
                    ten.set()

            client = system.create_node("client")
            results: dict[int, Any] = {}

            async def call(i: int) -> None:
                results[i] = await client.send("worker", {"type": "job", "payload": i})

            deliveries: dict[int, int] = {}
            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(call, i)
                with anyio.fail_after(WAIT):
                    await ten.wait()  # ten run in the worker process; ninety wait in the log
                process.send_signal(signal.SIGKILL)
                await process.wait()
                worker = system.create_node("worker")

                @worker.on("job")
                async def job(event: happen.Event, context: dict[str, Any]) -> int:
                    deliveries[int(event.payload)] = event.delivery
                    return int(event.payload) * 10

            assert results == {i: i * 10 for i in range(100)}
            assert {i for i, n in deliveries.items() if n == 2} == started
            assert all(n == 1 for i, n in deliveries.items() if i not in started)
            await system.idle()
            stats = worker.stats()
            assert (stats.accepted, stats.completed, stats.redelivered) == (100, 100, 10)
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
