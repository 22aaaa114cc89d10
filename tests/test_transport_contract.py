"""The contract every Transport keeps, run on the memory transport and on NATS.

Absence is checked with ordering, never with sleeps: one publisher's messages reach one
subscription in publish order, so a message that must not arrive is published first and a
message that must arrive after it; once the latter is in, the former would have been too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest

from happen._errors import PayloadTooLargeError, TransportError
from happen._transport import NO_RESPONDERS, STATUS_HEADER, Message, Subscription, Transport

pytestmark = pytest.mark.anyio

WAIT = 10  # seconds; a test that needs this long has failed


class Collector:
    """A subscription callback that keeps what it receives and lets a test wait for it."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._changed = anyio.Event()

    async def __call__(self, msg: Message) -> None:
        self.messages.append(msg)
        self._changed.set()

    @property
    def data(self) -> list[bytes]:
        return [msg.data for msg in self.messages]

    @property
    def subjects(self) -> list[str]:
        return [msg.subject for msg in self.messages]

    async def wait_for(self, count: int) -> list[Message]:
        with anyio.fail_after(WAIT):
            while len(self.messages) < count:
                self._changed = anyio.Event()
                await self._changed.wait()
        return self.messages


class RecordingListener:
    """A TransportListener that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def on_disconnected(self) -> None:
        self.calls.append(("disconnected", None))

    def on_reconnected(self) -> None:
        self.calls.append(("reconnected", None))

    def on_closed(self, error: BaseException | None) -> None:
        self.calls.append(("closed", error))

    def on_dropped(self, subscription: Subscription, count: int) -> None:
        self.calls.append(("dropped", (subscription, count)))


@pytest.fixture
async def transport(make_transport: Callable[[], Transport]) -> Transport:
    t = make_transport()
    await t.start()
    return t


def header_frame(headers: dict[str, str]) -> int:
    """Wire size of NATS headers: "NATS/1.0\\r\\n", "k: v\\r\\n" each, then "\\r\\n"."""
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


async def test_is_a_transport(transport: Transport) -> None:
    assert isinstance(transport, Transport)


async def test_exact_subject(transport: Transport) -> None:
    got = Collector()
    await transport.subscribe("contract.exact", got)
    await transport.publish("contract.other", b"no")
    await transport.publish("contract.exact.deeper", b"no")
    await transport.publish("contract.exact", b"yes")
    messages = await got.wait_for(1)
    assert [(m.subject, m.data) for m in messages] == [("contract.exact", b"yes")]
    assert not messages[0].reply
    assert not messages[0].headers


async def test_headers_and_reply_subject_arrive(transport: Transport) -> None:
    got = Collector()
    await transport.subscribe("contract.hdr", got)
    await transport.publish("contract.hdr", b"x", reply="contract.back", headers={"K-1": "v 1"})
    (msg,) = await got.wait_for(1)
    assert msg.reply == "contract.back"
    assert msg.headers == {"K-1": "v 1"}


async def test_star_matches_one_token(transport: Transport) -> None:
    got = Collector()
    await transport.subscribe("contract.star.*", got)
    for subject in ("contract.star", "contract.star.a.b", "contract.starx.a"):
        await transport.publish(subject, b"no")
    await transport.publish("contract.star.a", b"1")
    await transport.publish("contract.star.b", b"2")
    await got.wait_for(2)
    assert got.subjects == ["contract.star.a", "contract.star.b"]


async def test_greater_than_matches_one_or_more_tokens(transport: Transport) -> None:
    got = Collector()
    await transport.subscribe("contract.gt.>", got)
    await transport.publish("contract.gt", b"no")
    await transport.publish("contract.other.a", b"no")
    await transport.publish("contract.gt.a", b"1")
    await transport.publish("contract.gt.a.b.c", b"2")
    await got.wait_for(2)
    assert got.subjects == ["contract.gt.a", "contract.gt.a.b.c"]


async def test_queue_group_shares_while_plain_subscribers_each_get_all(
    transport: Transport,
) -> None:
    group, plain = Collector(), Collector()
    members: list[list[bytes]] = [[], []]

    def member(own: list[bytes]) -> Callable[[Message], Awaitable[None]]:
        async def callback(msg: Message) -> None:
            own.append(msg.data)
            await group(msg)

        return callback

    for own in members:
        await transport.subscribe("contract.q", member(own), queue="workers")
    await transport.subscribe("contract.q", plain)
    sent = [str(i).encode() for i in range(60)]
    for data in sent:
        await transport.publish("contract.q", data)
    await plain.wait_for(len(sent))
    assert plain.data == sent
    await group.wait_for(len(sent))
    assert sorted(group.data) == sorted(sent), "each message goes to exactly one member"
    assert members[0] and members[1], "the group shares the load"


async def test_reply_inbox_round_trip(transport: Transport) -> None:
    async def responder(msg: Message) -> None:
        await transport.publish(msg.reply, msg.data[::-1], headers={"Echo": msg.subject})

    await transport.subscribe("contract.svc", responder)
    inbox = transport.new_inbox()
    assert inbox != transport.new_inbox()
    answers = Collector()
    await transport.subscribe(inbox, answers)
    await transport.publish("contract.svc", b"ping", reply=inbox)
    (answer,) = await answers.wait_for(1)
    assert answer.subject == inbox
    assert answer.data == b"gnip"
    assert answer.headers == {"Echo": "contract.svc"}


async def test_request_nobody_hears_gets_no_responders_status(transport: Transport) -> None:
    inbox = transport.new_inbox()
    status = Collector()
    await transport.subscribe(inbox, status)
    await transport.publish("contract.nobody.home", b"anyone?", reply=inbox)
    (msg,) = await status.wait_for(1)
    assert msg.headers is not None
    assert msg.headers[STATUS_HEADER] == NO_RESPONDERS
    assert msg.data == b""


async def test_publish_nobody_hears_is_dropped_silently(transport: Transport) -> None:
    await transport.publish("contract.nobody.listens", b"x")  # no error, no reply
    got = Collector()
    await transport.subscribe("contract.nobody.listens", got)
    await transport.publish("contract.nobody.listens", b"later")
    await got.wait_for(1)
    assert got.data == [b"later"]


async def test_one_publishers_messages_arrive_in_order(transport: Transport) -> None:
    got = Collector()
    await transport.subscribe("contract.order", got)
    sent = [i.to_bytes(4, "big") for i in range(500)]
    for data in sent:
        await transport.publish("contract.order", data)
    await got.wait_for(len(sent))
    assert got.data == sent


async def test_unsubscribe_stops_delivery(transport: Transport) -> None:
    gone, witness = Collector(), Collector()
    subscription = await transport.subscribe("contract.unsub", gone)
    await transport.subscribe("contract.unsub", witness)
    await transport.publish("contract.unsub", b"before")
    await gone.wait_for(1)
    await subscription.unsubscribe()
    await transport.publish("contract.unsub", b"after")
    await witness.wait_for(2)
    # a second round trip gives a late delivery to `gone` every chance to show up
    await transport.publish("contract.unsub", b"after-2")
    await witness.wait_for(3)
    assert gone.data == [b"before"]
    await subscription.unsubscribe()  # a second unsubscribe is harmless


async def test_callback_error_does_not_end_the_subscription(transport: Transport) -> None:
    got = Collector()

    async def flaky(msg: Message) -> None:
        await got(msg)
        if msg.data == b"boom":
            raise RuntimeError("callback failed")

    await transport.subscribe("contract.flaky", flaky)
    await transport.publish("contract.flaky", b"boom")
    await transport.publish("contract.flaky", b"fine")
    await got.wait_for(2)
    assert got.data == [b"boom", b"fine"]


async def test_payload_over_max_payload_is_refused(transport: Transport) -> None:
    got = Collector()
    await transport.subscribe("contract.big", got)
    limit = transport.max_payload
    assert limit > 1024
    with pytest.raises(PayloadTooLargeError, match=str(limit)):
        await transport.publish("contract.big", b"x" * (limit + 1))
    headers = {"Big": "v" * 100}
    data = b"x" * (limit - header_frame(headers) + 1)  # fits alone; over with its headers
    with pytest.raises(PayloadTooLargeError, match=str(limit)) as info:
        await transport.publish("contract.big", data, headers=headers)
    assert str(limit + 1) in str(info.value)
    # exactly at the limit passes, and the connection survives it
    await transport.publish("contract.big", data[:-1], headers=headers)
    await transport.publish("contract.big", b"small")
    await got.wait_for(2)
    assert [len(d) for d in got.data] == [len(data) - 1, 5]


async def test_header_with_line_break_is_refused(transport: Transport) -> None:
    got = Collector()
    await transport.subscribe("contract.crlf", got)
    for headers in ({"K": "a\r\nInjected: 1"}, {"K": "a\nb"}, {"K\r": "v"}):
        with pytest.raises(TransportError):
            await transport.publish("contract.crlf", b"x", headers=headers)
    await transport.publish("contract.crlf", b"ok")
    await got.wait_for(1)
    assert got.data == [b"ok"]


async def test_not_started_and_stopped_transports_refuse_work(
    make_transport: Callable[[], Transport],
) -> None:
    t = make_transport()
    with pytest.raises(TransportError):
        await t.publish("contract.early", b"x")
    with pytest.raises(TransportError):
        await t.subscribe("contract.early", Collector())
    await t.start()
    await t.stop()
    with pytest.raises(TransportError):
        await t.publish("contract.late", b"x")
    with pytest.raises(TransportError):
        await t.subscribe("contract.late", Collector())
    with pytest.raises(TransportError):
        await t.start()


async def test_stop_delivers_what_was_published_and_reports_closed_once(
    make_transport: Callable[[], Transport],
) -> None:
    t = make_transport()
    listener = RecordingListener()
    t.set_listener(listener)
    await t.start()
    got = Collector()
    await t.subscribe("contract.drain", got)
    sent = [str(i).encode() for i in range(100)]
    for data in sent:
        await t.publish("contract.drain", data)
    await t.stop()
    assert got.data == sent
    await t.stop()
    assert listener.calls == [("closed", None)]


@pytest.mark.parametrize("subject", ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "a.b*"])
async def test_invalid_subject_to_publish_to_is_refused(transport: Transport, subject: str) -> None:
    with pytest.raises(TransportError):
        await transport.publish(subject, b"x")


@pytest.mark.parametrize("subject", ["", "a..b", "a.>.b", "a.b*", "a b", "a\r\nPUB x 1"])
async def test_invalid_subject_to_subscribe_to_is_refused(
    transport: Transport, subject: str
) -> None:
    with pytest.raises(TransportError):
        await transport.subscribe(subject, Collector())
