"""The monitoring endpoint of ``happen run --metrics-port``: a tiny HTTP/1.x server.

- ``GET /metrics``: the node counters in the Prometheus text format (``happen.metrics``);
- ``GET /healthz``: 200 while the process is alive (it answers at all);
- ``GET /readyz``: 200 once the system has started and its subscriptions are live
  (``system.ready()``), 503 before that and while it stops.

One request per connection (``Connection: close``), ``GET`` and ``HEAD`` only; a request
head must arrive within ``REQUEST_TIMEOUT`` seconds and fit in ``MAX_HEAD`` bytes. No web
framework: a scraper and a probe need nothing more.
"""

from __future__ import annotations

import enum
import logging

import anyio
from anyio.abc import Listener, SocketStream

import happen
from happen.metrics import CONTENT_TYPE, prometheus_text

__all__ = ["MAX_HEAD", "REQUEST_TIMEOUT", "Monitor", "Readiness"]

log = logging.getLogger("happen.cli")

#: Seconds a client has to send its request head.
REQUEST_TIMEOUT = 5.0
#: The largest request head read, in bytes.
MAX_HEAD = 8192

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class Readiness(enum.Enum):
    """What ``/readyz`` says: 503 while starting or stopping, 200 while ready."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


class Monitor:
    """The endpoint's view of one serving system; the serving code sets ``readiness``."""

    def __init__(self, system: happen.System) -> None:
        self.system = system
        self.readiness = Readiness.STARTING

    async def serve(self, listener: Listener[SocketStream]) -> None:
        """Answer requests on ``listener`` until cancelled. Never raises: a failed
        connection is logged at debug level and closed."""
        try:
            await listener.serve(self._handle)
        except Exception:
            log.exception("the monitoring endpoint stopped")

    async def _handle(self, stream: SocketStream) -> None:
        try:
            async with stream:
                status, content_type, body, head_only = await self._respond(stream)
                header = (
                    f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                    f"Content-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    "Cache-Control: no-store\r\n"
                    "Connection: close\r\n\r\n"
                ).encode()
                await stream.send(header if head_only else header + body)
        except Exception as exc:  # the client went away, or sent nothing in time
            log.debug("monitoring request failed: %r", exc)

    async def _respond(self, stream: SocketStream) -> tuple[int, str, bytes, bool]:
        text = "text/plain; charset=utf-8"
        try:
            head = await _read_head(stream)
        except _TooLarge:
            return 431, text, b"request head too large\n", False
        if not head:
            raise ConnectionError("the client sent no request")
        parts = head.split(b"\n", 1)[0].decode("latin-1").strip().split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, text, b"bad request line\n", False
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return 405, text, b"only GET and HEAD\n", False
        head_only = method == "HEAD"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE, prometheus_text(self.system).encode(), head_only
        if path == "/healthz":
            return 200, text, b"ok\n", head_only
        if path == "/readyz":
            state = self.readiness
            status = 200 if state is Readiness.READY else 503
            return status, text, f"{state.value}\n".encode(), head_only
        return 404, text, b"not found: try /metrics, /healthz or /readyz\n", head_only


class _TooLarge(Exception):
    pass


async def _read_head(stream: SocketStream) -> bytes:
    """The request head (what came before the client closed, if it did); ``_TooLarge``
    past ``MAX_HEAD``, ``TimeoutError`` past ``REQUEST_TIMEOUT``."""
    data = b""
    with anyio.fail_after(REQUEST_TIMEOUT):
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            if len(data) > MAX_HEAD:
                raise _TooLarge
            try:
                data += await stream.receive(4096)
            except anyio.EndOfStream:
                break
    return data
