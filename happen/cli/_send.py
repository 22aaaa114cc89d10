"""``happen send NODE TYPE [PAYLOAD_JSON]``: one call from the command line.

The result is printed as one JSON line; a streamed reply (``--stream``, or a generator
handler answering a plain send) as one JSON line per item, each as it arrives.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

import anyio
import msgspec

import happen
from happen.cli._exit import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    STOP_SIGNALS,
    CommandError,
    signal_exit_code,
)
from happen.cli._jsonline import write_line
from happen.cli._progress import ProgressLine
from happen.cli._settings import CODEC, NAMESPACE, TRANSPORT, require_nats

__all__ = ["parse_payload", "send"]


def parse_payload(raw: str | None) -> Any:
    """The payload given as JSON text; ``-`` reads it from stdin; None without one.

    Raises ``CommandError`` for text that is not JSON.
    """
    if raw is None:
        return None
    text = sys.stdin.read() if raw == "-" else raw
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise CommandError(f"PAYLOAD_JSON is not valid JSON ({exc}): {shown!r}") from None


def send(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Send ``args.type`` to ``args.node`` over NATS and print what comes back.

    Returns 0, 1 when the call failed (the error on stderr), or 128 + the signal when
    interrupted. Raises ``CommandError`` for bad input or a server that cannot be reached.
    """
    transport = TRANSPORT.resolve(args.transport, environ)
    namespace = NAMESPACE.resolve(args.namespace, environ)
    codec = CODEC.resolve(args.codec, environ)
    payload = parse_payload(args.payload)
    url = require_nats(transport, "send")
    if args.timeout is not None and not args.timeout > 0:
        raise CommandError(f"--timeout must be positive seconds, not {args.timeout}")
    try:
        system = happen.System(transport=url, namespace=namespace.value, codec=codec.value)
    except happen.HappenError as exc:
        raise CommandError(str(exc)) from None
    event = {"type": args.type, "payload": payload}
    return anyio.run(_send, system, args.node, event, args.stream, args.timeout)


async def _send(
    system: happen.System, node: str, event: dict[str, Any], stream: bool, timeout: float | None
) -> int:
    interrupted = 0
    code = EXIT_FAILED
    call = anyio.CancelScope()

    async def on_signal() -> None:
        nonlocal interrupted
        async for signum in signals:
            interrupted = signum
            call.cancel()

    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        try:
            await system.start()
        except happen.HappenError as exc:
            raise CommandError(str(exc)) from None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(on_signal)
                with call:
                    code = await _call(system, node, event, stream, timeout)
                tg.cancel_scope.cancel()
        finally:
            await system.stop()
    return signal_exit_code(interrupted) if interrupted else code


async def _call(
    system: happen.System, node: str, event: dict[str, Any], stream: bool, timeout: float | None
) -> int:
    client = system.create_node(f"happen-cli-{os.getpid()}")
    try:
        if stream:
            async with client.stream(node, event, timeout=timeout) as items:
                await _print_items(items)
        else:
            result = await client.send(node, event, timeout=timeout)
            if isinstance(result, happen.Stream):
                async with result:
                    await _print_items(result)
            else:
                write_line(result)
    except happen.InvalidIdError as exc:  # a node id or event type that cannot be sent
        print(f"happen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except happen.HappenError as exc:
        print(f"happen: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        pass  # the reader has gone (| head): leaving the stream stops the producer
    return EXIT_OK


async def _print_items(items: happen.Stream) -> None:
    progress = ProgressLine.for_terminal()
    try:
        async for item in items:
            if progress is None:
                write_line(item)
                continue
            progress.erase()
            write_line(item)
            progress.update(item)
    finally:
        if progress is not None:
            progress.erase()
