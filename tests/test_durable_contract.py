"""The durable half of the transport contract: logs, consumers, deliveries and key-value
buckets, run on the memory transport (asyncio and trio) and on NATS JetStream.

Redelivery is a matter of time (``ack_wait``, a nak's delay): these tests use short waits,
fetch with a timeout rather than sleep, and bound what they measure loosely (the machine is
shared), never to the millisecond. The memory transport's clock is the event loop's, so under
trio they run on a mock clock that jumps over every wait (the same assertions, no real time).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import anyio
import pytest
from trio.testing import MockClock

from happen._errors import PayloadTooLargeError, QueueFullError, TransportError
from happen._transport import (
    ConsumerSettings,
    Delivery,
    DurableLog,
    DurableTransport,
    Entry,
    KeyValue,
    LogConsumer,
    LogFullError,
    LogSettings,
    Retention,
    RevisionMismatch,
    Transport,
    durable_transport,
    escape_key,
    unescape_key,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        "asyncio",
        pytest.param(("trio", {"clock": MockClock(autojump_threshold=0)}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


WAIT = 5.0  # seconds: a fetch that should find something never needs this long
QUIET = 0.3  # seconds: a fetch that should find nothing waits this long
ACK_WAIT = 0.4  # seconds: the ack_wait of tests that wait for a redelivery


def unique(prefix: str) -> str:
    """A name no other test (or earlier run on the same server) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def transport(make_transport: Callable[[], Transport]) -> DurableTransport:
    (started_transport,) = await started(make_transport, 1)
    return started_transport


async def make_log(
    transport: DurableTransport,
    *,
    retention: Retention = Retention.WORK_QUEUE,
    max_msgs: int | None = None,
    dedup_window: float = 120.0,
) -> DurableLog:
    settings = LogSettings(retention=retention, max_msgs=max_msgs, dedup_window=dedup_window)
    return await transport.durable_log(unique("log"), settings)


async def make_consumer(
    log: DurableLog,
    name: str = "worker",
    *,
    subjects: tuple[str, ...] = (">",),
    ack_wait: float = 30.0,
    max_deliver: int | None = None,
) -> LogConsumer:
    settings = ConsumerSettings(subjects=subjects, ack_wait=ack_wait, max_deliver=max_deliver)
    return await log.consumer(name, settings)


async def started(make_transport: Callable[[], Transport], n: int) -> list[DurableTransport]:
    """``n`` started transports reaching the same broker (or server)."""
    hosts = []
    for _ in range(n):
        t = make_transport()
        await t.start()
        hosts.append(durable_transport(t))
    return hosts


async def fetch_one(consumer: LogConsumer, timeout: float = WAIT) -> Delivery:
    (delivery,) = await consumer.fetch(1, timeout=timeout)
    return delivery


async def pending_becomes(consumer: LogConsumer, expected: int) -> None:
    """Wait until ``consumer.pending() == expected``: on NATS an ack is fire-and-forget, so
    the server may count a message settled a moment ago."""
    with anyio.fail_after(WAIT):
        while await consumer.pending() != expected:  # noqa: ASYNC110 (server state, bounded)
            await anyio.sleep(0.02)


async def fetch_all(consumer: LogConsumer, count: int) -> list[Delivery]:
    """Exactly ``count`` deliveries, however many fetches that takes."""
    got: list[Delivery] = []
    with anyio.fail_after(WAIT):
        while len(got) < count:
            got += await consumer.fetch(count - len(got), timeout=WAIT)
    return got


# --- capability ------------------------------------------------------------------------------


async def test_both_transports_are_durable(transport: DurableTransport) -> None:
    assert isinstance(transport, DurableTransport)
    assert durable_transport(transport) is transport


async def test_a_transport_without_logs_is_refused_by_name() -> None:
    class BytesOnly:
        max_payload = 1024

        async def start(self) -> None: ...
        async def stop(self) -> None: ...
        async def publish(self, subject: str, data: bytes, **kw: object) -> None: ...
        async def subscribe(self, subject: str, callback: object, **kw: object) -> object: ...
        def new_inbox(self) -> str:
            return "_INBOX.x"

        def set_listener(self, listener: object) -> None: ...

    bytes_only = BytesOnly()
    assert isinstance(bytes_only, Transport)
    with pytest.raises(TransportError, match="BytesOnly has no durable logs"):
        durable_transport(bytes_only)


