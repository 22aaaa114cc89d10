"""Helpers shared by the tests: a system per test, and waiting on conditions."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

import happen

if TYPE_CHECKING:
    from happen.transports.nats import NatsTransport

_namespaces = itertools.count()


def unique_namespace() -> str:
    """A namespace no other test uses, so tests sharing one nats-server never interfere."""
    return f"t{os.getpid()}x{next(_namespaces)}"


def make_system(transport_url: str, **kwargs: Any) -> happen.System:
    """A system on the test's transport, in a namespace of its own."""
    kwargs.setdefault("namespace", unique_namespace())
    return happen.System(transport=transport_url, **kwargs)


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds, checking at every turn of the loop (bounded)."""
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 (polling a condition, bounded)
            await anyio.sleep(0.001)


async def drained(*nodes: happen.Node, timeout: float = 5.0) -> None:
    """Wait until the nodes run nothing, queue nothing, and hold nothing to retry or to
    dead-letter (as their stats say)."""

    def idle() -> bool:
        return all(
            not (s.active or s.queued or s.retrying or s.dead_letters_pending)
            for s in (n.stats() for n in nodes)
        )

    await eventually(idle, timeout)


def assert_accounted(node: happen.Node, sent: int) -> happen.NodeStats:
    """Every event that reached ``node`` is counted once, and every accepted one has its
    one outcome: completed, failed or dead-lettered."""
    stats = node.stats()
    assert stats.accepted + stats.rejected + stats.dropped == sent, stats
    assert stats.completed + stats.failed + stats.dead_lettered == stats.accepted, stats
    assert stats.active == 0 and stats.queued == 0, stats
    assert stats.retrying == 0 and stats.dead_letters_pending == 0, stats
    return stats


async def subscriptions_live(node: happen.Node) -> None:
    """Return once the subscriptions ``node``'s system made so far are live on the server.

    A request nobody hosts travels through the server on the system's own connection, after
    its subscriptions: once its "no responders" answer is back, they are registered, so
    another connection (another host, a raw client) can reach them.
    """
    try:
        await node.send("zz-nobody-hosts-this", {"type": "probe"}, timeout=5)
    except happen.NodeNotFoundError:
        return
    raise AssertionError("no node should be hosting 'zz-nobody-hosts-this'")


async def observed_inbox(system: happen.System, transport: Any) -> str:
    """The system's reply inbox prefix (``"<inbox>."``), as a peer on ``transport`` (started)
    sees it in a request from that system: what a third party who saw one call learns."""
    seen = anyio.Event()
    subjects: list[str] = []

    async def spy(msg: Any) -> None:
        subjects.append(msg.reply)
        seen.set()

    sub = await transport.subscribe(f"{system.namespace}.node.zz-spy", spy)
    await flushed(transport)
    await system.ready()
    asker = system.create_node(f"zz-asker{next(_namespaces)}")

    async def ask() -> None:
        await asker.send("zz-spy", {"type": "look"})  # never answered: cancelled below

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask)
        with anyio.fail_after(10):
            await seen.wait()
        tg.cancel_scope.cancel()  # the asker gives up at once
    await sub.unsubscribe()
    return subjects[0].rpartition(".")[0] + "."


async def flushed(transport: Any) -> None:
    """Return once the subscriptions ``transport`` (started) made so far are live on the
    server: a request nobody hears comes back "no responders" only after them."""
    answered = anyio.Event()

    async def on_status(msg: Any) -> None:
        answered.set()

    inbox = transport.new_inbox()
    sub = await transport.subscribe(inbox, on_status)
    await transport.publish(f"zz-nobody.{next(_namespaces)}", b"", reply=inbox)
    with anyio.fail_after(10):
        await answered.wait()
    await sub.unsubscribe()


@asynccontextmanager
async def running_process(args: Sequence[str]) -> AsyncIterator[anyio.abc.Process]:
    """A child process for the duration of the block: killed (if it still runs) and
    reaped at the end, even when the test was cancelled."""
    process = await anyio.open_process(list(args))
    try:
        yield process
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


#: The password of every user an ``authorization`` block names.
PASSWORD = "secret"


def authorization(namespace: str, users: dict[str, list[str]]) -> str:
    """A nats-server authorization block: each user (password ``PASSWORD``) may publish to
    what its list names, plus ``NAMESPACE.>`` and any inbox, and subscribe to those two."""
    core = [f"{namespace}.>", "_INBOX.>"]
    subscribe = ", ".join(f'"{subject}"' for subject in core)
    blocks = []
    for name, publish in users.items():
        allow = ", ".join(f'"{subject}"' for subject in dict.fromkeys([*core, *publish]))
        blocks.append(
            f'    {{ user: "{name}", password: "{PASSWORD}", permissions: {{\n'
            f"        publish: {{ allow: [{allow}] }}\n"
            f"        subscribe: {{ allow: [{subscribe}] }}\n"
            "    } }\n"
        )
    return "authorization {\n  users = [\n" + "".join(blocks) + "  ]\n}\n"


def signed_in(url: str, user: str, **options: Any) -> NatsTransport:
    """A NATS transport to ``url`` signed in as ``user`` (password ``PASSWORD``)."""
    from happen.transports.nats import NatsTransport

    return NatsTransport(url, user=user, password=PASSWORD, **options)
