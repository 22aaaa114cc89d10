"""Running the ``happen`` command as a real subprocess, and reading its output with deadlines.

``Command`` starts ``python -m happen ...`` (the same interpreter as the tests) and reads its
stdout and stderr line by line on two threads, so a test can wait for a line with a bound
(``wait_for``) while the command keeps running, send it a real signal, and wait for its exit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

WAIT = 20.0  # seconds; a test that needs this long has failed


def command_env(**settings: str) -> dict[str, str]:
    """This process's environment without any ``HAPPEN_*`` variable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAPPEN_")}
    env.update(settings)
    return env


def run_command(
    *args: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = WAIT,
) -> subprocess.CompletedProcess[str]:
    """Run ``happen args...`` to completion and return what it printed and its exit code."""
    return subprocess.run(
        [sys.executable, "-m", "happen", *args],
        cwd=cwd,
        env=command_env() if env is None else dict(env),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Output:
    """The lines one stream of a process has printed so far, filled by a reader thread."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def wait_for(
        self, pattern: str, *, count: int = 1, timeout: float = WAIT
    ) -> list[re.Match[str]]:
        """The first ``count`` lines matching ``pattern`` (a regex searched in each line),
        waiting for them up to ``timeout`` seconds; AssertionError with the output if not."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for line in self.lines if (m := compiled.search(line))]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise AssertionError(
                        f"no {count} line(s) matching {pattern!r} "
                        f"({'stream closed' if self._closed else 'timed out'}):\n"
                        + "\n".join(self.lines)
                    )
                self._changed.wait(left)

    def text(self) -> str:
        """Everything printed so far."""
        with self._changed:
            return "\n".join(self.lines)

    def join(self, timeout: float = WAIT) -> None:
        self._thread.join(timeout)


class Command:
    """``happen args...`` running in the background; a context manager that stops it if
    the test leaves it running (SIGTERM, so it stops what it started; SIGKILL after 5 s)."""

    def __init__(
        self,
        *args: str,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        stdout: int | None = subprocess.PIPE,
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "happen", *args],
            cwd=cwd,
            env=command_env() if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout = Output(self.process.stdout) if stdout == subprocess.PIPE else None
        self.stderr = Output(self.process.stderr)

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = WAIT) -> int:
        """Wait for the exit (bounded) and for the output to be read; the exit code."""
        code = self.process.wait(timeout=timeout)
        self.stderr.join()
        if self.stdout is not None:
            self.stdout.join()
        return code

    def __enter__(self) -> Command:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process.poll() is None:  # the test failed midway: stop it, then its children
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serving(command: Command, count: int = 1) -> list[int]:
    """Wait until ``command`` serves (``count`` processes for workers); their pids."""
    found = command.stderr.wait_for(r"serving .* \(pid (\d+)\)", count=count)
    return [int(m.group(1)) for m in found]


def gone(pid: int) -> bool:
    """Whether no process ``pid`` exists any more (reaped, not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pids: Sequence[int], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if not gone(p)]}"
        time.sleep(0.01)
