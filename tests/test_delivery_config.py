"""Delivery settings: validation at construction, resolution by node-id glob, the backoff,
and the decision a failed attempt leads to."""

from __future__ import annotations

import pickle
import random
from typing import Any

import pytest

import happen
from happen._delivery import DeliveryConfig, Outcome, decide


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"default": {"max_attempts": 0}}, "default.max_attempts"),
        ({"default": {"max_attempts": -3}}, "default.max_attempts"),
        ({"default": {"max_attempts": 2.5}}, "default.max_attempts"),
        ({"default": {"max_attempts": True}}, "default.max_attempts"),
        ({"default": {"max_attempts": "3"}}, "default.max_attempts"),
        ({"default": {"durable": "yes"}}, "default.durable"),
        ({"default": {"ack_wait": 0}}, "default.ack_wait"),
        ({"default": {"ack_wait": -1.0}}, "default.ack_wait"),
        ({"default": {"ack_wait": float("inf")}}, "default.ack_wait"),
        ({"default": {"dedup_window": 0.0}}, "default.dedup_window"),
        ({"default": {"backoff": {"initial": 0}}}, "default.backoff.initial"),
        ({"default": {"backoff": {"initial": -0.5}}}, "default.backoff.initial"),
        ({"default": {"backoff": {"initial": float("nan")}}}, "default.backoff.initial"),
        ({"default": {"backoff": {"factor": 0.5}}}, "default.backoff.factor"),
        ({"default": {"backoff": {"max": 0}}}, "default.backoff.max"),
        ({"default": {"backoff": {"jitter": "half"}}}, "default.backoff.jitter"),
        ({"default": {"backoff": {"cap": 1.0}}}, "cap"),
        ({"default": {"backoff": 1.0}}, "default.backoff"),
        ({"default": {"on_error": "ignore"}}, "default.on_error"),
        ({"default": {"dead_letter": "no such.node"}}, "default.dead_letter"),
        ({"default": {"dead_letter": ""}}, "default.dead_letter"),
        ({"default": {"dead_letter": 7}}, "default.dead_letter"),
        ({"default": {"retries": 3}}, "retries"),
        ({"patterns": {"billing-*": {"max_attempts": 0}}}, "patterns['billing-*'].max_attempts"),
        (
            {"patterns": {"billing-*": {"backoff": {"factor": 0}}}},
            "patterns['billing-*'].backoff.factor",
        ),
        ({"patterns": {"billing-*": {"on_error": 1}}}, "patterns['billing-*'].on_error"),
        ({"patterns": {"billing-*": {"dead_letter": "a*"}}}, "patterns['billing-*'].dead_letter"),
        ({"patterns": {"billing-*": 3}}, "patterns['billing-*']"),
        ({"patterns": {"": {}}}, "pattern ''"),
        ({"patterns": []}, "patterns"),
        ({"defaults": {}}, "defaults"),
    ],
)
def test_invalid_delivery_settings_name_the_key(settings: dict[str, Any], key: str) -> None:
    with pytest.raises(happen.InvalidConfigError) as info:
        happen.System(delivery=settings)
    message = str(info.value)
    assert key in message, message
    assert "delivery" in message


def test_delivery_must_be_a_dict() -> None:
    with pytest.raises(happen.InvalidConfigError, match="delivery must be a dict"):
        happen.System(delivery=[1, 2])  # type: ignore[arg-type]


def test_defaults_are_one_attempt_that_raises() -> None:
    settings = happen.System().delivery_for("anyone")
    assert settings == happen.DeliverySettings()
    assert settings.max_attempts == 1 and settings.on_error == "raise"
    assert settings.durable is False and settings.dead_letter is None
    assert settings.ack_wait == 30.0 and settings.dedup_window == 120.0
    assert settings.backoff == happen.Backoff(initial=1.0, factor=2.0, max=60.0, jitter="full")


