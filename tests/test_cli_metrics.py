"""``happen run --metrics-port``: Prometheus metrics, health and readiness over real HTTP, and
handler errors in the command's log. The command runs as a real subprocess over a real
nats-server; ``happen send`` in another subprocess moves the counters."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import pytest

import happen
from happen.cli._monitor import Monitor, Readiness
from tests.commands import Command, command_env, run_command, serving
from tests.conftest import NatsServer
from tests.helpers import unique_namespace

APP = Path(__file__).with_name("cli_app.py")


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    shutil.copy(APP, tmp_path / "app.py")
    return tmp_path


def get(url: str) -> tuple[int, str, str]:
    """GET ``url``: the status, the content type and the body."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def metric(text: str, name: str, node: str) -> int:
    """The value of sample ``name{...node="node"}`` in a Prometheus text exposition."""
    pattern = rf'^{name}{{namespace="[^"]+",node="{node}"}} (\d+)$'
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"no {name} for {node} in:\n{text}"
    return int(found.group(1))


def monitoring_url(run: Command) -> str:
    port = run.stderr.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")[0].group(1)
    return f"http://127.0.0.1:{port}"


def test_metrics_count_the_events_sent_and_handler_errors_are_logged(
    app_dir: Path, nats_server: NatsServer
) -> None:
    env = command_env(HAPPEN_TRANSPORT=nats_server.start().url, HAPPEN_NAMESPACE=unique_namespace())
    args = ("run", "app:setup", "--metrics-port", "0", "--metrics-host", "127.0.0.1")
    with Command(*args, cwd=app_dir, env=env) as run:
        url = monitoring_url(run)
        serving(run)
        assert get(f"{url}/healthz")[0] == 200
        assert get(f"{url}/readyz")[:1] == (200,)
        status, content_type, text = get(f"{url}/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert "# TYPE happen_node_accepted_total counter" in text
        assert "# TYPE happen_node_active gauge" in text
        assert metric(text, "happen_node_accepted_total", "svc") == 0

        for payload in ("1", "2"):
            sent = run_command("send", "svc", "echo", payload, cwd=app_dir, env=env)
            assert sent.returncode == 0, sent.stderr
        failed = run_command("send", "svc", "fail", cwd=app_dir, env=env)
        assert failed.returncode == 1 and "ValueError: boom" in failed.stderr

        text = get(f"{url}/metrics")[2]
        assert metric(text, "happen_node_accepted_total", "svc") == 3
        assert metric(text, "happen_node_completed_total", "svc") == 2
        assert metric(text, "happen_node_failed_total", "svc") == 1
        assert metric(text, "happen_node_active", "svc") == 0
        assert metric(text, "happen_node_max_concurrent", "svc") == 100
        assert re.search(r"^happen_bad_inputs_total\{namespace=\"[^\"]+\"\} 0$", text, re.M)

        # The handler's exception, logged where it ran, with its traceback.
        run.stderr.wait_for(r"ERROR happen\.handlers\[\d+\]: handler for 'fail' on node 'svc'")
        run.stderr.wait_for(r"^ValueError: boom$")
        assert "Traceback (most recent call last):" in run.stderr.text()
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.stderr.text()


def test_readyz_is_503_while_the_system_drains(app_dir: Path, nats_server: NatsServer) -> None:
    env = command_env(HAPPEN_TRANSPORT=nats_server.start().url, HAPPEN_NAMESPACE=unique_namespace())
    gate = app_dir / "gate"
    args = ("run", "app:setup", "--metrics-port", "0", "--metrics-host", "127.0.0.1")
    with Command(*args, cwd=app_dir, env=env) as run:
        url = monitoring_url(run)
        serving(run)
        # A stream whose handler holds the drain open until the gate file exists.
        with Command("send", "svc", "gated", f'"{gate}"', cwd=app_dir, env=env) as send:
            assert send.stdout is not None
            send.stdout.wait_for(r"^0$")
            assert metric(get(f"{url}/metrics")[2], "happen_node_active", "svc") == 1
            run.signal(signal.SIGTERM)
            run.stderr.wait_for("SIGTERM: draining")
            assert get(f"{url}/readyz") == (503, "text/plain; charset=utf-8", "stopping\n")
            assert get(f"{url}/healthz")[0] == 200  # alive, still draining
            assert metric(get(f"{url}/metrics")[2], "happen_node_active", "svc") == 1
            gate.touch()
            assert send.wait() == 0, send.stderr.text()
            assert send.stdout.lines == ["0", "1", "2"]
        assert run.wait() == 0, run.stderr.text()


def test_bad_metrics_settings_are_refused_before_serving(
    app_dir: Path, nats_server: NatsServer
) -> None:
    url = nats_server.start().url
    bad = run_command("run", "app:setup", "--metrics-port", "http", cwd=app_dir)
    assert bad.returncode == 2
    assert (
        bad.stderr == "happen: --metrics-port must be a port number from 0 to 65535, not 'http'\n"
    )
    env = command_env(HAPPEN_METRICS_PORT="70000")
    assert (
        "HAPPEN_METRICS_PORT must be"
        in run_command("run", "app:setup", cwd=app_dir, env=env).stderr
    )
    workers = run_command(
        "run",
        "app:setup",
        "--transport",
        url,
        "--workers",
        "2",
        "--metrics-port",
        "0",
        cwd=app_dir,
    )
    assert workers.returncode == 2 and "--metrics-port serves one process" in workers.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_command(
            "run",
            "app:setup",
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
            cwd=app_dir,
        )
    assert busy.returncode == 2, busy.stderr
    assert busy.stderr.startswith(f"happen: cannot serve metrics on 127.0.0.1:{port}: ")
    assert "Traceback" not in busy.stderr


@pytest.mark.anyio
async def test_the_endpoint_answers_readiness_and_refuses_what_it_does_not_serve(
    anyio_backend: str,
) -> None:
    async with happen.System() as system:
        endpoint = Monitor(system)
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)

        async def ask(request: bytes) -> bytes:
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(request)
                answer = b""
                try:
                    while True:
                        answer += await stream.receive()
                except anyio.EndOfStream:
                    return answer

        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(endpoint.serve, listener)
            starting = await ask(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert starting.startswith(b"HTTP/1.1 503 ") and starting.endswith(
                b"\r\n\r\nstarting\n"
            )
            endpoint.readiness = Readiness.READY
            ready = await ask(b"HEAD /readyz HTTP/1.0\r\n\r\n")
            assert ready.startswith(b"HTTP/1.1 200 OK\r\n") and ready.endswith(b"\r\n\r\n")
            assert (await ask(b"nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
            assert (await ask(b"DELETE /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
            assert (await ask(b"GET /" + b"x" * 10_000)).startswith(b"HTTP/1.1 431 ")
            assert (await ask(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
            tg.cancel_scope.cancel()
