"""Slow-consumer drops over NATS: reported for the very subscription that lost them, counted
on the node that owns it, and logged once per burst rather than once per message."""

from __future__ import annotations

import logging

import anyio
import pytest

import happen
from happen._transport import Message
from happen.transports import nats as nats_transport
from happen.transports.nats import NatsTransport
from tests.conftest import NatsServer
from tests.helpers import (
    assert_accounted,
    drained,
    eventually,
    subscriptions_live,
    unique_namespace,
)
from tests.test_nats_transport import EventListener
from tests.test_transport_contract import Collector

pytestmark = [pytest.mark.anyio, pytest.mark.nats]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class StuckCallback:
    """A subscription callback that takes one message and holds it until released, so that
    with ``pending_msgs_limit=1`` every message but the next one is dropped."""

    def __init__(self, listener: EventListener) -> None:
        self.listener = listener
        self.received: list[bytes] = []
        self.release = anyio.Event()

    async def __call__(self, msg: Message) -> None:
        self.received.append(msg.data)
        self.listener.progress.notify()
        await self.release.wait()


async def publish_many(transport: NatsTransport, subject: str, count: int) -> None:
    for i in range(count):
        await transport.publish(subject, b"%d" % i)


async def test_on_dropped_names_the_subscription_subscribe_returned(
    nats_server: NatsServer,
) -> None:
    transport = NatsTransport(nats_server.start().url, pending_msgs_limit=1)
    listener = EventListener()
    transport.set_listener(listener)
    await transport.start()
    stuck = StuckCallback(listener)
    try:
        slow = await transport.subscribe("drops.slow.*", stuck)
        calm = Collector()
        await transport.subscribe("drops.calm", calm)
        sent = 50
        await publish_many(transport, "drops.slow.one", sent)
        await transport.publish("drops.calm", b"fine")
        await calm.wait_for(1)
        await listener.progress.until(lambda: listener.dropped_count >= sent - 2)
        stuck.release.set()
        await listener.progress.until(lambda: len(stuck.received) + listener.dropped_count == sent)
        assert all(subscription is slow for subscription, _ in listener.dropped)
        assert slow.dropped == listener.dropped_count
    finally:
        stuck.release.set()
        await transport.stop()


async def test_transport_drops_are_counted_on_the_node_that_lost_them(
    nats_server: NatsServer,
) -> None:
    url = nats_server.start().url
    ns = unique_namespace()
    sender_system = happen.System(transport=url, namespace=ns)
    # A pending limit of one message: a burst of broadcasts overflows it at once.
    receiver_system = happen.System(
        transport=NatsTransport(url, pending_msgs_limit=1), namespace=ns
    )
    sender = sender_system.create_node("sender")
    receiver = receiver_system.create_node("receiver")
    bystander = receiver_system.create_node("bystander")
    receiver.on("tick", lambda event, context: None)
    bystander.on("other", lambda event, context: None)
    sent = 2000
    async with receiver_system, sender_system:
        await subscriptions_live(receiver)
        for _ in range(sent):
            await sender.broadcast({"type": "tick"})
        await eventually(
            lambda: receiver.stats().accepted + receiver.stats().dropped == sent, timeout=10
        )
        await drained(receiver)
        stats = assert_accounted(receiver, sent=sent)
        assert stats.dropped > 0, "the burst overflowed the subscription's pending limit"
        assert bystander.stats().dropped == 0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The drop log's clock, set by the test: ``clock[0]`` is "now" in seconds."""
    now = [1000.0]
    monkeypatch.setattr(nats_transport, "_clock", lambda: now[0])
    return now


def drop_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "happen.transports.nats" and "slow consumer" in record.getMessage()
    ]


async def test_thousands_of_drops_log_a_handful_of_lines(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture, clock: list[float]
) -> None:
    caplog.set_level(logging.DEBUG, logger="happen.transports.nats")
    transport = NatsTransport(nats_server.start().url, pending_msgs_limit=1)
    listener = EventListener()
    transport.set_listener(listener)
    await transport.start()
    stuck = StuckCallback(listener)
    try:
        subscription = await transport.subscribe("flood.*", stuck)
        sent = 5000
        await publish_many(transport, "flood.in", sent)
        await listener.progress.until(lambda: listener.dropped_count >= sent - 2)
        stuck.release.set()
        await listener.progress.until(lambda: len(stuck.received) + listener.dropped_count == sent)
        dropped = listener.dropped_count
        assert subscription.dropped == dropped
        assert len(drop_lines(caplog)) == 1, "one line while the burst goes on"
        await subscription.unsubscribe()
    finally:
        stuck.release.set()
        await transport.stop()
    first, last = drop_lines(caplog)
    assert "'flood.*'" in first and "pending_msgs_limit=1," in first, "names them and the limit"
    assert "'flood.*'" in last and f"{dropped} message(s) dropped in all" in last
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]


async def test_a_long_burst_logs_at_most_once_a_second_and_a_quiet_second_ends_it(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture, clock: list[float]
) -> None:
    caplog.set_level(logging.WARNING, logger="happen.transports.nats")
    transport = NatsTransport(nats_server.start().url, pending_msgs_limit=1)
    listener = EventListener()
    transport.set_listener(listener)
    await transport.start()
    stuck = StuckCallback(listener)

    async def drop(count: int, *, at: float) -> None:
        clock[0] = at
        before = listener.dropped_count
        await publish_many(transport, "burst.in", count)
        await listener.progress.until(lambda: listener.dropped_count == before + count)

    def lines_since(start: int) -> list[str]:
        return drop_lines(caplog)[start:]

    try:
        await transport.subscribe("burst.in", stuck)
        # Fill the callback, then the pending queue: from then on every message is dropped.
        await transport.publish("burst.in", b"held")
        await listener.progress.until(lambda: len(stuck.received) == 1)
        synced = Collector()
        await transport.subscribe("burst.sync", synced)
        await transport.publish("burst.in", b"pending")
        await transport.publish("burst.sync", b"")  # arrives after "pending" was queued
        await synced.wait_for(1)
        assert listener.dropped_count == 0

        await drop(100, at=1000.0)
        (started,) = drop_lines(caplog)
        assert "'burst.in'" in started and "being dropped" in started
        await drop(100, at=1000.6)  # less than a second since the last line: counted only
        assert lines_since(1) == []
        await drop(100, at=1001.2)  # a second since the last line, burst still on
        (progress,) = lines_since(1)
        assert "200 more message(s) dropped in the last 1.2 s (201 in this burst so far)" in (
            progress
        )
        await drop(5, at=1001.5)
        assert lines_since(2) == []
        await drop(7, at=1010.0)  # after a quiet second: the first burst ended, a new one
        ended, restarted = lines_since(2)
        assert "burst over, 305 message(s) dropped in all" in ended
        assert "being dropped" in restarted
    finally:
        stuck.release.set()
        await transport.stop()
    (stopped,) = lines_since(4)
    assert "burst over, 7 message(s) dropped in all" in stopped
    assert listener.dropped_count == 312