def test_settings_resolve_from_least_to_most_specific_pattern() -> None:
    system = happen.System(
        delivery={
            "default": {"max_attempts": 2, "backoff": {"initial": 0.5, "jitter": "none"}},
            "patterns": {
                "billing-eu-*": {"dead_letter": "billing-dlq", "backoff": {"max": 5.0}},
                "billing-*": {"max_attempts": 4, "on_error": "retry", "backoff": {"factor": 3}},
                "*": {"max_attempts": 9, "dead_letter": "dlq"},
            },
        }
    )
    assert system.delivery_for("billing-eu-1") == happen.DeliverySettings(
        max_attempts=4,
        on_error="retry",
        dead_letter="billing-dlq",
        backoff=happen.Backoff(initial=0.5, factor=3.0, max=5.0, jitter="none"),
    )
    assert system.delivery_for("worker") == happen.DeliverySettings(
        max_attempts=9,
        dead_letter="dlq",
        backoff=happen.Backoff(initial=0.5, jitter="none"),
    )


def test_a_pattern_may_take_a_dead_letter_node_away() -> None:
    system = happen.System(
        delivery={"default": {"dead_letter": "dlq"}, "patterns": {"dlq": {"dead_letter": None}}}
    )
    assert system.delivery_for("worker").dead_letter == "dlq"
    assert system.delivery_for("dlq").dead_letter is None


def test_durable_nodes_default_to_five_attempts_that_retry() -> None:
    system = happen.System(
        delivery={
            "patterns": {
                "billing-*": {"durable": True},
                "billing-strict": {"max_attempts": 1, "on_error": "raise"},
                "audit": {"durable": True, "on_error": "suppress"},
            }
        }
    )
    durable = system.delivery_for("billing-1")
    assert (durable.durable, durable.max_attempts, durable.on_error) == (True, 5, "retry")
    strict = system.delivery_for("billing-strict")
    assert (strict.durable, strict.max_attempts, strict.on_error) == (True, 1, "raise")
    audit = system.delivery_for("audit")
    assert (audit.max_attempts, audit.on_error) == (5, "suppress")
    plain = system.delivery_for("worker")
    assert (plain.durable, plain.max_attempts, plain.on_error) == (False, 1, "raise")


def test_resolved_settings_are_frozen_and_ids_are_checked() -> None:
    system = happen.System(delivery={"default": {"max_attempts": 3}})
    settings = system.delivery_for("worker")
    with pytest.raises(AttributeError):
        settings.max_attempts = 7  # type: ignore[misc]
    with pytest.raises(happen.InvalidIdError):
        system.delivery_for("not a node")


def test_config_resolves_alone() -> None:
    config = DeliveryConfig({"patterns": {"w-*": {"max_attempts": 2}}})
    assert config.resolve("w-1").max_attempts == 2
    assert config.resolve("other").max_attempts == 1


# ----- the backoff ------------------------------------------------------------------------


def test_backoff_grows_by_its_factor_up_to_its_cap() -> None:
    backoff = happen.Backoff(initial=0.1, factor=2.0, max=0.5, jitter="none")
    delays = [backoff.delay(attempt) for attempt in range(1, 7)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5, 0.5])
    assert happen.Backoff(initial=2, factor=1, jitter="none").delay(30) == 2
    # far beyond a float's range: the cap, not an OverflowError
    assert happen.Backoff(initial=1.0, factor=10.0, max=60.0, jitter="none").delay(10_000) == 60


def test_full_jitter_is_uniform_between_zero_and_the_computed_delay() -> None:
    backoff = happen.Backoff(initial=0.1, factor=2.0, max=0.5)
    assert backoff.jitter == "full"
    assert backoff.delay(3, lambda: 0.0) == 0.0
    assert backoff.delay(3, lambda: 0.5) == pytest.approx(0.2)
    assert backoff.delay(9, lambda: 0.999) == pytest.approx(0.4995)
    rng = random.Random(7)
    delays = [backoff.delay(2, rng.random) for _ in range(2000)]
    assert all(0.0 <= d <= 0.2 for d in delays)
    assert len(set(delays)) > 1900, "spread, not all equal"
    mean = sum(delays) / len(delays)
    assert 0.09 < mean < 0.11, "uniform: its mean is half the computed delay"
    settings = happen.DeliverySettings(backoff=backoff)
    assert settings.delay(3, lambda: 1.0) == pytest.approx(0.4)


