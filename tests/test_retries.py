"""Attempts and errors: retries with backoff, Retry and Reject, on_error, dead letters, and
the accounting of it all, on both transports (asyncio and trio on memory).

Backoffs here are tens of milliseconds; what is measured is bounded loosely (the machine is
shared), and nothing waits on a sleep where an event or a counter can be waited on.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import happen
from happen._transport import Transport
from tests.helpers import (
    assert_accounted,
    drained,
    eventually,
    make_system,
    subscriptions_live,
    unique_namespace,
)

pytestmark = pytest.mark.anyio

WAIT = 10  # seconds; a test that needs this long has failed
SLACK = 0.25  # for the scheduler of a busy machine


def now() -> float:
    return anyio.current_time()


def fast(**settings: Any) -> dict[str, Any]:
    """Delivery settings with a short, exact backoff (unless given)."""
    settings.setdefault("backoff", {"initial": 0.02, "jitter": "none"})
    return settings


def delivery(pattern: str = "worker", **settings: Any) -> dict[str, Any]:
    return {"patterns": {pattern: fast(**settings)}}


# ----- retries ----------------------------------------------------------------------------


async def test_failing_twice_then_succeeding_gives_the_caller_the_result(
    transport_url: str,
) -> None:
    config = delivery(max_attempts=3, on_error="retry")
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")
        seen: list[int] = []

        @worker.on("charge")
        async def charge(event: happen.Event, context: dict) -> dict:
            seen.append(event.delivery)
            if event.delivery < 3:
                raise ConnectionError(f"bank unreachable (attempt {event.delivery})")
            return {"charged": event.payload, "attempt": event.delivery}

        client = system.create_node("client")
        with anyio.fail_after(WAIT):
            result = await client.send("worker", {"type": "charge", "payload": 7})
        assert result == {"charged": 7, "attempt": 3}
        assert seen == [1, 2, 3]
        await drained(worker)
        stats = assert_accounted(worker, sent=1)
        assert (stats.completed, stats.failed, stats.retried) == (1, 0, 2)
        assert stats.accepted == 1, "one event, accepted once, whatever its attempts"


async def test_a_sync_handler_is_retried_too(transport_url: str) -> None:
    config = delivery(max_attempts=2, on_error="retry")
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")

        def flaky(event: happen.Event, context: dict) -> int:
            if event.delivery == 1:
                raise OSError("disk busy")
            return event.delivery

        worker.on("io", flaky)
        client = system.create_node("client")
        with anyio.fail_after(WAIT):
            assert await client.send("worker", {"type": "io"}) == 2
        await drained(worker)
        assert worker.stats().retried == 1


async def test_the_backoff_grows_by_its_factor_up_to_its_cap(transport_url: str) -> None:
    backoff = {"initial": 0.04, "factor": 2.0, "max": 0.1, "jitter": "none"}
    config = delivery(max_attempts=5, on_error="retry", backoff=backoff)
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")
        started: list[float] = []

        @worker.on("job")
        async def job(event: happen.Event, context: dict) -> str:
            started.append(now())
            if event.delivery < 5:
                raise RuntimeError("not yet")
            return "done"

        client = system.create_node("client")
        with anyio.fail_after(WAIT):
            assert await client.send("worker", {"type": "job"}) == "done"
    gaps = [b - a for a, b in itertools.pairwise(started)]
    expected = [0.04, 0.08, 0.1, 0.1]  # initial, x factor, then the cap
    assert len(gaps) == len(expected)
    for gap, delay in zip(gaps, expected, strict=True):
        assert delay * 0.9 <= gap < delay + SLACK, (gaps, expected)


async def test_full_jitter_waits_between_zero_and_the_computed_delay(
    transport_url: str,
) -> None:
    backoff = {"initial": 0.15, "jitter": "full"}
    config = delivery(max_attempts=2, on_error="retry", backoff=backoff)
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")
        first: dict[int, float] = {}
        gaps: list[float] = []

        @worker.on("job")
        async def job(event: happen.Event, context: dict) -> None:
            if event.delivery == 1:
                first[event.payload] = now()
                raise RuntimeError("once")
            gaps.append(now() - first[event.payload])

        client = system.create_node("client")
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(client.send, "worker", {"type": "job", "payload": i})
    assert len(gaps) == 8
    assert all(0 <= gap < 0.15 + SLACK for gap in gaps), gaps
    assert max(gaps) - min(gaps) > 0.01, f"jittered, not all equal: {gaps}"


async def test_a_waiting_retry_holds_no_slot(transport_url: str) -> None:
    concurrency = {"patterns": {"worker": {"max_concurrent": 1, "queue_limit": 1}}}
    config = delivery(max_attempts=2, on_error="retry")
    async with make_system(transport_url, concurrency=concurrency, delivery=config) as system:
        worker = system.create_node("worker")
        order: list[str] = []

        @worker.on("slow-to-succeed")
        async def flaky(event: happen.Event, context: dict) -> str:
            order.append(f"flaky-{event.delivery}")
            if event.delivery == 1:
                raise happen.Retry(delay=0.3)
            return "flaky done"

        @worker.on("quick")
        async def quick(event: happen.Event, context: dict) -> str:
            order.append("quick")
            return "quick done"

        client = system.create_node("client")
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                results: list[str] = []

                async def flaky_call() -> None:
                    results.append(await client.send("worker", {"type": "slow-to-succeed"}))

                tg.start_soon(flaky_call)
                await eventually(lambda: worker.stats().retrying == 1)
                stats = worker.stats()
                assert (stats.active, stats.queued) == (0, 0), "no slot, no queue place"
                assert stats.retried == 1
                # The only slot and the only queue place are free for others meanwhile.
                assert await client.send("worker", {"type": "quick"}) == "quick done"
                assert order == ["flaky-1", "quick"]
        assert results == ["flaky done"]
        assert order == ["flaky-1", "quick", "flaky-2"]
        await drained(worker)
        assert_accounted(worker, sent=2)


async def test_retry_asks_for_another_attempt_whatever_on_error_says(
    transport_url: str,
) -> None:
    config = delivery(max_attempts=3, on_error="raise")
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")
        started: list[float] = []

        @worker.on("poll")
        async def poll(event: happen.Event, context: dict) -> int:
            started.append(now())
            if event.delivery == 1:
                raise happen.Retry(delay=0.2)
            if event.delivery == 2:
                raise happen.Retry()  # the node's backoff: 0.02 s
            return event.delivery

        @worker.on("broken")
        async def broken(event: happen.Event, context: dict) -> None:
            raise ValueError("not retried: on_error is raise")

        client = system.create_node("client")
        with anyio.fail_after(WAIT):
            assert await client.send("worker", {"type": "poll"}) == 3
            with pytest.raises(happen.HandlerError) as raised:
                await client.send("worker", {"type": "broken"})
        assert raised.value.attempts == 1 and raised.value.remote_type == "ValueError"
        first_gap, second_gap = started[1] - started[0], started[2] - started[1]
        assert 0.18 <= first_gap < 0.2 + SLACK, "Retry(delay=) overrides the backoff"
        assert 0.018 <= second_gap < 0.02 + SLACK, "Retry() waits the backoff"
        await drained(worker)
        stats = assert_accounted(worker, sent=2)
        assert (stats.retried, stats.completed, stats.failed) == (2, 1, 1)


async def test_retry_is_bounded_by_max_attempts(transport_url: str) -> None:
    config = delivery(max_attempts=3)
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")
        runs: list[int] = []

        @worker.on("forever")
        async def forever(event: happen.Event, context: dict) -> None:
            runs.append(event.delivery)
            raise happen.Retry(delay=0.01)

        client = system.create_node("client")
        with anyio.fail_after(WAIT), pytest.raises(happen.HandlerError) as raised:
            await client.send("worker", {"type": "forever"})
        assert runs == [1, 2, 3]
        assert raised.value.remote_type == "Retry" and raised.value.attempts == 3
        await drained(worker)
        stats = assert_accounted(worker, sent=1)
        assert (stats.retried, stats.failed) == (2, 1)


async def test_the_last_failure_reaches_the_caller_with_its_attempts(
    transport_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="happen.handlers")
    config = delivery(max_attempts=3, on_error="retry")
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")

        @worker.on("doomed")
        async def doomed(event: happen.Event, context: dict) -> None:
            raise KeyError(f"order-{event.delivery}")

        client = system.create_node("client")
        with anyio.fail_after(WAIT), pytest.raises(happen.HandlerError) as raised:
            await client.send("worker", {"type": "doomed"})
        error = raised.value
        assert error.attempts == 3
        assert error.remote_type == "KeyError" and "order-3" in error.remote_message
        assert error.node_id == "worker" and "after 3 attempts" in str(error)
        await drained(worker)
        stats = assert_accounted(worker, sent=1)
        assert (stats.retried, stats.failed, stats.completed) == (2, 1, 0)
    records = [r for r in caplog.records if r.name == "happen.handlers"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING, logging.ERROR]
    assert all(r.exc_info is not None for r in records), "each attempt with its traceback"
    assert "attempt 1 of 3" in records[0].getMessage()
    assert "after 3 attempts" in records[2].getMessage()


async def test_on_error_raise_fails_at_once_and_suppress_completes_with_none(
    transport_url: str,
) -> None:
    config = {
        "patterns": {
            "strict": fast(max_attempts=3, on_error="raise"),
            "lenient": fast(max_attempts=3, on_error="suppress"),
        }
    }
    async with make_system(transport_url, delivery=config) as system:
        runs: list[str] = []
        for node_id in ("strict", "lenient"):
            node = system.create_node(node_id)

            async def fail(event: happen.Event, context: dict, node_id: str = node_id) -> int:
                runs.append(node_id)
                raise LookupError("no such customer")

            node.on("lookup", fail)
        client = system.create_node("client")
        with anyio.fail_after(WAIT):
            with pytest.raises(happen.HandlerError) as raised:
                await client.send("strict", {"type": "lookup"})
            assert await client.send("lenient", {"type": "lookup"}) is None
        assert raised.value.attempts == 1 and raised.value.remote_type == "LookupError"
        assert runs == ["strict", "lenient"], "neither is retried"
        stats = {node_id: system.stats()[node_id] for node_id in ("strict", "lenient")}
        assert (stats["strict"].failed, stats["strict"].suppressed) == (1, 0)
        assert (stats["lenient"].completed, stats["lenient"].suppressed) == (1, 1)
        assert stats["lenient"].failed == 0 and stats["lenient"].retried == 0


async def test_a_streaming_handler_is_retried_only_before_its_first_item(
    transport_url: str,
) -> None:
    config = delivery(max_attempts=3, on_error="retry")
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")

        @worker.on("count")
        async def count(event: happen.Event, context: dict) -> Any:
            if event.delivery == 1:
                raise ConnectionError("source not ready")
            for i in range(3):
                yield (event.delivery, i)

        @worker.on("break-midway")
        async def midway(event: happen.Event, context: dict) -> Any:
            yield event.delivery
            raise ConnectionError("source lost")

        client = system.create_node("client")
        with anyio.fail_after(WAIT):
            async with client.stream("worker", {"type": "count"}) as stream:
                items = [tuple(item) async for item in stream]
            assert items == [(2, 0), (2, 1), (2, 2)]
            got: list[int] = []
            with pytest.raises(happen.HandlerError) as raised:
                async with client.stream("worker", {"type": "break-midway"}) as stream:
                    async for item in stream:
                        got.append(item)
        assert got == [1], "the stream had started: it fails, it is not run again"
        assert raised.value.remote_type == "ConnectionError"
        await drained(worker)
        stats = assert_accounted(worker, sent=2)
        assert (stats.retried, stats.completed, stats.failed) == (1, 1, 1)


async def test_broadcast_handlers_are_retried(transport_url: str) -> None:
    config = delivery("listener", max_attempts=3, on_error="retry")
    async with make_system(transport_url, delivery=config) as system:
        listener = system.create_node("listener")
        deliveries: list[int] = []
        done = anyio.Event()

        @listener.on("price.changed")
        async def changed(event: happen.Event, context: dict) -> None:
            deliveries.append(event.delivery)
            if event.delivery < 3:
                raise TimeoutError("cache busy")
            done.set()

        await system.ready()
        sender = system.create_node("sender")
        await sender.broadcast({"type": "price.changed", "payload": {"sku": 1}})
        with anyio.fail_after(WAIT):
            await done.wait()
        assert deliveries == [1, 2, 3]
        await drained(listener)
        stats = assert_accounted(listener, sent=1)
        assert (stats.retried, stats.completed) == (2, 1)


# ----- the caller's call goes on while a retry waits ------------------------------------


async def test_a_caller_that_gives_up_during_a_retry_ends_it_at_once(
    transport_url: str,
) -> None:
    config = delivery(max_attempts=2)
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")
        runs: list[int] = []

        @worker.on("job")
        async def job(event: happen.Event, context: dict) -> None:
            runs.append(event.delivery)
            raise happen.Retry(delay=30)

        client = system.create_node("client")
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.send, "worker", {"type": "job"})
                await eventually(lambda: worker.stats().retrying == 1)
                gave_up = now()
                tg.cancel_scope.cancel()
            await eventually(lambda: worker.stats().failed == 1)
        assert now() - gave_up < 1.0, "ended at once, not after the retry's delay"
        assert runs == [1]
        stats = assert_accounted(worker, sent=1)
        assert stats.retried == 1
        with anyio.fail_after(2):
            await system.idle()  # the caller's side forgot the call too


async def test_the_call_timeout_bounds_a_waiting_retry(transport_url: str) -> None:
    config = delivery(max_attempts=2)
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")
        runs: list[int] = []

        @worker.on("job")
        async def job(event: happen.Event, context: dict) -> None:
            runs.append(event.delivery)
            raise happen.Retry(delay=30)

        client = system.create_node("client")
        sent = now()
        with anyio.fail_after(WAIT), pytest.raises(happen.SendTimeout) as raised:
            await client.send("worker", {"type": "job"}, timeout=0.3)
        assert 0.25 <= now() - sent < 0.3 + SLACK
        assert "'worker'" in str(raised.value), "answered by the node, at its deadline"
        assert runs == [1]
        await drained(worker)
        stats = assert_accounted(worker, sent=1)
        assert (stats.failed, stats.retried) == (1, 1)


async def test_a_retry_that_comes_due_after_the_deadline_never_runs(
    transport_url: str,
) -> None:
    config = delivery(max_attempts=3, on_error="retry", backoff={"initial": 0.3, "jitter": "none"})
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")
        runs: list[int] = []

        @worker.on("job")
        async def job(event: happen.Event, context: dict) -> None:
            runs.append(event.delivery)
            raise RuntimeError("down")

        client = system.create_node("client")
        with anyio.fail_after(WAIT), pytest.raises(happen.SendTimeout):
            await client.send("worker", {"type": "job"}, timeout=0.2)
        await drained(worker)
        assert runs == [1]
        assert_accounted(worker, sent=1)


async def test_a_remote_caller_keeps_waiting_through_a_retry_longer_than_liveness(
    make_transport: Callable[[], Transport],
) -> None:
    ns = unique_namespace()
    liveness = 0.3
    host = happen.System(
        transport=make_transport(), namespace=ns, delivery=delivery(max_attempts=2)
    )
    caller = happen.System(transport=make_transport(), namespace=ns, liveness_timeout=liveness)
    worker = host.create_node("worker")

    @worker.on("job")
    async def job(event: happen.Event, context: dict) -> int:
        if event.delivery == 1:
            raise happen.Retry(delay=3 * liveness)
        return event.delivery

    client = caller.create_node("client")
    async with host, caller:
        await subscriptions_live(worker)
        with anyio.fail_after(WAIT):
            assert await client.send("worker", {"type": "job"}) == 2, (
                "the waiting retry was claimed in every liveness ping: no HostLostError"
            )


async def test_stop_ends_waiting_retries(make_transport: Callable[[], Transport]) -> None:
    ns = unique_namespace()
    host = happen.System(
        transport=make_transport(), namespace=ns, delivery=delivery(max_attempts=2)
    )
    caller = happen.System(transport=make_transport(), namespace=ns)
    worker = host.create_node("worker")

    @worker.on("job")
    async def job(event: happen.Event, context: dict) -> None:
        raise happen.Retry(delay=30)

    client = caller.create_node("client")
    errors: list[BaseException] = []

    async def call() -> None:
        try:
            await client.send("worker", {"type": "job"})
        except happen.HappenError as exc:
            errors.append(exc)

    async with caller, host:
        await subscriptions_live(worker)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await eventually(lambda: worker.stats().retrying == 1)
                stopping = now()
                await host.stop()
                assert now() - stopping < 2.0, "stop does not wait for the retry's delay"
    assert len(errors) == 1 and isinstance(errors[0], happen.TransportError), errors
    assert "stopped" in str(errors[0])
    stats = assert_accounted(worker, sent=1)
    assert (stats.failed, stats.retried) == (1, 1)


# ----- Reject and dead letters ------------------------------------------------------------


async def test_reject_is_never_retried_and_is_dead_lettered(transport_url: str) -> None:
    config = delivery(max_attempts=5, on_error="retry", dead_letter="dlq")
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")
        runs: list[int] = []

        @worker.on("order.place")
        async def place(event: happen.Event, context: dict) -> None:
            runs.append(event.delivery)
            raise happen.Reject("sku 42 does not exist")

        dlq = system.create_node("dlq")
        letters: list[happen.Event] = []

        @dlq.on("happen.dead_letter")
        async def dead(event: happen.Event, context: dict) -> None:
            letters.append(event)

        client = system.create_node("client")
        with anyio.fail_after(WAIT), pytest.raises(happen.HandlerError) as raised:
            await client.send("worker", {"type": "order.place", "payload": {"sku": 42}})
        assert runs == [1]
        assert raised.value.remote_type == "Reject" and raised.value.attempts == 1
        assert raised.value.remote_message == "sku 42 does not exist"
        assert len(letters) == 1, "delivered before the caller was answered"
        payload = letters[0].payload
        assert payload["error"] == {"type": "Reject", "message": "sku 42 does not exist"}
        assert payload["attempts"] == 1 and payload["node"] == "worker"
        await drained(worker, dlq)
        stats = assert_accounted(worker, sent=1)
        assert (stats.dead_lettered, stats.failed, stats.retried) == (1, 0, 0)


async def test_a_dead_letter_carries_the_event_and_its_causality(transport_url: str) -> None:
    config = delivery(max_attempts=2, on_error="retry", dead_letter="dlq")
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")
        original: list[happen.Event] = []

        @worker.on("invoice.send")
        async def send_invoice(event: happen.Event, context: dict) -> None:
            original.append(event)
            raise ConnectionRefusedError("smtp down")

        dlq = system.create_node("dlq")
        letters: list[happen.Event] = []

        @dlq.on("happen.dead_letter")
        async def dead(event: happen.Event, context: dict) -> None:
            letters.append(event)

        front = system.create_node("front")

        @front.on("checkout")
        async def checkout(event: happen.Event, context: dict) -> None:
            await front.send("worker", {"type": "invoice.send", "payload": {"invoice": 9}})

        client = system.create_node("client")
        with anyio.fail_after(WAIT), pytest.raises(happen.HandlerError) as raised:
            await client.send("front", {"type": "checkout"})
        assert "ConnectionRefusedError" in str(raised.value)
        [letter] = letters
        failed = original[-1]
        assert letter.type == "happen.dead_letter"
        assert letter.payload == {
            "event": {
                "type": "invoice.send",
                "payload": {"invoice": 9},
                "context": letter.payload["event"]["context"],
            },
            "node": "worker",
            "error": {"type": "ConnectionRefusedError", "message": "smtp down"},
            "attempts": 2,
        }
        carried = letter.payload["event"]["context"]
        assert carried["id"] == failed.context.id and carried["sender"] == "front"
        assert carried["correlation_id"] == failed.context.correlation_id
        context = letter.context
        assert context.id == f"{failed.context.id}:dead", "a derived id, never the original's"
        assert context.causation_id == failed.context.id, "caused by the failed event"
        assert context.correlation_id == failed.context.correlation_id, "the same flow"
        assert context.sender == "worker" and context.path[-2:] == ("front", "worker")
        await drained(worker, dlq)
        stats = assert_accounted(worker, sent=1)
        assert (stats.dead_lettered, stats.retried, stats.failed) == (1, 1, 0)
        assert dlq.stats().completed == 1


async def test_a_dead_letter_waits_for_its_node_and_only_then_settles_the_event(
    transport_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="happen")
    config = delivery(
        "worker", dead_letter="late-dlq", backoff={"initial": 0.02, "max": 0.05, "jitter": "none"}
    )
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")

        @worker.on("job")
        async def job(event: happen.Event, context: dict) -> None:
            raise ValueError("bad job")

        client = system.create_node("client")
        order: list[str] = []

        async def call() -> None:
            try:
                await client.send("worker", {"type": "job", "payload": 1})
            except happen.HandlerError as exc:
                order.append(f"caller: {exc.remote_type}")

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await eventually(lambda: worker.stats().dead_letters_pending == 1)
                # Not delivered (no such node), tried again: the event is not settled yet.
                await eventually(lambda: "trying again" in caplog.text)
                stats = worker.stats()
                assert (stats.failed, stats.dead_lettered, stats.active) == (0, 0, 0)
                assert order == []
                late = system.create_node("late-dlq")

                @late.on("happen.dead_letter")
                async def dead(event: happen.Event, context: dict) -> None:
                    order.append(f"dead letter: {event.payload['event']['payload']}")

        assert order == ["dead letter: 1", "caller: ValueError"]
        await drained(worker, late)
        stats = assert_accounted(worker, sent=1)
        assert (stats.dead_lettered, stats.failed) == (1, 0)


async def test_a_caller_that_gives_up_is_let_go_while_the_dead_letter_goes_on(
    transport_url: str,
) -> None:
    config = delivery(dead_letter="late-dlq", backoff={"initial": 0.02, "jitter": "none"})
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")

        @worker.on("job")
        async def job(event: happen.Event, context: dict) -> None:
            raise ValueError("bad job")

        client = system.create_node("client")
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.send, "worker", {"type": "job"})
                await eventually(lambda: worker.stats().dead_letters_pending == 1)
                tg.cancel_scope.cancel()  # the caller gives up
            assert worker.stats().dead_letters_pending == 1, "the dead letter goes on"
            late = system.create_node("late-dlq")
            letters: list[str] = []

            @late.on("happen.dead_letter")
            async def dead(event: happen.Event, context: dict) -> None:
                letters.append(event.payload["error"]["message"])

            await drained(worker, late)
            await system.idle()  # the abandoned call is forgotten on both sides
        assert letters == ["bad job"], "the dead letter is never dropped"
        stats = assert_accounted(worker, sent=1)
        assert (stats.dead_lettered, stats.failed) == (1, 0), "one outcome, counted once"


async def test_a_dead_letter_whose_handler_fails_counts_as_delivered(
    transport_url: str,
) -> None:
    config = {
        "default": fast(dead_letter="dlq"),
        "patterns": {"dlq": {"dead_letter": "dlq"}},  # even pointing at itself: no loop
    }
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")

        @worker.on("job")
        async def job(event: happen.Event, context: dict) -> None:
            raise ValueError("bad job")

        dlq = system.create_node("dlq")

        @dlq.on("happen.dead_letter")
        async def dead(event: happen.Event, context: dict) -> None:
            raise RuntimeError("the dead-letter store is down")

        client = system.create_node("client")
        with anyio.fail_after(WAIT), pytest.raises(happen.HandlerError) as raised:
            await client.send("worker", {"type": "job"})
        assert raised.value.remote_type == "ValueError"
        await drained(worker, dlq)
        assert assert_accounted(worker, sent=1).dead_lettered == 1
        stats = assert_accounted(dlq, sent=1)
        assert (stats.failed, stats.dead_lettered) == (1, 0), "a dead letter is not re-lettered"


async def test_a_broadcast_is_dead_lettered_too(transport_url: str) -> None:
    config = delivery("listener", dead_letter="dlq")
    async with make_system(transport_url, delivery=config) as system:
        listener = system.create_node("listener")

        @listener.on("stock.low")
        async def low(event: happen.Event, context: dict) -> None:
            raise happen.Reject("unknown warehouse")

        dlq = system.create_node("dlq")
        got = anyio.Event()
        letters: list[dict[str, Any]] = []

        @dlq.on("happen.dead_letter")
        async def dead(event: happen.Event, context: dict) -> None:
            letters.append(event.payload)
            got.set()

        await system.ready()
        await system.create_node("sender").broadcast({"type": "stock.low", "payload": 3})
        with anyio.fail_after(WAIT):
            await got.wait()
        assert letters[0]["event"]["type"] == "stock.low" and letters[0]["node"] == "listener"
        await drained(listener, dlq)
        assert assert_accounted(listener, sent=1).dead_lettered == 1


async def test_a_dead_letter_undelivered_at_stop_is_counted_failed_and_logged(
    make_transport: Callable[[], Transport], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="happen")
    ns = unique_namespace()
    config = delivery(dead_letter="nowhere", backoff={"initial": 0.02, "jitter": "none"})
    host = happen.System(transport=make_transport(), namespace=ns, delivery=config)
    caller = happen.System(transport=make_transport(), namespace=ns)
    worker = host.create_node("worker")

    @worker.on("job")
    async def job(event: happen.Event, context: dict) -> None:
        raise ValueError("bad job")

    client = caller.create_node("client")
    errors: list[BaseException] = []

    async def call() -> None:
        try:
            await client.send("worker", {"type": "job"})
        except happen.HappenError as exc:
            errors.append(exc)

    async with caller, host:
        await subscriptions_live(worker)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await eventually(lambda: worker.stats().dead_letters_pending == 1)
                await host.stop()
    assert len(errors) == 1 and isinstance(errors[0], happen.HandlerError), errors
    stats = assert_accounted(worker, sent=1)
    assert (stats.failed, stats.dead_lettered) == (1, 0)
    assert "gave up delivering the dead letter" in caplog.text


# ----- accounting -------------------------------------------------------------------------


async def test_every_event_has_one_outcome_whatever_its_attempts(transport_url: str) -> None:
    config = delivery(max_attempts=3, on_error="retry", dead_letter="dlq")
    config["patterns"]["quiet"] = fast(max_attempts=2, on_error="suppress")
    async with make_system(transport_url, delivery=config) as system:
        worker = system.create_node("worker")
        quiet = system.create_node("quiet")
        dlq = system.create_node("dlq")

        @worker.on("job")
        async def job(event: happen.Event, context: dict) -> int:
            kind = event.payload % 4
            if kind == 0:
                return 0  # completes at once
            if kind == 1 and event.delivery < 2:
                raise RuntimeError("once")  # completes on its second attempt
            if kind == 2:
                raise happen.Reject("never")  # dead-lettered at once
            if kind == 3:
                raise RuntimeError("always")  # dead-lettered after 3 attempts
            return 1

        @quiet.on("job")
        async def quiet_job(event: happen.Event, context: dict) -> None:
            raise RuntimeError("suppressed")

        @dlq.on("happen.dead_letter")
        async def dead(event: happen.Event, context: dict) -> None:
            pass

        client = system.create_node("client")
        outcomes: list[str] = []

        async def one(target: str, i: int) -> None:
            try:
                await client.send(target, {"type": "job", "payload": i})
                outcomes.append("ok")
            except happen.HandlerError:
                outcomes.append("error")

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(one, "worker", i)
                for i in range(4):
                    tg.start_soon(one, "quiet", i)
            await system.idle()
        assert outcomes.count("ok") == 10 + 4 and outcomes.count("error") == 10
        stats = assert_accounted(worker, sent=20)
        assert (stats.completed, stats.dead_lettered, stats.failed) == (10, 10, 0)
        assert stats.retried == 5 + 5 * 2
        quiet_stats = assert_accounted(quiet, sent=4)
        assert (quiet_stats.completed, quiet_stats.suppressed) == (4, 4)
        assert assert_accounted(dlq, sent=10).completed == 10
        for stats in system.stats().values():
            assert stats.redelivered == 0
