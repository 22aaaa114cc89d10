"""Durable logs and buckets on JetStream: what survives, what fails fast, and which
JetStream resources they are (the ones docs/permissions.md grants)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import pytest
from nats.js import api

from happen._errors import TransportError
from happen._transport import ConsumerSettings, Entry, LogSettings, Retention, escape_key
from happen.transports.nats import NatsTransport
from tests.conftest import NatsServer, granting
from tests.helpers import PASSWORD, signed_in
from tests.test_durable_contract import unique
from tests.test_nats_transport import EventListener

pytestmark = [pytest.mark.anyio, pytest.mark.nats]

WAIT = 10.0
ACK_WAIT = 0.6


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def own_server() -> Iterator[NatsServer]:
    """A server this test may stop and restart without disturbing the others."""
    with NatsServer() as server:
        yield server


async def test_logs_and_buckets_outlive_the_connection(nats_server: NatsServer) -> None:
    name, bucket = unique("log"), unique("bucket")
    settings = LogSettings(max_msgs=100)
    reader = ConsumerSettings(ack_wait=ACK_WAIT)

    first = NatsTransport(nats_server.start().url)
    await first.start()
    log = await first.durable_log(name, settings)
    for i in range(3):
        await log.append("jobs", str(i).encode(), msg_id=f"m{i}")
    consumer = await log.consumer("worker", reader)
    done, unfinished = await consumer.fetch(2, timeout=WAIT)
    await done.ack()
    revision = await (await first.key_value(bucket)).put("k", b"kept")
    await first.stop()  # `unfinished` is left unsettled, as by a host that died

    second = NatsTransport(nats_server.url)
    await second.start()
    try:
        log = await second.durable_log(name, settings)
        assert (await log.append("jobs", b"0", msg_id="m0")).duplicate, "ids are remembered"
        consumer = await log.consumer("worker", reader)
        got = []
        with anyio.fail_after(WAIT):
            while len(got) < 2:
                got += await consumer.fetch(2, timeout=WAIT)
        assert sorted((d.data, d.delivery_count) for d in got) == [(b"1", 2), (b"2", 1)]
        assert unfinished.data == b"1"
        assert await (await second.key_value(bucket)).get("k") == Entry(b"kept", revision)
    finally:
        await second.stop()


async def test_logs_and_buckets_outlive_a_server_restart(own_server: NatsServer) -> None:
    transport = NatsTransport(own_server.url)
    listener = EventListener()
    transport.set_listener(listener)
    await transport.start()
    try:
        log = await transport.durable_log("restart", LogSettings())
        consumer = await log.consumer("worker", ConsumerSettings(ack_wait=ACK_WAIT))
        await log.append("jobs", b"before", msg_id="before")
        kv = await transport.key_value("restart")
        revision = await kv.put("k", b"v")
        (delivery,) = await consumer.fetch(1, timeout=WAIT)
        assert delivery.data == b"before"
        await delivery.ack()
        await log.append("jobs", b"stored", msg_id="stored")

        own_server.stop()  # killed, as in a crash; its file store stays
        with anyio.fail_after(WAIT):
            await listener.disconnected.wait()
        with anyio.fail_after(1), pytest.raises(TransportError, match="down"):
            await consumer.fetch(1, timeout=WAIT)
        with anyio.fail_after(1), pytest.raises(TransportError, match="down"):
            await log.append("jobs", b"refused", msg_id="refused")
        with anyio.fail_after(1), pytest.raises(TransportError, match="down"):
            await kv.get("k")

        own_server.start()
        with anyio.fail_after(WAIT):
            await listener.reconnected.wait()
        got = []
        with anyio.fail_after(WAIT):  # the pull subscription is made again
            while not got:
                got = await consumer.fetch(5, timeout=1)
        assert [d.data for d in got] == [b"stored"]
        await got[0].ack()
        assert (await log.append("jobs", b"x", msg_id="stored")).duplicate
        assert not (await log.append("jobs", b"after", msg_id="after")).duplicate
        (after,) = await consumer.fetch(1, timeout=WAIT)
        assert after.data == b"after"
        await after.ack()
        assert await kv.get("k") == Entry(b"v", revision)
        assert await kv.put("k", b"w", expect=revision) > revision
    finally:
        await transport.stop()


async def test_a_lost_consumer_is_made_again(nats_server: NatsServer) -> None:
    transport = NatsTransport(nats_server.start().url)
    await transport.start()
    try:
        log = await transport.durable_log(unique("log"))
        consumer = await log.consumer("worker")
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().delete_consumer(log.name, "worker")
        finally:
            await nc.close()
        await log.append("jobs", b"x", msg_id="m")
        (delivery,) = await consumer.fetch(1, timeout=WAIT)  # made again within the fetch
        assert delivery.data == b"x"
    finally:
        await transport.stop()


async def test_jetstream_resources_are_as_documented(nats_server: NatsServer) -> None:
    """The stream, consumer and bucket docs/permissions.md describes."""
    transport = NatsTransport(nats_server.start().url)
    await transport.start()
    nc = await nats.connect(nats_server.url)
    try:
        name, bucket = unique("log"), unique("bucket")
        log = await transport.durable_log(
            name, LogSettings(retention=Retention.INTEREST, max_msgs=7, dedup_window=30.0)
        )
        await log.consumer(
            "billing",
            ConsumerSettings(subjects=("order.*", "refund.>"), ack_wait=12.0, max_deliver=4),
        )
        kv = await transport.key_value(bucket)
        await kv.put("node-1.total:eur", b"1")

        js = nc.jetstream()
        stream = (await js.stream_info(name)).config
        assert stream.subjects == [f"$HAPPEN.log.{name}.>"]
        assert stream.retention == api.RetentionPolicy.INTEREST
        assert (stream.max_msgs, stream.discard) == (7, api.DiscardPolicy.NEW)
        assert stream.duplicate_window == 30.0
        assert stream.storage == api.StorageType.FILE
        consumer = (await js.consumer_info(name, "billing")).config
        assert consumer.durable_name == "billing"
        assert consumer.filter_subjects == [
            f"$HAPPEN.log.{name}.order.*",
            f"$HAPPEN.log.{name}.refund.>",
        ]
        assert (consumer.ack_wait, consumer.max_deliver) == (12.0, 4)
        assert consumer.ack_policy == api.AckPolicy.EXPLICIT
        assert consumer.max_ack_pending == -1
        bucket_stream = (await js.stream_info(f"KV_{bucket}")).config
        assert bucket_stream.max_msgs_per_subject == 1
        escaped = escape_key("node-1.total:eur")
        assert escaped == "node-1=2Etotal=3Aeur"
        raw = await js.get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{escaped}")
        assert raw.data == b"1"

        # a log is not any stream: one of the same name but other subjects is refused
        other = unique("foreign")
        await js.add_stream(name=other, subjects=[f"{other}.>"])
        with pytest.raises(TransportError, match="not this log"):
            await transport.durable_log(other)
    finally:
        await nc.close()
        await transport.stop()


def durable_grants(log: str, consumer: str, bucket: str, inbox: str) -> str:
    """The nats-server permissions docs/permissions.md gives a host that appends to and reads
    ``log`` as ``consumer``, and uses ``bucket``."""
    publish = [
        f"$HAPPEN.log.{log}.>",
        f"$JS.API.STREAM.INFO.{log}",
        f"$JS.API.STREAM.CREATE.{log}",
        f"$JS.API.STREAM.UPDATE.{log}",
        f"$JS.API.CONSUMER.CREATE.{log}.{consumer}",
        f"$JS.API.CONSUMER.CREATE.{log}.{consumer}.>",
        f"$JS.API.CONSUMER.INFO.{log}.{consumer}",
        f"$JS.API.CONSUMER.MSG.NEXT.{log}.{consumer}",
        f"$JS.ACK.{log}.{consumer}.>",
        f"$KV.{bucket}.>",
        f"$JS.API.STREAM.INFO.KV_{bucket}",
        f"$JS.API.STREAM.CREATE.KV_{bucket}",
        f"$JS.API.STREAM.MSG.GET.KV_{bucket}",
    ]
    allow = ", ".join(f'"{subject}"' for subject in publish)
    return (
        "authorization {\n  users = [\n"
        f'    {{ user: "host", password: "{PASSWORD}", permissions: {{\n'
        f"        publish: {{ allow: [{allow}] }}\n"
        f'        subscribe: {{ allow: ["{inbox}.>"] }}\n'
        "    } }\n  ]\n}\n"
    )


async def test_the_documented_grants_are_enough(tmp_path: Path) -> None:
    with granting(tmp_path, durable_grants("orders", "billing", "state", "_INBOX.hostA")) as server:
        transport = signed_in(
            server.url,
            "host",
            inbox_prefix="_INBOX.hostA",
            jetstream_timeout=1.0,  # a request the server refuses goes unanswered
        )
        await transport.start()
        try:
            log = await transport.durable_log("orders", LogSettings(max_msgs=10))
            log = await transport.durable_log("orders", LogSettings(max_msgs=20))  # update
            consumer = await log.consumer("billing", ConsumerSettings(subjects=("order.*",)))
            await log.consumer("billing", ConsumerSettings(subjects=("order.*", "refund.*")))
            await log.append("order.created", b"o", msg_id="o1")
            (delivery,) = await consumer.fetch(1, timeout=WAIT)
            await delivery.in_progress()
            await delivery.ack()
            assert await consumer.pending() in (0, 1)
            kv = await transport.key_value("state")
            revision = await kv.put("k", b"1", expect=0)
            assert await kv.get("k") == Entry(b"1", revision)
            await kv.delete("k", expect=revision)

            with pytest.raises(TransportError):  # and nothing more
                await transport.durable_log("other")
            with pytest.raises(TransportError):
                await log.consumer("audit")
        finally:
            await transport.stop()
