"""``happen run``: serving an application until a signal, draining, and worker processes.

Every test runs the real command as a subprocess, over a real nats-server, and sends it real
signals; ``happen send`` in another subprocess, or a System in the test, is the client.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections import Counter
from pathlib import Path

import anyio
import pytest

import happen
from tests.commands import Command, command_env, run_command, serving, wait_gone
from tests.conftest import NatsServer
from tests.helpers import unique_namespace

APP = Path(__file__).with_name("cli_app.py")


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A directory holding the test application as ``app.py`` (the command's cwd)."""
    shutil.copy(APP, tmp_path / "app.py")
    return tmp_path


def test_run_serves_a_setup_function_reachable_by_send_and_stops_on_sigterm(
    app_dir: Path, nats_server: NatsServer
) -> None:
    url, ns = nats_server.start().url, unique_namespace()
    with Command("run", "app:setup", "--transport", url, "--namespace", ns, cwd=app_dir) as run:
        serving(run)
        sent = run_command(
            "send",
            "svc",
            "echo",
            '{"id": 7}',
            "--transport",
            url,
            "--namespace",
            ns,
            cwd=app_dir,
        )
        assert (sent.returncode, sent.stderr) == (0, "")
        assert sent.stdout.splitlines() == ['{"id":7}']
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.stderr.text()
        run.stderr.wait_for("SIGTERM: draining")
        run.stderr.wait_for("stopped")


def test_sigterm_lets_a_request_in_flight_finish_then_exits_0(
    app_dir: Path, nats_server: NatsServer
) -> None:
    env = command_env(HAPPEN_TRANSPORT=nats_server.start().url, HAPPEN_NAMESPACE=unique_namespace())
    with Command("run", "app:setup", cwd=app_dir, env=env) as run:
        serving(run)
        with Command("send", "svc", "slow", "1.0", cwd=app_dir, env=env) as send:
            run.stderr.wait_for("slow started")
            run.signal(signal.SIGTERM)
            assert send.wait() == 0, send.stderr.text()
            assert send.stdout is not None and send.stdout.lines == ['"done"']
        assert run.wait() == 0, run.stderr.text()
        assert "Traceback" not in run.stderr.text()


def test_sigint_drains_a_system_configured_in_code_and_exits_0(
    app_dir: Path, nats_server: NatsServer
) -> None:
    url, ns = nats_server.start().url, unique_namespace()
    env = command_env(APP_TRANSPORT=url, APP_NAMESPACE=ns)
    with Command("run", "app:system", cwd=app_dir, env=env) as run:
        serving(run)
        with Command(
            "send", "svc", "slow", "0.5", "--transport", url, "--namespace", ns, cwd=app_dir
        ) as send:
            run.stderr.wait_for("slow started")
            run.signal(signal.SIGINT)
            assert send.wait() == 0, send.stderr.text()
        assert run.wait() == 0, run.stderr.text()
        run.stderr.wait_for("SIGINT: draining")


def test_two_workers_both_serve_and_a_signal_to_the_parent_stops_both(
    app_dir: Path, nats_server: NatsServer
) -> None:
    url, ns = nats_server.start().url, unique_namespace()
    with Command(
        "run", "app:setup", "--workers", "2", "--transport", url, "--namespace", ns, cwd=app_dir
    ) as run:
        workers = serving(run, count=2)
        assert run.pid not in workers and len(set(workers)) == 2

        async def forty_sends() -> Counter[int]:
            served: Counter[int] = Counter()
            async with happen.System(transport=url, namespace=ns) as system:
                client = system.create_node("client")

                async def one() -> None:
                    served[await client.send("svc", {"type": "pid"}, timeout=10)] += 1

                async with anyio.create_task_group() as tg:
                    for _ in range(40):
                        tg.start_soon(one)
            return served

        served = anyio.run(forty_sends)
        assert set(served) == set(workers), served
        run.signal(signal.SIGINT)  # as Ctrl-C would: the parent forwards it once to each
        assert run.wait() == 0, run.stderr.text()
        wait_gone(workers)
        assert run.stderr.text().count("SIGINT: draining") == 2


def test_workers_stop_by_themselves_when_their_supervisor_is_killed(
    app_dir: Path, nats_server: NatsServer
) -> None:
    env = command_env(HAPPEN_TRANSPORT=nats_server.start().url, HAPPEN_NAMESPACE=unique_namespace())
    with Command("run", "app:setup", "--workers", "2", cwd=app_dir, env=env) as run:
        workers = serving(run, count=2)
        run.signal(signal.SIGKILL)
        run.wait()
        wait_gone(workers)
        assert run.stderr.text().count("is gone: draining") == 2


def test_a_second_signal_ends_the_drain_at_once(app_dir: Path, nats_server: NatsServer) -> None:
    env = command_env(HAPPEN_TRANSPORT=nats_server.start().url, HAPPEN_NAMESPACE=unique_namespace())
    with Command("run", "app:setup", cwd=app_dir, env=env) as run:
        serving(run)
        with Command("send", "svc", "slow", "30", "--timeout", "3", cwd=app_dir, env=env) as send:
            run.stderr.wait_for("slow started")
            run.signal(signal.SIGTERM)
            run.stderr.wait_for("SIGTERM: draining")
            run.signal(signal.SIGTERM)
            assert run.wait(timeout=5) == 128 + signal.SIGTERM
            run.stderr.wait_for("SIGTERM again: exiting without draining")
            assert send.wait() == 1  # its server went away mid-call: no result
            assert "Traceback" not in send.stderr.text()


