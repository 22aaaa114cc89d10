"""What only the NATS transport does: asyncio only, fail-fast start, reconnection, drops."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import anyio
import pytest

from happen._errors import TransportError
from happen._transport import Message, Subscription
from happen.transports.nats import NatsTransport, from_url
from tests.conftest import NatsServer
from tests.test_transport_contract import WAIT, Collector

pytestmark = [pytest.mark.anyio, pytest.mark.nats]

USER, PASSWORD = "happen", "s3cret"


class Progress:
    """Lets a test wait until a condition holds, re-checking whenever something notifies."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        self._event.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        with anyio.fail_after(WAIT):
            while not condition():
                self._event = anyio.Event()
                await self._event.wait()


class EventListener:
    """A TransportListener that sets an anyio Event per callback, for tests to wait on."""

    def __init__(self) -> None:
        self.progress = Progress()
        self.disconnected = anyio.Event()
        self.reconnected = anyio.Event()
        self.closed = anyio.Event()
        self.closed_with: list[BaseException | None] = []
        self.dropped: list[tuple[Subscription, int]] = []

    def on_disconnected(self) -> None:
        self.disconnected.set()

    def on_reconnected(self) -> None:
        self.reconnected.set()

    def on_closed(self, error: BaseException | None) -> None:
        self.closed_with.append(error)
        self.closed.set()

    def on_dropped(self, subscription: Subscription, count: int) -> None:
        self.dropped.append((subscription, count))
        self.progress.notify()

    @property
    def dropped_count(self) -> int:
        """The total of the counts ``on_dropped`` reported."""
        return sum(count for _, count in self.dropped)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def auth_server() -> Iterator[NatsServer]:
    with NatsServer(extra_args=["--user", USER, "--pass", PASSWORD]) as server:
        yield server


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    """A server this test may stop and restart without disturbing the others."""
    with NatsServer() as server:
        yield server


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_start_under_trio_says_nats_needs_asyncio() -> None:
    transport = NatsTransport(f"nats://127.0.0.1:{unused_port()}")
    with pytest.raises(TransportError, match="asyncio"):
        await transport.start()


async def test_wrong_password_fails_fast_naming_authorization(auth_server: NatsServer) -> None:
    url = f"nats://{USER}:wrong@127.0.0.1:{auth_server.port}"
    transport = from_url(url)
    listener = EventListener()
    transport.set_listener(listener)
    began = time.monotonic()
    with anyio.fail_after(5), pytest.raises(TransportError) as info:
        await transport.start()
    assert time.monotonic() - began < 5
    message = str(info.value)
    assert "authorization" in message.lower()
    assert "wrong" not in message, "the password is not shown"
    assert listener.closed_with == []
    with pytest.raises(TransportError):
        await transport.publish("x", b"")


async def test_right_password_connects(auth_server: NatsServer) -> None:
    transport = from_url(f"nats://{USER}:{PASSWORD}@127.0.0.1:{auth_server.port}")
    await transport.start()
    try:
        got = Collector()
        await transport.subscribe("auth.ok", got)
        await transport.publish("auth.ok", b"in")
        await got.wait_for(1)
    finally:
        await transport.stop()


async def test_refused_connection_fails_fast_naming_the_cause() -> None:
    transport = NatsTransport(f"nats://127.0.0.1:{unused_port()}")
    with anyio.fail_after(5), pytest.raises(TransportError, match="Refused"):
        await transport.start()


async def test_a_dead_server_in_the_list_does_not_stop_start(nats_server: NatsServer) -> None:
    transport = from_url(f"nats://127.0.0.1:{unused_port()}, {nats_server.start().url}")
    assert isinstance(transport, NatsTransport)
    assert len(transport.servers) == 2
    await transport.start()
    await transport.stop()


async def test_max_payload_is_the_servers(tmp_path_factory: pytest.TempPathFactory) -> None:
    config = tmp_path_factory.mktemp("conf") / "small.conf"
    config.write_text("max_payload: 4096\n")
    with NatsServer(extra_args=["-c", str(config)]) as server:
        transport = NatsTransport(server.url)
        assert transport.max_payload == 1024 * 1024
        await transport.start()
        try:
            assert transport.max_payload == 4096
        finally:
            await transport.stop()


async def test_new_inbox_before_start() -> None:
    transport = NatsTransport()
    first, second = transport.new_inbox(), transport.new_inbox()
    assert first.startswith("_INBOX.")
    assert first != second


async def test_server_restart_reconnects_and_subscriptions_live_again(
    own_server: NatsServer,
) -> None:
    user_calls: list[str] = []

    async def disconnected_cb() -> None:
        user_calls.append("disconnected")

    async def reconnected_cb() -> None:
        user_calls.append("reconnected")

    transport = NatsTransport(
        own_server.url, disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb
    )
    listener = EventListener()
    transport.set_listener(listener)
    await transport.start()
    try:
        got = Collector()
        await transport.subscribe("bounce.here", got)
        await transport.publish("bounce.here", b"before")
        await got.wait_for(1)
        with anyio.fail_after(WAIT):
            own_server.stop()
            await listener.disconnected.wait()
            assert not listener.reconnected.is_set()
            own_server.start()
            await listener.reconnected.wait()
        await transport.publish("bounce.here", b"after")
        await got.wait_for(2)
        assert got.data == [b"before", b"after"]
        assert listener.closed_with == []
        assert user_calls == ["disconnected", "reconnected"]
    finally:
        await transport.stop()
    assert listener.closed_with == [None]


async def test_slow_consumer_drops_are_reported(nats_server: NatsServer) -> None:
    errors: list[Exception] = []

    async def error_cb(error: Exception) -> None:
        errors.append(error)

    transport = NatsTransport(nats_server.start().url, pending_msgs_limit=1, error_cb=error_cb)
    listener = EventListener()
    transport.set_listener(listener)
    await transport.start()
    release = anyio.Event()
    received: list[bytes] = []

    async def stuck(msg: Message) -> None:
        received.append(msg.data)
        listener.progress.notify()
        await release.wait()

    try:
        subscription = await transport.subscribe("slow.*", stuck)
        sent = 10
        for i in range(sent):
            await transport.publish("slow.consumer", str(i).encode())
        # The callback holds one message and the pending queue one more: the rest drop.
        await listener.progress.until(lambda: len(listener.dropped) >= sent - 2)
        release.set()
        await listener.progress.until(lambda: len(received) + len(listener.dropped) == sent)
        assert set(listener.dropped) == {(subscription, 1)}, "named by the subscription itself"
        assert len(errors) == len(listener.dropped), "the user's error_cb is called too"
    finally:
        release.set()
        await transport.stop()


async def test_giving_up_reconnecting_reports_closed_and_fails_calls(
    own_server: NatsServer,
) -> None:
    transport = NatsTransport(own_server.url, max_reconnect_attempts=1, reconnect_time_wait=0.05)
    listener = EventListener()
    transport.set_listener(listener)
    await transport.start()
    own_server.stop()
    with anyio.fail_after(WAIT):
        await listener.closed.wait()
    assert listener.disconnected.is_set()
    (error,) = listener.closed_with
    assert isinstance(error, TransportError)
    with pytest.raises(TransportError, match="closed"):
        await transport.publish("after.close", b"x")
    with pytest.raises(TransportError):
        await transport.subscribe("after.close", Collector())
    await transport.stop()
    assert len(listener.closed_with) == 1