# --- appending and dedup ---------------------------------------------------------------------


async def test_append_gives_increasing_sequences(transport: DurableTransport) -> None:
    log = await make_log(transport)
    seqs = [(await log.append("jobs", b"x", msg_id=f"m{i}")).seq for i in range(3)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3


async def test_reappend_of_an_id_is_a_duplicate_even_after_its_ack(
    transport: DurableTransport,
) -> None:
    log = await make_log(transport)
    consumer = await make_consumer(log)
    first = await log.append("jobs", b"one", msg_id="order-7")
    assert not first.duplicate
    again = await log.append("jobs", b"other bytes", msg_id="order-7")
    assert again.duplicate and again.seq == first.seq
    delivery = await fetch_one(consumer)
    assert delivery.data == b"one"
    await delivery.ack()
    after_ack = await log.append("jobs", b"one", msg_id="order-7")
    assert after_ack.duplicate and after_ack.seq == first.seq
    assert await consumer.fetch(1, timeout=QUIET) == [], "a duplicate is not stored"
    await pending_becomes(consumer, 0)


async def test_an_id_is_new_again_once_the_dedup_window_passed(
    transport: DurableTransport,
) -> None:
    log = await make_log(transport, dedup_window=0.5)
    first = await log.append("jobs", b"x", msg_id="once")
    assert (await log.append("jobs", b"x", msg_id="once")).duplicate
    with anyio.fail_after(WAIT):
        while (later := await log.append("jobs", b"x", msg_id="once")).duplicate:  # noqa: ASYNC110
            await anyio.sleep(0.1)
    assert later.seq > first.seq


async def test_append_refuses_bad_subjects_ids_headers_and_sizes(
    transport: DurableTransport,
) -> None:
    log = await make_log(transport)
    for subject in ("", "a..b", "a.*", "a.>", "a b"):
        with pytest.raises(TransportError):
            await log.append(subject, b"x", msg_id="m")
    for msg_id in ("", " padded", "line\nbreak", "x" * 1025):
        with pytest.raises(TransportError):
            await log.append("jobs", b"x", msg_id=msg_id)
    for headers in ({"Nats-Expected-Stream": "other"}, {"nats-msg-id": "forged"}):
        with pytest.raises(TransportError, match="reserved"):
            await log.append("jobs", b"x", msg_id="m", headers=headers)
    with pytest.raises(PayloadTooLargeError):
        await log.append("jobs", b"x" * transport.max_payload, msg_id="big")
    consumer = await make_consumer(log)
    await pending_becomes(consumer, 0)


async def test_a_full_log_refuses_and_stores_nothing(transport: DurableTransport) -> None:
    log = await make_log(transport, max_msgs=2)
    consumer = await make_consumer(log)
    await log.append("jobs", b"1", msg_id="m1")
    await log.append("jobs", b"2", msg_id="m2")
    with pytest.raises(LogFullError) as info:
        await log.append("jobs", b"3", msg_id="m3")
    assert isinstance(info.value, QueueFullError)
    assert info.value.log == log.name and info.value.limit == 2
    assert (await log.append("jobs", b"1", msg_id="m1")).duplicate, "a duplicate is answered"
    await pending_becomes(consumer, 2)
    first = await fetch_one(consumer)
    await first.ack()
    with anyio.fail_after(WAIT):  # the ack frees a place (NATS: once the server has it)
        while True:
            try:
                await log.append("jobs", b"3", msg_id="m3")
                break
            except LogFullError:
                await anyio.sleep(0.05)
    got = await fetch_all(consumer, 2)
    assert [d.data for d in got] == [b"2", b"3"], "the refused append left nothing behind"


# --- fetching and settling -------------------------------------------------------------------


async def test_delivery_carries_what_was_appended(transport: DurableTransport) -> None:
    log = await make_log(transport)
    consumer = await make_consumer(log)
    appended = await log.append("jobs.eu", b"\x00payload", msg_id="ev-1", headers={"K": "v"})
    plain = await log.append("jobs.us", b"", msg_id="ev-2")
    first, second = await fetch_all(consumer, 2)
    assert (first.subject, first.data, first.headers) == ("jobs.eu", b"\x00payload", {"K": "v"})
    assert (first.msg_id, first.seq, first.delivery_count) == ("ev-1", appended.seq, 1)
    assert (second.subject, second.data, second.headers) == ("jobs.us", b"", None)
    assert (second.msg_id, second.seq) == ("ev-2", plain.seq)


async def test_fetch_takes_at_most_n_in_log_order(transport: DurableTransport) -> None:
    log = await make_log(transport)
    consumer = await make_consumer(log)
    for i in range(5):
        await log.append("jobs", str(i).encode(), msg_id=f"m{i}")
    first = await consumer.fetch(2, timeout=WAIT)
    assert [d.data for d in first] == [b"0", b"1"]
    await pending_becomes(consumer, 5)
    rest = await fetch_all(consumer, 3)
    assert [d.data for d in rest] == [b"2", b"3", b"4"]
    assert await consumer.fetch(5, timeout=QUIET) == []


async def test_fetch_returns_as_soon_as_one_message_comes(transport: DurableTransport) -> None:
    log = await make_log(transport)
    consumer = await make_consumer(log)
    got: list[Delivery] = []

    async def fetcher() -> None:
        got.extend(await consumer.fetch(10, timeout=20))

    with anyio.fail_after(10):  # well before the fetch's own timeout
        async with anyio.create_task_group() as tg:
            tg.start_soon(fetcher)
            await anyio.sleep(0.2)  # let the fetch start waiting (a real fetch, not a sleep test)
            await log.append("jobs", b"late", msg_id="late")
    assert [d.data for d in got] == [b"late"]


async def test_an_empty_fetch_returns_an_empty_list_after_its_timeout(
    transport: DurableTransport,
) -> None:
    consumer = await make_consumer(await make_log(transport))
    start = anyio.current_time()
    assert await consumer.fetch(3, timeout=QUIET) == []
    assert anyio.current_time() - start >= QUIET * 0.8


async def test_ack_settles(transport: DurableTransport) -> None:
    log = await make_log(transport)
    consumer = await make_consumer(log, ack_wait=ACK_WAIT)
    await log.append("jobs", b"x", msg_id="m")
    delivery = await fetch_one(consumer)
    await delivery.ack()
    await delivery.ack()  # a second settlement does nothing
    await delivery.in_progress()
    assert await consumer.fetch(1, timeout=ACK_WAIT * 2) == [], "no redelivery after an ack"
    await pending_becomes(consumer, 0)


async def test_no_ack_means_a_redelivery_after_ack_wait(transport: DurableTransport) -> None:
    log = await make_log(transport)
    consumer = await make_consumer(log, ack_wait=ACK_WAIT)
    await log.append("jobs", b"x", msg_id="m")
    first = await fetch_one(consumer)
    delivered = anyio.current_time()
    assert first.delivery_count == 1
    again = await fetch_one(consumer)
    assert anyio.current_time() - delivered >= ACK_WAIT * 0.8
    assert (again.seq, again.msg_id, again.data) == (first.seq, "m", b"x")
    assert again.delivery_count == 2
    await again.ack()
    await pending_becomes(consumer, 0)


async def test_in_progress_keeps_a_long_handler_from_redelivery(
    transport: DurableTransport,
) -> None:
    log = await make_log(transport)
    consumer = await make_consumer(log, ack_wait=ACK_WAIT)
    await log.append("jobs", b"slow", msg_id="m")
    delivery = await fetch_one(consumer)
    redelivered: list[Delivery] = []

    async def watcher() -> None:  # another fetch of the consumer, all the handler's time
        redelivered.extend(await consumer.fetch(1, timeout=ACK_WAIT * 3))

    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher)
        for _ in range(int(ACK_WAIT * 3 / 0.15)):  # the handler runs for 3 x ack_wait
            await anyio.sleep(0.15)
            await delivery.in_progress()
    assert redelivered == []
    await delivery.ack()
    await pending_becomes(consumer, 0)