def test_environment_settings_are_used_and_the_command_line_wins(
    app_dir: Path, nats_server: NatsServer
) -> None:
    url = nats_server.start().url
    from_env, from_command_line = unique_namespace(), unique_namespace()
    env = command_env(HAPPEN_TRANSPORT=url, HAPPEN_NAMESPACE=from_env)
    with Command("run", "app:setup", "--namespace", from_command_line, cwd=app_dir, env=env) as run:
        serving(run)
        run.stderr.wait_for(f"on {url}, namespace '{from_command_line}'")
        # The transport came from the environment; the namespace from the command line.
        here = run_command(
            "send", "svc", "echo", "1", "--namespace", from_command_line, cwd=app_dir, env=env
        )
        assert (here.returncode, here.stdout) == (0, "1\n"), here.stderr
        elsewhere = run_command("send", "svc", "echo", "1", cwd=app_dir, env=env)
        assert elsewhere.returncode == 1
        assert "NodeNotFoundError" in elsewhere.stderr
        run.signal(signal.SIGTERM)
        assert run.wait() == 0


def test_a_system_configured_in_code_does_not_take_the_environment_and_says_so(
    app_dir: Path, nats_server: NatsServer
) -> None:
    url, ns = nats_server.start().url, unique_namespace()
    env = command_env(APP_TRANSPORT=url, APP_NAMESPACE=ns, HAPPEN_NAMESPACE="other")
    with Command("run", "app:system", cwd=app_dir, env=env) as run:
        serving(run)
        run.stderr.wait_for("HAPPEN_NAMESPACE is not applied: app:system is a System configured")
        run.stderr.wait_for(f"namespace '{ns}'")
        run.signal(signal.SIGTERM)
        assert run.wait() == 0


def test_a_system_configured_in_code_takes_the_settings_its_code_left_out(
    app_dir: Path, nats_server: NatsServer
) -> None:
    """Its transport from the environment, its namespace from the command line; its
    concurrency stays the code's."""
    url = nats_server.start().url
    from_env, from_command_line = unique_namespace(), unique_namespace()
    env = command_env(HAPPEN_TRANSPORT=url, HAPPEN_NAMESPACE=from_env)
    args = ("run", "app:open_system", "--namespace", from_command_line)
    with Command(*args, cwd=app_dir, env=env) as run:
        serving(run)
        run.stderr.wait_for(f"namespace '{from_command_line}'")
        here = run_command(
            "send", "svc", "echo", "1", "--namespace", from_command_line, cwd=app_dir, env=env
        )
        assert (here.returncode, here.stdout) == (0, "1\n"), here.stderr
        stats = run_command(
            "stats", "--json", "--namespace", from_command_line, cwd=app_dir, env=env
        )
        assert '"max_concurrent": 4' in stats.stdout.replace('":4', '": 4'), stats.stdout
        run.signal(signal.SIGTERM)
        assert run.wait() == 0


def test_workers_that_cannot_reach_the_server_end_the_command_with_code_2(
    app_dir: Path,
) -> None:
    done = run_command(
        "run", "app:setup", "--workers", "2", "--transport", "nats://127.0.0.1:1", cwd=app_dir
    )
    assert done.returncode == 2, done.stderr
    assert "could not connect to NATS at nats://127.0.0.1:1" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_application_that_raises_on_import_shows_its_traceback_and_exits_1(
    tmp_path: Path,
) -> None:
    (tmp_path / "broken.py").write_text("raise RuntimeError('misconfigured')\n")
    done = run_command("run", "broken:setup", cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: misconfigured" in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "happen: importing 'broken' failed: RuntimeError('misconfigured')"
    )


def test_a_setup_function_that_raises_shows_its_traceback_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "fails.py").write_text(
        "def setup(system):\n    raise KeyError('no such setting')\n"
    )
    done = run_command("run", "fails:setup", cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "KeyError: 'no such setting'" in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "happen: fails:setup(system) raised KeyError('no such setting')"
    )


def test_the_service_example_serves_under_happen_run(nats_server: NatsServer) -> None:
    example = Path(__file__).parent.parent / "examples" / "service"
    env = command_env(HAPPEN_TRANSPORT=nats_server.start().url, HAPPEN_NAMESPACE=unique_namespace())
    with Command("run", "app:setup", "--workers", "2", cwd=example, env=env) as run:
        serving(run, count=2)
        total = run_command("send", "reports", "total", "[3, 4, 5]", cwd=example, env=env)
        assert (total.returncode, total.stdout) == (0, "12\n"), total.stderr
        build = run_command("send", "reports", "build", '{"pages": 2}', cwd=example, env=env)
        assert build.returncode == 0, build.stderr
        assert [json.loads(line) for line in build.stdout.splitlines()][:2] == [
            {"progress": 0.5, "message": "page 1 of 2"},
            {"progress": 1.0, "message": "page 2 of 2"},
        ]
        run.signal(signal.SIGINT)
        assert run.wait() == 0, run.stderr.text()
