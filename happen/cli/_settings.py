"""Settings of the command: from the command line, else the environment, else a default.

Each setting has an option (``--transport``) and an environment variable
(``HAPPEN_TRANSPORT``); both go through the same parser, so a bad value reads the same
wherever it came from, and the error names where it came from.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar
from urllib.parse import urlsplit

import msgspec

from happen.cli._exit import CommandError

__all__ = [
    "CODEC",
    "LOG_LEVEL",
    "METRICS_HOST",
    "METRICS_PORT",
    "NAMESPACE",
    "SETTINGS",
    "TRANSPORT",
    "WORKERS",
    "Resolved",
    "Setting",
    "Source",
    "TransportKind",
    "log_level",
    "require_nats",
    "transport_kind",
]

T = TypeVar("T")


class Source(enum.Enum):
    """Where a setting's value came from."""

    COMMAND_LINE = "command line"
    ENVIRONMENT = "environment"
    DEFAULT = "default"


class Resolved(msgspec.Struct, Generic[T], frozen=True):
    """A setting's value and where it came from; ``given`` is the option or variable."""

    value: T
    source: Source
    given: str


class Setting(Generic[T]):
    """One setting: its option, its environment variable, its parser and its default.

    The parser takes the raw text and the name it came under, and raises ``CommandError``.
    """

    def __init__(
        self,
        option: str,
        metavar: str,
        env: str,
        parse: Callable[[str, str], T],
        default: T,
        help: str,
    ) -> None:
        self.option = option
        self.metavar = metavar
        self.env = env
        self.parse = parse
        self.default = default
        self.help = help

    def resolve(self, given: str | None, environ: Mapping[str, str]) -> Resolved[T]:
        """The command line's ``given`` value if any, else the environment's, else the default.

        An empty environment variable counts as unset. Raises ``CommandError`` for a value
        its parser refuses.
        """
        if given is not None:
            return Resolved(self.parse(given, self.option), Source.COMMAND_LINE, self.option)
        raw = environ.get(self.env, "")
        if raw != "":
            return Resolved(self.parse(raw, self.env), Source.ENVIRONMENT, self.env)
        return Resolved(self.default, Source.DEFAULT, "default")


class TransportKind(enum.Enum):
    """The kinds of transport URL the command knows."""

    MEMORY = "memory"
    NATS = "nats"


_NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def transport_kind(url: str) -> TransportKind:
    """The kind of a transport URL the parser accepted."""
    return TransportKind.MEMORY if url in ("memory", "memory://") else TransportKind.NATS


def require_nats(transport: Resolved[str], command: str) -> str:
    """The NATS URL ``command`` talks to another process through; ``CommandError`` for the
    memory transport, which reaches nothing outside this process."""
    if transport_kind(transport.value) is TransportKind.MEMORY:
        raise CommandError(
            f"{command} needs a NATS transport: on 'memory' it reaches nothing outside its "
            f"own process; pass --transport nats://host:port or set {TRANSPORT.env}"
        )
    return transport.value


def _transport(raw: str, name: str) -> str:
    url = raw.strip()
    if url in ("memory", "memory://"):
        return url
    servers = [part.strip() for part in url.split(",")]
    for server in servers:
        try:
            parts = urlsplit(server)
            parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        except ValueError as exc:
            raise CommandError(f"{name}: bad transport URL {server!r} ({exc})") from None
        if parts.scheme not in _NATS_SCHEMES or not parts.hostname:
            raise CommandError(
                f"{name}: bad transport URL {server!r}: use 'memory' or 'nats://host:port' "
                f"(several NATS servers separated by commas)"
            )
    return ",".join(servers)


# Node ids and namespaces become subject tokens: the core's rule for both.
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _namespace(raw: str, name: str) -> str:
    if not _NAMESPACE.fullmatch(raw):
        raise CommandError(
            f"{name}: namespace {raw!r} must be 1-128 ASCII letters, digits, '-' or '_'"
        )
    return raw


def _positive_int(raw: str, name: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise CommandError(f"{name} must be a positive whole number, not {raw!r}")
    return value


def _port(raw: str, name: str) -> int | None:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise CommandError(f"{name} must be a port number from 0 to 65535, not {raw!r}")
    return value


def _host(raw: str, name: str) -> str:
    host = raw.strip()
    if not host or any(c.isspace() for c in host):
        raise CommandError(f"{name} must be an address to listen on, not {raw!r}")
    return host


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(raw: str, name: str) -> str:
        value = raw.lower()
        if value not in choices:
            raise CommandError(f"{name} must be one of {', '.join(choices)}, not {raw!r}")
        return value

    return parse


TRANSPORT: Setting[str] = Setting(
    "--transport",
    "URL",
    "HAPPEN_TRANSPORT",
    _transport,
    "memory",
    "'memory' or 'nats://host:port' (a comma-separated list of servers is allowed)",
)
NAMESPACE: Setting[str] = Setting(
    "--namespace",
    "NS",
    "HAPPEN_NAMESPACE",
    _namespace,
    "happen",
    "prefix of every subject; systems sharing a NATS server see each other only within one",
)
CODEC: Setting[str] = Setting(
    "--codec",
    "CODEC",
    "HAPPEN_CODEC",
    _choice("msgpack", "json"),
    "msgpack",
    "wire codec, msgpack or json; every system of a namespace must use the same one",
)
WORKERS: Setting[int] = Setting(
    "--workers",
    "N",
    "HAPPEN_WORKERS",
    _positive_int,
    1,
    "serving processes; more than one shares the load of the same nodes over NATS",
)
LOG_LEVEL: Setting[str] = Setting(
    "--log-level",
    "LEVEL",
    "HAPPEN_LOG_LEVEL",
    _choice("debug", "info", "warning", "error"),
    "info",
    "level of the logs on stderr: debug, info, warning or error",
)

METRICS_PORT: Setting[int | None] = Setting(
    "--metrics-port",
    "P",
    "HAPPEN_METRICS_PORT",
    _port,
    None,
    "serve /metrics (Prometheus), /healthz and /readyz over HTTP on this port (0: any free)",
)
METRICS_HOST: Setting[str] = Setting(
    "--metrics-host",
    "HOST",
    "HAPPEN_METRICS_HOST",
    _host,
    "0.0.0.0",
    "address the --metrics-port endpoint listens on (127.0.0.1: this machine only)",
)

#: Every setting that also comes from the environment, for the help text and the docs.
SETTINGS: tuple[Setting[str] | Setting[int] | Setting[int | None], ...] = (
    TRANSPORT,
    NAMESPACE,
    CODEC,
    WORKERS,
    LOG_LEVEL,
    METRICS_PORT,
    METRICS_HOST,
)


def log_level(name: str) -> int:
    """The ``logging`` level for a ``LOG_LEVEL`` value."""
    return logging.getLevelNamesMapping()[name.upper()]
