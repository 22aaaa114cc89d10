"""Per-key order: keyed ``send`` against unkeyed ``send`` of the same run.

Both sides are happen, with the same systems, payload and senders (one system in memory, two
over NATS, as ``memory.request.*`` / ``nats.request.*``); the baseline is the figure keys are
held to, not another library.

- ``keys.100``: 100 senders in flight, each with a key of its own (``k0`` ... ``k99``), so keys
  never wait for each other: the cost of keeping per-key order. Baseline: the same senders
  without keys. Target 0.8.
- ``keys.hot``: 100 senders in flight, all with one key: the key's events run one at a time.
  Baseline: the same senders without keys to a node with ``max_concurrent=1``, which also runs
  one at a time. Target: as fast, which a wall-clock ratio can only show within its noise:
  two identical sides measure 0.97-1.04 against each other on a two-core machine, so the row
  is met at 0.97 (``PARITY``). Instruction counts (the README's benchmark section) tell finer.
- ``keys.same``: the ``keys.hot`` baseline against itself, in memory: the noise floor.

The node is hosted once: a keyed request reaches the instance that owns its key's partition
directly. (With several instances, a request that reaches another one is passed on: one more
hop for those.)
"""

from __future__ import annotations

from functools import partial
from typing import Any

from benchmarks import _happen
from benchmarks._drive import Operation, closed_loop
from benchmarks._harness import IN_FLIGHT, LOOPS, NATS_LOOPS, Config, Sample, Scenario, Side

ONE_AT_A_TIME = {"patterns": {"server": {"max_concurrent": 1}}}

#: "As fast as": the lowest ratio two identical sides reach against each other here.
PARITY = 0.97


async def sends(
    config: Config, *, transport: str, keys: str, concurrency: dict[str, Any] | None = None
) -> Sample:
    """send -> reply round trips per second, IN_FLIGHT senders; ``keys``: ``"none"``,
    ``"own"`` (a key per sender) or ``"hot"`` (one key for all)."""
    async with _happen.systems(config, transport, concurrency) as (server_system, client_system):
        _happen.serve(server_system.create_node("server"))
        client = client_system.create_node("client")
        await _happen.until_reachable(client, "server")
        if keys != "none":  # the node takes its key partitions before the timed phase
            await client.send("server", _happen.PING, key="warm-up")

        def sender(key: str | None) -> Operation:
            async def one() -> int:
                await client.send("server", _happen.PING, key=key)
                return 1

            return one

        names: list[str | None]
        if keys == "own":
            names = [f"k{n}" for n in range(IN_FLIGHT)]
        elif keys == "hot":
            names = ["hot"] * IN_FLIGHT
        else:
            names = [None] * IN_FLIGHT
        return await closed_loop([sender(key) for key in names], config.duration)


def scenarios(transport: str) -> list[Scenario]:
    loops = NATS_LOOPS if transport == "nats" else LOOPS
    where = "NATS" if transport == "nats" else "in-memory"
    return [
        Scenario(
            key=f"{transport}.keys.100",
            title=f"{where} keyed send→reply, {IN_FLIGHT} keys in flight (vs unkeyed)",
            unit="rt/s",
            happen=Side("keyed", partial(sends, transport=transport, keys="own")),
            baseline=Side("unkeyed", partial(sends, transport=transport, keys="none")),
            target=0.8,
            loops=loops,
        ),
        Scenario(
            key=f"{transport}.keys.hot",
            title=f"{where} one hot key, {IN_FLIGHT} senders (vs unkeyed, max_concurrent=1)",
            unit="rt/s",
            happen=Side("keyed", partial(sends, transport=transport, keys="hot")),
            baseline=Side(
                "unkeyed",
                partial(sends, transport=transport, keys="none", concurrency=ONE_AT_A_TIME),
            ),
            target=PARITY,
            loops=loops,
        ),
    ]


def noise_floor() -> Scenario:
    """The ``keys.hot`` baseline against itself: how far apart two identical sides measure,
    the resolution of a parity row (no target: it calibrates, it does not judge)."""
    one_at_a_time = partial(sends, transport="memory", keys="none", concurrency=ONE_AT_A_TIME)
    return Scenario(
        key="memory.keys.same",
        title="in-memory unkeyed, max_concurrent=1, against itself (the noise floor)",
        unit="rt/s",
        happen=Side("unkeyed", one_at_a_time),
        baseline=Side("unkeyed", one_at_a_time),
        target=None,
        loops=LOOPS,
    )


SCENARIOS = [*scenarios("memory"), noise_floor(), *scenarios("nats")]
