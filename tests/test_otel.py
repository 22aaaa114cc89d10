"""OpenTelemetry (``happen.otel``): one trace across systems, with the right parents, and the
node counters as metrics. Each system has a tracer provider of its own, as separate hosts
would: the trace context can only travel in the events."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import happen
import happen.otel
from tests.helpers import drained, unique_namespace

pytestmark = pytest.mark.anyio


class Host:
    """A system with its own tracer provider, whose finished spans are kept in memory."""

    def __init__(self, transport: happen.Transport, namespace: str) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.system = happen.System(transport=transport, namespace=namespace)
        happen.otel.instrument(self.system, tracer_provider=provider)

    def spans(self) -> dict[str, ReadableSpan]:
        return {span.name: span for span in self.exporter.get_finished_spans()}


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


@pytest.fixture
def three_hosts(make_transport: Callable[[], happen.Transport]) -> list[Host]:
    namespace = unique_namespace()
    return [Host(make_transport(), namespace) for _ in range(3)]


async def test_a_flow_across_three_systems_is_one_trace(three_hosts: list[Host]) -> None:
    a, b, c = three_hosts
    async with a.system, b.system, c.system:
        relay = b.system.create_node("relay")
        store = c.system.create_node("store")

        @relay.on("order")
        async def forward(event: happen.Event, context: dict[str, Any]) -> Any:
            return await relay.send("store", {"type": "save", "payload": event.payload})

        @store.on("save")
        async def save(event: happen.Event, context: dict[str, Any]) -> Any:
            return {"saved": event.payload}

        await b.system.ready()
        await c.system.ready()
        client = a.system.create_node("client")
        assert await client.send("relay", {"type": "order", "payload": 7}) == {"saved": 7}
        await drained(relay, store)

    send_order = a.spans()["send order"]
    handle_order, send_save = b.spans()["handle order"], b.spans()["send save"]
    handle_save = c.spans()["handle save"]
    spans = [send_order, handle_order, send_save, handle_save]
    assert len({trace_id(span) for span in spans}) == 1
    assert send_order.parent is None
    assert parent_of(handle_order) == span_id(send_order)
    assert parent_of(send_save) == span_id(handle_order)
    assert parent_of(handle_save) == span_id(send_save)
    assert [span.kind for span in spans] == [
        SpanKind.CLIENT,
        SpanKind.SERVER,
        SpanKind.CLIENT,
        SpanKind.SERVER,
    ]
    assert handle_order.attributes is not None and send_order.attributes is not None
    assert handle_order.attributes["happen.node"] == "relay"
    assert send_order.attributes["happen.target"] == "relay"
    assert all(span.status.status_code is StatusCode.UNSET for span in spans)


async def test_a_generator_handler_is_traced_while_its_items_are_made(
    three_hosts: list[Host],
) -> None:
    a, b, c = three_hosts
    async with a.system, b.system, c.system:
        model = b.system.create_node("model")
        lookup = c.system.create_node("lookup")

        @model.on("words")
        async def words(event: happen.Event, context: dict[str, Any]) -> AsyncIterator[str]:
            for word in event.payload:
                yield await model.send("lookup", {"type": "upper", "payload": word})

        @lookup.on("upper")
        async def upper(event: happen.Event, context: dict[str, Any]) -> str:
            return str(event.payload).upper()

        await b.system.ready()
        await c.system.ready()
        client = a.system.create_node("client")
        async with client.stream("model", {"type": "words", "payload": ["x", "y"]}) as stream:
            assert [word async for word in stream] == ["X", "Y"]
        await drained(model, lookup)

    stream_span = a.spans()["stream words"]
    handle_words = b.spans()["handle words"]
    sends = [s for s in b.exporter.get_finished_spans() if s.name == "send upper"]
    handles = [s for s in c.exporter.get_finished_spans() if s.name == "handle upper"]
    assert len(sends) == len(handles) == 2
    assert parent_of(handle_words) == span_id(stream_span)
    assert all(parent_of(send) == span_id(handle_words) for send in sends)
    assert sorted(parent_of(h) or 0 for h in handles) == sorted(span_id(s) for s in sends)
    assert len({trace_id(s) for s in [stream_span, handle_words, *sends, *handles]}) == 1
    # The stream's span covers the whole stream, the handler's span all its items.
    assert stream_span.end_time is not None and handle_words.end_time is not None
    assert all(handle_words.end_time >= (send.end_time or 0) for send in sends)


async def test_failures_mark_both_spans(three_hosts: list[Host]) -> None:
    a, b, _ = three_hosts
    async with a.system, b.system:
        node = b.system.create_node("svc")

        @node.on("boom")
        async def boom(event: happen.Event, context: dict[str, Any]) -> None:
            raise ValueError("kaput")

        await b.system.ready()
        with pytest.raises(happen.HandlerError):
            await a.system.create_node("client").send("svc", {"type": "boom"})
        await drained(node)

    client_span, server_span = a.spans()["send boom"], b.spans()["handle boom"]
    assert client_span.status.status_code is StatusCode.ERROR
    assert server_span.status.status_code is StatusCode.ERROR
    assert server_span.status.description == "ValueError: kaput"
    assert [e.name for e in server_span.events] == ["exception"]
    assert parent_of(server_span) == span_id(client_span)


async def test_node_counters_are_exported_as_metrics(transport_url: str) -> None:
    reader = InMemoryMetricReader()
    system = happen.System(transport=transport_url, namespace=unique_namespace())
    happen.otel.instrument(system, meter_provider=MeterProvider(metric_readers=[reader]))
    with pytest.raises(RuntimeError, match="instrumented already"):
        happen.otel.instrument(system)
    async with system:
        node = system.create_node("svc")
        node.on("x", lambda event, context: 1)
        client = system.create_node("client")
        for _ in range(3):
            await client.send("svc", {"type": "x"})
        await drained(node)
        data = reader.get_metrics_data()
    assert data is not None
    points: dict[tuple[str, str], Any] = {}
    kinds: dict[str, str] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "happen"
            for metric in scope.metrics:
                kinds[metric.name] = type(metric.data).__name__
                for point in metric.data.data_points:
                    points[(metric.name, str(point.attributes["happen.node"]))] = point.value
    assert points[("happen.node.accepted", "svc")] == 3
    assert points[("happen.node.completed", "svc")] == 3
    assert points[("happen.node.failed", "svc")] == 0
    assert points[("happen.node.accepted", "client")] == 0
    assert points[("happen.node.active", "svc")] == 0
    assert points[("happen.node.max_concurrent", "svc")] == 100
    assert kinds["happen.node.accepted"] == "Sum"
    assert kinds["happen.node.queued"] == "Gauge"


async def test_a_traced_stream_closed_early_ends_its_spans(
    three_hosts: list[Host], caplog: pytest.LogCaptureFixture
) -> None:
    a, b, _ = three_hosts
    async with a.system, b.system:
        node = b.system.create_node("model")
        closed = False

        @node.on("count")
        async def count(event: happen.Event, context: dict[str, Any]) -> AsyncIterator[int]:
            nonlocal closed
            try:
                for i in range(1_000_000):
                    yield i
            finally:
                closed = True

        await b.system.ready()
        client = a.system.create_node("client")
        async with client.stream("model", {"type": "count"}) as stream:
            async for item in stream:
                if item == 5:
                    break
        await drained(node)
        assert closed

    stream_span, handle_span = a.spans()["stream count"], b.spans()["handle count"]
    assert parent_of(handle_span) == span_id(stream_span)
    assert stream_span.status.status_code is StatusCode.UNSET
    assert handle_span.status.status_code is StatusCode.UNSET
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


def test_only_happen_otel_imports_opentelemetry() -> None:
    code = (
        "import sys, happen, happen.metrics, happen.cli\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')]\n"
        "import happen.otel\n"
        "assert 'opentelemetry.trace' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
