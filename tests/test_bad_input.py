"""Bad input gets a clear error naming what was wrong, and nothing is lost."""

from __future__ import annotations

import pytest

import happen
from tests.helpers import assert_accounted, drained, make_system

pytestmark = pytest.mark.anyio

BAD_IDS = [
    "a.b",
    "*",
    ">",
    "has space",
    "",
    "x" * 500,
    "tab\there",
    "new\nline",
    "caf\u00e9",
    "\u0430dmin",
    "semi;colon",
    None,
    7,
]
BAD_TYPES = [
    "",
    "a..b",
    ".a",
    "a.",
    "*",
    ">",
    "a b",
    "x" * 500,
    "line\nbreak",
    "\u0455end",
    "a/b",
    None,
    3,
]


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_invalid_node_ids_are_refused_before_any_subject_is_built(
    transport_url: str, bad: object
) -> None:
    async with make_system(transport_url) as system:
        with pytest.raises(happen.InvalidIdError, match="invalid node id"):
            system.create_node(bad)  # type: ignore[arg-type]
        client = system.create_node("client")
        with pytest.raises(happen.InvalidIdError, match="invalid node id"):
            await client.send(bad, {"type": "x"})  # type: ignore[arg-type]
        with pytest.raises(happen.InvalidIdError):
            system.concurrency_for(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", BAD_TYPES)
async def test_invalid_event_types_are_refused(transport_url: str, bad: object) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("n")
        with pytest.raises(happen.InvalidIdError, match="invalid event type"):
            await node.send("n", {"type": bad})
        with pytest.raises(happen.InvalidIdError, match="invalid event type"):
            await node.broadcast({"type": bad})
        if isinstance(bad, str) and "*" not in bad:
            with pytest.raises(happen.InvalidIdError):
                node.on(bad, lambda e, c: None)
        assert node.stats().accepted == 0


def test_valid_edges_are_accepted() -> None:
    system = happen.System()
    system.create_node("x" * 128)
    system.create_node("A-b_9")
    node = system.create_node("n")
    node.on("t" * 256, lambda e, c: None)
    node.on("ns:order.created-v2_x", lambda e, c: None)


async def test_event_without_type_or_of_wrong_shape(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("n")
        with pytest.raises(happen.InvalidIdError, match="no 'type'"):
            await node.send("n", {"payload": 1})
        with pytest.raises(TypeError, match="unexpected event keys"):
            await node.send("n", {"type": "x", "payload": 1, "extra": 2})
        with pytest.raises(TypeError, match="not list"):
            await node.send("n", ["x"])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="priority"):
            await node.send("n", {"type": "x"}, priority="high")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            await node.send("n", {"type": "x"}, timeout=-1)


async def test_unencodable_payload_fails_at_the_sender_naming_the_type(
    transport_url: str,
) -> None:
    class Widget:
        pass

    async with make_system(transport_url) as system:
        node = system.create_node("n")
        node.on("x", lambda e, c: None)
        client = system.create_node("client")
        with pytest.raises(happen.CodecError, match="Widget"):
            await client.send("n", {"type": "x", "payload": {"w": Widget()}})
        with pytest.raises(happen.CodecError, match="Widget"):
            await client.broadcast({"type": "x", "payload": Widget()})
        assert node.stats().accepted == 0


async def test_unencodable_result_fails_the_call_as_handler_error(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("n")
        node.on("x", lambda e, c: object())
        client = system.create_node("client")
        with pytest.raises(happen.HandlerError) as info:
            await client.send("n", {"type": "x"})
        assert info.value.remote_type == "CodecError"
        assert "object" in info.value.remote_message
        await drained(node)
        assert assert_accounted(node, sent=1).failed == 1


async def test_deeply_nested_payload_is_refused(transport_url: str) -> None:
    async with make_system(transport_url, max_depth=16) as system:
        node = system.create_node("n")
        node.on("x", lambda e, c: "ok")
        deep: list = []
        cursor = deep
        for _ in range(40):
            cursor.append([])
            cursor = cursor[0]
        with pytest.raises(happen.CodecError, match="nested deeper"):
            await node.send("n", {"type": "x", "payload": deep})
        assert await node.send("n", {"type": "x", "payload": [[["shallow"]]]}) == "ok"


async def test_payload_over_max_payload_is_refused_before_publishing(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        node = system.create_node("n")
        node.on("x", lambda e, c: "ok")
        huge = "x" * (2 * 1024 * 1024)
        with pytest.raises(happen.PayloadTooLargeError, match="max_payload"):
            await node.send("n", {"type": "x", "payload": huge})
        assert node.stats().accepted == 0
        assert await node.send("n", {"type": "x", "payload": "small"}) == "ok"


async def test_sending_after_stop_raises(transport_url: str) -> None:
    system = make_system(transport_url)
    async with system:
        node = system.create_node("n")
        node.on("x", lambda e, c: None)
    with pytest.raises(happen.SystemStoppedError, match="stopped"):
        await node.send("n", {"type": "x"})
    with pytest.raises(happen.SystemStoppedError):
        await node.broadcast({"type": "x"})
    with pytest.raises(happen.SystemStoppedError):
        node.stream("n", {"type": "x"})
    with pytest.raises(happen.SystemStoppedError):
        system.create_node("late")


def test_non_callable_handlers_and_bad_patterns_are_refused() -> None:
    node = happen.System().create_node("n")
    with pytest.raises(TypeError, match="must be callable, not int"):
        node.on("x", 42)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="must be callable, not str"):
        node.on("x")("not a function")  # type: ignore[type-var]

    def sync_generator(event: happen.Event, context: dict):  # type: ignore[no-untyped-def]
        yield 1

    with pytest.raises(TypeError, match="async def"):
        node.on("x", sync_generator)
    with pytest.raises(TypeError, match="pattern"):
        node.on(3.5, lambda e, c: None)  # type: ignore[call-overload]
    with pytest.raises(happen.InvalidIdError, match="invalid pattern"):
        node.on("a.**b", lambda e, c: None)
    with pytest.raises(happen.InvalidIdError, match="invalid pattern"):
        node.on("a b.*", lambda e, c: None)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"codec": "xml"}, "codec"),
        ({"max_depth": 0}, "max_depth"),
        ({"stream_window": 0}, "stream_window"),
        ({"stream_idle_timeout": -1}, "stream_idle_timeout"),
        ({"worker_threads": 0}, "worker_threads"),
        ({"drain_timeout": 0}, "drain_timeout"),
        ({"namespace": "a.b"}, "namespace"),
        ({"transport": 42}, "transport"),
        ({"concurrency": [1]}, "concurrency"),
    ],
)
def test_invalid_system_settings(kwargs: dict, name: str) -> None:
    with pytest.raises(happen.InvalidConfigError, match=name):
        happen.System(**kwargs)


async def test_unknown_transport_url_fails_at_start() -> None:
    with pytest.raises(happen.TransportError, match="carrier-pigeon"):
        async with happen.System(transport="carrier-pigeon://x"):
            pass


async def test_duplicate_node_id_in_one_system(transport_url: str) -> None:
    async with make_system(transport_url) as system:
        system.create_node("twin")
        with pytest.raises(happen.InvalidIdError, match="already exists"):
            system.create_node("twin")
