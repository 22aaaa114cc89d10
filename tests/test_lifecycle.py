"""Starting and stopping: drain, cancellation of stragglers, open streams, the public API."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import happen
from happen._transport import Message, Transport
from tests.helpers import eventually, make_system, unique_namespace

pytestmark = pytest.mark.anyio


async def test_stop_lets_in_flight_handlers_finish(transport_url: str) -> None:
    system = make_system(transport_url)
    outcomes: list[object] = []
    async with system:
        node = system.create_node("worker")
        release = anyio.Event()

        @node.on("job")
        async def job(event: happen.Event, context: dict) -> str:
            await release.wait()
            await anyio.sleep(0.01)
            return "finished"

        client = system.create_node("client")

        async def call() -> None:
            outcomes.append(await client.send("worker", {"type": "job"}))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(call)
            await eventually(lambda: node.stats().active == 3)
            release.set()
            await system.stop(timeout=5)
    assert outcomes == ["finished"] * 3
    stats = node.stats()
    assert (stats.completed, stats.failed) == (3, 0)


async def test_stop_cancels_what_outlives_the_drain_timeout(transport_url: str) -> None:
    system = make_system(transport_url, concurrency={"default": {"max_concurrent": 1}})
    errors: list[BaseException] = []
    cleaned_up = anyio.Event()
    async with system:
        node = system.create_node("stuck")

        @node.on("hang")
        async def hang(event: happen.Event, context: dict) -> None:
            try:
                await anyio.sleep_forever()
            finally:
                cleaned_up.set()

        client = system.create_node("client")

        async def call() -> None:
            try:
                await client.send("stuck", {"type": "hang"})
            except happen.HappenError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            tg.start_soon(call)  # queued behind the first
            await eventually(lambda: node.stats().queued == 1)
            with anyio.fail_after(5):
                await system.stop(timeout=0.1)
    assert cleaned_up.is_set()
    assert len(errors) == 2 and all(isinstance(e, happen.TransportError) for e in errors)
    stats = node.stats()
    assert (stats.accepted, stats.failed, stats.completed) == (2, 2, 0)


async def test_stop_closes_open_streams(transport_url: str) -> None:
    system = make_system(transport_url)
    finalised = anyio.Event()
    async with system:
        node = system.create_node("endless")

        @node.on("ticks")
        async def ticks(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
            try:
                while True:
                    yield 1
                    await anyio.sleep(0.001)
            finally:
                finalised.set()

        client = system.create_node("client")
        stream = await client.send("endless", {"type": "ticks"})
        assert await stream.__anext__() == 1
        with anyio.fail_after(5):
            await system.stop(timeout=0.1)
        with pytest.raises(happen.TransportError):
            async for _ in stream:
                pass
    assert finalised.is_set()


async def test_system_starts_once_and_stop_is_idempotent(transport_url: str) -> None:
    system = make_system(transport_url)
    await system.start()
    with pytest.raises(RuntimeError, match="starts once") as info:  # misuse, not a fault
        await system.start()
    assert not isinstance(info.value, happen.HappenError)
    await system.stop()
    await system.stop()
    with pytest.raises(RuntimeError, match="starts once"):
        await system.start()


async def test_system_stats_lists_every_node(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        a = system.create_node("a")
        a.on("x", lambda e, c: 1)
        system.create_node("b")
        await a.send("a", {"type": "x"})
        stats = system.stats()
        assert set(stats) == {"a", "b"}
        assert stats["a"].completed == 1 and stats["b"].accepted == 0


def test_all_is_complete_and_names_report_the_package() -> None:
    public = {name for name in dir(happen) if not name.startswith("_") and name[0].isupper()}
    assert public == set(happen.__all__)
    for name in happen.__all__:
        obj = getattr(happen, name)
        assert obj.__module__ == "happen", name
        assert obj.__doc__, f"{name} has no docstring"


def test_package_layout() -> None:
    root = Path(happen.__file__).parent
    assert (root / "py.typed").exists()
    memory = importlib.import_module("happen.transports.memory")
    assert callable(memory.from_url)
    nats = importlib.import_module("happen.transports.nats")
    assert callable(nats.from_url)
    for module in root.glob("*.py"):
        assert "import nats" not in module.read_text(), module.name


async def test_every_system_answers_a_stats_query_with_its_nodes(
    make_transport: Callable[[], Transport],
) -> None:
    """The query ``happen stats`` sends: one JSON answer per system of the namespace."""
    ns = unique_namespace()
    first = happen.System(transport=make_transport(), namespace=ns)
    second = happen.System(transport=make_transport(), namespace=ns)
    first.create_node("orders").on("x", lambda e, c: 1)
    second.create_node("orders").on("x", lambda e, c: 1)
    second.create_node("billing")
    raw = make_transport()
    answers: list[dict[str, Any]] = []

    async def collect(msg: Message) -> None:
        answers.append(msgspec.json.decode(msg.data))

    async with first, second:
        await first.ready()
        await second.ready()
        await first.create_node("client").send("orders", {"type": "x"})
        await raw.start()
        inbox = raw.new_inbox()
        await raw.subscribe(inbox, collect)
        await raw.publish(f"{ns}.stats", b"{}", reply=inbox)
        await eventually(lambda: len(answers) == 2)
    by_system = {a["system"]: a for a in answers}
    assert set(by_system) == {first.id, second.id}
    assert set(by_system[second.id]["nodes"]) == {"orders", "billing"}
    orders = [by_system[s.id]["nodes"]["orders"] for s in (first, second)]
    assert sum(o["completed"] for o in orders) == 1
    assert all(isinstance(a["pid"], int) and a["host"] for a in answers)


async def test_apply_defaults_fills_only_what_the_code_left_out(
    make_transport: Callable[[], Transport],
) -> None:
    left_out = happen.System()
    assert left_out.settings_given() == frozenset()
    given = happen.System(namespace="mine")
    assert given.settings_given() == frozenset({"namespace"})
    ns = unique_namespace()
    for system in (left_out, given):
        system.create_node("n").on("x", lambda e, c: "ok")
        system.apply_defaults(transport=make_transport(), namespace=ns)
    assert left_out.namespace == ns and given.namespace == "mine"
    with pytest.raises(happen.InvalidConfigError, match="namespace"):
        happen.System().apply_defaults(namespace="not valid!")
    async with left_out:
        client = left_out.create_node("client")
        assert await client.send("n", {"type": "x"}) == "ok"
        with pytest.raises(RuntimeError, match="fixed once a system starts"):
            left_out.apply_defaults(namespace="late")