async def test_nak_redelivers_after_its_delay(transport: DurableTransport) -> None:
    log = await make_log(transport)
    consumer = await make_consumer(log)  # ack_wait 30 s: only the nak brings it back
    await log.append("jobs", b"x", msg_id="m")
    first = await fetch_one(consumer)
    await first.nak(delay=0.5)
    naked = anyio.current_time()
    await pending_becomes(consumer, 1)
    second = await fetch_one(consumer)
    assert anyio.current_time() - naked >= 0.4
    assert (second.seq, second.delivery_count) == (first.seq, 2)
    await second.nak()  # no delay: at once
    third = await fetch_one(consumer, timeout=2)
    assert third.delivery_count == 3
    await third.ack()


async def test_term_stops_redelivery(transport: DurableTransport) -> None:
    log = await make_log(transport)
    consumer = await make_consumer(log, ack_wait=ACK_WAIT)
    await log.append("jobs", b"poison", msg_id="poison")
    await log.append("jobs", b"fine", msg_id="fine")
    poison = await fetch_one(consumer)
    await poison.term()
    fine = await fetch_one(consumer)
    assert fine.data == b"fine"
    await fine.ack()
    assert await consumer.fetch(1, timeout=ACK_WAIT * 2) == []
    await pending_becomes(consumer, 0)


