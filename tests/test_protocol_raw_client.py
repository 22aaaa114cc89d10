"""A client in "another language": bare nats-py and JSON, following only docs/PROTOCOL.md.

Nothing here imports happen's protocol module: the frames are written by hand from the
document, so a drift between the document and the wire fails these tests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import nats
import nats.errors
import pytest
from nats.aio.client import Client

import happen
from tests.conftest import NatsServer
from tests.helpers import assert_accounted, drained, subscriptions_live, unique_namespace

pytestmark = [pytest.mark.anyio, pytest.mark.nats]

WAIT = 10  # seconds; a test that needs this long has failed


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py is asyncio-only


def frame(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


class Inbox:
    """An inbox subscription of the raw client: decoded JSON frames, waited on."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.subject = nc.new_inbox()
        self.frames: list[dict[str, Any]] = []
        self._changed = anyio.Event()

    async def start(self) -> Inbox:
        async def on_message(msg: Any) -> None:
            self.frames.append(json.loads(msg.data))
            self._changed.set()

        await self.nc.subscribe(self.subject, cb=on_message)
        return self

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        """Wait until ``count`` frames arrived; return them all."""
        await self.wait_until(lambda: len(self.frames) >= count)
        return self.frames

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        with anyio.fail_after(WAIT):
            while not condition():
                self._changed = anyio.Event()
                await self._changed.wait()

    @property
    def kinds(self) -> list[str]:
        return [f["k"] for f in self.frames]

    @property
    def items(self) -> list[Any]:
        """The streamed items so far, from "chunk" and "chunks" frames, in order."""
        items: list[Any] = []
        for f in self.frames:
            if f["k"] == "chunk":
                items.append(f.get("item"))
            elif f["k"] == "chunks":
                items.extend(f["items"])
        return items


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.start().url)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def served(nats_server: NatsServer) -> happen.System:
    """A system with codec="json" serving nodes a foreign client calls (start it with
    ``serving``, once its nodes are created)."""
    config = {
        "patterns": {
            "one-at-a-time": {"max_concurrent": 1, "queue_limit": 1, "backpressure_threshold": 1.0},
            "busy": {"max_concurrent": 1, "queue_limit": 4, "backpressure_threshold": 0.5},
        }
    }
    return happen.System(
        transport=nats_server.start().url,
        namespace=unique_namespace(),
        codec="json",
        concurrency=config,
        stream_idle_timeout=0.3,
    )


@asynccontextmanager
async def serving(system: happen.System, node: happen.Node) -> AsyncIterator[None]:
    """Start ``system`` (its nodes created) and wait until a foreign client can reach them."""
    async with system:
        await subscriptions_live(node)
        yield


def subject(system: happen.System, node_id: str) -> str:
    return f"{system.namespace}.node.{node_id}"


async def test_request_reply_with_nc_request(served: happen.System, nc: Client) -> None:
    node = served.create_node("orders")
    seen: list[happen.Event] = []

    @node.on("order.created")
    async def created(event: happen.Event, context: dict) -> dict:
        seen.append(event)
        return {"ok": True, "id": event.payload["id"]}

    async with serving(served, node):
        reply = await nc.request(
            subject(served, "orders"),
            frame(k="req", type="order.created", payload={"id": 7}),
            timeout=WAIT,
        )
        assert json.loads(reply.data) == {"k": "res", "value": {"ok": True, "id": 7}}
        # A foreign request without a context gets one: sender "external", a root event.
        (event,) = seen
        assert event.context.sender == "external"
        assert event.context.correlation_id == event.context.id
        assert event.context.causation_id is None

        # A context the client passes is kept; unknown fields are ignored.
        context = {
            "id": "ext-1",
            "sender": "billing",
            "correlation_id": "root-9",
            "path": ["billing"],
            "timestamp": 1700000000000,
            "causation_id": "root-9",
        }
        reply = await nc.request(
            subject(served, "orders"),
            frame(k="req", type="order.created", payload={"id": 8}, context=context, x_extra=1),
            timeout=WAIT,
        )
        assert json.loads(reply.data)["value"] == {"ok": True, "id": 8}
        assert seen[1].context.id == "ext-1" and seen[1].context.correlation_id == "root-9"
        assert seen[1].context.path == ("billing",)


