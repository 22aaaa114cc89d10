"""An application that installs happen type-checks with ``mypy --strict`` (DESIGN section 13):
from a wheel, and from an editable install made as the README makes it (``pip install -e .``).

Each install goes into a fresh virtual environment, built from a copy of the project, without
network: the wheel and the editable install are built without build isolation, and the fresh
environment reaches the dependencies (anyio, msgspec, nats-py, setuptools) through a ``.pth``
file naming this environment's site-packages. (Python does not read the ``.pth`` files of a
directory a ``.pth`` file adds, so this environment's own install of happen stays invisible.)
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

APP = '''\
"""An application of happen, written as a user would."""

from typing import Any

import anyio

import happen
from happen.transports.memory import MemoryBroker, MemoryTransport
from happen.transports.nats import NatsTransport


async def main() -> None:
    transport = MemoryTransport(broker=MemoryBroker())
    async with happen.System(transport=transport) as system:
        orders = system.create_node("order-service")

        @orders.on("process-order")
        async def process(event: happen.Event, context: dict[str, Any]) -> dict[str, Any]:
            return {"ok": True, "id": event.payload["id"]}

        client = system.create_node("client")
        result = await client.send("order-service", {"type": "process-order", "payload": {"id": 7}})
        assert result == {"ok": True, "id": 7}
        limit: int = transport.max_payload
        assert limit > 0


def remote() -> happen.Transport:
    return NatsTransport("nats://127.0.0.1:4222", pending_msgs_limit=1024)


anyio.run(main)
'''

# mypy must see the real types, not merely find the modules: this misuse is an error.
MISUSE = """\
from happen.transports.memory import MemoryTransport

MemoryTransport(max_payload="1 MiB")
"""
MISUSE_ERROR = 'misuse.py:3: error: Argument "max_payload" to "MemoryTransport" has incompatible'


def run(*command: str | Path, cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MYPY"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, command))} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project (its symlink kept as a symlink), an application and a mypy
    cache shared by the checks."""
    setuptools = importlib.metadata.version("setuptools")
    assert tuple(map(int, setuptools.split(".")[:2])) >= (70, 1), (
        f"setuptools {setuptools} cannot build a wheel without the 'wheel' package: "
        f"pip install -e '.[test]' again"
    )
    work = tmp_path_factory.mktemp("packaging")
    source = work / "happen-src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("happen", "transports"):
        shutil.copytree(
            ROOT / name,
            source / name,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    app = work / "app"
    app.mkdir()
    (app / "app.py").write_text(APP)
    (app / "misuse.py").write_text(MISUSE)
    (app / "mypy.ini").write_text("[mypy]\nstrict = True\n")
    return work


def fresh_venv(path: Path) -> Path:
    """A virtual environment without pip, seeing this one's site-packages; its python."""
    run(sys.executable, "-m", "venv", "--without-pip", path)
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    Path(purelib.strip(), "_dependencies.pth").write_text("".join(f"{d}\n" for d in ours))
    return python


def pip_install(python: Path, *args: str | Path) -> None:
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-build-isolation",
        *args,
    )


def where_happen_is(python: Path, cwd: Path) -> tuple[Path, Path]:
    """Where ``python`` imports happen and happen.transports.memory from (resolved)."""
    out = run(
        python,
        "-c",
        "import happen, happen.transports.memory as m; print(happen.__file__); print(m.__file__)",
        cwd=cwd,
    )
    package, memory = out.split()
    return Path(package).resolve().parent, Path(memory).resolve()


def type_check(workspace: Path, python: Path) -> None:
    """mypy --strict on the application, against the happen ``python`` has installed."""
    app = workspace / "app"
    command: list[str | Path] = [
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--config-file",
        app / "mypy.ini",
        "--cache-dir",
        workspace / "mypy-cache",
        "--python-executable",
        python,
        "--no-error-summary",
        "app.py",
        "misuse.py",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MYPY")}
    done = subprocess.run(command, cwd=app, env=env, capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(MISUSE_ERROR), (
        "mypy --strict should pass app.py and report only the misuse; it said:\n"
        + textwrap.indent(done.stdout + done.stderr, "  ")
    )


def test_an_application_type_checks_against_the_wheel(workspace: Path) -> None:
    wheels = workspace / "wheels"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        wheels,
        workspace / "happen-src",
    )
    (wheel,) = wheels.glob("happen-*.whl")
    python = fresh_venv(workspace / "venv-wheel")
    pip_install(python, wheel)

    package, memory = where_happen_is(python, cwd=workspace / "app")
    assert (workspace / "venv-wheel").resolve() in package.parents, package
    assert memory == package / "transports" / "memory.py"
    assert (package / "py.typed").is_file()
    type_check(workspace, python)


def test_an_application_type_checks_against_an_editable_install(workspace: Path) -> None:
    source = workspace / "happen-src"
    python = fresh_venv(workspace / "venv-editable")
    pip_install(python, "-e", source)

    package, memory = where_happen_is(python, cwd=workspace / "app")
    assert package == (source / "happen").resolve()
    assert memory == (source / "transports" / "memory.py").resolve()
    type_check(workspace, python)
