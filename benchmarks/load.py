"""Load scenarios: an overload burst, and latency at half capacity.

overload: a burst of 10 x queue_limit sends at one node whose handler is held shut, so exactly
``max_concurrent`` run, ``queue_limit`` wait and the rest are rejected. Each round runs two fresh
subprocesses (``python -m benchmarks.load``) so each peak RSS (VmHWM) is its own: a control with
the same burst of tasks and no happen (held or turned away as happen would; ~4 kB per waiting
task, ~40 MB for the 10 100 that wait), then happen. The figure is happen's growth (peak minus
the RSS before the burst) minus the control's: what the node and its client cost beyond the
sending tasks themselves. The backpressure threshold is 1.0 so that in-process senders are
rejected rather than suspended (suspended senders would wait on a handler that is held shut).
Then the handler is released and node.stats() must account for every event:
accepted + rejected + dropped == sent, completed + failed + dead_lettered == accepted.

latency: the node's capacity is measured first (send->reply with 100 in flight), then an
open-loop driver issues a send every 1/(capacity/2) s without waiting for replies; p50 and
p99 are of each send's time from issue to reply. The baseline is the raw transport (an anyio
server task, or nats-py request/responder) under the same driver at half of its own capacity,
which shows how much of the tail is the driver's and the event loop's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from benchmarks import _happen, over_nats
from benchmarks._drive import Operation, closed_loop, open_loop, percentile, pooled_capacity
from benchmarks._harness import (
    IN_FLIGHT,
    LOOPS,
    NATS_LOOPS,
    PAYLOAD,
    Config,
    Figure,
    Row,
    Sample,
    Scenario,
    Side,
    Unavailable,
    make_row,
)

ROOT = Path(__file__).resolve().parent.parent
QUEUE_LIMIT = 10_000
MAX_CONCURRENT = 100
RSS_TARGET_MB = 50.0
P99_OVER_P50 = 10.0


# --- overload ---------------------------------------------------------------------------------


def memory_kb(field: str) -> int:
    """A ``Vm*`` field of /proc/self/status, in kB (VmRSS now, VmHWM the peak so far)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


Sender = Callable[[], Coroutine[Any, Any, None]]


async def drive(
    tg: TaskGroup, one: Sender, sent: int, settled: Callable[[], bool]
) -> tuple[int, int]:
    """Start ``sent`` tasks running ``one``, a thousand at a time, and wait until ``settled()``.

    Returns the RSS before the burst and the peak RSS once every send was admitted or turned
    away (kB); the caller releases the held handlers when this returns.
    """
    base_kb = memory_kb("VmRSS")
    for i in range(sent):
        tg.start_soon(one)
        if i % 1000 == 999:  # let each thousand reach the node before starting more
            await anyio.lowlevel.checkpoint()
    with anyio.move_on_after(30):
        while not settled():  # noqa: ASYNC110 (stats() is a snapshot, with no notification)
            await anyio.sleep(0.01)
    return base_kb, memory_kb("VmHWM")


async def burst(queue_limit: int) -> dict[str, Any]:
    """The child's work: one burst at a happen node, its memory peak and the accounting."""
    happen = _happen.load()
    concurrency = {
        "default": {
            "max_concurrent": MAX_CONCURRENT,
            "queue_limit": queue_limit,
            "backpressure_threshold": 1.0,
        }
    }
    sent = 10 * queue_limit
    outcomes = {"replied": 0, "rejected": 0, "other": 0}
    gate = anyio.Event()
    async with happen.System(transport="memory", concurrency=concurrency) as system:
        sink = system.create_node("sink")

        @sink.on("work")
        async def work(event: Any, context: dict[str, Any]) -> None:
            await gate.wait()

        client = system.create_node("burst")
        event = {"type": "work", "payload": PAYLOAD}

        async def one() -> None:
            try:
                await client.send("sink", event)
                outcomes["replied"] += 1
            except happen.QueueFullError:
                outcomes["rejected"] += 1
            except happen.HappenError:
                outcomes["other"] += 1

        async with anyio.create_task_group() as tg:
            settled = lambda: _admitted(sink.stats()) >= sent  # noqa: E731
            base_kb, peak_kb = await drive(tg, one, sent, settled)
            during = _happen.stats_dict(sink.stats())
            gate.set()
        stats = sink.stats()
    final = _happen.stats_dict(stats)
    accounted = (
        _admitted(stats) == sent
        and stats.completed + stats.failed + stats.dead_lettered == stats.accepted
        and outcomes["replied"] + outcomes["rejected"] + outcomes["other"] == sent
    )
    return {
        "growth_mb": (peak_kb - base_kb) / 1024,
        "sent": sent,
        "during_burst": during,
        "final": final,
        "senders": outcomes,
        "accounted": accounted,
    }


