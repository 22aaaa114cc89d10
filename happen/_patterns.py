"""Event-type patterns: exact types, dot-segment globs and predicates.

Globs are matched on dot-separated segments: ``*`` matches within one segment and ``**``
matches one or more whole segments. Each pattern also names the broadcast subject suffix a
node subscribes to: the equivalent NATS subject where one exists, a broader one otherwise
(the node then filters).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from happen._errors import InvalidIdError
from happen._ids import validate_event_type

__all__ = ["Pattern", "compile_pattern"]

log = logging.getLogger("happen")

_GLOB_SEGMENT = re.compile(r"[A-Za-z0-9_:*-]+")

PatternLike = str | Callable[[str], bool]


class Pattern:
    """A compiled event-type pattern."""

    __slots__ = ("exact", "matches", "source", "subject")

    def __init__(
        self,
        source: PatternLike,
        matches: Callable[[str], bool],
        subject: str,
        exact: str | None,
    ) -> None:
        self.source = source
        self.matches = matches
        #: the subject suffix (after "{ns}.bcast.") that covers every type this pattern matches
        self.subject = subject
        #: the event type itself, for an exact pattern
        self.exact = exact

    def __repr__(self) -> str:
        return f"Pattern({self.source!r})"


def compile_pattern(pattern: object) -> Pattern:
    """Compile an exact type, a glob or a predicate; raise on anything else."""
    if isinstance(pattern, str):
        if "*" not in pattern:
            validate_event_type(pattern)
            return Pattern(pattern, pattern.__eq__, pattern, pattern)
        return _compile_glob(pattern)
    if callable(pattern):
        return Pattern(pattern, _safe_predicate(pattern), ">", None)
    raise TypeError(
        f"a pattern is an event type, a glob or a predicate Callable[[str], bool], "
        f"not {type(pattern).__name__}"
    )


def _compile_glob(pattern: str) -> Pattern:
    segments = pattern.split(".")
    if len(pattern) > 256 or not all(
        seg == "**" or _GLOB_SEGMENT.fullmatch(seg) for seg in segments
    ):
        raise InvalidIdError(
            f"invalid pattern {pattern!r}: a glob is dot-separated segments of letters, digits, "
            "'-', '_', ':' and '*', or a whole '**' segment"
        )
    parts: list[str] = []
    for seg in segments:
        if seg == "**":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        elif "**" in seg:
            raise InvalidIdError(f"invalid pattern {pattern!r}: '**' must be a whole segment")
        else:
            parts.append("[^.]*".join(re.escape(p) for p in seg.split("*")))
    regex = re.compile(r"\.".join(parts))

    subject: list[str] = []
    for i, seg in enumerate(segments):
        if seg == "**" and i == len(segments) - 1:
            subject.append(">")
            break
        if seg == "*" or "*" not in seg:
            subject.append(seg)
            continue
        subject.append(">")  # a partial-segment glob or an inner '**': subscribe wider, filter
        break

    def matches(event_type: str) -> bool:
        return regex.fullmatch(event_type) is not None

    return Pattern(pattern, matches, ".".join(subject), None)


def _safe_predicate(predicate: Callable[[str], bool]) -> Callable[[str], bool]:
    def matches(event_type: str) -> bool:
        try:
            return bool(predicate(event_type))
        except Exception:
            log.exception(
                "pattern predicate %r raised on %r; treated as no match", predicate, event_type
            )
            return False

    return matches
