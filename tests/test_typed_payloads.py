"""Types at the boundary: ``happen.Event[T]`` handlers, ``result_type=`` and ``item_type=``.

A payload that does not fit a typed handler is refused at the caller with
``happen.ValidationError`` naming the field, counted ``rejected`` only, and the handler never
runs; a result or a stream item that does not fit the caller's type is refused likewise.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, TypedDict

import anyio
import msgspec
import pytest

import happen
from tests.helpers import assert_accounted, drained, eventually, make_system

pytestmark = pytest.mark.anyio


class Item(msgspec.Struct):
    sku: str
    qty: int


class Order(msgspec.Struct):
    id: int
    items: list[Item]


class Invoice(msgspec.Struct):
    order: int
    total: int


@dataclasses.dataclass
class Point:
    x: float
    y: float


class Greeting(TypedDict):
    name: str


class Stamped(msgspec.Struct):
    at: datetime.datetime
    blob: bytes
    counts: dict[int, str]


class Positive(msgspec.Struct):
    qty: int

    def __post_init__(self) -> None:
        if self.qty <= 0:
            raise ValueError("qty must be positive")
        if self.qty > 100:
            raise RuntimeError("not a validation error")


BAD_ORDER = {"id": 2, "items": [{"sku": "b", "qty": "two"}]}


async def test_a_typed_handler_gets_the_payload_as_its_type(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        shop = system.create_node("shop")
        seen: list[Any] = []

        @shop.on("order.place")
        async def place(event: happen.Event[Order], context: dict[str, Any]) -> int:
            seen.append(event.payload)
            return sum(item.qty for item in event.payload.items)

        client = system.create_node("client")
        payload = {"id": 1, "items": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 3}]}
        assert await client.send("shop", {"type": "order.place", "payload": payload}) == 5
        # A Struct sent as the payload arrives as one too.
        assert await client.send("shop", {"type": "order.place", "payload": Order(2, [])}) == 0
        assert seen == [Order(1, [Item("a", 2), Item("b", 3)]), Order(2, [])]


async def test_a_payload_that_does_not_fit_is_refused_naming_the_field(
    transport_url: str,
) -> None:
    async with make_system(transport_url) as system:
        shop = system.create_node("shop")
        ran: list[Any] = []

        @shop.on("order.place")
        async def place(event: happen.Event[Order], context: dict[str, Any]) -> None:
            ran.append(event.payload)

        client = system.create_node("client")
        with pytest.raises(happen.ValidationError) as refused:
            await client.send("shop", {"type": "order.place", "payload": BAD_ORDER})
        error = refused.value
        assert isinstance(error, happen.CodecError)
        assert error.path == "$.items[0].qty"
        assert error.node_id == "shop"
        assert "$.items[0].qty" in str(error) and "Order" in str(error)
        assert "'order.place'" in str(error)
        with pytest.raises(happen.ValidationError, match=r"Expected `object`, got `str`"):
            await client.send("shop", {"type": "order.place", "payload": "an order"})
        assert ran == []
        await drained(shop)
        stats = assert_accounted(shop, sent=2)
        assert (stats.rejected, stats.accepted, stats.failed) == (2, 0, 0)


async def test_dataclass_typeddict_and_generic_payloads(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("shapes")

        @node.on("point")
        async def point(event: happen.Event[Point], context: dict[str, Any]) -> float:
            assert isinstance(event.payload, Point)
            return event.payload.x + event.payload.y

        @node.on("greet")
        def greet(event: happen.Event[Greeting], context: dict[str, Any]) -> str:
            return "hello " + event.payload["name"]

        @node.on("items")
        async def items(event: happen.Event[list[Item]], context: dict[str, Any]) -> int:
            return len(event.payload)

        client = system.create_node("client")
        assert await client.send("shapes", {"type": "point", "payload": {"x": 1, "y": 2}}) == 3
        assert await client.send("shapes", {"type": "greet", "payload": {"name": "ada"}}) == (
            "hello ada"
        )
        assert await client.send("shapes", {"type": "items", "payload": [{"sku": "a", "qty": 1}]})
        with pytest.raises(happen.ValidationError, match="required field `name`"):
            await client.send("shapes", {"type": "greet", "payload": {}})
        with pytest.raises(happen.ValidationError) as refused:
            await client.send("shapes", {"type": "items", "payload": [{"sku": 1, "qty": 1}]})
        assert refused.value.path == "$[0].sku"


async def test_the_types_own_checks_refuse_a_payload(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("stock")

        @node.on("take")
        async def take(event: happen.Event[Positive], context: dict[str, Any]) -> int:
            return event.payload.qty

        client = system.create_node("client")
        assert await client.send("stock", {"type": "take", "payload": {"qty": 3}}) == 3
        for qty, message in ((0, "qty must be positive"), (101, "not a validation error")):
            with pytest.raises(happen.ValidationError, match=message):
                await client.send("stock", {"type": "take", "payload": {"qty": qty}})
        await drained(node)
        assert assert_accounted(node, sent=3).rejected == 2


async def test_an_untyped_handler_gets_the_payload_as_decoded(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("plain")

        @node.on("any")
        async def bare(event: happen.Event, context: dict[str, Any]) -> Any:
            return event.payload

        @node.on("explicit-any")
        async def explicit(event: happen.Event[Any], context: dict[str, Any]) -> Any:
            return event.payload

        client = system.create_node("client")
        for event_type in ("any", "explicit-any"):
            result = await client.send("plain", {"type": event_type, "payload": Order(1, [])})
            assert result == {"id": 1, "items": []}


@pytest.mark.parametrize("codec", ["msgpack", "json"])
async def test_typed_payloads_and_results_on_both_codecs(transport_url: str, codec: str) -> None:
    """Values a codec carries as something else (bytes and datetimes as strings in JSON, int
    keys as strings) become the annotated type again; nothing else is coerced."""
    async with make_system(transport_url, codec=codec) as system:
        node = system.create_node("stamps")

        @node.on("stamp")
        async def stamp(event: happen.Event[Stamped], context: dict[str, Any]) -> Stamped:
            assert isinstance(event.payload.at, datetime.datetime)
            return event.payload

        client = system.create_node("client")
        at = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
        value = Stamped(at, b"\x00\x01", {1: "one"})
        result = await client.send(
            "stamps", {"type": "stamp", "payload": value}, result_type=Stamped
        )
        assert result == value
        bad = {"at": at, "blob": b"", "counts": {1: 2}}
        with pytest.raises(happen.ValidationError) as refused:
            await client.send("stamps", {"type": "stamp", "payload": bad})
        assert refused.value.path == "$.counts[...]"
        with pytest.raises(happen.ValidationError) as refused:
            await client.send("stamps", {"type": "stamp", "payload": {**bad, "at": "yesterday"}})
        assert refused.value.path == "$.at"


async def test_result_type_converts_and_types_the_result(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        billing = system.create_node("billing")

        @billing.on("invoice")
        async def invoice(event: happen.Event, context: dict[str, Any]) -> dict[str, Any]:
            return {"order": event.payload, "total": 10 * event.payload}

        @billing.on("broken-invoice")
        async def broken(event: happen.Event, context: dict[str, Any]) -> dict[str, Any]:
            return {"order": 1, "total": "ten"}

        @billing.on("invoices")
        async def invoices(event: happen.Event, context: dict[str, Any]) -> AsyncIterator[int]:
            yield 1

        client = system.create_node("client")
        result = await client.send(
            "billing", {"type": "invoice", "payload": 3}, result_type=Invoice
        )
        assert result == Invoice(order=3, total=30)
        assert await client.send(
            "billing", {"type": "invoice", "payload": 3}, result_type=dict[str, int]
        ) == {"order": 3, "total": 30}
        with pytest.raises(happen.ValidationError) as refused:
            await client.send("billing", {"type": "broken-invoice"}, result_type=Invoice)
        assert refused.value.path == "$.total"
        assert refused.value.node_id == "billing"
        assert "'broken-invoice'" in str(refused.value) and "Invoice" in str(refused.value)
        with pytest.raises(happen.ValidationError, match="stream"):
            await client.send("billing", {"type": "invoices"}, result_type=Invoice)
        # Without result_type: the result as decoded, as before.
        assert await client.send("billing", {"type": "broken-invoice"}) == {
            "order": 1,
            "total": "ten",
        }
        await drained(billing)
        assert billing.stats().failed == 0  # the node did its part; the caller refused


async def test_result_type_refuses_an_unsupported_type_at_once(transport_url: str) -> None:
    class NotConvertible:
        pass

    async with make_system(transport_url) as system:
        client = system.create_node("client")
        with pytest.raises(TypeError, match="NotConvertible"):
            await client.send("nobody", {"type": "x"}, result_type=NotConvertible)


async def test_item_type_converts_every_item(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        model = system.create_node("model")
        closed = anyio.Event()

        @model.on("items")
        async def items(event: happen.Event, context: dict[str, Any]) -> AsyncIterator[Any]:
            try:
                for i in range(event.payload):
                    yield {"sku": f"s{i}", "qty": i}
                yield {"sku": "last", "qty": "many"}
                yield {"sku": "never read", "qty": 0}
            finally:
                closed.set()

        @model.on("one")
        async def one(event: happen.Event, context: dict[str, Any]) -> dict[str, Any]:
            return {"sku": "only", "qty": 1}

        client = system.create_node("client")
        got: list[Item] = []
        with pytest.raises(happen.ValidationError) as refused:
            async with client.stream("model", {"type": "items", "payload": 3}, item_type=Item) as s:
                async for item in s:
                    got.append(item)
        assert got == [Item("s0", 0), Item("s1", 1), Item("s2", 2)]
        assert refused.value.path == "$.qty"
        assert refused.value.node_id == "model"
        with anyio.fail_after(5):
            await closed.wait()  # the producer was closed
        single = [i async for i in client.stream("model", {"type": "one"}, item_type=Item)]
        assert single == [Item("only", 1)]
        await drained(model)
        assert model.stats().failed == 0


async def test_a_broadcast_copy_that_does_not_fit_is_rejected_and_logged_once(
    transport_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_system(transport_url) as system:
        audit = system.create_node("audit")
        loose = system.create_node("loose")
        typed_seen: list[Order] = []
        loose_seen: list[Any] = []

        @audit.on("order.*")
        async def record(event: happen.Event[Order], context: dict[str, Any]) -> None:
            typed_seen.append(event.payload)

        @loose.on("order.*")
        async def anything(event: happen.Event, context: dict[str, Any]) -> None:
            loose_seen.append(event.payload)

        sender = system.create_node("sender")
        caplog.set_level(logging.WARNING, logger="happen")
        await sender.broadcast({"type": "order.created", "payload": BAD_ORDER})
        await sender.broadcast({"type": "order.created", "payload": BAD_ORDER})
        await sender.broadcast({"type": "order.created", "payload": {"id": 3, "items": []}})
        await eventually(lambda: len(loose_seen) == 3 and len(typed_seen) == 1)
        await drained(audit, loose)
        stats = assert_accounted(audit, sent=3)
        assert (stats.accepted, stats.rejected) == (1, 2)
        assert typed_seen == [Order(3, [])]
        refusals = [r for r in caplog.records if "refused a broadcast" in r.getMessage()]
        assert len(refusals) == 1
        assert "'audit'" in refusals[0].getMessage()
        assert "$.items[0].qty" in refusals[0].getMessage()


async def test_an_annotation_that_cannot_be_used_is_refused_at_registration(
    transport_url: str,
) -> None:
    class Local(msgspec.Struct):  # invisible to get_type_hints under postponed annotations
        x: int

    class Opaque:  # msgspec cannot build it from decoded data
        pass

    async with make_system(transport_url) as system:
        node = system.create_node("n")

        async def local(event: happen.Event[Local], context: dict[str, Any]) -> None:
            pass

        async def opaque(event: happen.Event[Opaque], context: dict[str, Any]) -> None:
            pass

        async def local_result(event: happen.Event[Order], context: dict[str, Any]) -> Local:
            return Local(event.payload.id)

        with pytest.raises(TypeError, match="module level"):
            node.on("a", local)
        node.on("c", local_result)  # only the event's annotation is read
        client = system.create_node("client")
        with pytest.raises(happen.ValidationError):
            await client.send("n", {"type": "c", "payload": {"id": "x"}})
        with pytest.raises(TypeError, match="Opaque"):
            node.on("b", opaque)
        assert not node.hears("a") and not node.hears("b")


async def test_a_remote_caller_gets_validation_error(make_transport: Any) -> None:
    """Across two systems (two hosts) the refusal travels as ``bad_request`` with
    ``error_type`` ``"ValidationError"``."""
    from tests.helpers import unique_namespace

    namespace = unique_namespace()
    serving = happen.System(transport=make_transport(), namespace=namespace)
    calling = happen.System(transport=make_transport(), namespace=namespace)
    async with serving, calling:
        shop = serving.create_node("shop")

        @shop.on("order.place")
        async def place(event: happen.Event[Order], context: dict[str, Any]) -> int:
            return event.payload.id

        await serving.ready()
        client = calling.create_node("client")
        with pytest.raises(happen.ValidationError) as refused:
            await client.send("shop", {"type": "order.place", "payload": BAD_ORDER})
        assert refused.value.path == "$.items[0].qty"
        assert refused.value.node_id == "shop"
        assert await client.send("shop", {"type": "order.place", "payload": Order(4, [])}) == 4


@pytest.mark.nats
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # nats-py is asyncio-only
async def test_a_foreign_client_reads_error_type_validation_error(nats_server: Any) -> None:
    import nats

    from tests.helpers import subscriptions_live, unique_namespace

    system = happen.System(
        transport=nats_server.start().url, namespace=unique_namespace(), codec="json"
    )
    shop = system.create_node("shop")

    @shop.on("order.place")
    async def place(event: happen.Event[Order], context: dict[str, Any]) -> int:
        return event.payload.id

    async with system:
        await subscriptions_live(shop)
        nc = await nats.connect(nats_server.url)
        try:
            frame = {"k": "req", "type": "order.place", "payload": BAD_ORDER}
            reply = await nc.request(
                f"{system.namespace}.node.shop", json.dumps(frame).encode(), timeout=10
            )
        finally:
            await nc.close()
        answer = json.loads(reply.data)
        assert answer["k"] == "err" and answer["code"] == "bad_request"
        assert answer["error_type"] == "ValidationError"
        assert answer["message"].endswith("- at `$.items[0].qty`")


class _Watch:
    trace = None

    def __init__(self, ended: list[str | None]) -> None:
        self._ended = ended

    def ended(self, error: BaseException | None) -> None:
        self._ended.append(type(error).__name__ if error else None)


class _Observer:
    def __init__(self) -> None:
        self.ended: list[str | None] = []

    def call_started(
        self, operation: str, sender: str, target: str | None, event_type: str
    ) -> _Watch:
        return _Watch(self.ended)


async def test_typed_results_and_items_of_observed_calls(transport_url: str) -> None:
    """With a call observer (telemetry), calls take another path: typed all the same."""
    async with make_system(transport_url) as system:
        observer = _Observer()
        system.observe_calls(observer)
        billing = system.create_node("billing")

        @billing.on("invoice")
        async def invoice(event: happen.Event, context: dict[str, Any]) -> dict[str, Any]:
            return {"order": 1, "total": event.payload}

        @billing.on("invoices")
        async def invoices(event: happen.Event, context: dict[str, Any]) -> AsyncIterator[Any]:
            yield {"order": 1, "total": 2}
            yield {"order": 2, "total": "three"}

        client = system.create_node("client")
        result = await client.send(
            "billing", {"type": "invoice", "payload": 5}, result_type=Invoice
        )
        assert result == Invoice(1, 5)
        with pytest.raises(happen.ValidationError, match=r"\$\.total"):
            await client.send("billing", {"type": "invoice", "payload": "x"}, result_type=Invoice)
        with pytest.raises(happen.ValidationError, match="stream"):
            await client.send("billing", {"type": "invoices"}, result_type=Invoice)
        got: list[Invoice] = []
        with pytest.raises(happen.ValidationError, match=r"\$\.total"):
            async for item in client.stream("billing", {"type": "invoices"}, item_type=Invoice):
                got.append(item)
        assert got == [Invoice(1, 2)]
        await eventually(lambda: len(observer.ended) == 4)
        assert observer.ended[:3] == [None, None, None]  # the calls themselves succeeded
        assert observer.ended[3] == "ValidationError"  # the stream ended with the error
