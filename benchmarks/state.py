"""Node state over NATS: ``node.state.put`` / ``update`` against nats-py's JetStream KV.

Both sides use one connection and a fresh bucket per round (happen: a fresh namespace, so
its bucket ``happen_{ns}_state``; raw: a bucket made with ``create_key_value(history=1)``,
as happen's transport makes it). Values are the PAYLOAD dict in msgpack on both sides.

- ``put``: an unconditional write, one key per worker.
- ``update``: read-modify-write with compare-and-set, one key per worker. happen's
  ``update`` applies a function to the current value; the raw loop does what a careful
  nats-py user does for the same job: it keeps the value and revision of its last write,
  applies the same function to the decoded value and calls ``kv.update(last=revision)``.
  Neither side reads before writing once the key is known (happen compares against the
  revision its system last wrote), so both are one round trip per update.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import msgspec

from benchmarks import _happen
from benchmarks._drive import Operation, closed_loop
from benchmarks._harness import (
    IN_FLIGHT,
    NATS_LOOPS,
    PAYLOAD,
    Config,
    Sample,
    Scenario,
    Side,
    Unavailable,
)

encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder().decode


def bump(value: Any) -> Any:
    """The update both sides apply: the payload with its ``id`` one higher."""
    if value is None:
        return dict(PAYLOAD)
    return {**value, "id": value["id"] + 1}


async def happen_state(config: Config, *, operation: str, workers: int) -> Sample:
    happen = _happen.load()
    url = _happen.transport_url(config, "nats")
    namespace = f"bench{uuid.uuid4().hex[:12]}"
    async with happen.System(transport=url, namespace=namespace) as system:
        state = system.create_node("bench").state
        await state.put("warm", PAYLOAD)  # opens the bucket outside the timed phase

        def put_to(key: str) -> Operation:
            async def one() -> int:
                await state.put(key, PAYLOAD)
                return 1

            return one

        def update_of(key: str) -> Operation:
            async def one() -> int:
                await state.update(key, bump)
                return 1

            return one

        make = put_to if operation == "put" else update_of
        return await closed_loop([make(f"k{i}") for i in range(workers)], config.duration)


@asynccontextmanager
async def raw_bucket(config: Config) -> AsyncIterator[Any]:
    import nats

    if config.nats_url is None:
        raise Unavailable("no nats-server")
    client = await nats.connect(config.nats_url)
    try:
        js = client.jetstream()
        bucket = f"bench{uuid.uuid4().hex[:12]}"
        kv = await js.create_key_value(bucket=bucket, history=1)
        try:
            yield kv
        finally:
            await js.delete_key_value(bucket)
    finally:
        await client.close()


async def raw_state(config: Config, *, operation: str, workers: int) -> Sample:
    async with raw_bucket(config) as kv:
        await kv.put("warm", encode(PAYLOAD))

        def put_to(key: str) -> Operation:
            async def one() -> int:
                await kv.put(key, encode(PAYLOAD))
                return 1

            return one

        def update_of(key: str) -> Operation:
            last: list[Any] = [None, 0]  # the value and revision of this key's last write

            async def one() -> int:
                value = bump(None if last[0] is None else decode(last[0]))
                data = encode(value)
                if last[0] is None:
                    revision = await kv.create(key, data)
                else:
                    revision = await kv.update(key, data, last=last[1])
                last[:] = [data, revision]
                return 1

            return one

        make = put_to if operation == "put" else update_of
        return await closed_loop([make(f"k{i}") for i in range(workers)], config.duration)


def scenario(operation: str, workers: int) -> Scenario:
    shape = "sequential" if workers == 1 else f"{workers} keys in parallel"
    return Scenario(
        key=f"nats.state.{operation}.{'seq' if workers == 1 else workers}",
        title=f"NATS node state {operation}, {shape}",
        unit="ops/s",
        happen=Side("happen", partial(happen_state, operation=operation, workers=workers)),
        baseline=Side("nats-py KV", partial(raw_state, operation=operation, workers=workers)),
        target=0.8,
        loops=NATS_LOOPS,
    )


SCENARIOS = [
    scenario("put", 1),
    scenario("put", IN_FLIGHT),
    scenario("update", 1),
    scenario("update", IN_FLIGHT),
]
