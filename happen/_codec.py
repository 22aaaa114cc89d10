"""Encoding and decoding of wire frames (msgpack or JSON), with a nesting-depth guard.

msgspec can overflow the C stack on extremely deep nesting, so bytes from the network are
scanned before they are decoded: anything nested deeper than the limit is refused with
``CodecError``. The scan is a single C-level pass for ordinary messages; only input that
might be deep is walked exactly, in time linear in its length whatever the bytes are.

A codec never changes a value silently: msgspec's JSON encoder writes NaN and infinities as
``null``, so the JSON codec refuses them with ``CodecError``. Only output that holds a
``null`` is checked, by walking the value.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Generic, TypeVar

import msgspec

from happen._errors import CodecError, InvalidConfigError, ValidationError

__all__ = ["Codec", "Converter", "make_codec", "path_of"]

T = TypeVar("T")

# msgpack bytes that can start a container: fixmap, fixarray, array16/32, map16/32.
_MSGPACK_CONTAINER_BYTES = bytes(range(0x80, 0xA0)) + bytes((0xDC, 0xDD, 0xDE, 0xDF))
_MSGPACK_OTHER_BYTES = bytes(b for b in range(256) if b not in _MSGPACK_CONTAINER_BYTES)
_JSON_OTHER_BYTES = bytes(b for b in range(256) if b not in b"[{")
_NON_FINITE_JSON = "NaN/infinity cannot be encoded as JSON; use msgpack or encode it as a string"
# A JSON string (possessive: never backtracks into its escapes), a bracket, or the opening
# quote of a string that is never closed: every quote matches, so the scan never retries the
# bytes of an unterminated string from a later position.
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[\[\]{}]|"', re.DOTALL)


class Codec:
    """Encodes values to bytes and decodes bytes into wire frames."""

    def __init__(self, name: str, max_depth: int) -> None:
        self.name = name
        self.max_depth = max_depth
        self._json = name == "json"
        self._converters: dict[Any, Converter[Any]] = {}
        #: The bytes of the last value encoded, which passed the depth check: the memory
        #: transport hands this very object to the subscribers, and they need not scan it
        #: again (bytes are immutable, and the reference kept means the id is not reused).
        self.checked = b""
        if name == "msgpack":
            self._encoder: msgspec.msgpack.Encoder | msgspec.json.Encoder = (
                msgspec.msgpack.Encoder()
            )
            self._exact = _msgpack_depth_exceeds
            self._other = _MSGPACK_OTHER_BYTES
        else:
            self._encoder = msgspec.json.Encoder()
            self._exact = _json_depth_exceeds
            self._other = _JSON_OTHER_BYTES

    def _too_deep(self, data: bytes) -> bool:
        """Nested deeper than ``max_depth``? One C-level count decides for ordinary input:
        fewer bytes that can open a container than the limit. Only the rest are walked."""
        limit = self.max_depth
        return len(data.translate(None, self._other)) > limit and self._exact(data, limit)

    def encode(self, value: Any) -> bytes:
        """Encode ``value``; raise ``CodecError`` naming what could not be encoded (with JSON,
        that includes NaN and infinities, which JSON cannot represent)."""
        try:
            data = self._encoder.encode(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise CodecError(f"cannot encode with the {self.name} codec: {exc}") from None
        except RecursionError:
            raise CodecError(
                f"cannot encode with the {self.name} codec: the value is nested too deeply"
            ) from None
        limit = self.max_depth  # (``_too_deep``, written out: every frame sent comes here)
        if len(data.translate(None, self._other)) > limit and self._exact(data, limit):
            raise CodecError(
                f"cannot send a message nested deeper than {self.max_depth} levels, counting "
                "its envelope (the max_depth system setting); nothing was sent"
            )
        if self._json and b"null" in data and _holds_non_finite_float(value):
            raise CodecError(f"cannot encode with the json codec: {_NON_FINITE_JSON}")
        self.checked = data
        return data

    def decoder(self, type: type[T]) -> Decoder[T]:
        """A reusable decoder for ``type``, guarded by the depth scan."""
        return Decoder(self, type)

    def converter(self, type: Any) -> Converter[Any]:
        """A converter of decoded values to ``type``, made once per type (``TypeError`` if
        msgspec cannot convert to it)."""
        try:
            return self._converters[type]
        except KeyError:
            pass
        except TypeError:  # an unhashable type (Annotated with unhashable metadata)
            return Converter(type, str_keys=self._json)
        converter: Converter[Any] = Converter(type, str_keys=self._json)
        if len(self._converters) >= 1024:
            self._converters.clear()
        self._converters[type] = converter
        return converter


class Decoder(Generic[T]):
    """Decodes bytes into one frame type after checking nesting depth."""

    __slots__ = ("_codec", "_decode", "_exact", "_other")

    def __init__(self, codec: Codec, type: type[T]) -> None:
        self._codec = codec
        self._other = codec._other
        self._exact = codec._exact
        if codec.name == "msgpack":
            self._decode = msgspec.msgpack.Decoder(type).decode
        else:
            self._decode = msgspec.json.Decoder(type).decode

    def decode(self, data: bytes) -> T:
        """Decode ``data``; raise ``CodecError`` on bad, mis-shaped or too-deep input."""
        codec = self._codec
        if data is not codec.checked:  # (``Codec._too_deep``, written out)
            limit = codec.max_depth
            if len(data.translate(None, self._other)) > limit and self._exact(data, limit):
                raise CodecError(f"refused input nested deeper than {limit} levels")
        try:
            return self._decode(data)
        except msgspec.ValidationError as exc:
            raise CodecError(f"malformed message: {exc}") from None
        except (msgspec.DecodeError, RecursionError) as exc:
            raise CodecError(f"undecodable {self._codec.name} message: {exc}") from None


_QUALIFIED = re.compile(r"\b[\w.]+\.(\w+)")  # module.Name -> Name
_PATH = re.compile(r" - at `(\$[^`]*)`$")


def path_of(message: str) -> str:
    """The path msgspec names at the end of a validation message (``"$"`` when none)."""
    found = _PATH.search(message)
    return found.group(1) if found else "$"


def type_name(target: Any) -> str:
    """How a message names a type: ``Order``, ``list[Item]``."""
    if isinstance(target, type):
        return target.__qualname__
    return _QUALIFIED.sub(r"\1", repr(target))


class Converter(Generic[T]):
    """Converts decoded values to one type with ``msgspec.convert``, strict as msgspec is by
    default. Dict keys may be strings standing for other types with the JSON codec, whose
    keys are always strings; otherwise nothing is coerced.
    """

    __slots__ = ("_str_keys", "name", "type")

    def __init__(self, target: Any, *, str_keys: bool) -> None:
        try:
            info = msgspec.inspect.type_info(target)
        except Exception as exc:  # unsupported types, unresolvable annotations
            raise TypeError(f"msgspec cannot convert values to {target!r}: {exc}") from None
        if isinstance(info, msgspec.inspect.CustomType):
            raise TypeError(
                f"msgspec cannot build a {type_name(target)} from decoded data: use a "
                "msgspec Struct, a dataclass, a TypedDict or another type msgspec supports"
            )
        self.type = target
        self.name = type_name(target)
        self._str_keys = str_keys

    def __call__(self, value: Any) -> T:
        """``value`` as this type; ``ValidationError`` naming the field that does not fit."""
        try:
            result: T = msgspec.convert(value, self.type, str_keys=self._str_keys)
        except msgspec.ValidationError as exc:
            message = str(exc)
            raise ValidationError(
                f"does not fit {self.name}: {message}", path=path_of(message)
            ) from None
        except Exception as exc:  # a __post_init__ raising something else refuses it too
            raise ValidationError(
                f"does not fit {self.name}: {type(exc).__name__}: {exc}"
            ) from None
        return result


def make_codec(name: object, max_depth: object) -> Codec:
    """Build the codec for a system setting; raise ``InvalidConfigError`` on bad values."""
    if name not in ("msgpack", "json"):
        raise InvalidConfigError(f"codec must be 'msgpack' or 'json', not {name!r}")
    if type(max_depth) is not int or not 2 <= max_depth <= 1000:
        raise InvalidConfigError(f"max_depth must be an int from 2 to 1000, not {max_depth!r}")
    assert isinstance(name, str)
    return Codec(name, max_depth)


_SKIPPED_TYPES = frozenset((str, int, bool, type(None), bytes))


def _holds_non_finite_float(value: Any) -> bool:
    """True when ``value`` holds a NaN or infinite float where msgspec would encode it: in a
    dict's values, a list, tuple or set, or a field of a Struct, dataclass or attrs class.

    Iterative, so any nesting msgspec could encode is walked without recursion.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _SKIPPED_TYPES:
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, msgspec.Struct):
            stack.extend(getattr(item, name) for name in item.__struct_fields__)
        else:
            stack.extend(_field_values(item))
    return False


