"""Unit tests of the service's handlers, on the in-memory transport.

The memory transport is a real transport: the same core path as over NATS, with the node's
concurrency cap, bounded queue and counters. So a test runs the application's own ``setup``
on a System of its own, sends events as a caller would, and checks results and stats; no
server, no mocks. Run them with ``python -m pytest examples/service/test_app.py``.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from app import setup

import happen

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_total_sums_the_list() -> None:
    async with happen.System() as system:  # transport="memory" by default
        setup(system)
        client = system.create_node("test-client")
        assert await client.send("reports", {"type": "total", "payload": [3, 4, 5]}) == 12
        stats = system.stats()["reports"]
        assert (stats.accepted, stats.completed, stats.failed) == (1, 1, 0)


async def test_total_of_something_else_fails_as_a_handler_error() -> None:
    async with happen.System() as system:
        setup(system)
        client = system.create_node("test-client")
        with pytest.raises(happen.HandlerError) as info:
            await client.send("reports", {"type": "total", "payload": "not a list"})
        assert info.value.remote_type == "TypeError"
        assert system.stats()["reports"].failed == 1


async def test_build_streams_progress_then_the_result() -> None:
    async with happen.System() as system:
        setup(system)
        client = system.create_node("test-client")
        with anyio.fail_after(10):
            build = {"type": "build", "payload": {"pages": 2}}
            items = [item async for item in client.stream("reports", build)]
        assert [item.get("progress") for item in items[:-1]] == [0.5, 1.0]
        assert items[-1]["done"] is True and items[-1]["pages"] == 2


async def test_the_queue_limit_holds_in_tests_too() -> None:
    """Caps and queues are configured as in production: a test can check the overload path."""
    config = {"patterns": {"reports": {"max_concurrent": 1, "queue_limit": 0}}}
    async with happen.System(concurrency=config) as system:
        setup(system)
        client = system.create_node("test-client")
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.send, "reports", {"type": "build", "payload": {"pages": 1}})
            with anyio.fail_after(5):
                while system.stats()["reports"].active == 0:
                    await anyio.lowlevel.checkpoint()
            with pytest.raises(happen.QueueFullError):
                await client.send("reports", {"type": "total", "payload": [1]})