async def test_max_deliver_stops_redelivery(transport: DurableTransport) -> None:
    log = await make_log(transport)
    consumer = await make_consumer(log, ack_wait=ACK_WAIT, max_deliver=2)
    await log.append("jobs", b"x", msg_id="m")
    assert (await fetch_one(consumer)).delivery_count == 1
    assert (await fetch_one(consumer)).delivery_count == 2
    assert await consumer.fetch(1, timeout=ACK_WAIT * 2.5) == []
    await pending_becomes(consumer, 0)


async def test_a_late_ack_settles_a_redelivered_message(transport: DurableTransport) -> None:
    log = await make_log(transport)
    consumer = await make_consumer(log, ack_wait=ACK_WAIT)
    await log.append("jobs", b"x", msg_id="m")
    first = await fetch_one(consumer)
    second = await fetch_one(consumer)  # first's host "stalled" past ack_wait
    assert second.delivery_count == 2
    await first.ack()  # the stalled host finishes after all
    await second.ack()  # and the second one too: no error
    assert await consumer.fetch(1, timeout=ACK_WAIT * 2) == []
    await pending_becomes(consumer, 0)


# --- several consumers, several fetchers -----------------------------------------------------


async def test_consumers_of_an_interest_log_each_get_a_copy(transport: DurableTransport) -> None:
    log = await make_log(transport, retention=Retention.INTEREST)
    billing = await make_consumer(log, "billing", subjects=("order.*",))
    audit = await make_consumer(log, "audit", subjects=(">",))
    await log.append("order.created", b"o1", msg_id="o1")
    await log.append("user.created", b"u1", msg_id="u1")
    assert [d.data for d in await fetch_all(audit, 2)] == [b"o1", b"u1"]
    (bill,) = await fetch_all(billing, 1)
    assert bill.data == b"o1"
    await bill.ack()
    await pending_becomes(billing, 0)
    await pending_becomes(audit, 2)


async def test_an_interest_log_keeps_nothing_no_consumer_reads(
    transport: DurableTransport,
) -> None:
    log = await make_log(transport, retention=Retention.INTEREST)
    await log.append("order.created", b"early", msg_id="early")
    latecomer = await make_consumer(log, "late")
    await log.append("order.created", b"later", msg_id="later")
    assert [d.data for d in await fetch_all(latecomer, 1)] == [b"later"]
    assert await latecomer.fetch(1, timeout=QUIET) == []


async def test_a_work_queue_log_keeps_messages_until_a_consumer_comes(
    transport: DurableTransport,
) -> None:
    log = await make_log(transport)
    await log.append("jobs", b"early", msg_id="early")
    latecomer = await make_consumer(log, "late")
    await pending_becomes(latecomer, 1)
    assert [d.data for d in await fetch_all(latecomer, 1)] == [b"early"]


