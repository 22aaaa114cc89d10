"""An account ledger: per-key order, with the balance kept in node state.

Three instances of node ``ledger`` (three systems sharing one memory broker, as three hosts
share a NATS server) handle deposits and withdrawals keyed by account. Events of one account
run one at a time, across all instances, in the order the node accepted them, so a handler
can read the balance, decide and write it back: no other operation on that account runs in
between, on any instance, and the compare-and-set never meets a conflict. Accounts run in
parallel, spread over the instances.

Run it: ``python examples/ledger.py``.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AsyncExitStack
from typing import Any

import anyio

import happen
from happen.transports.memory import MemoryBroker, MemoryTransport

ACCOUNTS = 12
INSTANCES = 3


def ledger_instance(system: happen.System, name: str, served: Counter[str]) -> happen.Node:
    ledger = system.create_node("ledger")

    @ledger.on("deposit")
    async def deposit(event: happen.Event, context: dict[str, Any]) -> int:
        return await apply(event, +event.payload["amount"])

    @ledger.on("withdraw")
    async def withdraw(event: happen.Event, context: dict[str, Any]) -> int:
        return await apply(event, -event.payload["amount"])

    async def apply(event: happen.Event, change: int) -> int:
        account = event.key
        assert account is not None, "ledger events are sent with key=account"
        served[name] += 1
        seen = await ledger.state.get(account)
        balance = (seen.value if seen is not None else 0) + change
        if balance < 0:
            raise ValueError(f"{account}: insufficient funds")
        await anyio.sleep(0.001)  # some work between the read and the write
        # expect= is the guard: it would raise StateConflict if anything had written the
        # balance since the read. Per-key order means nothing does.
        await ledger.state.put(account, balance, expect=seen.revision if seen else 0)
        return balance

    return ledger


async def main() -> None:
    broker = MemoryBroker()
    served: Counter[str] = Counter()
    hosts = [
        happen.System(transport=MemoryTransport(broker=broker), namespace="bank")
        for _ in range(INSTANCES)
    ]
    instances = [ledger_instance(system, f"instance-{n}", served) for n, system in enumerate(hosts)]
    teller = happen.System(transport=MemoryTransport(broker=broker), namespace="bank")
    client = teller.create_node("teller")

    async def operate(account: str) -> None:
        # Open with 100, then withdraw 30 three times: 10 left. In any other order a
        # withdrawal would meet insufficient funds.
        await client.send("ledger", {"type": "deposit", "payload": {"amount": 100}}, key=account)
        for _ in range(3):
            await client.send(
                "ledger", {"type": "withdraw", "payload": {"amount": 30}}, key=account
            )

    async with AsyncExitStack() as running:
        for system in [*hosts, teller]:
            await running.enter_async_context(system)
        async with anyio.create_task_group() as tg:
            for n in range(ACCOUNTS):
                tg.start_soon(operate, f"acct-{n}")
        balances: dict[str, Any] = {}
        for n in range(ACCOUNTS):
            seen = await instances[0].state.get(f"acct-{n}")
            balances[f"acct-{n}"] = None if seen is None else seen.value
    stats = [instance.stats() for instance in instances]
    conflicts = sum(s.state_conflicts for s in stats)
    print("balances:", sorted(set(balances.values())), "for", len(balances), "accounts")
    print("operations per instance:", dict(sorted(served.items())))
    print("state conflicts:", conflicts)
    assert set(balances.values()) == {10}, balances
    assert conflicts == 0
    assert sum(s.completed for s in stats) == 4 * ACCOUNTS


if __name__ == "__main__":
    anyio.run(main)
