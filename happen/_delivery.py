"""Delivery: the attempts and errors policy of a node (section 9 of the design).

- ``DeliveryConfig`` validates ``System(delivery=...)`` at construction and resolves it per
  node id, like the concurrency settings (default, then every matching pattern from the
  least to the most specific).
- ``DeliverySettings`` are one node's resolved settings; ``Backoff`` computes the delay
  before the next attempt.
- ``decide`` turns a failed attempt into a ``Decision``: run again after a delay, fail,
  complete with ``None`` (suppress), or send a dead letter. The node acts on it; a durable
  node acts on the same decision with its log's verbs.
- ``DeadLetters`` sends a dead letter to the dead-letter node, raising when it could not.
"""

from __future__ import annotations

import enum
import fnmatch
import logging
import math
import random as random_module
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, Protocol

import msgspec
from msgspec import UNSET, Meta, UnsetType

from happen._config import specificity
from happen._errors import HandlerError, InvalidConfigError, InvalidIdError, Reject, Retry
from happen._events import Event
from happen._ids import validate_node_id

__all__ = [
    "DEAD_LETTER_TYPE",
    "Backoff",
    "DeadLetters",
    "Decision",
    "DeliveryConfig",
    "DeliverySettings",
    "Outcome",
    "dead_letter_payload",
    "decide",
]

log = logging.getLogger("happen")

#: The event type of a dead letter.
DEAD_LETTER_TYPE = "happen.dead_letter"

Seconds = Annotated[float, Meta(gt=0)]
Factor = Annotated[float, Meta(ge=1)]
Attempts = Annotated[int, Meta(ge=1)]
Jitter = Literal["full", "none"]
OnError = Literal["raise", "suppress", "retry"]