async def test_a_consumer_reads_only_its_subjects(transport: DurableTransport) -> None:
    log = await make_log(transport)
    eu = await make_consumer(log, "eu", subjects=("jobs.eu.>",))
    us = await make_consumer(log, "us", subjects=("jobs.us", "jobs.us.*"))
    for subject in ("jobs.eu.fr", "jobs.us", "jobs.us.ny", "jobs.asia"):
        await log.append(subject, subject.encode(), msg_id=subject)
    assert [d.subject for d in await fetch_all(eu, 1)] == ["jobs.eu.fr"]
    assert [d.subject for d in await fetch_all(us, 2)] == ["jobs.us", "jobs.us.ny"]
    assert await eu.fetch(1, timeout=QUIET) == []


async def test_a_work_queue_log_refuses_overlapping_consumers(
    transport: DurableTransport,
) -> None:
    log = await make_log(transport)
    await make_consumer(log, "orders", subjects=("order.*",))
    with pytest.raises(TransportError, match="overlaps"):
        await make_consumer(log, "everything", subjects=(">",))
    with pytest.raises(TransportError, match="overlaps"):
        await make_consumer(log, "created", subjects=("*.created",))
    await make_consumer(log, "users", subjects=("user.*",))  # disjoint: fine
    await make_consumer(log, "orders", subjects=("order.*",))  # the same consumer again: fine


async def test_fetchers_of_one_consumer_share_its_messages(
    make_transport: Callable[[], Transport],
) -> None:
    hosts = await started(make_transport, 2)
    log = await make_log(hosts[0])
    for i in range(10):
        await log.append("jobs", str(i).encode(), msg_id=f"m{i}")
    shared_log = await hosts[1].durable_log(log.name, log.settings)
    a = await make_consumer(log, "worker")
    b = await make_consumer(shared_log, "worker")
    got_a = await a.fetch(4, timeout=WAIT)
    got_b = await fetch_all(b, 6)
    assert len(got_a) == 4
    assert sorted(d.data for d in got_a + got_b) == sorted(str(i).encode() for i in range(10))
    for delivery in got_a + got_b:
        await delivery.ack()
    assert await a.fetch(1, timeout=QUIET) == []
    await pending_becomes(b, 0)


async def test_a_fetch_that_returned_holds_nothing_back(
    make_transport: Callable[[], Transport],
) -> None:
    """A fetch that waited for a message and got one holds nothing more: a message appended
    after it returned goes to whichever handle of the consumer fetches next, at once (not
    into the first handle's buffer, to wait out ``ack_wait`` once it stops fetching)."""
    hosts = await started(make_transport, 2)
    log = await make_log(hosts[0])
    a = await make_consumer(log, "worker")
    b = await make_consumer(await hosts[1].durable_log(log.name, log.settings), "worker")
    got: list[Delivery] = []

    async def fetcher() -> None:
        got.extend(await a.fetch(5, timeout=20))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(fetcher)
            await anyio.sleep(0.2)  # let the fetch start waiting (a real fetch, not a sleep test)
            await log.append("jobs", b"first", msg_id="first")
    assert [d.data for d in got] == [b"first"]
    await log.append("jobs", b"second", msg_id="second")
    assert [d.data for d in await b.fetch(5, timeout=WAIT)] == [b"second"]


async def test_a_settlement_completes_though_its_task_is_cancelled(
    transport: DurableTransport,
) -> None:
    """An ack awaited in a cancelled scope still settles (a node acks as its worker may be
    cancelled, and relies on it)."""
    log = await make_log(transport)
    consumer = await make_consumer(log)
    await log.append("jobs", b"x", msg_id="m1")
    delivery = await fetch_one(consumer)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await delivery.ack()
    await pending_becomes(consumer, 0)


