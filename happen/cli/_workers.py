"""Supervising N serving processes: start them, forward SIGINT/SIGTERM, end with them.

Each worker runs in a session of its own, so a Ctrl-C in the terminal reaches the
supervisor only, which forwards it once to every worker; a worker notices a supervisor that
died without a word (its parent changes) and stops. A worker that exits on its own (a crash,
a server it cannot reach) makes the supervisor stop the others and exit with its code.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence

import anyio
from anyio.abc import Process

from happen.cli._exit import EXIT_FAILED, EXIT_OK, STOP_SIGNALS, signal_exit_code

__all__ = ["supervise"]

log = logging.getLogger("happen.cli")


async def supervise(command: Sequence[str], count: int, env: Mapping[str, str]) -> int:
    """Run ``count`` copies of ``command`` until they have all exited; return the exit code.

    The code is 0 when every worker exited 0 after a forwarded signal; otherwise the code of
    the first worker that failed (128 + the signal for one killed by a signal).
    """
    with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
        processes: list[Process] = []
        try:
            for _ in range(count):
                processes.append(
                    await anyio.open_process(
                        command,
                        stdin=subprocess.DEVNULL,
                        stdout=None,
                        stderr=None,
                        env=dict(env),
                        start_new_session=True,
                    )
                )
            log.info(
                "supervising %d workers (pid %d): %s",
                count,
                os.getpid(),
                ", ".join(str(p.pid) for p in processes),
            )
            return await _until_all_exit(processes, signals)
        finally:
            with anyio.CancelScope(shield=True):
                for process in processes:
                    if process.returncode is None:
                        process.kill()
                    await process.aclose()


async def _until_all_exit(processes: list[Process], signals: AsyncIterator[signal.Signals]) -> int:
    stopping = False
    code = EXIT_OK

    def stop_all(signum: signal.Signals) -> None:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signum)

    async def watch(process: Process) -> None:
        nonlocal stopping, code
        returncode = await process.wait()
        exit_code = signal_exit_code(-returncode) if returncode < 0 else returncode
        if exit_code != EXIT_OK and code == EXIT_OK:
            code = exit_code
        if not stopping:
            stopping = True
            code = exit_code or EXIT_FAILED
            log.error("worker %d exited with code %d; stopping the others", process.pid, exit_code)
            stop_all(signal.SIGTERM)

    async def forward() -> None:
        nonlocal stopping
        async for signum in signals:
            stopping = True
            name = signum.name
            log.info("%s: forwarding it to the workers", name)
            stop_all(signum)

    async with anyio.create_task_group() as outer:
        outer.start_soon(forward)
        async with anyio.create_task_group() as inner:
            for process in processes:
                inner.start_soon(watch, process)
        outer.cancel_scope.cancel()
    return code
