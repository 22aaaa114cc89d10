"""Bad bytes on the wire: answered with ``bad_request``, counted, logged once, and survived.

A second, raw transport of the same kind publishes straight to a system's subjects, as a
buggy or hostile client in another process would.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import msgspec
import pytest

import happen
from happen._transport import Message, Transport
from tests.helpers import (
    assert_accounted,
    drained,
    eventually,
    observed_inbox,
    subscriptions_live,
    unique_namespace,
)

pytestmark = pytest.mark.anyio

WAIT = 10  # seconds; a test that needs this long has failed


def encode(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


def deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = [value]
    return value


class Raw:
    """A bare transport with a reply inbox: publishes bytes, collects decoded replies."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.inbox = ""
        self.replies: list[dict[str, Any]] = []
        self._changed = anyio.Event()

    async def start(self) -> Raw:
        await self.transport.start()
        self.inbox = self.transport.new_inbox()
        await self.transport.subscribe(self.inbox, self._on_reply)
        return self

    async def _on_reply(self, msg: Message) -> None:
        self.replies.append(msgspec.msgpack.decode(msg.data))
        self._changed.set()

    async def ask(self, subject: str, data: bytes) -> dict[str, Any]:
        """Publish ``data`` with our inbox as reply subject; return the next reply."""
        count = len(self.replies)
        await self.transport.publish(subject, data, reply=self.inbox)
        await self.wait_for(count + 1)
        return self.replies[count]

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        with anyio.fail_after(WAIT):
            while len(self.replies) < count:
                self._changed = anyio.Event()
                await self._changed.wait()
        return self.replies


@pytest.fixture
async def raw(make_transport: Callable[[], Transport]) -> Raw:
    return await Raw(make_transport()).start()


@pytest.fixture
async def served(make_transport: Callable[[], Transport]) -> AsyncIterator[happen.System]:
    system = happen.System(transport=make_transport(), namespace=unique_namespace())
    node = system.create_node("n")
    node.on("x", lambda e, c: "ok")
    async with system:
        await subscriptions_live(node)
        yield system


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "happen" and r.levelno == logging.WARNING and text in r.getMessage()
    ]


BAD_REQUESTS = [
    pytest.param(b"\xc1\xc1 not msgpack", "undecodable", id="garbage"),
    pytest.param(b"", "undecodable", id="empty"),
    pytest.param(encode({"k": "req"}), "type", id="request-without-type"),
    pytest.param(encode({"k": "req", "type": 5}), "type", id="type-not-a-string"),
    pytest.param(encode({"k": "req", "type": "x", "priority": "high"}), "priority", id="priority"),
    pytest.param(encode({"k": "req", "type": "x", "window": [1]}), "window", id="window"),
    pytest.param(encode({"k": "whatever", "type": "x"}), "whatever", id="unknown-kind"),
    pytest.param(encode({"k": "credit", "n": 1}), "credit", id="credit-to-a-node"),
    pytest.param(encode(["req", "x"]), "malformed", id="array-not-map"),
    pytest.param(encode({"k": "req", "type": "x", "payload": deep(100)}), "deeper", id="deep"),
    pytest.param(encode({"k": "req", "type": "has space"}), "invalid event type", id="bad-type"),
    pytest.param(encode({"k": "req", "type": "a..b"}), "invalid event type", id="empty-segment"),
]


@pytest.mark.parametrize(("data", "says"), BAD_REQUESTS)
async def test_a_malformed_request_is_answered_counted_logged_once_and_survived(
    served: happen.System,
    raw: Raw,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    says: str,
) -> None:
    subject = f"{served.namespace}.node.n"
    caplog.set_level(logging.WARNING, logger="happen")
    for _ in range(3):
        reply = await raw.ask(subject, data)
        assert reply["k"] == "err" and reply["code"] == "bad_request", reply
        assert says in reply["message"], reply
    await raw.transport.publish(subject, data)  # without a reply subject: counted only
    # a good request after the bad ones: the node still serves, raw clients and nodes alike
    assert await raw.ask(subject, encode({"k": "req", "type": "x"})) == {"k": "res", "value": "ok"}
    node = served.create_node("client")
    assert await node.send("n", {"type": "x"}) == "ok"

    stats = served.stats()["n"]
    assert (stats.rejected, stats.accepted, stats.completed) == (4, 2, 2)
    assert served.bad_inputs == 4
    assert len(warnings_about(caplog, "malformed")) == 1, "repeated bad input is logged once"


