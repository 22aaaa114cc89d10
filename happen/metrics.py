"""The node counters as metrics: which are counters and which gauges, and the Prometheus text
exposition format.

``prometheus_text(system)`` is what ``happen run --metrics-port`` serves at ``/metrics``;
serve it from your own web application the same way. ``happen.otel`` exports the same
readings as OpenTelemetry metrics.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from happen._mailbox import NodeStats
from happen._system import System

__all__ = ["CONTENT_TYPE", "GAUGES", "Reading", "prometheus_text", "readings"]

#: The content type of ``prometheus_text`` (the Prometheus text format, version 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The ``NodeStats`` fields that are a level now, not a count since the start: gauges.
#: Every other numeric field is a counter.
GAUGES = frozenset(
    {"active", "queued", "max_concurrent", "queue_limit", "under_pressure"}
    | {"keys_active", "keyed_waiting"}
    | {"retrying", "dead_letters_pending", "backlog"}
)

_DESCRIPTIONS = {
    "active": "Handler executions running on the node now.",
    "queued": "Events waiting in the node's queue now.",
    "max_concurrent": "The node's concurrency cap.",
    "queue_limit": "The node's queue limit.",
    "under_pressure": "1 while the node's queue is at or past its backpressure threshold.",
    "accepted": "Events the node admitted to a slot or its queue.",
    "completed": "Admitted events whose handling completed.",
    "failed": "Admitted events whose handling failed (raised, timed out, abandoned, stopped).",
    "rejected": "Events the node refused (queue full, no handler, malformed, stopping).",
    "dropped": "Broadcast copies and messages dropped (queue full, transport drops).",
    "state_reads": "Reads of node state (get, view get, and the reads update makes).",
    "state_writes": "Node state puts, deletes and updates that succeeded.",
    "state_conflicts": "Node state compare-and-sets that were refused.",
    "retried": "Executions after the first that the node's retry policy scheduled.",
    "redelivered": "Deliveries of durable events after a crash or an expired ack_wait.",
    "dead_lettered": "Events that failed for good and whose dead letter was delivered.",
    "suppressed": "Events completed with None by on_error='suppress' (also in completed).",
    "retrying": "Events waiting to run again now (holding no slot and no queue place).",
    "dead_letters_pending": "Events whose dead letter is waiting to be delivered.",
    "handed_back": "Durable events this instance gave back to the log when it stopped.",
    "backlog": "Events a durable node's log holds (not yet taken, or not yet settled).",
}


class Reading(msgspec.Struct, frozen=True):
    """One node counter or gauge, with its value for each node (``{node_id: value}``)."""

    name: str
    kind: str  # "counter" or "gauge"
    description: str
    values: dict[str, int]


def readings(stats: Mapping[str, NodeStats]) -> list[Reading]:
    """Every numeric field of ``NodeStats`` as a counter or a gauge (``GAUGES``), with each
    node's value; ``under_pressure`` reads 0 or 1."""
    result = []
    for name in NodeStats.__struct_fields__:
        values: dict[str, int] = {}
        for node_id, node_stats in stats.items():
            value = getattr(node_stats, name)
            if isinstance(value, bool | int):
                values[node_id] = int(value)
        if values or not stats:
            kind = "gauge" if name in GAUGES else "counter"
            description = _DESCRIPTIONS.get(name, f"The node's {name.replace('_', ' ')} {kind}.")
            result.append(Reading(name, kind, description, values))
    return result


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(system: System) -> str:
    """``system``'s node counters and gauges in the Prometheus text format (``CONTENT_TYPE``).

    One family per ``NodeStats`` field: counters are ``happen_node_<field>_total``, gauges
    ``happen_node_<field>``, each sample labelled ``namespace`` and ``node``; then the
    system's ``happen_bad_inputs_total`` and ``happen_stray_frames_total``.
    """
    namespace = _label(system.namespace)
    lines: list[str] = []

    def family(metric: str, kind: str, description: str) -> None:
        lines.append(f"# HELP {metric} {description}")
        lines.append(f"# TYPE {metric} {kind}")

    for reading in readings(system.stats()):
        metric = f"happen_node_{reading.name}"
        if reading.kind == "counter":
            metric += "_total"
        family(metric, reading.kind, reading.description)
        for node_id, value in reading.values.items():
            lines.append(f'{metric}{{namespace="{namespace}",node="{_label(node_id)}"}} {value}')
    for metric, value, description in (
        ("happen_bad_inputs_total", system.bad_inputs, "Malformed frames the system refused."),
        (
            "happen_stray_frames_total",
            system.stray_frames,
            "Frames for calls or streams no longer there (late answers).",
        ),
    ):
        family(metric, "counter", description)
        lines.append(f'{metric}{{namespace="{namespace}"}} {value}')
    return "\n".join(lines) + "\n"