# ----- Retry and Reject ------------------------------------------------------------------


@pytest.mark.parametrize("delay", [-1, -0.001, float("nan"), float("inf"), "1", True])
def test_retry_refuses_a_bad_delay(delay: Any) -> None:
    with pytest.raises(ValueError, match="Retry delay"):
        happen.Retry(delay=delay)


def test_retry_and_reject_travel_pickled_with_their_facts() -> None:
    retry = pickle.loads(pickle.dumps(happen.Retry(delay=0.25)))
    assert isinstance(retry, happen.Retry) and retry.delay == 0.25
    assert pickle.loads(pickle.dumps(happen.Retry())).delay is None
    reject = pickle.loads(pickle.dumps(happen.Reject("bad order")))
    assert isinstance(reject, happen.Reject) and reject.reason == "bad order"
    assert str(reject) == "bad order"
    assert isinstance(retry, happen.HappenError) and isinstance(reject, happen.HappenError)


# ----- the decision ----------------------------------------------------------------------


def settings(**kwargs: Any) -> happen.DeliverySettings:
    kwargs.setdefault("backoff", happen.Backoff(initial=0.1, jitter="none"))
    return happen.DeliverySettings(**kwargs)


def test_decisions_follow_on_error_and_attempts() -> None:
    boom = ValueError("boom")
    retry = settings(max_attempts=3, on_error="retry")
    assert decide(retry, boom, 1).outcome is Outcome.RETRY
    assert decide(retry, boom, 1).delay == pytest.approx(0.1)
    assert decide(retry, boom, 2).delay == pytest.approx(0.2)
    assert decide(retry, boom, 3).outcome is Outcome.FAIL
    assert decide(retry, boom, 1, retryable=False).outcome is Outcome.FAIL
    assert decide(settings(max_attempts=3), boom, 1).outcome is Outcome.FAIL  # "raise"
    suppress = settings(max_attempts=3, on_error="suppress")
    assert decide(suppress, boom, 1).outcome is Outcome.SUPPRESS
    dead = settings(max_attempts=2, on_error="retry", dead_letter="dlq")
    assert decide(dead, boom, 1).outcome is Outcome.RETRY
    assert decide(dead, boom, 2).outcome is Outcome.DEAD_LETTER
    assert decide(settings(dead_letter="dlq"), boom, 1).outcome is Outcome.DEAD_LETTER


def test_retry_is_honoured_whatever_on_error_says_within_max_attempts() -> None:
    for on_error in ("raise", "suppress", "retry"):
        two = settings(max_attempts=2, on_error=on_error)
        assert decide(two, happen.Retry(), 1).outcome is Outcome.RETRY
        assert decide(two, happen.Retry(), 1).delay == pytest.approx(0.1)
        assert decide(two, happen.Retry(delay=7), 1).delay == 7
    assert decide(settings(max_attempts=2), happen.Retry(), 2).outcome is Outcome.FAIL
    assert decide(settings(), happen.Retry(), 1).outcome is Outcome.FAIL  # one attempt only


def test_reject_is_never_retried_nor_suppressed() -> None:
    reject = happen.Reject("no")
    for on_error in ("raise", "suppress", "retry"):
        assert decide(settings(max_attempts=5, on_error=on_error), reject, 1).outcome is (
            Outcome.FAIL
        )
        dead = settings(max_attempts=5, on_error=on_error, dead_letter="dlq")
        assert decide(dead, reject, 1).outcome is Outcome.DEAD_LETTER
