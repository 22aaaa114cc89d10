"""A long flow: its causal path keeps the last hops, ``hops`` counts them all, and every hop
costs the same however far the flow has travelled."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import pytest

import happen
from happen._transport import Message, Transport
from tests.helpers import make_system, subscriptions_live, unique_namespace

pytestmark = pytest.mark.anyio

KEPT = 16  # happen keeps the last 16 node ids of a flow's path
HOPS = {"memory": 20_000, "nats": 3_000}
WINDOW = 1_000  # hops timed at the start and at the end of the flow


async def test_a_long_flow_keeps_a_bounded_path_and_counts_every_hop(
    transport_url: str, transport_kind: str
) -> None:
    total = HOPS[transport_kind]
    async with make_system(transport_url) as system:
        looper = system.create_node("looper")
        handled_at: list[float] = []
        last: list[happen.CausalContext] = []
        done = anyio.Event()

        @looper.on("tick")
        async def tick(event: happen.Event, context: dict) -> None:
            handled_at.append(time.perf_counter())
            if len(handled_at) < total:
                await looper.broadcast({"type": "tick"})  # inherits this event's causality
            else:
                last.append(event.context)
                done.set()

        client = system.create_node("client")
        await client.broadcast({"type": "tick"})
        with anyio.fail_after(20):
            await done.wait()

    ctx = last[0]
    assert len(ctx.path) == KEPT and ctx.path == ("looper",) * KEPT
    # a typical hop (the median, so a pause of the machine does not count) costs no more at
    # the end of the flow than at its start
    gaps = [later - earlier for earlier, later in itertools.pairwise(handled_at)]
    first, final = statistics.median(gaps[:WINDOW]), statistics.median(gaps[-WINDOW:])
    assert final < 3 * first, (
        f"a hop took {final * 1e6:.0f} us at the end, {first * 1e6:.0f} at first"
    )
    assert ctx.hops == total == len(handled_at)
    assert ctx.sender == "looper" and ctx.causation_id is not None


async def test_the_path_keeps_the_last_node_ids_in_order(transport_url: str) -> None:
    names = [f"relay-{i}" for i in range(20)]
    async with make_system(transport_url) as system:
        for here, there in zip(names, [*names[1:], None], strict=True):
            relay = system.create_node(here)

            async def forward(
                event: happen.Event,
                context: dict,
                relay: happen.Node = relay,
                to: str | None = there,
            ) -> happen.CausalContext:
                if to is None:
                    return event.context
                return await relay.send(to, {"type": "hop"})  # type: ignore[no-any-return]

            relay.on("hop", forward)
        client = system.create_node("client")
        root_id = await client.send("relay-0", {"type": "hop"})

    # the client sent to relay-0, relay-0 to relay-1, ..., relay-18 to relay-19
    assert root_id["hops"] == 20
    assert root_id["path"] == names[19 - KEPT : 19]
    assert len(root_id["path"]) == KEPT


@pytest.mark.parametrize(
    ("path_length", "hops", "hops_after"),
    [
        pytest.param(1_000, None, 1_001, id="a long path and no hop count"),
        pytest.param(3, 40, 41, id="a counted flow"),
        pytest.param(2, 2**63 - 1, 2**63 - 1, id="a forged hop count"),
    ],
)
async def test_a_foreign_context_joins_the_flow_bounded(
    make_transport: Callable[[], Transport], path_length: int, hops: int | None, hops_after: int
) -> None:
    system = happen.System(transport=make_transport(), namespace=unique_namespace())
    relay = system.create_node("relay")
    sink = system.create_node("sink")
    sink.on("record", lambda event, context: event.context)

    @relay.on("start")
    async def start(event: happen.Event, context: dict) -> Any:
        return await relay.send("sink", {"type": "record"})

    raw = make_transport()
    replies: list[dict[str, Any]] = []
    replied = anyio.Event()

    async def on_reply(msg: Message) -> None:
        replies.append(msgspec.msgpack.decode(msg.data))
        replied.set()

    context: dict[str, Any] = {
        "id": "ext-1",
        "sender": "billing",
        "correlation_id": "root-9",
        "path": [f"far-{i}" for i in range(path_length - 1)] + ["billing"],
    }
    if hops is not None:
        context["hops"] = hops
    async with system:
        await subscriptions_live(relay)
        await raw.start()
        inbox = raw.new_inbox()
        await raw.subscribe(inbox, on_reply)
        frame = {"k": "req", "type": "start", "context": context}
        await raw.publish(
            f"{system.namespace}.node.relay", msgspec.msgpack.encode(frame), reply=inbox
        )
        with anyio.fail_after(10):
            await replied.wait()

    reply = replies[0]
    assert reply["k"] == "res", reply
    seen = reply["value"]  # the context of the event relay sent to sink
    assert seen["hops"] == hops_after
    assert seen["correlation_id"] == "root-9" and seen["causation_id"] == "ext-1"
    assert seen["path"] == [*context["path"][-(KEPT - 1) :], "relay"]
