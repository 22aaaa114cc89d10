"""Handler shapes ``node.on`` accepts: checked by ``mypy --strict`` (tests/test_typing.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, assert_type

import msgspec

import happen


class Order(msgspec.Struct):
    id: int
    items: list[str]


def setup(node: happen.Node) -> None:
    @node.on("order.place")
    async def place(event: happen.Event[Order], context: dict[str, Any]) -> int:
        assert_type(event.payload, Order)
        return event.payload.id + len(event.payload.items)

    # The decorator returns the handler unchanged, with its own type.
    same: Callable[[happen.Event[Order], dict[str, Any]], Coroutine[Any, Any, int]] = place
    assert same is place

    @node.on("order.*")
    async def untyped(event: happen.Event, context: dict[str, Any]) -> None:
        assert_type(event.payload, Any)
        assert_type(event.context, happen.CausalContext)

    @node.on("tokens")
    async def tokens(event: happen.Event[int], context: dict[str, Any]) -> AsyncIterator[str]:
        for i in range(event.payload):
            yield f"token-{i}"

    @node.on(lambda event_type: event_type.startswith("sync."))
    def sync(event: happen.Event, context: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    @node.on("defaults")
    async def with_defaults(
        event: happen.Event, context: dict[str, Any], name: str = "audit"
    ) -> str:
        return name

    def next_step(event: happen.Event, context: dict[str, Any]) -> int:
        return 1

    @node.on("continuum")
    async def continuum(
        event: happen.Event, context: dict[str, Any]
    ) -> Callable[[happen.Event, dict[str, Any]], int]:
        return next_step

    class Counter:
        async def __call__(self, event: happen.Event, context: dict[str, Any]) -> int:
            return 1

    unregister = node.on("count", Counter())
    assert_type(unregister, Callable[[], None])
    unregister()
    node.on("lambda", lambda event, context: event.payload)
    node.on("cpu", sync, executor="process")
    node.on("cpu-none", sync, executor=None)

    @node.on("cpu.decorated", executor="process")
    def crunch(event: happen.Event[list[int]], context: dict[str, Any]) -> int:
        return sum(event.payload)
