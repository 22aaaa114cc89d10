"""Slow-consumer drops over NATS: reported for the very subscription that lost them, and
counted on the node that owns it."""

from __future__ import annotations

import anyio
import pytest

import happen
from happen._transport import Message
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