async def driver_only(queue_limit: int) -> dict[str, Any]:
    """The control: the same burst of tasks, held or turned away as happen would, no happen.

    Its growth is the driver's own (~4 kB per waiting task), subtracted from happen's.
    """
    sent = 10 * queue_limit
    capacity = MAX_CONCURRENT + queue_limit
    gate = anyio.Event()
    arrived = 0

    async def one() -> None:
        nonlocal arrived
        arrived += 1
        if arrived <= capacity:
            await gate.wait()
        else:
            try:
                raise _Rejected
            except _Rejected:
                pass

    async with anyio.create_task_group() as tg:
        base_kb, peak_kb = await drive(tg, one, sent, lambda: arrived >= sent)
        gate.set()
    return {"growth_mb": (peak_kb - base_kb) / 1024, "sent": sent}


class _Rejected(Exception):
    pass


def _admitted(stats: Any) -> int:
    return int(stats.accepted + stats.rejected + stats.dropped)


async def _child(*arguments: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.load", *arguments]
    result = await anyio.run_process(command, cwd=ROOT, check=False)
    lines = result.stdout.decode().strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = result.stderr.decode().strip().splitlines()[-15:]
        raise RuntimeError(f"overload child exited {result.returncode}:\n" + "\n".join(tail))
    report: dict[str, Any] = json.loads(lines[-1])
    if "unavailable" in report:
        raise Unavailable(report["unavailable"])
    return report


async def overload(config: Config) -> Sample:
    """One round: the control child, then the happen child, on this round's loop.

    The figure is happen's growth minus the control's (the driver's own tasks).
    """
    arguments = ["--loop", config.loop, "--queue-limit", str(QUEUE_LIMIT)]
    control = await _child(*arguments, "--control")
    report = await _child(*arguments)
    report["gross_mb"] = report["growth_mb"]
    report["driver_mb"] = control["growth_mb"]
    final = report["final"]
    report["summary"] = (
        f"sent {report['sent']}: accepted {final['accepted']} + rejected {final['rejected']}"
        f" + dropped {final['dropped']}; completed {final['completed']} + failed"
        f" {final['failed']}; senders saw {report['senders']}"
        f" -> {'accounted' if report['accounted'] else 'NOT accounted'}"
    )
    return Sample(report["gross_mb"] - report["driver_mb"], report)


def overload_report(
    scenario: Scenario, loop: str, happen: Figure, baseline: Figure | None
) -> list[Row]:
    """happen's net growth (the figure) beside the driver's own growth (the control)."""
    met = None
    driver = None
    if happen.median is not None and happen.max is not None:
        met = all(n["accounted"] for n in happen.notes) and happen.max < RSS_TARGET_MB
        driver = Figure.of([Sample(n["driver_mb"]) for n in happen.notes])
    target = f"< {RSS_TARGET_MB:g} MB net, accounted"
    row = make_row(scenario, loop, happen, driver, ratio=None, target=target, met=met)
    row.baseline_side = "driver"
    return [row]


# --- latency ----------------------------------------------------------------------------------


async def latency(config: Config, *, transport: str) -> Sample:
    """p50 (the figure) and p99 (in the notes) of happen's send->reply at half capacity."""
    async with _happen.systems(config, transport) as (server_system, client_system):
        _happen.serve(server_system.create_node("server"))
        client = client_system.create_node("client")
        await _happen.until_reachable(client, "server")

        async def one() -> int:
            await client.send("server", _happen.PING)
            return 1

        return await at_half_capacity(one, config)


async def raw_memory_latency(config: Config) -> Sample:
    """The same driver against a raw anyio server task (a request stream, a reply per call)."""
    requests, incoming = anyio.create_memory_object_stream[Any](math.inf)

    async def serve() -> None:
        async for payload, reply in incoming:
            reply.send_nowait(payload)

    async def one() -> int:
        reply, replied = anyio.create_memory_object_stream[Any](1)
        await requests.send((PAYLOAD, reply))
        await replied.receive()
        return 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        sample = await at_half_capacity(one, config)
        tg.cancel_scope.cancel()
    return sample


async def raw_nats_latency(config: Config) -> Sample:
    """The same driver against nats-py ``request`` and a nats-py responder."""
    async with over_nats.connections(config) as (responder, requester, prefix):

        async def echo(msg: Any) -> None:
            await responder.publish(msg.reply, over_nats.encode(over_nats.decode(msg.data)))

        await responder.subscribe(f"{prefix}.rpc", cb=echo)
        await responder.flush()
        data = over_nats.encode(PAYLOAD)
        await over_nats.until_answered(requester, f"{prefix}.rpc", data)

        async def one() -> int:
            reply = await requester.request(f"{prefix}.rpc", data, timeout=over_nats.TIMEOUT)
            over_nats.decode(reply.data)
            return 1

        return await at_half_capacity(one, config)


async def at_half_capacity(one: Operation, config: Config) -> Sample:
    """Capacity (100 in flight, through the driver's own worker pool, so that the driver's cost
    is part of it), then open-loop at half of it: p50 and p99 in ms."""
    await closed_loop(one, config.duration / 5, IN_FLIGHT)  # warm-up
    capacity = await pooled_capacity(one, config.duration / 2, IN_FLIGHT)
    latencies, lags, failures = await open_loop(one, capacity / 2, config.duration)
    if not latencies:
        raise RuntimeError(f"every send failed: {failures}")
    latencies.sort()
    lags.sort()
    return Sample(
        percentile(latencies, 50) * 1000,
        {
            "p99_ms": percentile(latencies, 99) * 1000,
            "capacity": capacity,
            "offered": capacity / 2,
            "sends": len(latencies),
            "lag_p99_ms": percentile(lags, 99) * 1000,
            "failures": failures,
            **({"summary": f"failed sends: {failures}"} if failures else {}),
        },
    )


def _p99(figure: Figure | None) -> Figure | None:
    if figure is None or figure.median is None:
        return figure
    return Figure.of([Sample(n["p99_ms"]) for n in figure.notes])


def latency_report(
    scenario: Scenario, loop: str, happen: Figure, baseline: Figure | None
) -> list[Row]:
    """Two rows: p50, then p99 with p99/p50 as the ratio; the baseline is the raw transport
    under the same driver (at half of its own capacity), to tell the driver's tail from happen's."""
    p99 = _p99(happen)
    assert p99 is not None
    ratio = met = None
    note = ""
    if happen.median and p99.median is not None:
        ratio = p99.median / happen.median
        met = ratio < P99_OVER_P50
        capacity = statistics.median(n["capacity"] for n in happen.notes)
        lag = max(n["lag_p99_ms"] for n in happen.notes)
        note = (
            f"happen capacity ~{capacity:,.0f} rt/s, offered half; ratio = p99/p50;"
            f" driver lag p99 <= {lag:.2f} ms"
        )
    return [
        make_row(scenario, loop, happen, baseline, ratio=None, target="—", met=None, suffix=".p50"),
        make_row(
            scenario,
            loop,
            p99,
            _p99(baseline),
            ratio=ratio,
            target=f"p99 < {P99_OVER_P50:g}x p50",
            met=met,
            note=note,
            suffix=".p99",
        ),
    ]


SCENARIOS = [
    Scenario(
        key="load.overload",
        title=f"overload: burst of 10 x queue_limit ({QUEUE_LIMIT}) sends at one node",
        unit="MB RSS",
        happen=Side("happen", overload),
        baseline=None,
        target=None,
        report=overload_report,
    ),
    Scenario(
        key="load.latency.memory",
        title="in-memory send→reply latency at half capacity",
        unit="ms",
        happen=Side("happen", partial(latency, transport="memory")),
        baseline=Side("anyio", raw_memory_latency),
        target=None,
        loops=LOOPS,
        report=latency_report,
    ),
    Scenario(
        key="load.latency.nats",
        title="NATS send→reply latency at half capacity",
        unit="ms",
        happen=Side("happen", partial(latency, transport="nats")),
        baseline=Side("nats-py", raw_nats_latency),
        target=None,
        loops=NATS_LOOPS,
        report=latency_report,
    ),
]


def main() -> None:
    """The overload child: run one burst, print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load")
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    parser.add_argument("--queue-limit", type=int, default=QUEUE_LIMIT)
    parser.add_argument("--control", action="store_true", help="the driver alone, no happen")
    args = parser.parse_args()
    work = driver_only if args.control else burst
    try:
        if args.loop == "trio":
            report = anyio.run(work, args.queue_limit, backend="trio")
        else:
            options = {"use_uvloop": args.loop == "uvloop"}
            report = anyio.run(work, args.queue_limit, backend="asyncio", backend_options=options)
    except Unavailable as exc:
        report = {"unavailable": str(exc)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
