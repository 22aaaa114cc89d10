"""The JSON codec: its depth guard costs linear time on any bytes, and it changes no value."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import happen
from happen._codec import _json_depth_exceeds, make_codec
from tests.helpers import assert_accounted, drained, make_system

LIMIT = 64
SIZE = 200_000  # bytes: a frame a peer can send (the NATS max_payload is 1 MiB by default)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from('ab"\\[]{}\n\x00é'), max_size=30)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.text(alphabet=st.sampled_from('k"\\[{'), max_size=5), inner, max_size=5
        )
    ),
    max_leaves=60,
)


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def depth_exceeds_byte_by_byte(data: bytes, limit: int) -> bool:
    """The reference: one byte at a time, tracking whether it is in a string or an escape."""
    level = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == ord("\\"):
                escaped = True
            elif byte == ord('"'):
                in_string = False
        elif byte == ord('"'):
            in_string = True
        elif byte in b"[{":
            level += 1
            if level > limit:
                return True
        elif byte in b"]}":
            level -= 1
    return False


@settings(max_examples=300, deadline=None)
@given(values, st.integers(min_value=0, max_value=70))
def test_json_scan_agrees_with_the_real_depth(value: Any, wrap: int) -> None:
    for i in range(wrap):
        value = [value] if i % 2 else {"k": value}
    data = msgspec.json.encode(value)
    real = depth(value)
    assert _json_depth_exceeds(data, real) is False
    if real:
        assert _json_depth_exceeds(data, real - 1) is True


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200) | st.text(alphabet='"\\[]{}a ', max_size=200).map(str.encode))
def test_json_scan_agrees_with_a_byte_by_byte_scan_on_any_bytes(data: bytes) -> None:
    for limit in (0, 1, 3):
        assert _json_depth_exceeds(data, limit) == depth_exceeds_byte_by_byte(data, limit)


def crafted_frames() -> dict[str, bytes]:
    """Frames of about 200 KB built to make a backtracking scan take minutes; each holds
    more than LIMIT brackets, so the exact scan runs on all of them."""
    head = b'{"k":"req","type":"x","payload":'
    return {
        "escaped quotes in an unterminated string": head + b'"' + b'\\"' * (SIZE // 2) + b"[" * 99,
        "escaped quotes outside any string": head + b'\\"' * (SIZE // 2) + b"{" * 99,
        "a backslash run escaping the closing quote": (
            head + b'"' + b"\\" * SIZE + b'\\"' + b"[" * 99
        ),
        "backslashes and quotes alternating": head + b'"\\\\\\"' * (SIZE // 5) + b"[" * 99,
        "many short strings": head + b"[" * 63 + b'"\\"",' * (SIZE // 5) + b'""' + b"]" * 63 + b"}",
        "many empty containers": head + b"[" + b"[],{}," * (SIZE // 6) + b"[]]}",
        "deep nesting": b"[" * SIZE,
        "deep objects": b'{"a":' * (SIZE // 5),
    }


@pytest.mark.parametrize("name", list(crafted_frames()))
def test_crafted_json_frames_are_refused_or_decoded_in_linear_time(name: str) -> None:
    data = crafted_frames()[name]
    decoder = make_codec("json", LIMIT).decoder(object)
    started = time.perf_counter()
    try:
        decoder.decode(data)
    except happen.CodecError:
        pass
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"{name}: {len(data)} bytes took {elapsed:.2f} s"


# ----- NaN and infinities ---------------------------------------------------------------


@dataclasses.dataclass
class Reading:
    sensor: str
    value: float


class Sample(msgspec.Struct):
    label: str
    values: list[float]


NON_FINITE = [float("nan"), float("inf"), float("-inf")]
HOLDERS = [
    lambda x: x,
    lambda x: {"a": [1, {"b": (None, x)}]},
    lambda x: Reading("t1", x),
    lambda x: [Sample("s", [0.5, x])],
    lambda x: {frozenset({x})},
]


@pytest.mark.anyio
async def test_json_refuses_nan_and_infinity_at_the_sender(transport_url: str) -> None:
    async with make_system(transport_url, codec="json") as system:
        node = system.create_node("n")
        node.on("x", lambda e, c: "ok")
        client = system.create_node("client")
        for bad in NON_FINITE:
            for hold in HOLDERS:
                payload = hold(bad)
                with pytest.raises(happen.CodecError, match="NaN/infinity cannot be encoded"):
                    await client.send("n", {"type": "x", "payload": payload})
                with pytest.raises(happen.CodecError, match="use msgpack"):
                    await client.broadcast({"type": "x", "payload": payload})
        assert node.stats().accepted == 0
        # nulls and finite floats still travel; so does the text "null" in a string
        payload = {"none": None, "pi": 3.25, "text": "null NaN Infinity", "big": 1e308}
        node.on("echo", lambda e, c: e.payload)
        assert await client.send("n", {"type": "echo", "payload": payload}) == payload


@pytest.mark.anyio
async def test_json_handler_returning_nan_fails_the_call(transport_url: str) -> None:
    async with make_system(transport_url, codec="json") as system:
        node = system.create_node("n")
        node.on("x", lambda e, c: {"mean": float("nan")})
        client = system.create_node("client")
        with pytest.raises(happen.HandlerError) as info:
            await client.send("n", {"type": "x"})
        assert info.value.remote_type == "CodecError"
        assert "NaN/infinity cannot be encoded as JSON" in info.value.remote_message
        await drained(node)
        assert assert_accounted(node, sent=1).failed == 1


@pytest.mark.anyio
async def test_msgpack_carries_nan_and_infinity_unchanged(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("n")
        node.on("echo", lambda e, c: e.payload)
        client = system.create_node("client")
        nan, inf, minus_inf = await client.send(
            "n", {"type": "echo", "payload": [float("nan"), float("inf"), float("-inf")]}
        )
        assert math.isnan(nan) and inf == math.inf and minus_inf == -math.inf