def _field_values(item: Any) -> list[Any]:
    """The field values msgspec encodes for a dataclass or attrs instance; ``[]`` otherwise."""
    kind = type(item)
    if hasattr(kind, "__dataclass_fields__"):
        return [getattr(item, field.name) for field in dataclasses.fields(item)]
    attrs_fields = getattr(kind, "__attrs_attrs__", None)
    if attrs_fields is not None:
        return [getattr(item, field.name) for field in attrs_fields]
    return []


def _json_depth_exceeds(data: bytes, limit: int) -> bool:
    """True when JSON ``data`` nests arrays and objects deeper than ``limit``.

    Linear in ``len(data)`` whatever the bytes: one left-to-right pass, a string skipped in
    one possessive match, escapes included. An unterminated string ends the scan: the decoder
    rejects the input there, as it rejects any malformed input past the depth seen so far.
    """
    depth = 0
    for token in _JSON_TOKENS.finditer(data):
        start = token.start()
        byte = data[start]
        if byte == 0x5B or byte == 0x7B:  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte == 0x5D or byte == 0x7D:  # ] }
            depth -= 1
        elif token.end() - start == 1:  # a quote that opens no complete string
            return False
    return False


def _msgpack_table() -> list[tuple[int, int, int]]:
    """For each first byte: (kind, a, b).

    kind 0: a scalar of ``a`` bytes in all; kind 1: a string/bin/ext whose length is in the
    ``a`` bytes after the header, plus ``b`` more bytes; kind 2: a container of ``a`` items
    (fixmap items count keys and values); kind 3: a container whose count is in the ``a``
    bytes after the header, times ``b``; kind 4: never used (0xc1).
    """
    table: list[tuple[int, int, int]] = []
    for byte in range(256):
        if byte <= 0x7F or byte >= 0xE0 or byte in (0xC0, 0xC2, 0xC3):
            table.append((0, 1, 0))
        elif byte <= 0x8F:
            table.append((2, (byte & 0x0F) * 2, 0))
        elif byte <= 0x9F:
            table.append((2, byte & 0x0F, 0))
        elif byte <= 0xBF:
            table.append((0, 1 + (byte & 0x1F), 0))
        elif byte in (0xC4, 0xD9):
            table.append((1, 1, 0))
        elif byte in (0xC5, 0xDA):
            table.append((1, 2, 0))
        elif byte in (0xC6, 0xDB):
            table.append((1, 4, 0))
        elif byte == 0xC7:
            table.append((1, 1, 1))
        elif byte == 0xC8:
            table.append((1, 2, 1))
        elif byte == 0xC9:
            table.append((1, 4, 1))
        elif byte in (0xCA, 0xCE, 0xD2):
            table.append((0, 5, 0))
        elif byte in (0xCB, 0xCF, 0xD3):
            table.append((0, 9, 0))
        elif byte in (0xCC, 0xD0):
            table.append((0, 2, 0))
        elif byte in (0xCD, 0xD1):
            table.append((0, 3, 0))
        elif 0xD4 <= byte <= 0xD8:
            table.append((0, 2 + (1 << (byte - 0xD4)), 0))
        elif byte == 0xDC:
            table.append((3, 2, 1))
        elif byte == 0xDD:
            table.append((3, 4, 1))
        elif byte == 0xDE:
            table.append((3, 2, 2))
        elif byte == 0xDF:
            table.append((3, 4, 2))
        else:
            table.append((4, 0, 0))
    return table


_MSGPACK_TABLE = _msgpack_table()


def _msgpack_depth_exceeds(data: bytes, limit: int) -> bool:
    """Walk msgpack headers without building values; True when nesting exceeds ``limit``."""
    table = _MSGPACK_TABLE
    from_bytes = int.from_bytes
    pos = 0
    n = len(data)
    stack: list[int] = []  # items left in each enclosing container
    left = 1  # items left in the innermost open container (the top level holds one)
    while pos < n:
        kind, a, b = table[data[pos]]
        if kind == 0:
            pos += a
        elif kind == 1:
            pos += 1 + a + b + from_bytes(data[pos + 1 : pos + 1 + a], "big")
        elif kind == 4:
            return False  # not msgpack: the decoder will reject it
        else:
            if kind == 2:
                pos += 1
                children = a
            else:
                children = from_bytes(data[pos + 1 : pos + 1 + a], "big") * b
                pos += 1 + a
            if len(stack) + 1 > limit:
                return True
            if children:
                stack.append(left - 1)
                left = children
                continue
        left -= 1
        while not left and stack:
            left = stack.pop()
    return False