async def test_stored_counts_the_messages_under_a_filter(transport: DurableTransport) -> None:
    log = await make_log(transport)
    for i, subject in enumerate(["events", "keyed.0", "keyed.0", "keyed.63", "other.1"]):
        await log.append(subject, b"x", msg_id=f"m{i}")
    assert await log.stored("keyed.>") == 3
    assert await log.stored("keyed.0") == 2
    assert await log.stored("*") == 1
    assert await log.stored(">") == 5
    assert await log.stored("none.>") == 0
    consumer = await make_consumer(log, subjects=("keyed.0",))
    for delivery in await fetch_all(consumer, 2):
        await delivery.ack()  # a work-queue log forgets what its consumer settled
    with anyio.fail_after(WAIT):
        while await log.stored("keyed.>") != 1:  # noqa: ASYNC110 (server state, bounded)
            await anyio.sleep(0.02)
    with pytest.raises(TransportError, match="invalid subject filter"):
        await log.stored("a..b")


async def test_a_consumer_can_be_reconfigured(transport: DurableTransport) -> None:
    log = await make_log(transport)
    await make_consumer(log, "worker", ack_wait=30.0)
    consumer = await make_consumer(log, "worker", ack_wait=ACK_WAIT)
    await log.append("jobs", b"x", msg_id="m")
    await fetch_one(consumer)
    assert (await fetch_one(consumer, timeout=WAIT)).delivery_count == 2, "the new ack_wait"


async def test_a_log_cannot_change_its_retention(transport: DurableTransport) -> None:
    log = await make_log(transport)
    with pytest.raises(TransportError, match="retention"):
        await transport.durable_log(log.name, LogSettings(retention=Retention.INTEREST))


async def test_invalid_names_and_settings_are_refused(transport: DurableTransport) -> None:
    for name in ("", "a.b", "a b", "a*", "x" * 256):
        with pytest.raises(TransportError):
            await transport.durable_log(name)
        with pytest.raises(TransportError):
            await transport.key_value(name)
    log = await make_log(transport)
    with pytest.raises(TransportError):
        await log.consumer("a.b")
    for bad in ({"max_msgs": 0}, {"dedup_window": 0.0}):
        with pytest.raises(ValueError):
            LogSettings(**bad)  # type: ignore[arg-type]
    for bad_consumer in ({"subjects": ()}, {"subjects": ("a.>.b",)}, {"ack_wait": 0.0}):
        with pytest.raises(ValueError):
            ConsumerSettings(**bad_consumer)  # type: ignore[arg-type]
    consumer = await make_consumer(log)
    with pytest.raises(ValueError):
        await consumer.fetch(0, timeout=QUIET)


async def test_a_stopped_transport_refuses_durable_work(
    make_transport: Callable[[], Transport],
) -> None:
    t = durable_transport(make_transport())
    with pytest.raises(TransportError):
        await t.durable_log(unique("log"))
    await t.start()
    log = await make_log(t)
    consumer = await make_consumer(log)
    await log.append("jobs", b"x", msg_id="m")
    delivery = await fetch_one(consumer)
    kv = await t.key_value(unique("bucket"))
    await t.stop()
    with pytest.raises(TransportError):
        await log.append("jobs", b"y", msg_id="n")
    with pytest.raises(TransportError):
        await consumer.fetch(1, timeout=QUIET)
    with pytest.raises(TransportError):
        await delivery.ack()
    with pytest.raises(TransportError):
        await kv.get("k")


async def test_a_closed_consumer_handle_refuses_to_fetch(transport: DurableTransport) -> None:
    log = await make_log(transport)
    consumer = await make_consumer(log)
    await consumer.close()
    await consumer.close()
    with pytest.raises(TransportError, match="closed"):
        await consumer.fetch(1, timeout=QUIET)
    again = await make_consumer(log)  # the consumer itself stays
    await log.append("jobs", b"x", msg_id="m")
    assert (await fetch_one(again)).data == b"x"


# --- key-value buckets -----------------------------------------------------------------------


@pytest.fixture
async def bucket(transport: DurableTransport) -> KeyValue:
    return await transport.key_value(unique("bucket"))


async def test_put_then_get(bucket: KeyValue) -> None:
    assert await bucket.get("k") is None
    revision = await bucket.put("k", b"v1")
    assert await bucket.get("k") == Entry(b"v1", revision)
    assert await bucket.get("other") is None


async def test_revisions_only_increase_across_the_bucket(bucket: KeyValue) -> None:
    revisions = [await bucket.put(key, b"x") for key in ("a", "b", "a", "c")]
    await bucket.delete("b")
    revisions.append(await bucket.put("b", b"again"))
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)


