"""A third party that saw one conversation cannot forge another: reply tokens are random."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import pytest

import happen
from happen._transport import Message, Transport
from tests.helpers import flushed, unique_namespace

pytestmark = pytest.mark.anyio

WAIT = 10


async def test_a_seen_reply_subject_does_not_lead_to_another_callers_result(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    server = happen.System(transport=make_transport(), namespace=ns)
    client = happen.System(transport=make_transport(), namespace=ns)
    release = anyio.Event()
    slow = server.create_node("slow")

    @slow.on("work")
    async def work(e: happen.Event, c: dict[str, Any]) -> str:
        await release.wait()
        return "real"

    raw = make_transport()
    seen: list[str] = []
    spied = anyio.Event()

    async def spy(msg: Message) -> None:  # the attacker hosts a node the client calls
        seen.append(msg.reply)
        spied.set()
        await raw.publish(msg.reply, msgspec.msgpack.encode({"k": "res", "value": "spy"}))

    async with server, client:
        await server.ready()
        await raw.start()
        await raw.subscribe(f"{ns}.node.spy", spy, queue="spy")
        await flushed(raw)
        caller = client.create_node("caller")
        results: list[Any] = []

        async def victim() -> None:
            results.append(await caller.send("slow", {"type": "work"}, timeout=WAIT))

        async with anyio.create_task_group() as tg:
            tg.start_soon(victim)
            assert await caller.send("spy", {"type": "look"}, timeout=WAIT) == "spy"
            with anyio.fail_after(WAIT):
                await spied.wait()
            prefix, _, token = seen[0].rpartition(".")
            guesses = {f"{prefix}.{token}"}
            if all(ch in "0123456789abcdef" for ch in token):
                number = int(token, 16)
                guesses |= {f"{prefix}.{number + k:x}" for k in range(-64, 65) if number + k >= 0}
            for subject in guesses:  # what an attacker who saw one token would try
                forged = msgspec.msgpack.encode({"k": "res", "value": "forged"})
                await raw.publish(subject, forged)
            release.set()
        assert results == ["real"]
