"""OpenTelemetry for a happen system: spans for calls and handler executions, and the node
counters as metrics. Needs the ``otel`` extra (``pip install 'happen[otel]'``).

``happen.otel.instrument(system)`` is all it takes:

- a **client span** per ``send``, ``stream`` and ``broadcast`` a node of the system makes
  (``send <type>``, ``stream <type>``: kind CLIENT; ``broadcast <type>``: kind PRODUCER),
  from the call until its result, the end of its stream, or its failure. Its W3C
  traceparent travels in the event's causal context (``CausalContext.trace``);
- a **server span** per handler execution (``handle <type>``, kind SERVER), the child of
  the span that sent the event, through the system's middleware. Sends made while the
  handler runs (from its body, its continuum, a generator's body) are its children, so a
  flow across systems and hosts is one trace;
- **metrics**: every counter and gauge of ``system.stats()`` as an observable instrument
  (``happen.node.accepted``, ``happen.node.active``, ...; see ``happen.metrics``).

Spans and metrics go to the global tracer and meter providers unless others are given.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import happen
from happen._events import Event
from happen._middleware import CallNext, current_node_id
from happen._system import System
from happen.metrics import GAUGES, readings

__all__ = ["instrument"]

#: The instrumentation scope's name (the tracer's and the meter's).
SCOPE = "happen"

# The causal context's field is a W3C traceparent, whatever global propagator is set.
_propagator = TraceContextTextMapPropagator()


def instrument(
    system: System,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
) -> None:
    """Trace ``system``'s calls and handler executions, and export its node counters as
    metrics. Call it once per system, before or after it starts.

    Raises ``RuntimeError`` when the system is instrumented already (or has another call
    observer: see ``System.observe_calls``).
    """
    tracer = trace.get_tracer(SCOPE, happen.__version__, tracer_provider=tracer_provider)
    try:
        system.observe_calls(_CallSpans(tracer, system.namespace))
    except RuntimeError:
        raise RuntimeError(
            "this system is instrumented already (or has a call observer of its own)"
        ) from None
    system.use(_HandlerSpans(tracer, system.namespace))
    meter = metrics.get_meter(SCOPE, happen.__version__, meter_provider=meter_provider)
    _register_metrics(meter, system)


def _error(span: trace.Span, error: BaseException) -> None:
    if isinstance(error, Exception):
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    else:  # cancelled (the caller gave up, the system stops)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))


class _CallWatch:
    """A client span, from the call to its end (a ``happen.CallWatch``)."""

    __slots__ = ("_span", "trace")

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        carrier: dict[str, str] = {}
        _propagator.inject(carrier, context=trace.set_span_in_context(span))
        self.trace: str | None = carrier.get("traceparent")

    def ended(self, error: BaseException | None) -> None:
        if error is not None:
            _error(self._span, error)
        self._span.end()


class _CallSpans:
    """Starts a client span per call, the child of the current span (a
    ``happen.CallObserver``)."""

    def __init__(self, tracer: trace.Tracer, namespace: str) -> None:
        self._tracer = tracer
        self._namespace = namespace

    def call_started(
        self, operation: str, sender: str, target: str | None, event_type: str
    ) -> _CallWatch:
        attributes = {
            "messaging.system": "happen",
            "happen.namespace": self._namespace,
            "happen.operation": operation,
            "happen.sender": sender,
            "happen.event.type": event_type,
        }
        if target is not None:
            attributes["happen.target"] = target
        kind = SpanKind.PRODUCER if operation == "broadcast" else SpanKind.CLIENT
        span = self._tracer.start_span(
            f"{operation} {event_type}", kind=kind, attributes=attributes
        )
        return _CallWatch(span)


class _HandlerSpans:
    """A middleware: a server span per handler execution, the child of the span that sent
    the event (from its ``trace``), current while the handler runs."""

    def __init__(self, tracer: trace.Tracer, namespace: str) -> None:
        self._tracer = tracer
        self._namespace = namespace

    async def __call__(self, event: Event, context: dict[str, Any], call_next: CallNext) -> Any:
        causal = event.context
        # A root event starts a trace: never the ambient context of the worker task.
        parent = otel_context.Context()
        if causal.trace:
            parent = _propagator.extract({"traceparent": causal.trace}, context=parent)
        attributes = {
            "messaging.system": "happen",
            "happen.namespace": self._namespace,
            "happen.node": current_node_id() or "",
            "happen.event.type": event.type,
            "happen.event.id": causal.id,
            "happen.sender": causal.sender,
            "happen.correlation_id": causal.correlation_id,
        }
        span = self._tracer.start_span(
            f"handle {event.type}", context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        active = trace.set_span_in_context(span)
        token = otel_context.attach(active)
        try:
            result = await call_next(event)
        except BaseException as exc:
            _error(span, exc)
            span.end()
            raise
        finally:
            otel_context.detach(token)
        if inspect.isasyncgen(result):
            return _traced_items(result, span, active)
        span.end()
        return result


async def _traced_items(
    items: AsyncIterator[Any], span: trace.Span, active: otel_context.Context
) -> AsyncIterator[Any]:
    """A generator handler's items, its span current while each is made; the span ends
    with the stream. The span is made current around each step only, never across a
    ``yield``, so it cannot leak into the task that reads the items."""
    try:
        while True:
            token = otel_context.attach(active)
            try:
                item = await items.__anext__()
            except StopAsyncIteration:
                return
            finally:
                otel_context.detach(token)
            yield item
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit):  # closed early by the consumer: no error
            _error(span, exc)
        raise
    finally:
        span.end()
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


def _register_metrics(meter: metrics.Meter, system: System) -> None:
    """An observable instrument per ``NodeStats`` counter and gauge, reading
    ``system.stats()`` at each collection."""
    namespace = system.namespace

    def observe(name: str) -> Any:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for reading in readings(system.stats()):
                if reading.name == name:
                    return [
                        Observation(value, {"happen.namespace": namespace, "happen.node": node})
                        for node, value in reading.values.items()
                    ]
            return []

        return callback

    for reading in readings({}):
        name = f"happen.node.{reading.name}"
        unit = "1" if reading.name == "under_pressure" else "{event}"
        if reading.name in GAUGES:
            meter.create_observable_gauge(
                name, callbacks=[observe(reading.name)], unit=unit, description=reading.description
            )
        else:
            meter.create_observable_counter(
                name, callbacks=[observe(reading.name)], unit=unit, description=reading.description
            )
