"""Only a call's owner can give it up: an abandon or a cancel carries the call's secret.

A third party that saw a request (its reply subject, its seal) cannot abandon it, nor cancel
another caller's stream; the caller's own abandon and cancel still work.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

import happen
from happen._transport import Transport
from tests.helpers import assert_accounted, drained, eventually, observed_inbox, unique_namespace
from tests.raw_peer import WAIT, RawPeer

pytestmark = pytest.mark.anyio

FORGED_SECRETS = ["", "00" * 16]  # none, and a guess


async def test_a_third_party_who_saw_a_request_cannot_abandon_it(
    make_transport: Callable[[], Transport],
) -> None:
    system = happen.System(transport=make_transport(), namespace=unique_namespace())
    ns = system.namespace
    node = system.create_node("slow")
    started, release, cancelled = anyio.Event(), anyio.Event(), anyio.Event()

    @node.on("work")
    async def work(event: happen.Event, context: dict) -> str:
        started.set()
        try:
            await release.wait()
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise
        return "done"

    client = system.create_node("client")
    spy = await RawPeer(make_transport()).start()
    async with system:
        await system.ready()
        requests = await spy.listen(f"{ns}.node.slow")  # a copy of every request to the node
        results: list[str] = []

        async def victim() -> None:
            results.append(await client.send("slow", {"type": "work"}, timeout=WAIT))

        async with anyio.create_task_group() as tg:
            tg.start_soon(victim)
            await requests.wait_for(1)
            with anyio.fail_after(WAIT):
                await started.wait()
            (msg, request) = requests.messages[0]
            for secret in [*FORGED_SECRETS, request.get("seal", "")]:
                await spy.publish(
                    f"{ns}.cancel.slow", {"k": "abandon", "reply": msg.reply, "secret": secret}
                )
            await eventually(lambda: system.bad_inputs == 3 or cancelled.is_set(), timeout=WAIT)
            assert not cancelled.is_set(), "a stranger's abandon cancelled the handler"
            release.set()
        assert results == ["done"]
        await drained(node)
        assert assert_accounted(node, sent=1).completed == 1


async def test_a_third_party_cannot_cancel_another_callers_stream(
    make_transport: Callable[[], Transport],
) -> None:
    system = happen.System(transport=make_transport(), namespace=unique_namespace())
    ns = system.namespace
    node = system.create_node("feed")
    go, finalised = anyio.Event(), anyio.Event()

    @node.on("items")
    async def items(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
        try:
            yield 0
            await go.wait()
            for i in range(1, 1000):
                yield i
        finally:
            finalised.set()

    client = system.create_node("client")
    spy = await RawPeer(make_transport()).start()
    async with system:
        # The spy hears every request to the node and every frame to the caller's inbox.
        inbox = await observed_inbox(system, spy.transport)
        requests = await spy.listen(f"{ns}.node.feed")
        replies = await spy.listen(inbox + "*")
        got: list[int] = []
        async with client.stream("feed", {"type": "items"}) as stream:
            async for item in stream:
                got.append(item)
                if item == 0:
                    await replies.wait_until(lambda: "start" in replies.kinds)
                    (msg, request) = requests.messages[0]
                    control = replies.frames[replies.kinds.index("start")]["control"]
                    for secret in [*FORGED_SECRETS, request.get("seal", "")]:
                        await spy.publish(
                            f"{ns}.cancel.feed",
                            {"k": "abandon", "reply": msg.reply, "secret": secret},
                        )
                        await spy.publish(control, {"k": "cancel", "secret": secret})
                    await eventually(
                        lambda: system.bad_inputs == 6 or finalised.is_set(), timeout=WAIT
                    )
                    assert not finalised.is_set(), "a stranger cancelled the stream"
                    go.set()
        assert got == list(range(1000))
        await drained(node)
        assert assert_accounted(node, sent=1).completed == 1


async def test_the_callers_own_abandon_and_cancel_still_work(transport_url: str) -> None:
    system = happen.System(transport=transport_url, namespace=unique_namespace())
    node = system.create_node("worker")
    cancelled, finalised = anyio.Event(), anyio.Event()

    @node.on("stuck")
    async def stuck(event: happen.Event, context: dict) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()

    @node.on("forever")
    async def forever(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
        try:
            while True:
                yield "x"
        finally:
            finalised.set()

    client = system.create_node("client")
    async with system:
        with pytest.raises(happen.SendTimeout):
            await client.send("worker", {"type": "stuck"}, timeout=0.2)
        with anyio.fail_after(WAIT):
            await cancelled.wait()
        async with client.stream("worker", {"type": "forever"}) as stream:
            async for _ in stream:
                break
        with anyio.fail_after(WAIT):
            await finalised.wait()
        await drained(node)
        assert system.bad_inputs == 0
        assert assert_accounted(node, sent=2).failed == 1  # the abandoned call