async def test_a_none_result_omits_value(served: happen.System, nc: Client) -> None:
    node = served.create_node("quiet")
    node.on("ping", lambda e, c: None)
    async with serving(served, node):
        reply = await nc.request(
            subject(served, "quiet"), frame(k="req", type="ping"), timeout=WAIT
        )
        assert json.loads(reply.data) == {"k": "res"}


async def test_each_failure_code_a_foreign_client_can_provoke(
    served: happen.System, nc: Client
) -> None:
    node = served.create_node("worker")
    release = anyio.Event()
    cancelled: list[str] = []

    @node.on("fail")
    async def fail(event: happen.Event, context: dict) -> None:
        raise ValueError("bad\nthing")

    @node.on("hang")
    async def hang(event: happen.Event, context: dict) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.append(event.type)

    gate = served.create_node("one-at-a-time")

    @gate.on("wait")
    async def wait(event: happen.Event, context: dict) -> int:
        await release.wait()
        return int(event.payload)

    async with serving(served, node):

        async def ask(data: bytes) -> dict[str, Any]:
            reply = await nc.request(subject(served, "worker"), data, timeout=WAIT)
            return json.loads(reply.data)

        reply = await ask(frame(k="req", type="unknown.type"))
        assert reply["k"] == "err" and reply["code"] == "no_handler"
        assert "unknown.type" in reply["message"]

        reply = await ask(frame(k="req", type="fail"))
        assert reply == {
            "k": "err",
            "code": "handler_error",
            "message": "bad thing",
            "error_type": "ValueError",
        }

        reply = await ask(frame(k="req", type="hang", timeout_ms=50))
        assert reply["k"] == "err" and reply["code"] == "timeout"
        assert cancelled == ["hang"], "the handler was cancelled at its deadline"

        for bad in (
            b"not json at all",
            frame(k="req"),
            frame(k="req", type=5),
            frame(k="nope", type="fail"),
            frame(k="req", type="has space"),
            frame(k="req", type="fail", priority="high"),
        ):
            reply = await ask(bad)
            assert reply["k"] == "err" and reply["code"] == "bad_request", bad
            assert reply["message"]

        # queue_full: one running, one queued (queue_limit 1), the third is refused at once.
        inbox = await Inbox(nc).start()
        for i in range(3):
            await nc.publish(
                subject(served, "one-at-a-time"),
                frame(k="req", type="wait", payload=i),
                reply=inbox.subject,
            )
        (refused,) = await inbox.wait_for(1)
        assert refused["k"] == "err" and refused["code"] == "queue_full"
        assert "queue is full" in refused["message"]
        release.set()
        frames = await inbox.wait_for(3)
        assert sorted(f.get("value") for f in frames[1:]) == [0, 1]
        await drained(node, gate)
        assert_accounted(gate, sent=3)
        stats = assert_accounted(node, sent=9)
        assert (stats.rejected, stats.failed) == (7, 2)


async def test_no_responders_for_an_unknown_node(served: happen.System, nc: Client) -> None:
    node = served.create_node("probe")
    async with serving(served, node):
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(subject(served, "nobody-here"), frame(k="req", type="x"), timeout=WAIT)


