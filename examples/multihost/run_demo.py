"""Runs the whole multi-host demo on one machine and checks that the load was shared.

Starts ``happen server`` (a nats-server with JetStream) on a free port, ``happen run
worker:setup --workers 2`` (two serving processes under one command) and ``producer.py``;
exits 0 when both workers served requests and the command drained and exited 0 on SIGTERM.

    python examples/multihost/run_demo.py
"""

from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKERS = 2
JOBS = 40
TIMEOUT = 30.0
HAPPEN = [sys.executable, "-m", "happen"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_listening(port: int, server: subprocess.Popen[str]) -> None:
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


class Command:
    """A subprocess whose output lines (stdout and stderr) are read by a thread."""

    def __init__(self, args: list[str], cwd: Path | None = None) -> None:
        self.process = subprocess.Popen(
            args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, times: int = 1) -> None:
        deadline = time.monotonic() + TIMEOUT
        seen = 0
        while seen < times:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise SystemExit(f"{text!r} was not printed in time") from None
            if line is None:
                raise SystemExit(f"the command exited early:\n{''.join(self.output)}")
            self.output.append(line)
            print(line, end="")
            seen += text in line

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=TIMEOUT)
        while (line := self.lines.get(timeout=TIMEOUT)) is not None:
            self.output.append(line)
            print(line, end="")
        return code


def main() -> int:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as store:
        server = Command([*HAPPEN, "server", "--port", str(port), "--store", store])
        workers: Command | None = None
        try:
            wait_until_listening(port, server.process)
            workers = Command(
                [*HAPPEN, "run", "worker:setup", "--workers", str(WORKERS),
                 "--transport", url, "--namespace", "multihost-demo"],
                cwd=HERE,
            )
            workers.wait_for("serving", times=WORKERS)
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
            served = re.search(r"^served: (.*)$", producer.stdout, re.MULTILINE)
            counts = [int(n) for n in re.findall(r": (\d+)", served.group(1))] if served else []
            print(f"jobs per worker: {counts}")
            if sum(counts) != JOBS or len(counts) < WORKERS:
                print("FAIL: the jobs were not shared between the workers", file=sys.stderr)
                return 1
            if workers.stop() != 0:
                print("FAIL: happen run did not drain and exit 0", file=sys.stderr)
                return 1
            print("OK: both workers served requests")
            return 0
        finally:
            for command in (workers, server):
                if command is not None and command.process.poll() is None:
                    command.process.send_signal(signal.SIGTERM)
                    try:
                        command.process.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        command.process.kill()
                        command.process.wait()


if __name__ == "__main__":
    sys.exit(main())
