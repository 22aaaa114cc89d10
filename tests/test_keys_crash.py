"""Per-key order when the instance that owns a key is killed (SIGKILL), over NATS.

What the docs promise for a node that is not durable: the events of the key that the killed
instance had admitted are lost with it (their callers get ``HostLostError`` within
``liveness_timeout``); the key's later events run on a surviving instance, in the order it
accepts them, and none of them starts before the killed instance's lease has run out. Events
sent meanwhile wait (held at the instance they reached), rather than fail.

For a durable node: the key's events the killed instance had fetched (running, or waiting
behind the key) run again on a survivor, in log order, before the key's later events; their
callers get their results from the survivor.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest

import happen
from happen._keys import keys_bucket
from happen._partitions import Ownership
from happen.transports.nats import NatsTransport
from tests.conftest import NatsServer
from tests.helpers import eventually, running_process, unique_namespace

pytestmark = [pytest.mark.anyio, pytest.mark.nats]

WORKER = str(Path(__file__).parent / "workers" / "keyed.py")
LEASE = 1.0  # the liveness_timeout of every system here, and so the key lease
WAIT = 20


def worker_process(
    url: str, ns: str, lease: float = LEASE, *extra: str
) -> AbstractAsyncContextManager[anyio.abc.Process]:
    return running_process([sys.executable, WORKER, url, ns, str(lease), *extra])


async def remote_stats(url: str, ns: str, pid: int) -> dict[str, Any]:
    """Node ``ledger``'s stats in the process ``pid``, as ``happen stats`` reads them."""
    transport = NatsTransport(url)
    await transport.start()
    try:
        found: dict[str, Any] = {}
        answered = anyio.Event()

        async def on_reply(msg: happen.Message) -> None:
            report = msgspec.json.decode(msg.data)
            if report.get("pid") == pid:
                found.update(report["nodes"].get("ledger", {}))
                answered.set()

        inbox = transport.new_inbox()
        await transport.subscribe(inbox, on_reply)
        await transport.publish(f"{ns}.stats", b"{}", reply=inbox)
        with anyio.fail_after(5):
            await answered.wait()
        return found
    finally:
        await transport.stop()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_killed_owners_keys_run_on_a_survivor_after_its_lease(
    nats_server: NatsServer,
) -> None:
    url = nats_server.start().url
    ns = unique_namespace()
    here = os.getpid()
    starts: list[tuple[int, float]] = []
    async with (
        worker_process(url, ns) as process,
        happen.System(transport=url, namespace=ns, liveness_timeout=LEASE) as system,
    ):
        ledger = system.create_node("ledger")

        @ledger.on("op")
        async def op(event: happen.Event, context: dict[str, Any]) -> dict[str, Any]:
            starts.append((event.payload["n"], anyio.current_time()))
            return {"pid": here, "n": event.payload["n"]}

        observer = system.create_node("observer")
        hanging = anyio.Event()
        observer.on("started", lambda event, context: hanging.set())
        client = system.create_node("client")

        # Both instances take part; find a key the worker process owns.
        key = None
        with anyio.fail_after(WAIT):
            while key is None:
                for n in range(64):
                    try:
                        got = await client.send(
                            "ledger", {"type": "op", "payload": {"n": 0}}, key=f"k{n}", timeout=2
                        )
                    except (happen.NodeNotFoundError, happen.SendTimeout):
                        await anyio.sleep(0.05)
                        break
                    if got["pid"] == process.pid:
                        key = f"k{n}"
                        break
        worker_pid = process.pid
        starts.clear()
        lost: list[BaseException] = []

        async def send(n: int, hang: bool = False) -> Any:
            payload = {"n": n, "hang": hang}
            return await client.send("ledger", {"type": "op", "payload": payload}, key=key)

        async def doomed(n: int, hang: bool = False) -> None:
            try:
                await send(n, hang)
            except happen.HappenError as exc:
                lost.append(exc)

        results: dict[int, Any] = {}

        async def later(n: int) -> None:
            results[n] = await send(n)

        async with anyio.create_task_group() as tg:
            tg.start_soon(doomed, 1, True)  # runs on the worker, and hangs there
            with anyio.fail_after(WAIT):
                await hanging.wait()
            tg.start_soon(doomed, 2)  # waits behind it, on the worker
            with anyio.fail_after(WAIT):
                # (polling another process's counters, bounded)
                while (await remote_stats(url, ns, worker_pid)).get("keyed_waiting") != 1:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            await process.wait()
            died = anyio.current_time()
            for n, waiting in ((3, 1), (4, 2)):  # sent while nobody owns the key
                tg.start_soon(later, n)
                await eventually(lambda w=waiting: ledger.stats().keyed_waiting == w, WAIT)
        assert len(lost) == 2 and all(isinstance(exc, happen.HostLostError) for exc in lost)
        assert results == {3: {"pid": here, "n": 3}, 4: {"pid": here, "n": 4}}
        assert [n for n, _ in starts] == [3, 4], "in the order the survivor accepted them"
        assert starts[0][1] - died >= 0.5 * LEASE, "not before the killed owner's lease ran out"
        assert (await send(5))["pid"] == here
    stats = ledger.stats()
    assert stats.accepted == stats.completed and stats.failed == stats.rejected == 0


