"""The memory transport's durable logs and buckets: what only it can show.

Its deadlines follow the event loop's clock, so under trio's autojumping mock clock a test of
a 30-second ack_wait or a 2-minute dedup window takes no real time.
"""

from __future__ import annotations

import time

import anyio
import pytest
from trio.testing import MockClock

from happen._errors import TransportError
from happen._transport import ConsumerSettings, LogSettings
from happen.transports.memory import MemoryBroker, MemoryTransport

pytestmark = pytest.mark.anyio

virtual_time = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}))]
)


async def started(broker: MemoryBroker | None = None) -> MemoryTransport:
    transport = MemoryTransport(broker=broker)
    await transport.start()
    return transport


@virtual_time
async def test_redelivery_and_dedup_follow_the_event_loop_clock() -> None:
    real_start = time.monotonic()
    transport = await started()
    log = await transport.durable_log("jobs", LogSettings(dedup_window=120.0))
    consumer = await log.consumer("worker", ConsumerSettings(ack_wait=30.0))
    await log.append("jobs", b"x", msg_id="m")
    start = anyio.current_time()
    await consumer.fetch(1, timeout=1)  # not settled: it comes back after ack_wait
    (again,) = await consumer.fetch(1, timeout=60)
    assert again.delivery_count == 2
    assert 30.0 <= anyio.current_time() - start < 31.0
    await again.nak(delay=300.0)
    (late,) = await consumer.fetch(1, timeout=600)
    assert late.delivery_count == 3
    assert anyio.current_time() - start >= 330.0
    await late.ack()
    appended = await log.append("jobs", b"x", msg_id="m")
    assert not appended.duplicate, "the 120 s window passed in virtual time"
    assert time.monotonic() - real_start < 5.0
    await transport.stop()


async def test_logs_and_buckets_belong_to_a_broker() -> None:
    shared = MemoryBroker()
    one, two, alone = await started(shared), await started(shared), await started()
    await (await one.durable_log("jobs")).append("jobs", b"x", msg_id="m")
    await (await one.key_value("state")).put("k", b"v")
    assert await (await (await two.durable_log("jobs")).consumer("c")).pending() == 1
    assert (await (await two.key_value("state")).get("k")) is not None
    assert await (await (await alone.durable_log("jobs")).consumer("c")).pending() == 0
    assert (await (await alone.key_value("state")).get("k")) is None
    for transport in (one, two, alone):
        await transport.stop()


async def test_a_waiting_fetch_ends_when_its_transport_stops() -> None:
    transport = await started()
    consumer = await (await transport.durable_log("jobs")).consumer("c")
    failed = anyio.Event()

    async def fetcher() -> None:
        with pytest.raises(TransportError):
            await consumer.fetch(1, timeout=30)
        failed.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(fetcher)
        await anyio.wait_all_tasks_blocked()
        await transport.stop()
        with anyio.fail_after(1):
            await failed.wait()


async def test_a_fetch_waits_for_an_append_from_another_host() -> None:
    broker = MemoryBroker()
    reader, writer = await started(broker), await started(broker)
    consumer = await (await reader.durable_log("jobs")).consumer("c")
    log = await writer.durable_log("jobs")
    got = []

    async def fetcher() -> None:
        got.extend(await consumer.fetch(5, timeout=30))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(fetcher)
            await anyio.wait_all_tasks_blocked()
            await log.append("jobs", b"x", msg_id="m")
    assert [d.data for d in got] == [b"x"]
