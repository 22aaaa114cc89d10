"""Encoding and decoding of wire frames (msgpack or JSON), with a nesting-depth guard.

msgspec can overflow the C stack on extremely deep nesting, so bytes from the network are
scanned before they are decoded: anything nested deeper than the limit is refused with
``CodecError``. The scan is a single C-level pass for ordinary messages; only input that
might be deep is walked exactly.
"""

from __future__ import annotations

import re
from typing import Any, Generic, TypeVar

import msgspec

from happen._errors import CodecError, InvalidConfigError

__all__ = ["Codec", "make_codec"]

T = TypeVar("T")

# msgpack bytes that can start a container: fixmap, fixarray, array16/32, map16/32.
_MSGPACK_CONTAINER_BYTES = bytes(range(0x80, 0xA0)) + bytes((0xDC, 0xDD, 0xDE, 0xDF))
_MSGPACK_OTHER_BYTES = bytes(b for b in range(256) if b not in _MSGPACK_CONTAINER_BYTES)
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class Codec:
    """Encodes values to bytes and decodes bytes into wire frames."""

    def __init__(self, name: str, max_depth: int) -> None:
        self.name = name
        self.max_depth = max_depth
        if name == "msgpack":
            self._encoder: msgspec.msgpack.Encoder | msgspec.json.Encoder = (
                msgspec.msgpack.Encoder()
            )
            self._too_deep = self._msgpack_too_deep
        else:
            self._encoder = msgspec.json.Encoder()
            self._too_deep = self._json_too_deep

    def encode(self, value: Any) -> bytes:
        """Encode ``value``; raise ``CodecError`` naming what could not be encoded."""
        try:
            data = self._encoder.encode(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise CodecError(f"cannot encode with the {self.name} codec: {exc}") from None
        except RecursionError:
            raise CodecError(
                f"cannot encode with the {self.name} codec: the value is nested too deeply"
            ) from None
        if self._too_deep(data):
            raise CodecError(
                f"cannot send a message nested deeper than {self.max_depth} levels, counting "
                "its envelope (the max_depth system setting); nothing was sent"
            )
        return data

    def decoder(self, type: type[T]) -> Decoder[T]:
        """A reusable decoder for ``type``, guarded by the depth scan."""
        return Decoder(self, type)

    def _msgpack_too_deep(self, data: bytes) -> bool:
        if len(data.translate(None, _MSGPACK_OTHER_BYTES)) <= self.max_depth:
            return False
        return _msgpack_depth_exceeds(data, self.max_depth)

    def _json_too_deep(self, data: bytes) -> bool:
        if data.count(b"[") + data.count(b"{") <= self.max_depth:
            return False
        depth = 0
        for match in _JSON_TOKENS.finditer(data):
            token = match.group()
            if token in (b"[", b"{"):
                depth += 1
                if depth > self.max_depth:
                    return True
            elif token in (b"]", b"}"):
                depth -= 1
        return False


class Decoder(Generic[T]):
    """Decodes bytes into one frame type after checking nesting depth."""

    __slots__ = ("_codec", "_decode", "_too_deep")

    def __init__(self, codec: Codec, type: type[T]) -> None:
        self._codec = codec
        self._too_deep = codec._too_deep
        if codec.name == "msgpack":
            self._decode = msgspec.msgpack.Decoder(type).decode
        else:
            self._decode = msgspec.json.Decoder(type).decode

    def decode(self, data: bytes) -> T:
        """Decode ``data``; raise ``CodecError`` on bad, mis-shaped or too-deep input."""
        if self._too_deep(data):
            raise CodecError(f"refused input nested deeper than {self._codec.max_depth} levels")
        try:
            return self._decode(data)
        except msgspec.ValidationError as exc:
            raise CodecError(f"malformed message: {exc}") from None
        except (msgspec.DecodeError, RecursionError) as exc:
            raise CodecError(f"undecodable {self._codec.name} message: {exc}") from None


def make_codec(name: object, max_depth: object) -> Codec:
    """Build the codec for a system setting; raise ``InvalidConfigError`` on bad values."""
    if name not in ("msgpack", "json"):
        raise InvalidConfigError(f"codec must be 'msgpack' or 'json', not {name!r}")
    if type(max_depth) is not int or not 2 <= max_depth <= 1000:
        raise InvalidConfigError(f"max_depth must be an int from 2 to 1000, not {max_depth!r}")
    assert isinstance(name, str)
    return Codec(name, max_depth)


def _msgpack_depth_exceeds(data: bytes, limit: int) -> bool:
    """Walk msgpack headers without building values; True when nesting exceeds ``limit``."""
    pos = 0
    n = len(data)
    stack: list[int] = []  # items left to read in each open container
    while pos < n:
        b = data[pos]
        pos += 1
        children = 0
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            pass
        elif b <= 0x8F:
            children = (b & 0x0F) * 2
        elif b <= 0x9F:
            children = b & 0x0F
        elif b <= 0xBF:
            pos += b & 0x1F
        elif b in (0xC4, 0xD9):
            pos += 1 + data[pos] if pos < n else 1
        elif b in (0xC5, 0xDA):
            pos += 2 + int.from_bytes(data[pos : pos + 2], "big")
        elif b in (0xC6, 0xDB):
            pos += 4 + int.from_bytes(data[pos : pos + 4], "big")
        elif b == 0xC7:
            pos += 2 + (data[pos] if pos < n else 0)
        elif b == 0xC8:
            pos += 3 + int.from_bytes(data[pos : pos + 2], "big")
        elif b == 0xC9:
            pos += 5 + int.from_bytes(data[pos : pos + 4], "big")
        elif b in (0xCA, 0xCE, 0xD2):
            pos += 4
        elif b in (0xCB, 0xCF, 0xD3):
            pos += 8
        elif b in (0xCC, 0xD0):
            pos += 1
        elif b in (0xCD, 0xD1):
            pos += 2
        elif 0xD4 <= b <= 0xD8:
            pos += 1 + (1 << (b - 0xD4))
        elif b == 0xDC:
            children = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        elif b == 0xDD:
            children = int.from_bytes(data[pos : pos + 4], "big")
            pos += 4
        elif b == 0xDE:
            children = 2 * int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        elif b == 0xDF:
            children = 2 * int.from_bytes(data[pos : pos + 4], "big")
            pos += 4
        else:  # 0xC1 is never used: the decoder will reject the input
            return False
        if stack:
            stack[-1] -= 1
        if b in _MSGPACK_CONTAINER_BYTES:
            if len(stack) + 1 > limit:
                return True
            if children:
                stack.append(children)
        while stack and stack[-1] == 0:
            stack.pop()
    return False