async def test_compare_and_set_refuses_a_stale_revision_with_the_current_entry(
    bucket: KeyValue,
) -> None:
    first = await bucket.put("account-7", b"100")
    second = await bucket.put("account-7", b"90", expect=first)
    with pytest.raises(RevisionMismatch) as info:
        await bucket.put("account-7", b"80", expect=first)
    assert info.value.current == Entry(b"90", second)
    assert (info.value.key, info.value.expected, info.value.bucket) == (
        "account-7",
        first,
        bucket.bucket,
    )
    assert await bucket.get("account-7") == Entry(b"90", second), "nothing was written"
    with pytest.raises(RevisionMismatch) as missing:
        await bucket.put("never-written", b"x", expect=first)
    assert missing.value.current is None


async def test_expect_zero_creates_only_a_missing_key_even_after_a_delete(
    bucket: KeyValue,
) -> None:
    created = await bucket.put("lock", b"me", expect=0)
    with pytest.raises(RevisionMismatch) as info:
        await bucket.put("lock", b"you", expect=0)
    assert info.value.current == Entry(b"me", created)
    await bucket.delete("lock")
    assert await bucket.get("lock") is None
    recreated = await bucket.put("lock", b"you", expect=0)
    assert await bucket.get("lock") == Entry(b"you", recreated)


async def test_delete_with_a_stale_revision_is_refused(bucket: KeyValue) -> None:
    first = await bucket.put("k", b"1")
    second = await bucket.put("k", b"2")
    with pytest.raises(RevisionMismatch) as info:
        await bucket.delete("k", expect=first)
    assert info.value.current == Entry(b"2", second)
    with pytest.raises(RevisionMismatch):
        await bucket.delete("k", expect=0)  # "must not exist", and it does
    await bucket.delete("k", expect=second)
    assert await bucket.get("k") is None


async def test_delete_of_a_missing_key_does_nothing_unless_a_revision_is_expected(
    bucket: KeyValue,
) -> None:
    await bucket.delete("ghost")
    await bucket.delete("ghost", expect=0)
    with pytest.raises(RevisionMismatch) as info:
        await bucket.delete("ghost", expect=12345)
    assert info.value.current is None
    assert await bucket.get("ghost") is None


async def test_keys_are_escaped_and_kept_apart(bucket: KeyValue) -> None:
    keys = ["node-1.order:7", "node-1=2Eorder:7", "a b/ü", "=", ".", "*", ">", "x" * 300]
    for i, key in enumerate(keys):
        await bucket.put(key, str(i).encode())
    for i, key in enumerate(keys):
        entry = await bucket.get(key)
        assert entry is not None and entry.value == str(i).encode(), key
    for bad in ("", "x" * 1025, "é" * 200):
        with pytest.raises(TransportError):
            await bucket.put(bad, b"x")


async def test_a_value_over_the_limit_is_refused(
    transport: DurableTransport, bucket: KeyValue
) -> None:
    with pytest.raises(PayloadTooLargeError):
        await bucket.put("big", b"x" * transport.max_payload)
    assert await bucket.get("big") is None


async def test_negative_expect_is_a_programming_error(bucket: KeyValue) -> None:
    with pytest.raises(ValueError):
        await bucket.put("k", b"x", expect=-1)


async def test_buckets_are_shared_by_name(make_transport: Callable[[], Transport]) -> None:
    one, two = make_transport(), make_transport()
    await one.start()
    await two.start()
    name = unique("bucket")
    revision = await (await durable_transport(one).key_value(name)).put("k", b"v")
    assert await (await durable_transport(two).key_value(name)).get("k") == Entry(b"v", revision)


def test_key_escaping_round_trips() -> None:
    for key in ["plain", "node-1.order:7", "=41", "a b/ü", "\x00", "😀"]:
        escaped = escape_key(key)
        assert all((c.isalnum() and c.isascii()) or c in "-_=" for c in escaped)
        assert unescape_key(escaped) == key
    assert escape_key("node-1.x") != escape_key("node-1=2Ex")
