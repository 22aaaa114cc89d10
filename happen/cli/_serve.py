"""One serving process: start the system, serve until SIGINT or SIGTERM, then drain.

A second signal while draining ends the process at once. A worker started by
``happen run --workers N`` also stops when its supervisor is gone (its parent changes).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import AsyncIterator

import anyio
from anyio.abc import SocketAttribute

import happen
from happen.cli._exit import STOP_SIGNALS, CommandError, signal_exit_code
from happen.cli._monitor import Monitor, Readiness

__all__ = ["serve"]

log = logging.getLogger("happen.cli")

#: How often a worker checks that its supervisor is still there, in seconds.
SUPERVISOR_CHECK = 0.5


async def serve(
    system: happen.System,
    *,
    label: str,
    supervisor_pid: int | None,
    monitor: tuple[str, int] | None = None,
) -> None:
    """Start ``system``, log ``label`` once its nodes are reachable from other processes,
    and stop it (draining) on a signal. With ``monitor`` (host, port), serve ``/metrics``,
    ``/healthz`` and ``/readyz`` there from before the start until the system has stopped.

    Raises what ``system.start()`` raises (``TransportError`` for a server that cannot be
    reached), and ``CommandError`` when the monitoring port cannot be listened on. Returns
    once the system has stopped.
    """
    if monitor is None:
        await _serve(system, label, supervisor_pid, None)
        return
    host, port = monitor
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise CommandError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
        ) from None
    endpoint = Monitor(system)
    failure: Exception | None = None
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(endpoint.serve, listener)
        bound = listener.extra(SocketAttribute.local_port)
        log.info("metrics on http://%s:%d/metrics (also /healthz, /readyz)", host, bound)
        try:
            await _serve(system, label, supervisor_pid, endpoint)
        except Exception as exc:  # raised as itself below, not in an ExceptionGroup
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _serve(
    system: happen.System, label: str, supervisor_pid: int | None, endpoint: Monitor | None
) -> None:
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with system:
            await system.ready()  # reachable from other processes before saying so
            if endpoint is not None:
                endpoint.readiness = Readiness.READY
            nodes = ", ".join(system.stats()) or "none"
            log.info("serving %s (pid %d): nodes %s", label, os.getpid(), nodes)
            reason = await _stop_requested(signals, supervisor_pid)
            if endpoint is not None:
                endpoint.readiness = Readiness.STOPPING
            log.info("%s: draining", reason)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_exit_on_second_signal, signals)
                await system.stop()
                tg.cancel_scope.cancel()
    log.info("stopped (pid %d)", os.getpid())


async def _stop_requested(
    signals: AsyncIterator[signal.Signals], supervisor_pid: int | None
) -> str:
    """Wait for a stop signal, or for the supervisor to go; say which."""
    reason = ""
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            nonlocal reason
            async for signum in signals:
                reason = signum.name
                tg.cancel_scope.cancel()
                return

        async def on_orphaned() -> None:
            nonlocal reason
            while os.getppid() == supervisor_pid:  # noqa: ASYNC110 (no event to wait on)
                await anyio.sleep(SUPERVISOR_CHECK)
            reason = f"supervisor {supervisor_pid} is gone"
            tg.cancel_scope.cancel()

        tg.start_soon(on_signal)
        if supervisor_pid is not None:
            tg.start_soon(on_orphaned)
    return reason


async def _exit_on_second_signal(signals: AsyncIterator[signal.Signals]) -> None:
    async for signum in signals:
        log.warning("%s again: exiting without draining", signum.name)
        logging.shutdown()
        sys.stderr.flush()
        os._exit(signal_exit_code(signum.value))