async def test_streamed_reply_with_credit_and_early_cancel(
    served: happen.System, nc: Client
) -> None:
    node = served.create_node("counter")
    produced: list[int] = []
    finalised = anyio.Event()

    @node.on("count")
    async def count(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
        try:
            for i in range(event.payload):
                produced.append(i)
                yield {"i": i}
        finally:
            finalised.set()

    async with serving(served, node):
        # A whole stream within the default window: start, the items, end.
        inbox = await Inbox(nc).start()
        await nc.publish(
            subject(served, "counter"), frame(k="req", type="count", payload=3), reply=inbox.subject
        )
        await inbox.wait_until(lambda: "end" in inbox.kinds)
        assert inbox.frames[0]["k"] == "start" and inbox.frames[0]["control"]
        assert set(inbox.kinds[1:-1]) <= {"chunk", "chunks"}
        assert inbox.items == [{"i": i} for i in range(3)]
        # Each frame numbers its first item; the end counts them all.
        seqs = [f["seq"] for f in inbox.frames[1:-1]]
        sizes = [len(f["items"]) if f["k"] == "chunks" else 1 for f in inbox.frames[1:-1]]
        assert seqs == [sum(sizes[:i]) for i in range(len(sizes))]
        assert inbox.frames[-1] == {"k": "end", "count": 3}

        # A window of 2: the producer stops after 2 items until the client grants more.
        finalised = anyio.Event()
        produced.clear()
        inbox = await Inbox(nc).start()
        await nc.publish(
            subject(served, "counter"),
            frame(k="req", type="count", payload=1000, window=2),
            reply=inbox.subject,
        )
        await inbox.wait_until(lambda: len(inbox.items) == 2)
        control = inbox.frames[0]["control"]
        # A round trip through the serving system after our request: no third item meanwhile.
        await nc.request(subject(served, "counter"), frame(k="req", type="no-such"), timeout=WAIT)
        assert produced == [0, 1], "the generator is not advanced past the window"
        assert len(inbox.items) == 2
        await nc.publish(control, frame(k="credit", n=2))  # for the 2 items read
        await inbox.wait_until(lambda: len(inbox.items) >= 4)
        assert [item["i"] for item in inbox.items] == [0, 1, 2, 3]
        await nc.request(subject(served, "counter"), frame(k="req", type="no-such"), timeout=WAIT)
        assert len(produced) == 4 and len(inbox.items) == 4
        await nc.publish(control, frame(k="cancel"))
        with anyio.fail_after(WAIT):
            await finalised.wait()
        assert len(produced) == 4
        await drained(node)
        assert "end" not in inbox.kinds and "err" not in inbox.kinds
        stats = assert_accounted(node, sent=4)  # two streams, two probes
        assert (stats.completed, stats.rejected) == (2, 2)


async def test_a_stream_nobody_reads_is_closed_after_the_idle_timeout(
    served: happen.System, nc: Client
) -> None:
    node = served.create_node("ticker")
    finalised = anyio.Event()

    @node.on("tick")
    async def tick(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
        try:
            while True:
                yield "tick"
        finally:
            finalised.set()

    async with serving(served, node):
        inbox = await Inbox(nc).start()
        await nc.publish(
            subject(served, "ticker"), frame(k="req", type="tick", window=1), reply=inbox.subject
        )
        # start, the one item of the window, then (0.3 s later) the failure
        frames = await inbox.wait_for(3)
        assert [f["k"] for f in frames] == ["start", "chunk", "err"]
        assert frames[1]["item"] == "tick" and frames[2]["code"] == "timeout"
        assert finalised.is_set()


async def test_abandon_cancels_a_running_handler(served: happen.System, nc: Client) -> None:
    node = served.create_node("slow")
    started = anyio.Event()
    cancelled = anyio.Event()

    @node.on("work")
    async def work(event: happen.Event, context: dict) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    async with serving(served, node):
        inbox = await Inbox(nc).start()
        await nc.publish(subject(served, "slow"), frame(k="req", type="work"), reply=inbox.subject)
        with anyio.fail_after(WAIT):
            await started.wait()
        await nc.publish(f"{served.namespace}.cancel.slow", frame(k="abandon", reply=inbox.subject))
        with anyio.fail_after(WAIT):
            await cancelled.wait()
        (reply,) = await inbox.wait_for(1)
        assert reply["k"] == "err" and reply["code"] == "timeout"


async def test_pressure_hold_then_ack(served: happen.System, nc: Client) -> None:
    # "busy": max_concurrent 1, queue_limit 4, threshold 0.5: under pressure from 2 queued.
    node = served.create_node("busy")
    release = anyio.Event()

    @node.on("job")
    async def job(event: happen.Event, context: dict) -> int:
        await release.wait()
        return int(event.payload)

    async with serving(served, node):
        inboxes = [await Inbox(nc).start() for _ in range(3)]
        for i, inbox in enumerate(inboxes):
            await nc.publish(
                subject(served, "busy"), frame(k="req", type="job", payload=i), reply=inbox.subject
            )
        # The third request is admitted (queued 2 of 4) but the node is now under pressure.
        assert await inboxes[2].wait_for(1) == [{"k": "hold"}]
        assert inboxes[0].frames == inboxes[1].frames == []
        release.set()
        frames = await inboxes[2].wait_for(3)
        assert frames == [{"k": "hold"}, {"k": "ack"}, {"k": "res", "value": 2}]
        for i in (0, 1):
            assert await inboxes[i].wait_for(1) == [{"k": "res", "value": i}]
