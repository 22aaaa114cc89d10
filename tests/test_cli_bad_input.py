"""Bad input to the ``happen`` command: one clear line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.commands import WAIT, command_env, run_command

APP = Path(__file__).with_name("cli_app.py")
UNREACHABLE = "nats://127.0.0.1:1"  # nothing listens on port 1: refused at once

CASES = {
    "unknown module": (["run", "nowhere:setup"], {}, "no module named 'nowhere'"),
    "unknown attribute": (["run", "app:nothing"], {}, "module 'app' has no attribute 'nothing'"),
    "not module:attr": (["run", "app"], {}, "'app' is not module:attr"),
    "attribute of the wrong kind": (
        ["run", "app:not_an_app"],
        {},
        "must be a happen.System or a function not_an_app(system), not int",
    ),
    "setup taking two arguments": (["run", "app:two_arguments"], {}, "must take one argument"),
    "unknown transport scheme": (
        ["run", "app:setup", "--transport", "http://x"],
        {},
        "--transport: bad transport URL 'http://x'",
    ),
    "port that is not a number": (
        ["run", "app:setup", "--transport", "nats://host:abc"],
        {},
        "bad transport URL 'nats://host:abc'",
    ),
    "bad URL in the environment": (
        ["run", "app:setup"],
        {"HAPPEN_TRANSPORT": "nats:/oops"},
        "HAPPEN_TRANSPORT: bad transport URL",
    ),
    "unreachable server (run)": (
        ["run", "app:setup", "--transport", UNREACHABLE],
        {},
        f"could not connect to NATS at {UNREACHABLE}",
    ),
    "unreachable server (send)": (
        ["send", "svc", "echo", "1", "--transport", UNREACHABLE],
        {},
        f"could not connect to NATS at {UNREACHABLE}",
    ),
    "unreachable server (stats)": (
        ["stats", "--transport", UNREACHABLE],
        {},
        f"could not connect to NATS at {UNREACHABLE}",
    ),
    "payload that is not JSON": (
        ["send", "svc", "echo", "{'a': 1}", "--transport", UNREACHABLE],
        {},
        "PAYLOAD_JSON is not valid JSON",
    ),
    "bad namespace": (["run", "app:setup", "--namespace", "a.b"], {}, "namespace 'a.b' must be"),
    "bad worker count in the environment": (
        ["run", "app:setup"],
        {"HAPPEN_WORKERS": "many"},
        "HAPPEN_WORKERS must be a positive whole number, not 'many'",
    ),
    "workers on the memory transport": (
        ["run", "app:setup", "--workers", "2"],
        {},
        "--workers=2 needs a NATS transport",
    ),
    "send on the memory transport": (
        ["send", "svc", "echo"],
        {},
        "send needs a NATS transport",
    ),
    "stats on the memory transport": (["stats"], {}, "stats needs a NATS transport"),
    "option a System configured in code cannot take": (
        ["run", "app:system", "--transport", UNREACHABLE],
        {},
        "--transport cannot change app:system: it is a System configured in code",
    ),
    "usage error": (["send", "svc"], {}, "happen send: the following arguments are required"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_on_stderr_and_exit_code_2(case: str, tmp_path: Path) -> None:
    args, env, message = CASES[case]
    shutil.copy(APP, tmp_path / "app.py")
    done = run_command(*args, cwd=tmp_path, env=command_env(**env))
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert message in done.stderr


def test_the_installed_script_is_the_same_command(tmp_path: Path) -> None:
    script = shutil.which("happen", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("happen is not installed in this environment (pip install -e .)")
    done = subprocess.run(
        [script, "run", "nowhere:setup"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=command_env(),
        timeout=WAIT,
    )
    assert done.returncode == 2
    assert (
        done.stderr == f"happen: no module named 'nowhere' (looked in {tmp_path} and on sys.path)\n"
    )
