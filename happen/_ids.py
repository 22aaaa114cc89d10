"""Validation of node ids and event types, before any subject is built from them."""

from __future__ import annotations

import functools
import re

from happen._errors import InvalidIdError

__all__ = [
    "KNOWN_KEYS",
    "learn_key",
    "validate_event_id",
    "validate_event_type",
    "validate_key",
    "validate_node_id",
]

_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_:-]+(?:\.[A-Za-z0-9_:-]+)*")

NODE_ID_RULE = "1-128 characters of ASCII letters, digits, '-' and '_'"
EVENT_TYPE_RULE = (
    "1-256 characters of ASCII letters, digits, '-', '_', ':' and '.', "
    "with no empty dot-separated segment"
)
#: The longest key (``key=`` on ``send`` and ``stream``), in characters.
MAX_KEY = 256
KEY_RULE = f"a string of 1-{MAX_KEY} characters (any characters UTF-8 can encode)"


def validate_node_id(node_id: object) -> str:
    """Return ``node_id`` if it is a valid node id, else raise ``InvalidIdError``."""
    if type(node_id) is not str:
        raise InvalidIdError(f"invalid node id {_show(node_id)}: a node id is {NODE_ID_RULE}")
    return _valid_node_id(node_id)


def validate_event_type(event_type: object) -> str:
    """Return ``event_type`` if it is a valid event type, else raise ``InvalidIdError``."""
    if type(event_type) is not str:
        raise InvalidIdError(
            f"invalid event type {_show(event_type)}: an event type is {EVENT_TYPE_RULE}"
        )
    return _valid_event_type(event_type)


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid key for per-key order: ``TypeError`` for a non-string,
    ``InvalidIdError`` for an empty one, one over ``MAX_KEY`` characters, or one UTF-8
    cannot encode (a lone surrogate)."""
    if type(key) is not str:
        raise TypeError(f"a key is a str ({KEY_RULE}), not {type(key).__name__}")
    if not 0 < len(key) <= MAX_KEY:
        raise InvalidIdError(
            f"invalid key {_show(key)} of {len(key)} characters: a key is {KEY_RULE}"
        )
    if not key.isascii():
        try:
            key.encode()
        except UnicodeEncodeError:
            raise InvalidIdError(f"invalid key {_show(key)}: a key is {KEY_RULE}") from None
    return key


#: Valid keys met lately (``learn_key``): a sender checks a key it meets again by one lookup.
KNOWN_KEYS: set[str] = set()
_KNOWN_KEYS_MAX = 4096


def learn_key(key: object) -> None:
    """Check ``key`` (``validate_key``: raises if it is not valid) and remember it in
    ``KNOWN_KEYS``, which is emptied when it is full."""
    valid = validate_key(key)
    if len(KNOWN_KEYS) >= _KNOWN_KEYS_MAX:
        KNOWN_KEYS.clear()
    KNOWN_KEYS.add(valid)


# Ids and types repeat on the hot path: remember the valid ones (a pure function's memo).
@functools.lru_cache(maxsize=4096)
def _valid_node_id(node_id: str) -> str:
    if not _NODE_ID.fullmatch(node_id):
        raise InvalidIdError(f"invalid node id {_show(node_id)}: a node id is {NODE_ID_RULE}")
    return node_id


@functools.lru_cache(maxsize=4096)
def _valid_event_type(event_type: str) -> str:
    if len(event_type) > 256 or not _EVENT_TYPE.fullmatch(event_type):
        raise InvalidIdError(
            f"invalid event type {_show(event_type)}: an event type is {EVENT_TYPE_RULE}"
        )
    return event_type


EVENT_ID_RULE = "1-256 characters, none of them whitespace or control characters"
_EVENT_ID = re.compile(r"[^\x00-\x20\x7f-\xa0\s]{1,256}")


def validate_event_id(event_id: object) -> str:
    """Return ``event_id`` (an ``id=`` given to a send) if valid, else raise: ``TypeError``
    for a non-string, ``InvalidIdError`` for a malformed one."""
    if type(event_id) is not str:
        raise TypeError(f"an event id is a str, not {type(event_id).__name__}")
    if not _EVENT_ID.fullmatch(event_id):
        raise InvalidIdError(f"invalid event id {_show(event_id)}: an event id is {EVENT_ID_RULE}")
    return event_id


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
