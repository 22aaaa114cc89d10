"""What ``send``, ``stream`` and ``Stream`` give a caller: checked by ``mypy --strict``."""

from __future__ import annotations

import dataclasses
from typing import Any, TypedDict, assert_type

import msgspec

import happen


class Invoice(msgspec.Struct):
    order: int
    total: int


@dataclasses.dataclass
class Point:
    x: float
    y: float


class Greeting(TypedDict):
    name: str


async def calls(node: happen.Node, other: happen.Node) -> None:
    event = {"type": "invoice", "payload": {"id": 7}}
    assert_type(await node.send("billing", event), Any)
    assert_type(await node.send(other, event, timeout=1.0, priority=2), Any)
    assert_type(await node.send("billing", event, result_type=Invoice), Invoice)
    assert_type(await node.send("billing", event, result_type=Point), Point)
    assert_type(await node.send("billing", event, result_type=Greeting), Greeting)
    assert_type(await node.send("billing", event, result_type=list[Invoice]), list[Invoice])
    assert_type(await node.send("billing", event, result_type=int), int)
    # A type a checker cannot spell as type[T] (a union) gives object: narrow it.
    maybe = await node.send("billing", event, result_type=Invoice | None)
    assert_type(maybe, object)
    invoice: Invoice = await node.send("billing", event, result_type=Invoice)
    total: int = invoice.total
    assert total >= 0

    typed_event: happen.Event[dict[str, int]] = happen.Event("invoice", {"id": 7})
    assert_type(typed_event.payload, dict[str, int])
    assert_type(happen.Event("ping"), happen.Event[Any])
    await node.broadcast(typed_event)


async def streams(node: happen.Node) -> None:
    event = {"type": "generate", "payload": {"tokens": 3}}
    async with node.stream("model", event, item_type=Invoice) as invoices:
        assert_type(invoices, happen.Stream[Invoice])
        async for invoice in invoices:
            assert_type(invoice, Invoice)
    untyped = node.stream("model", event)
    assert_type(untyped, happen.Stream[Any])
    assert_type(untyped, happen.Stream)
    async for item in untyped:
        assert_type(item, Any)
    await untyped.aclose()
    words = [word async for word in node.stream("model", event, item_type=str)]
    assert_type(words, list[str])
    streamed = await node.send("model", event)
    if isinstance(streamed, happen.Stream):
        async for chunk in streamed:
            assert_type(chunk, Any)
