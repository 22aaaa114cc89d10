"""A third party that saw one conversation cannot forge another: reply tokens are random."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import pytest

import happen
from happen._codec import make_codec
from happen._transport import Message, Transport
from happen._wire import Wire
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


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("draw", ["new_token", "new_secret"])
def test_a_forked_process_never_reuses_its_parents_reply_tokens(draw: str) -> None:
    # Tokens and call secrets are drawn from the random source a batch at a time: a child
    # forked with part of a batch left must draw its own, not hand out the ones its parent
    # will hand out too.
    wire = Wire(make_codec("msgpack", 64), "forked")
    new = getattr(wire, draw)
    new()  # a batch drawn, most of it left
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next tokens, then leave at once
        try:
            os.write(write, " ".join(new() for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {new() for _ in range(8)}
    assert len(child) == 8
    assert len(parent) == 8
    assert not child & parent
