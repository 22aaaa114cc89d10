"""``happen stats``: every node of a namespace, on every host, with its counters.

Each System answers a request on ``{namespace}.stats`` with one JSON reply. Stand-in
responders (raw subscribers answering in that shape) check the command's edge cases; the last
test reads a real ``happen run``.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import happen
from happen.cli._stats import StatsReply, render_table
from happen.transports.nats import NatsTransport
from tests.commands import WAIT, Command, command_env, run_command, serving
from tests.conftest import NatsServer
from tests.helpers import unique_namespace

APP = Path(__file__).with_name("cli_app.py")

COUNTERS = {
    "active": 1,
    "queued": 0,
    "max_concurrent": 100,
    "queue_limit": 10000,
    "under_pressure": False,
    "accepted": 12,
    "completed": 10,
    "failed": 1,
    "rejected": 0,
    "dropped": 0,
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py is asyncio-only


@asynccontextmanager
async def responders(url: str, namespace: str, replies: Sequence[Any]) -> AsyncIterator[None]:
    """One subscriber per reply on ``{namespace}.stats``, each answering with its reply."""
    transport = NatsTransport(url)
    await transport.start()
    try:
        for reply in replies:

            async def answer(msg: happen.Message, body: bytes = json.dumps(reply).encode()) -> None:
                await transport.publish(msg.reply, body)

            await transport.subscribe(f"{namespace}.stats", answer)
        yield
    finally:
        await transport.stop()


async def happen_stats(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    with anyio.fail_after(WAIT):
        done = await anyio.run_process(
            [sys.executable, "-m", "happen", "stats", *args], env=env, check=False
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def system_reply(system: str, host: str, pid: int, **nodes: dict[str, Any]) -> dict[str, Any]:
    return {"system": system, "host": host, "pid": pid, "nodes": nodes}


@pytest.mark.anyio
async def test_stats_prints_a_row_per_node_per_system(nats_server: NatsServer) -> None:
    url, ns = nats_server.start().url, unique_namespace()
    replies = [
        system_reply("s1", "alpha", 101, worker=COUNTERS, api=COUNTERS),
        system_reply("s2", "beta", 202, worker={**COUNTERS, "retried": 3}),
        "not a stats reply",
    ]
    env = command_env(HAPPEN_TRANSPORT=url, HAPPEN_NAMESPACE=ns)
    async with responders(url, ns, replies):
        code, out, err = await happen_stats(env=env)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"namespace '{ns}': 2 systems, 3 nodes; 1 malformed reply ignored"
    heading, *rows = lines[2:]
    assert heading.split() == [
        "NODE", "HOST/PID", "ACTIVE", "QUEUED", "MAX", "LIMIT", "PRESSURE", "ACCEPTED",
        "COMPLETED", "FAILED", "REJECTED", "DROPPED", "RETRIED",
    ]  # fmt: skip
    assert [row.split() for row in rows] == [
        ["api", "alpha/101", "1", "0", "100", "10000", "no", "12", "10", "1", "0", "0", "-"],
        ["worker", "alpha/101", "1", "0", "100", "10000", "no", "12", "10", "1", "0", "0", "-"],
        ["worker", "beta/202", "1", "0", "100", "10000", "no", "12", "10", "1", "0", "0", "3"],
    ]


@pytest.mark.anyio
async def test_stats_json_prints_one_line_per_system(nats_server: NatsServer) -> None:
    url, ns = nats_server.start().url, unique_namespace()
    replies = [system_reply("s1", "alpha", 101, worker=COUNTERS)]
    env = command_env(HAPPEN_TRANSPORT=url)
    async with responders(url, ns, replies):
        code, out, err = await happen_stats("--json", "--namespace", ns, env=env)
    assert (code, err) == (0, "")
    assert [json.loads(line) for line in out.splitlines()] == replies


@pytest.mark.anyio
async def test_stats_says_when_no_system_answers(nats_server: NatsServer) -> None:
    env = command_env(HAPPEN_TRANSPORT=nats_server.start().url)
    code, out, err = await happen_stats("--namespace", unique_namespace(), env=env)
    assert code == 1 and out == ""
    assert "no system answered on" in err and "(nobody listens)" in err


@pytest.mark.anyio
async def test_stats_watch_refreshes_until_sigint(nats_server: NatsServer, tmp_path: Path) -> None:
    url, ns = nats_server.start().url, unique_namespace()
    env = command_env(HAPPEN_TRANSPORT=url, HAPPEN_NAMESPACE=ns)
    async with responders(url, ns, [system_reply("s1", "alpha", 101, worker=COUNTERS)]):
        with Command("stats", "--watch", cwd=tmp_path, env=env) as watch:
            assert watch.stdout is not None
            await anyio.to_thread.run_sync(lambda: watch.stdout.wait_for("^worker ", count=2))
            watch.signal(signal.SIGINT)
            assert await anyio.to_thread.run_sync(watch.wait) == 0
    assert watch.stdout.text().count(f"namespace '{ns}': 1 system, 1 node") >= 2
    assert "\x1b[" not in watch.stdout.text()  # not a terminal: frames one after another


def test_the_table_lines_up_its_columns() -> None:
    replies = [
        StatsReply("s1", "a-long-host-name", 1, {"n": {**COUNTERS, "under_pressure": True}}),
        StatsReply("s2", "b", 22222, {"a-long-node-name": {"active": 3}}),
    ]
    lines = render_table(replies)
    assert len({len(line) for line in lines[:2]}) == 1  # full rows are the same width
    assert lines[2].split()[6] == "yes"
    assert lines[1].split()[:3] == ["a-long-node-name", "b/22222", "3"]


def test_stats_shows_the_nodes_of_a_served_application(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    shutil.copy(APP, tmp_path / "app.py")
    env = command_env(HAPPEN_TRANSPORT=nats_server.start().url, HAPPEN_NAMESPACE=unique_namespace())
    with Command("run", "app:setup", "--workers", "2", cwd=tmp_path, env=env) as run:
        pids = serving(run, count=2)
        for _ in range(4):
            assert run_command("send", "svc", "echo", "1", cwd=tmp_path, env=env).returncode == 0
        done = run_command("stats", "--json", cwd=tmp_path, env=env)
        run.signal(signal.SIGTERM)
        assert run.wait() == 0
    assert done.returncode == 0, done.stderr
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(reply["pid"] for reply in replies) == sorted(pids)
    assert sum(reply["nodes"]["svc"]["completed"] for reply in replies) == 4
