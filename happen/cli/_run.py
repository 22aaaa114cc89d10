"""``happen run module:attr``: serve an application in this process, or in N workers."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping

import anyio

import happen
from happen.cli._app import Application
from happen.cli._exit import CommandError
from happen.cli._serve import serve
from happen.cli._settings import (
    CODEC,
    LOG_LEVEL,
    METRICS_HOST,
    METRICS_PORT,
    NAMESPACE,
    TRANSPORT,
    WORKERS,
    Resolved,
    Source,
    TransportKind,
    log_level,
    transport_kind,
)
from happen.cli._workers import supervise

__all__ = ["run"]

log = logging.getLogger("happen.cli")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Serve ``args.app`` until SIGINT or SIGTERM; return the exit code.

    Raises ``CommandError`` for bad settings, an application that cannot be loaded, a
    server that cannot be reached, or ``--workers`` above 1 on the memory transport.
    """
    transport = TRANSPORT.resolve(args.transport, environ)
    namespace = NAMESPACE.resolve(args.namespace, environ)
    codec = CODEC.resolve(args.codec, environ)
    workers = WORKERS.resolve(args.workers, environ)
    level = LOG_LEVEL.resolve(args.log_level, environ)
    metrics_port = METRICS_PORT.resolve(args.metrics_port, environ)
    metrics_host = METRICS_HOST.resolve(args.metrics_host, environ)
    logging.basicConfig(level=log_level(level.value), format=LOG_FORMAT, stream=sys.stderr)
    supervisor_pid: int | None = args.supervisor_pid
    app = Application.load(args.app)
    notices = app.check(transport, namespace, codec)
    if supervisor_pid is None:  # a worker's supervisor has said these already
        for notice in notices:
            log.warning(notice)
    url = app.transport(transport)
    if workers.value > 1:
        if metrics_port.value is not None:
            raise CommandError(
                f"{metrics_port.given} serves one process: with {workers.given}="
                f"{workers.value} run one 'happen run' per port instead (or scrape "
                f"'happen stats --json')"
            )
        if url is not None and transport_kind(url) is TransportKind.MEMORY:
            raise CommandError(
                f"{workers.given}={workers.value} needs a NATS transport: on 'memory' each "
                f"worker would serve nodes no other process reaches; pass --transport "
                f"nats://host:port or set {TRANSPORT.env}"
            )
        command = [sys.executable, "-m", "happen", "run", args.app, "--workers", "1"]
        command += ["--supervisor-pid", str(os.getpid())]
        env = dict(environ)
        for setting, resolved in (
            (TRANSPORT, transport),
            (NAMESPACE, namespace),
            (CODEC, codec),
            (LOG_LEVEL, level),
        ):
            if resolved.source is not Source.DEFAULT:
                env[setting.env] = str(resolved.value)
        return anyio.run(supervise, command, workers.value, env)
    where = url if url is not None else "the transport set in code"
    label = f"{args.app} on {where}"
    monitor = None
    if metrics_port.value is not None:
        monitor = (metrics_host.value, metrics_port.value)
    anyio.run(_serve_app, app, label, transport, namespace, codec, supervisor_pid, monitor)
    return 0


async def _serve_app(
    app: Application,
    label: str,
    transport: Resolved[str],
    namespace: Resolved[str],
    codec: Resolved[str],
    supervisor_pid: int | None,
    monitor: tuple[str, int] | None,
) -> None:
    system = await app.make_system(transport, namespace, codec)
    label += f", namespace {system.namespace!r}"
    try:
        await serve(system, label=label, supervisor_pid=supervisor_pid, monitor=monitor)
    except happen.HappenError as exc:
        raise CommandError(f"cannot serve {app.target}: {exc}") from None