class Backoff(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How long a failed event waits before its next attempt.

    - ``initial``: seconds after the first failed attempt (default 1.0);
    - ``factor``: each further wait is this many times the one before (2.0);
    - ``max``: no wait is longer (60.0);
    - ``jitter``: ``"full"`` (default) waits a random time between 0 and the computed one,
      so that events that failed together do not all come back together; ``"none"`` waits
      exactly the computed time.
    """

    initial: Seconds = 1.0
    factor: Factor = 2.0
    max: Seconds = 60.0
    jitter: Jitter = "full"

    def delay(self, attempt: int, random: Callable[[], float] = random_module.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 for the first):
        ``min(max, initial * factor ** (attempt - 1))``, times ``random()`` (uniform in
        [0, 1)) with full jitter."""
        try:
            computed = min(self.max, self.initial * self.factor ** max(0, attempt - 1))
        except OverflowError:
            computed = self.max
        if self.jitter == "full":
            return computed * random()
        return computed


class DeliverySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The resolved delivery settings of one node (``System.delivery_for``).

    - ``durable``: events sent to the node are persisted first and handled at least once.
    - ``ack_wait``: seconds a durable delivery may go unacknowledged before it is delivered
      again (30.0).
    - ``dedup_window``: seconds within which a re-send of the same event id is stored once
      (120.0).
    - ``max_attempts``: executions of one event, the first included (1; 5 for a durable
      node unless given).
    - ``backoff``: the wait between attempts (``Backoff``).
    - ``on_error``: what a handler's exception does: ``"raise"`` fails the event at once
      (the default), ``"retry"`` runs it again while attempts remain (the default for a
      durable node), ``"suppress"`` completes it with ``None``.
    - ``dead_letter``: the id of the node that receives a ``happen.dead_letter`` event for
      each event that failed for good (after its last attempt, or a ``Reject``), or ``None``.
    """

    durable: bool = False
    ack_wait: Seconds = 30.0
    dedup_window: Seconds = 120.0
    max_attempts: Attempts = 1
    backoff: Backoff = Backoff()
    on_error: OnError = "raise"
    dead_letter: str | None = None

    def delay(self, attempt: int, random: Callable[[], float] = random_module.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (see ``Backoff.delay``)."""
        return self.backoff.delay(attempt, random)

    @property
    def plain(self) -> bool:
        """Whether a failure simply fails (one attempt, ``on_error="raise"``, no dead
        letter): the node then needs none of the retry machinery."""
        return self.max_attempts == 1 and self.on_error == "raise" and self.dead_letter is None


class _BackoffOverrides(msgspec.Struct, forbid_unknown_fields=True):
    initial: Seconds | UnsetType = UNSET
    factor: Factor | UnsetType = UNSET
    max: Seconds | UnsetType = UNSET
    jitter: Jitter | UnsetType = UNSET


class _Overrides(msgspec.Struct, forbid_unknown_fields=True):
    durable: bool | UnsetType = UNSET
    ack_wait: Seconds | UnsetType = UNSET
    dedup_window: Seconds | UnsetType = UNSET
    max_attempts: Attempts | UnsetType = UNSET
    backoff: _BackoffOverrides | UnsetType = UNSET
    on_error: OnError | UnsetType = UNSET
    dead_letter: str | UnsetType | None = UNSET


class DeliveryConfig:
    """The system-wide delivery configuration, validated once and resolved per node id.

    ``raw`` is ``{"default": {...}, "patterns": {glob: {...}}}`` (or ``None``); every key
    of ``DeliverySettings`` may appear in either, ``backoff`` as a dict of its own keys
    (merged key by key). Raises ``InvalidConfigError`` naming the key (and the pattern) for
    an unknown key, a wrong type or a value out of range.
    """

    def __init__(self, raw: Any = None) -> None:
        if raw is None:
            raw = {}
        if isinstance(raw, Mapping):
            raw = dict(raw)
        if not isinstance(raw, dict):
            raise InvalidConfigError(
                f"delivery must be a dict with 'default' and 'patterns', not {type(raw).__name__}"
            )
        unknown = set(raw) - {"default", "patterns"}
        if unknown:
            raise InvalidConfigError(
                f"invalid delivery settings: unknown key {sorted(unknown, key=str)[0]!r} "
                "(expected 'default' and 'patterns')"
            )
        self._default = _convert(raw.get("default", {}), "default")
        patterns_raw = raw.get("patterns", {})
        if not isinstance(patterns_raw, dict):
            raise InvalidConfigError(
                "invalid delivery settings: 'patterns' must be a dict of node-id globs"
            )
        patterns: list[tuple[str, _Overrides]] = []
        for pattern, value in patterns_raw.items():
            if not isinstance(pattern, str) or not pattern:
                raise InvalidConfigError(
                    f"invalid delivery settings: pattern {pattern!r} must be a non-empty str"
                )
            patterns.append((pattern, _convert(value, f"patterns[{pattern!r}]")))
        # least specific first, so the most specific is applied last; ties keep order
        self._patterns = sorted(patterns, key=lambda kv: specificity(kv[0]))

    @property
    def any_durable(self) -> bool:
        """Whether some node of the namespace may be durable (then broadcasts are stored
        for durable nodes too)."""
        layers = [self._default, *(overrides for _, overrides in self._patterns)]
        return any(overrides.durable is True for overrides in layers)

    def resolve(self, node_id: str) -> DeliverySettings:
        """The settings for ``node_id``: defaults, then every matching pattern in turn.

        ``max_attempts`` defaults to 5 and ``on_error`` to ``"retry"`` when the resolved
        ``durable`` is True and they were not given.
        """
        given: dict[str, Any] = {}
        backoff: dict[str, Any] = {}
        layers = [self._default]
        layers.extend(o for pattern, o in self._patterns if fnmatch.fnmatchcase(node_id, pattern))
        for overrides in layers:
            for field in overrides.__struct_fields__:
                value = getattr(overrides, field)
                if value is UNSET:
                    continue
                if field == "backoff":
                    backoff.update(_given(value))
                else:
                    given[field] = value
        durable = bool(given.get("durable", False))
        given.setdefault("max_attempts", 5 if durable else 1)
        given.setdefault("on_error", "retry" if durable else "raise")
        if backoff:
            given["backoff"] = Backoff(**backoff)
        return DeliverySettings(**given)


def _given(overrides: msgspec.Struct) -> dict[str, Any]:
    return {
        field: value
        for field in overrides.__struct_fields__
        if (value := getattr(overrides, field)) is not UNSET
    }


def _backoff_given(overrides: _Overrides) -> list[tuple[str, Any]]:
    backoff = overrides.backoff
    if backoff is UNSET:
        return []
    return [(f"backoff.{field}", value) for field, value in _given(backoff).items()]


def _convert(value: Any, where: str) -> _Overrides:
    try:
        overrides = msgspec.convert(value, _Overrides, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc).replace("- at `$", f"- at `{where}")
        if "- at `" not in message:
            message += f" - at `{where}`"
        raise InvalidConfigError(f"invalid delivery settings: {message}") from None
    for field, value in (*_given(overrides).items(), *_backoff_given(overrides)):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidConfigError(
                f"invalid delivery settings: Expected a finite number, got {value} - at "
                f"`{where}.{field}`"
            )
    dead_letter = overrides.dead_letter
    if isinstance(dead_letter, str):
        try:
            validate_node_id(dead_letter)
        except InvalidIdError as exc:
            raise InvalidConfigError(
                f"invalid delivery settings: {exc} - at `{where}.dead_letter`"
            ) from None
    return overrides


# ----- the decision after a failed attempt ----------------------------------------------


class Outcome(enum.Enum):
    """What becomes of an event whose attempt failed."""

    RETRY = "retry"  # run it again after ``Decision.delay``
    FAIL = "fail"  # it failed for good: counted failed, the caller gets HandlerError
    SUPPRESS = "suppress"  # it completes with None: counted completed and suppressed
    DEAD_LETTER = "dead_letter"  # it failed for good: send its dead letter, then settle it


class Decision(msgspec.Struct, frozen=True):
    """The outcome of a failed attempt, and for a retry the seconds to wait first."""

    outcome: Outcome
    delay: float = 0.0


def decide(
    settings: DeliverySettings,
    error: BaseException,
    attempt: int,
    random: Callable[[], float] = random_module.random,
    *,
    retryable: bool = True,
) -> Decision:
    """What to do after attempt number ``attempt`` (1 for the first) raised ``error``.

    - ``Reject``: never retried, never suppressed: dead-lettered when ``dead_letter`` is set,
      else failed.
    - ``Retry``: run again after its ``delay`` (or the backoff) while attempts remain,
      whatever ``on_error`` says.
    - Any other exception: with ``on_error="retry"``, run again after the backoff while
      attempts remain; with ``"suppress"``, complete with ``None``; with ``"raise"``, give up.

    An event that is given up on (its attempts spent, or ``retryable`` False, e.g. a
    streamed broadcast whose items were read) is suppressed under ``on_error="suppress"``,
    else dead-lettered when ``dead_letter`` is set, else failed.
    """
    if type(error) is Reject:
        return Decision(Outcome.DEAD_LETTER if settings.dead_letter else Outcome.FAIL)
    if retryable and attempt < settings.max_attempts:
        if isinstance(error, Retry):
            delay = error.delay
            return Decision(
                Outcome.RETRY, settings.delay(attempt, random) if delay is None else delay
            )
        if settings.on_error == "retry":
            return Decision(Outcome.RETRY, settings.delay(attempt, random))
    if settings.on_error == "suppress":
        return Decision(Outcome.SUPPRESS)
    if settings.dead_letter:
        return Decision(Outcome.DEAD_LETTER)
    return Decision(Outcome.FAIL)


def dead_letter_payload(
    event: Event[Any], node_id: str, error: BaseException, attempts: int, message: str
) -> dict[str, Any]:
    """The payload of the dead letter of ``event``, which failed on ``node_id`` with
    ``error`` (described by ``message``) after ``attempts`` attempts."""
    return {
        "event": {"type": event.type, "payload": event.payload, "context": event.context},
        "node": node_id,
        "error": {"type": type(error).__name__, "message": message},
        "attempts": attempts,
    }


# ----- sending dead letters -------------------------------------------------------------


class Sends(Protocol):
    """What ``DeadLetters`` sends with: the system's caller."""

    async def send(
        self,
        sender: str,
        target: Any,
        event: Any,
        timeout: float | None,
        priority: int,
        convert: Callable[[Any], Any] | None = None,
        *,
        event_id: str | None = None,
    ) -> Any: ...

    def stores(self, target: str) -> bool: ...

    async def enqueue(
        self, sender: str, target: Any, event: Any, event_id: str | None = None
    ) -> Any: ...


class DeadLetters:
    """Sends dead letters to dead-letter nodes, with the system's caller.

    ``publish`` returns once the dead-letter node has handled the letter (or stored it, when
    that node is durable); a failure of
    its handler counts as delivered (that node counts its own failure). Anything else
    (no such node, no handler, a full queue, the transport down, the system stopping)
    raises, and the caller of ``publish`` tries again later.
    """

    def __init__(self, caller: Sends) -> None:
        self._caller = caller

    async def publish(
        self, sender: str, target: str, event_id: str, payload: dict[str, Any]
    ) -> None:
        """Send the dead letter ``payload`` from node ``sender`` to node ``target``, as an
        event of type ``happen.dead_letter`` whose id is ``event_id``; its causal parent is
        the event whose handler is running (the failed event, set by the node)."""
        event = {"type": DEAD_LETTER_TYPE, "payload": payload}
        if self._caller.stores(target):
            # A durable dead-letter node: delivered once stored (under the derived id, so a
            # letter sent again after a crash is stored once).
            await self._caller.enqueue(sender, target, event, event_id)
            return
        try:
            result = await self._caller.send(sender, target, event, None, 0, event_id=event_id)
        except HandlerError as exc:
            log.debug("dead-letter node %r failed on a dead letter: %s", target, exc)
            return
        aclose = getattr(result, "aclose", None)
        if aclose is not None:  # the dead-letter handler streams: nobody reads it
            await aclose()
