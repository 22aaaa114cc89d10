"""While the connection to NATS is down, publishing and subscribing fail at once.

nats-py would otherwise keep a publish in its reconnect buffer for the whole outage (and send
it, late, once reconnected): the caller would wait without knowing, and a message it believes
lost could still arrive.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import anyio
import pytest

import happen
from happen._errors import TransportError
from happen.transports.nats import NatsTransport
from tests.conftest import NatsServer
from tests.helpers import unique_namespace
from tests.test_nats_transport import EventListener
from tests.test_transport_contract import WAIT, Collector

pytestmark = [pytest.mark.anyio, pytest.mark.nats]

DOWN = r"the connection to NATS is down \(reconnecting\); nothing was sent"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    """A server this test may stop and restart without disturbing the others."""
    with NatsServer() as server:
        yield server


class WatchedConnection:
    """A NATS transport whose loss and return of its connection can be waited on."""

    def __init__(self, server: NatsServer) -> None:
        self.down = anyio.Event()
        self.back = anyio.Event()

        async def disconnected_cb() -> None:
            self.down.set()

        async def reconnected_cb() -> None:
            self.back.set()

        self.transport = NatsTransport(
            server.url, disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb
        )


async def test_publish_and_subscribe_fail_at_once_while_reconnecting(
    own_server: NatsServer,
) -> None:
    transport = NatsTransport(own_server.url)
    listener = EventListener()
    transport.set_listener(listener)
    await transport.start()
    try:
        got = Collector()
        await transport.subscribe("outage.here", got)
        own_server.stop()
        with anyio.fail_after(WAIT):
            await listener.disconnected.wait()

        with anyio.fail_after(1), pytest.raises(TransportError, match=DOWN) as info:
            await transport.publish("outage.here", b"refused")
        assert "outage.here" in str(info.value)
        with anyio.fail_after(1), pytest.raises(TransportError, match=DOWN):
            await transport.subscribe("outage.later", Collector())

        own_server.start()
        with anyio.fail_after(WAIT):
            await listener.reconnected.wait()
        await transport.publish("outage.here", b"after")
        await got.wait_for(1)
        # The refused message was not buffered and sent on reconnection, ahead of this one.
        assert got.data == [b"after"]
        later = Collector()
        await transport.subscribe("outage.later", later)
        await transport.publish("outage.later", b"works")
        await later.wait_for(1)
    finally:
        await transport.stop()


async def test_a_send_while_the_connection_is_down_fails_at_once(own_server: NatsServer) -> None:
    watched = WatchedConnection(own_server)
    system = happen.System(transport=watched.transport, namespace=unique_namespace())
    echo = system.create_node("echo")
    echo.on("ping", lambda event, context: "pong")
    client = system.create_node("client")
    async with system:
        assert await client.send("echo", {"type": "ping"}, timeout=WAIT) == "pong"
        own_server.stop()
        with anyio.fail_after(WAIT):
            await watched.down.wait()
        with anyio.fail_after(1), pytest.raises(happen.TransportError, match="down"):
            await client.send("echo", {"type": "ping"}, timeout=30)
        own_server.start()
        with anyio.fail_after(WAIT):
            await watched.back.wait()
        assert await client.send("echo", {"type": "ping"}, timeout=WAIT) == "pong"


async def test_node_state_fails_at_once_while_the_connection_is_down(
    own_server: NatsServer,
) -> None:
    """A read or write of node state names what could not be done, at once; once the
    connection is back, the state written before the outage is there and writes work."""
    watched = WatchedConnection(own_server)
    system = happen.System(transport=watched.transport, namespace=unique_namespace())
    ledger = system.create_node("ledger")
    async with system:
        first = await ledger.state.put("balance", 10)
        own_server.stop()
        with anyio.fail_after(WAIT):
            await watched.down.wait()
        attempts: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("write", lambda: ledger.state.put("balance", 20)),
            ("read", lambda: ledger.state.get("balance")),
            ("delete", lambda: ledger.state.delete("balance")),
        ]
        for action, attempt in attempts:
            with anyio.fail_after(1), pytest.raises(TransportError, match=DOWN) as info:
                await attempt()
            assert f"{action} key 'ledger.balance' of bucket" in str(info.value)
        own_server.start()
        with anyio.fail_after(WAIT):
            await watched.back.wait()
        kept = await ledger.state.get("balance")
        assert kept is not None and (kept.value, kept.revision) == (10, first)
        assert await ledger.state.put("balance", 30, expect=first) > first
