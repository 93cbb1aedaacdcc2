"""JSON mode (protocol section 9.1).

An append body is validated and flattened one level: a top-level array stores
each element as its own message, anything else is one message. Messages are
stored compactly serialised and joined with commas, so a read is just the stored
fragments joined with commas and wrapped in ``[...]``.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from .errors import BadRequest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses integers beyond 64 bits, which JSON allows; the standard
    # library parses them (and we keep rejecting NaN/Infinity, which JSON does not).
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest("body is not valid JSON") from exc


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def flatten(body: bytes, *, allow_empty: bool) -> list[bytes]:
    """Validate ``body`` and return its messages, one serialised fragment each."""
    if not body.strip():
        raise BadRequest("body is not valid JSON")
    value = _loads(body)
    if isinstance(value, list):
        if not value and not allow_empty:
            raise BadRequest("empty JSON array: nothing to append")
        return [_dumps(item) for item in value]
    return [_dumps(value)]


def join(messages: list[bytes]) -> bytes:
    """Fragments of one entry, as stored in Redis."""
    return b",".join(messages)


def split(fragment: bytes) -> list[bytes]:
    """Inverse of join: the messages of one stored entry."""
    if not fragment:
        return []
    return [_dumps(item) for item in _loads(b"[" + fragment + b"]")]


def as_array(fragments: list[bytes]) -> bytes:
    """A JSON read response: every stored message in one array."""
    return b"[" + b",".join(f for f in fragments if f) + b"]"
