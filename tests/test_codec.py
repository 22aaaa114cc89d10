"""The nesting guard measures exactly the depth msgspec would build, for every msgpack type."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from happen._codec import _msgpack_depth_exceeds, make_codec

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
    | st.binary(max_size=70_000)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=60,
)


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(values, st.integers(min_value=0, max_value=70))
def test_msgpack_walker_agrees_with_the_real_depth(value: Any, wrap: int) -> None:
    for _ in range(wrap):
        value = [value]
    data = msgspec.msgpack.encode(value)
    real = depth(value)
    assert _msgpack_depth_exceeds(data, real) is False
    if real:
        assert _msgpack_depth_exceeds(data, real - 1) is True


@settings(max_examples=100, deadline=None)
@given(values, st.integers(min_value=0, max_value=70))
def test_codecs_refuse_exactly_what_is_too_deep(value: Any, wrap: int) -> None:
    for _ in range(wrap):
        value = {"k": value}
    for name in ("msgpack", "json"):
        codec = make_codec(name, 32)
        data = (msgspec.msgpack if name == "msgpack" else msgspec.json).encode(value)
        assert codec._too_deep(data) == (depth(value) > 32), name
