"""``happen send``: one call from the command line, its result or items as JSON lines.

One ``happen run`` of the test application serves every test of this module, over the
session's nats-server; each ``happen send`` is a subprocess.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from happen.cli._progress import ProgressLine, progress_of
from tests.commands import WAIT, Command, command_env, run_command, serving
from tests.conftest import NatsServer
from tests.helpers import unique_namespace

APP = Path(__file__).with_name("cli_app.py")


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer
) -> Iterator[tuple[Path, dict[str, str]]]:
    """The test application served by ``happen run``: its directory, and the environment
    that points ``happen send`` at it."""
    app_dir = tmp_path_factory.mktemp("send")
    shutil.copy(APP, app_dir / "app.py")
    env = command_env(HAPPEN_TRANSPORT=nats_server.start().url, HAPPEN_NAMESPACE=unique_namespace())
    with Command("run", "app:setup", cwd=app_dir, env=env) as run:
        serving(run)
        yield app_dir, env
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.stderr.text()


def test_send_prints_the_result_as_one_json_line(served: tuple[Path, dict[str, str]]) -> None:
    app_dir, env = served
    payload = {"text": "héllo\nworld", "n": [1, 2.5, None, True], "nested": {"a": {}}}
    done = run_command("send", "svc", "echo", json.dumps(payload), cwd=app_dir, env=env)
    assert (done.returncode, done.stderr) == (0, "")
    assert [json.loads(line) for line in done.stdout.splitlines()] == [payload]


def test_send_without_a_payload_sends_null(served: tuple[Path, dict[str, str]]) -> None:
    app_dir, env = served
    done = run_command("send", "svc", "echo", cwd=app_dir, env=env)
    assert (done.returncode, done.stdout) == (0, "null\n"), done.stderr


def test_send_reads_the_payload_from_stdin_with_a_dash(
    served: tuple[Path, dict[str, str]],
) -> None:
    app_dir, env = served
    done = run_command("send", "svc", "echo", "-", cwd=app_dir, env=env, input='[1, "two"]\n')
    assert (done.returncode, done.stdout) == (0, '[1,"two"]\n'), done.stderr


def test_send_stream_prints_each_item_as_a_json_line_as_it_arrives(
    served: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    app_dir, env = served
    gate = tmp_path / "gate"
    with Command(
        "send",
        "svc",
        "gated",
        json.dumps(str(gate)),
        "--stream",
        "--timeout",
        "10",
        cwd=app_dir,
        env=env,
    ) as send:
        assert send.stdout is not None
        send.stdout.wait_for("^0$")  # printed while the producer still waits for the gate
        assert send.process.poll() is None
        gate.touch()
        assert send.wait() == 0, send.stderr.text()
        assert send.stdout.lines == ["0", "1", "2"]


def test_a_generator_handler_streams_without_the_flag(
    served: tuple[Path, dict[str, str]],
) -> None:
    app_dir, env = served
    done = run_command("send", "svc", "progress", "3", cwd=app_dir, env=env)
    assert done.returncode == 0, done.stderr
    items = [json.loads(line) for line in done.stdout.splitlines()]
    assert [item["step"] for item in items] == [0, 1, 2]
    assert done.stderr == ""  # no progress line: stdout is not a terminal


def test_a_plain_handler_asked_for_a_stream_prints_its_one_result(
    served: tuple[Path, dict[str, str]],
) -> None:
    app_dir, env = served
    done = run_command("send", "svc", "echo", '"one"', "--stream", cwd=app_dir, env=env)
    assert (done.returncode, done.stdout) == (0, '"one"\n'), done.stderr


def test_send_stream_shows_progress_on_a_terminal(served: tuple[Path, dict[str, str]]) -> None:
    app_dir, env = served
    # stdout and stderr on one pseudo-terminal, as in an interactive shell.
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "happen", "send", "svc", "progress", "4", "--stream"],
            cwd=app_dir,
            env={**env, "TERM": "xterm", "COLUMNS": "100"},
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=terminal,
        )
        os.close(terminal)
        screen = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal closed: the process is done with it
                break
            if not chunk:
                break
            screen += chunk
        assert process.wait(timeout=WAIT) == 0, screen
    finally:
        os.close(controller)
    text = screen.decode()
    assert "[######------------------]  25%  1 item" in text
    assert "[########################] 100%  4 items" in text
    assert "step 4" in text
    # Each JSON line is written after the progress line is erased, and every item is there.
    lines = [line.rsplit("\x1b[2K", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    items = [json.loads(line) for line in lines if line.startswith("{")]
    assert [item["step"] for item in items] == [0, 1, 2, 3]
    assert text.endswith("\r\x1b[2K")  # erased at the end


def test_a_failed_call_is_one_line_on_stderr_and_exit_code_1(
    served: tuple[Path, dict[str, str]],
) -> None:
    app_dir, env = served
    for args, message in (
        (["svc", "fail"], "HandlerError"),
        (["svc", "unknown"], "NoHandlerError"),
        (["nobody", "echo"], "NodeNotFoundError"),
        (["svc", "slow", "5", "--timeout", "0.2"], "SendTimeout"),
    ):
        done = run_command("send", *args, cwd=app_dir, env=env)
        assert done.returncode == 1, (args, done.stderr)
        assert done.stdout == ""
        assert len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr


def test_sigint_stops_a_stream_and_exits_130(
    served: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    app_dir, env = served
    gate = tmp_path / "never"
    with Command("send", "svc", "gated", json.dumps(str(gate)), cwd=app_dir, env=env) as send:
        assert send.stdout is not None
        send.stdout.wait_for("^0$")
        send.signal(signal.SIGINT)
        assert send.wait() == 130
        assert "Traceback" not in send.stderr.text()


def test_the_progress_figure_is_a_number_from_0_to_1() -> None:
    assert progress_of({"progress": 0.5, "message": "half"}) == (0.5, "half")
    assert progress_of({"progress": 1}) == (1.0, "")
    for item in ({"progress": 1.5}, {"progress": True}, {"progress": "50%"}, [0.5], 0.5):
        assert progress_of(item) is None


def test_the_progress_line_fits_the_terminal() -> None:
    class Screen:
        text = ""

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

    screen = Screen()
    line = ProgressLine(screen, clock=lambda: 0.0, columns=30)  # type: ignore[arg-type]
    line.update({"progress": 0.5, "message": "a long message that does not fit"})
    assert screen.text == "\r\x1b[2K" + "[############------------]  50%"[:29]
    line.erase()
    assert screen.text.endswith("\r\x1b[2K")