DURABLE_LEASE = 2.0  # the liveness_timeout of both processes of the durable test
ACK_WAIT = 3.0  # the durable ledger's ack_wait there (longer than the lease)


async def partitions_settled(url: str, ns: str, instances: int) -> None:
    """Wait until node ``ledger``'s key record has ``instances`` members and no partition
    is being handed over (so a key's owner found now stays its owner)."""
    transport = NatsTransport(url)
    await transport.start()
    try:
        bucket = await transport.key_value(keys_bucket(ns))
        with anyio.fail_after(WAIT):
            while True:
                entry = await bucket.get("ledger")
                if entry is not None:
                    table = msgspec.msgpack.decode(entry.value, type=Ownership)
                    if len(table.members) == instances and not any(table.incoming):
                        return
                await anyio.sleep(0.05)  # (polling the server's record, bounded)
    finally:
        await transport.stop()


async def find_key_of(client: happen.Node, pid: int) -> str:
    """A key whose partition the process ``pid`` owns (it answers the key's events)."""
    with anyio.fail_after(WAIT):
        while True:
            for n in range(64):
                payload = {"n": 0}
                got = await client.send("ledger", {"type": "op", "payload": payload}, key=f"k{n}")
                if got["pid"] == pid:
                    return f"k{n}"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_killed_owners_durable_events_run_again_first_on_a_survivor(
    nats_server: NatsServer,
) -> None:
    url = nats_server.start().url
    ns = unique_namespace()
    here = os.getpid()
    starts: list[tuple[int, int]] = []  # (n, delivery)
    delivery = {"patterns": {"ledger": {"durable": True, "ack_wait": ACK_WAIT}}}
    async with (
        worker_process(url, ns, DURABLE_LEASE, str(ACK_WAIT)) as process,
        happen.System(
            transport=url, namespace=ns, liveness_timeout=DURABLE_LEASE, delivery=delivery
        ) as system,
    ):
        ledger = system.create_node("ledger")

        @ledger.on("op")
        async def op(event: happen.Event, context: dict[str, Any]) -> dict[str, Any]:
            starts.append((event.payload["n"], event.delivery))
            return {"pid": here, "n": event.payload["n"]}

        observer = system.create_node("observer")
        hanging = anyio.Event()
        observer.on("started", lambda event, context: hanging.set())
        client = system.create_node("client")
        worker_pid = process.pid
        await client.enqueue("ledger", {"type": "op", "payload": {"n": 0}}, key="k0")
        await partitions_settled(url, ns, 2)  # (both instances take part, nothing moving)
        key = await find_key_of(client, worker_pid)
        starts.clear()
        results: dict[int, Any] = {}

        async def send(n: int, hang: bool = False) -> None:
            payload = {"n": n, "hang": hang}
            results[n] = await client.send(
                "ledger", {"type": "op", "payload": payload}, key=key, timeout=WAIT
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(send, 1, True)  # fetched by the worker, and hangs there
            with anyio.fail_after(WAIT):
                await hanging.wait()
            tg.start_soon(send, 2)  # fetched by the worker too: waits behind 1
            with anyio.fail_after(WAIT):
                # (polling another process's counters, bounded)
                while (await remote_stats(url, ns, worker_pid)).get("keyed_waiting") != 1:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            await process.wait()
            for n in (3, 4):  # stored while the key's partition has no live owner
                receipt = await client.enqueue(
                    "ledger", {"type": "op", "payload": {"n": n}}, key=key
                )
                assert not receipt.duplicate
            tg.start_soon(send, 5)
        # The killed owner's two events first (delivered again), then the later ones, in
        # log order, all on the survivor; their callers were answered from it.
        assert starts == [(1, 2), (2, 2), (3, 1), (4, 1), (5, 1)]
        assert results == {n: {"pid": here, "n": n} for n in (1, 2, 5)}
        await eventually(lambda: ledger.stats().completed >= 5, WAIT)
    stats = ledger.stats()
    assert stats.redelivered == 2
    assert stats.accepted == stats.completed and stats.failed == stats.rejected == 0
