"""``happen stats [--watch]``: every node of a namespace, on every host, with its counters.

Every running System answers a request on ``{namespace}.stats`` with one JSON reply::

    {"system": "<id>", "host": "<hostname>", "pid": 123,
     "nodes": {"<node id>": {"active": 0, "queued": 0, ...}}}

The command publishes one request with a reply inbox, collects the replies that arrive
within ``--wait`` seconds and prints one table row per node per system.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from typing import Any

import anyio
import msgspec

import happen
from happen.cli._exit import EXIT_FAILED, EXIT_OK, STOP_SIGNALS, CommandError
from happen.cli._jsonline import write_line
from happen.cli._settings import NAMESPACE, TRANSPORT, require_nats

__all__ = ["StatsReply", "collect", "render_table", "stats"]

#: Seconds between two refreshes of ``--watch``.
WATCH_INTERVAL = 1.0
CLEAR_SCREEN = "\x1b[H\x1b[2J"
# The header and code NATS puts on the answer to a request that nobody subscribes to.
STATUS_HEADER, NO_RESPONDERS = "Status", "503"

#: The columns shown first, in this order, with their headings; other counters follow.
KNOWN_COUNTERS = {
    "active": "ACTIVE",
    "queued": "QUEUED",
    "max_concurrent": "MAX",
    "queue_limit": "LIMIT",
    "under_pressure": "PRESSURE",
    "accepted": "ACCEPTED",
    "completed": "COMPLETED",
    "failed": "FAILED",
    "rejected": "REJECTED",
    "dropped": "DROPPED",
}


class StatsReply(msgspec.Struct, frozen=True):
    """One system's answer to a stats request."""

    system: str
    host: str
    pid: int
    nodes: dict[str, dict[str, Any]]


class Collected(msgspec.Struct):
    """What one stats request brought back."""

    replies: list[StatsReply]
    malformed: int = 0
    no_responders: bool = False


_decoder = msgspec.json.Decoder(StatsReply)


async def collect(transport: happen.Transport, subject: str, wait: float) -> Collected:
    """Publish one request on ``subject`` and gather the replies for ``wait`` seconds.

    ``transport`` is a started ``happen.Transport``. Returns early when NATS says nobody
    listens. A reply that does not decode is counted in ``malformed``, not shown.
    """
    replies: dict[str, StatsReply] = {}
    result = Collected([])
    nobody = anyio.Event()

    async def on_reply(msg: happen.Message) -> None:
        if msg.headers and msg.headers.get(STATUS_HEADER) == NO_RESPONDERS:
            result.no_responders = True
            nobody.set()
            return
        try:
            reply = _decoder.decode(msg.data)
        except msgspec.DecodeError:
            result.malformed += 1
            return
        replies[reply.system] = reply  # one per system: a repeat replaces the first

    inbox = transport.new_inbox()
    subscription = await transport.subscribe(inbox, on_reply)
    try:
        await transport.publish(subject, b"{}", reply=inbox)
        with anyio.move_on_after(wait):
            await nobody.wait()
    finally:
        await subscription.unsubscribe()
    result.replies = list(replies.values())
    return result


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render_table(replies: list[StatsReply]) -> list[str]:
    """The lines of the table: a heading, then a row per node per system."""
    extra = sorted(
        {name for reply in replies for counters in reply.nodes.values() for name in counters}
        - KNOWN_COUNTERS.keys()
    )
    columns = [*KNOWN_COUNTERS, *extra]
    heading = ["NODE", "HOST/PID", *KNOWN_COUNTERS.values(), *(name.upper() for name in extra)]
    rows = [
        [node, f"{reply.host}/{reply.pid}", *(_cell(counters.get(c)) for c in columns)]
        for reply in replies
        for node, counters in reply.nodes.items()
    ]
    rows.sort(key=lambda row: (row[0], row[1]))
    widths = [max(len(row[i]) for row in [heading, *rows]) for i in range(len(heading))]
    lines = []
    for row in [heading, *rows]:
        cells = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _summary(namespace: str, found: Collected, wait: float) -> str:
    if not found.replies:
        why = " (nobody listens)" if found.no_responders else ""
        text = f"no system answered on '{namespace}.stats' within {wait:g} s{why}"
    else:
        nodes = sum(len(reply.nodes) for reply in found.replies)
        text = (
            f"namespace '{namespace}': {_count(len(found.replies), 'system')}, "
            f"{_count(nodes, 'node')}"
        )
    if found.malformed:
        text += f"; {_count(found.malformed, 'malformed reply')} ignored"
    return text


def stats(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Print the stats table once (``--json``: one JSON line per system), or refresh it
    every second until SIGINT/SIGTERM with ``--watch``.

    Returns 1 when no system answered (once); raises ``CommandError`` for bad settings or
    a server that cannot be reached.
    """
    transport = TRANSPORT.resolve(args.transport, environ)
    namespace = NAMESPACE.resolve(args.namespace, environ)
    url = require_nats(transport, "stats")
    if not args.wait > 0:
        raise CommandError(f"--wait must be positive seconds, not {args.wait}")
    return anyio.run(_stats, url, namespace.value, args)


async def _stats(url: str, namespace: str, args: argparse.Namespace) -> int:
    from happen.transports.nats import from_url  # nats-py loads only for this command

    transport = from_url(url)
    try:
        await transport.start()
    except happen.HappenError as exc:
        raise CommandError(str(exc)) from None
    try:
        if not args.watch:
            try:
                found = await collect(transport, f"{namespace}.stats", args.wait)
            except happen.HappenError as exc:
                raise CommandError(str(exc), EXIT_FAILED) from None
            _show(namespace, found, args, clear=False)
            return EXIT_OK if found.replies else EXIT_FAILED
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch, transport, namespace, args)
                async for _ in signals:
                    break
                tg.cancel_scope.cancel()
        return EXIT_OK
    finally:
        with anyio.CancelScope(shield=True):
            await transport.stop()


async def _watch(transport: happen.Transport, namespace: str, args: argparse.Namespace) -> None:
    clear = sys.stdout.isatty()
    while True:
        started = time.monotonic()
        try:
            found = await collect(transport, f"{namespace}.stats", args.wait)
        except happen.HappenError as exc:  # the connection is down: say so, try again
            print(f"happen: {exc}", file=sys.stderr, flush=True)
        else:
            _show(namespace, found, args, clear=clear)
        await anyio.sleep(max(0.0, WATCH_INTERVAL - (time.monotonic() - started)))


def _show(namespace: str, found: Collected, args: argparse.Namespace, *, clear: bool) -> None:
    summary = _summary(namespace, found, args.wait)
    if args.json:
        for reply in found.replies:
            write_line(reply)
        if not found.replies or found.malformed:
            print(f"happen: {summary}", file=sys.stderr)
        return
    if not found.replies and not args.watch:
        print(f"happen: {summary}", file=sys.stderr)
        return
    lines = [summary]
    if found.replies:
        lines += ["", *render_table(found.replies)]
    text = "\n".join(lines) + "\n"
    if clear:
        text = CLEAR_SCREEN + text
    elif args.watch:
        text = time.strftime("%H:%M:%S ") + text + "\n"
    sys.stdout.write(text)
    sys.stdout.flush()
