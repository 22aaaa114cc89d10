"""Concurrency settings: validation at construction and resolution by node-id glob."""

from __future__ import annotations

import fnmatch
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from happen._errors import InvalidConfigError

__all__ = ["ConcurrencyConfig", "ConcurrencySettings", "specificity"]

MaxConcurrent = Annotated[int, Meta(ge=1)]
QueueLimit = Annotated[int, Meta(ge=0)]
Threshold = Annotated[float, Meta(gt=0, le=1)]
Strategy = Literal["fifo", "priority"]


class ConcurrencySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The resolved flow-control settings of one node.

    - ``max_concurrent``: handler executions that may run at once (all event types share it).
    - ``queue_limit``: events that may wait beyond those; one more is rejected.
    - ``queue_strategy``: ``"fifo"``, or ``"priority"`` (higher ``priority`` first).
    - ``backpressure_threshold``: the fraction of ``queue_limit`` at which senders are held.
    """

    max_concurrent: MaxConcurrent = 100
    queue_limit: QueueLimit = 10_000
    queue_strategy: Strategy = "fifo"
    backpressure_threshold: Threshold = 0.8


class _Overrides(msgspec.Struct, forbid_unknown_fields=True):
    max_concurrent: MaxConcurrent | UnsetType = UNSET
    queue_limit: QueueLimit | UnsetType = UNSET
    queue_strategy: Strategy | UnsetType = UNSET
    backpressure_threshold: Threshold | UnsetType = UNSET


class _Config(msgspec.Struct, forbid_unknown_fields=True):
    default: _Overrides = msgspec.field(default_factory=_Overrides)
    patterns: dict[str, _Overrides] = msgspec.field(default_factory=dict)


def specificity(pattern: str) -> int:
    """How specific a node-id glob is: its literal characters (more is more specific)."""
    return sum(1 for c in pattern if c not in "*?[]!")


class ConcurrencyConfig:
    """The system-wide concurrency configuration, validated once and resolved per node id."""

    def __init__(self, raw: Any = None) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise InvalidConfigError(
                f"concurrency must be a dict with 'default' and 'patterns', not "
                f"{type(raw).__name__}"
            )
        unknown = set(raw) - {"default", "patterns"}
        if unknown:
            raise InvalidConfigError(
                f"invalid concurrency settings: unknown key {sorted(unknown)[0]!r} "
                "(expected 'default' and 'patterns')"
            )
        default = _convert(raw.get("default", {}), "default")
        patterns_raw = raw.get("patterns", {})
        if not isinstance(patterns_raw, dict):
            raise InvalidConfigError(
                "invalid concurrency settings: 'patterns' must be a dict of node-id globs"
            )
        patterns: dict[str, _Overrides] = {}
        for pattern, value in patterns_raw.items():
            if not isinstance(pattern, str) or not pattern:
                raise InvalidConfigError(
                    f"invalid concurrency settings: pattern {pattern!r} must be a non-empty str"
                )
            patterns[pattern] = _convert(value, f"patterns[{pattern!r}]")
        config = _Config(default=default, patterns=patterns)
        self._default = _apply(ConcurrencySettings(), config.default)
        # least specific first, so the most specific is applied last; ties keep order
        self._patterns = sorted(config.patterns.items(), key=lambda kv: specificity(kv[0]))

    def resolve(self, node_id: str) -> ConcurrencySettings:
        """The settings for ``node_id``: defaults, then every matching pattern in turn."""
        settings = self._default
        for pattern, overrides in self._patterns:
            if fnmatch.fnmatchcase(node_id, pattern):
                settings = _apply(settings, overrides)
        return settings


def _convert(value: Any, where: str) -> _Overrides:
    try:
        return msgspec.convert(value, _Overrides, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc).replace("- at `$", f"- at `{where}")
        if "- at `" not in message:
            message += f" - at `{where}`"
        raise InvalidConfigError(f"invalid concurrency settings: {message}") from None


def _apply(base: ConcurrencySettings, overrides: _Overrides) -> ConcurrencySettings:
    changes = {
        field: value
        for field in overrides.__struct_fields__
        if (value := getattr(overrides, field)) is not UNSET
    }
    return msgspec.structs.replace(base, **changes) if changes else base
