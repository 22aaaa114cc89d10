"""Values as JSON lines on standard output, one per value, written as soon as they come."""

from __future__ import annotations

import sys
from typing import Any

import msgspec

__all__ = ["encode_line", "write_line"]


def _fallback(value: Any) -> Any:
    # A value JSON has no form for (a decoded extension type, say): show it as text
    # rather than fail after the call has already succeeded.
    return repr(value)


_encoder = msgspec.json.Encoder(enc_hook=_fallback)


def encode_line(value: Any) -> bytes:
    """``value`` as one line of JSON (bytes as base64, other unknown types as their repr)."""
    return _encoder.encode(value) + b"\n"


def write_line(value: Any) -> None:
    """Write ``value`` as a JSON line on standard output and flush it.

    Raises ``BrokenPipeError`` when the reader is gone (``| head -1``).
    """
    out = sys.stdout.buffer
    out.write(encode_line(value))
    out.flush()