async def test_stray_and_malformed_frames_on_the_inbox_are_counted(
    served: happen.System, raw: Raw, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="happen")
    inbox = await observed_inbox(served, raw.transport)  # "<inbox>." + a token per call
    await raw.transport.publish(inbox + "ffff", encode({"k": "res", "value": 1}))
    await raw.transport.publish(inbox + "fffe", encode({"k": "credit", "n": 5}))
    await raw.transport.publish(inbox + "fffd", encode({"k": "cancel"}))
    await eventually(lambda: served.stray_frames == 3, timeout=WAIT)
    for _ in range(3):
        await raw.transport.publish(inbox + "ffff", b"\xc1 garbage")
    await raw.transport.publish(inbox + "ffff", encode({"k": "req", "type": "x"}))  # not a reply
    await eventually(lambda: served.bad_inputs == 4, timeout=WAIT)
    assert served.stray_frames == 3
    assert len(warnings_about(caplog, "inbox")) == 1
    # the system's own calls still get their replies
    node = served.create_node("client")
    assert await node.send("n", {"type": "x"}) == "ok"
    assert served.stats()["n"].rejected == 0


async def test_malformed_broadcast_and_cancel_frames_are_counted(
    served: happen.System, raw: Raw, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="happen")
    ns = served.namespace
    for _ in range(2):
        await raw.transport.publish(f"{ns}.bcast.x", b"\xc1 garbage")
        await raw.transport.publish(f"{ns}.cancel.n", encode({"k": "abandon"}))
    await raw.transport.publish(f"{ns}.bcast.x", encode({"k": "bcast", "type": "not valid"}))
    await raw.transport.publish(f"{ns}.cancel.n", encode({"k": "abandon", "reply": "nothing"}))
    await eventually(lambda: served.bad_inputs == 5 and served.stray_frames == 1, timeout=WAIT)
    assert len(warnings_about(caplog, "broadcast")) == 2  # one per kind of error
    assert len(warnings_about(caplog, "cancel")) == 1
    node = served.create_node("client")
    assert await node.send("n", {"type": "x"}) == "ok"
    stats = served.stats()["n"]
    assert (stats.accepted, stats.rejected, stats.dropped) == (1, 0, 0)


async def test_a_raw_client_past_the_queue_limit_gets_queue_full(
    make_transport: Callable[[], Transport], raw: Raw
) -> None:
    config = {
        "patterns": {
            "tight": {"max_concurrent": 1, "queue_limit": 1, "backpressure_threshold": 1.0}
        }
    }
    system = happen.System(
        transport=make_transport(), namespace=unique_namespace(), concurrency=config
    )
    node = system.create_node("tight")
    release = anyio.Event()

    @node.on("wait")
    async def wait(event: happen.Event, context: dict) -> int:
        await release.wait()
        return int(event.payload)

    async with system:
        await subscriptions_live(node)
        subject = f"{system.namespace}.node.tight"
        for i in range(3):  # one runs, one waits in the queue, the third is refused
            await raw.transport.publish(
                subject, encode({"k": "req", "type": "wait", "payload": i}), reply=raw.inbox
            )
        (refused,) = await raw.wait_for(1)
        assert refused["k"] == "err" and refused["code"] == "queue_full"
        assert "queue is full" in refused["message"]
        release.set()
        replies = await raw.wait_for(3)
        assert sorted(r["value"] for r in replies[1:]) == [0, 1]
        await drained(node)
        stats = assert_accounted(node, sent=3)
        assert (stats.completed, stats.rejected) == (2, 1)
