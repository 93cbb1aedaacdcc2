"""JSON mode (protocol section 9.1).

An append body is validated and flattened one level: a top-level array stores
each element as its own message, anything else is one message. One append is
one stream entry holding its messages comma-joined, in the client's own text
(the inside of the array, or the value), so a read is just the entries joined
with commas and wrapped in ``[...]``, and every number keeps its exact digits.

Validation uses orjson; bodies with numbers orjson would turn into doubles, or
with escapes it refuses (lone surrogates), are checked by the standard library.
``flatten``/``split`` re-serialise messages one by one, exactly, for the rare
case that needs single messages: a fork at a sub-offset inside an append.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import orjson

from gateway.protocol.errors import BadRequest

# Numbers orjson might not round-trip exactly: 16+ digit runs, 3-digit exponents.
_RISKY_NUMBER = re.compile(rb"[0-9]{16}|[eE][+-]?[0-9]{3}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _ExactNumber(Decimal):
    """A JSON number as written (Decimal keeps every digit and exponent)."""


def _loads_exact(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
        return json.loads(
            text,
            parse_float=_ExactNumber,
            parse_int=_ExactNumber,
            parse_constant=_reject_constant,
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadRequest("body is not valid JSON") from exc


def _dumps_exact(value: Any) -> bytes:
    parts: list[str] = []
    _write_exact(value, parts)
    return "".join(parts).encode("utf-8")


def _write_exact(value: Any, out: list[str]) -> None:
    if isinstance(value, _ExactNumber):
        out.append(str(value))
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write_exact(item, out)
        out.append("]")
    elif isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _write_exact(item, out)
        out.append("}")
    elif isinstance(value, str):
        out.append(_string(value))
    else:  # true, false, null
        out.append(json.dumps(value))


def _string(value: str) -> str:
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (valid JSON as an escape, not encodable as UTF-8).
        text = json.dumps(value)
    return text


def _parse(body: bytes) -> tuple[Any, bool]:
    """The parsed body and whether it took the exact path."""
    if not _RISKY_NUMBER.search(body):
        try:
            return orjson.loads(body), False
        except orjson.JSONDecodeError:
            pass  # maybe valid JSON orjson refuses (lone surrogates): try exactly
    return _loads_exact(body), True


def flatten(body: bytes, *, allow_empty: bool) -> list[bytes]:
    """Validate ``body`` and return its messages, one serialised fragment each."""
    if not body.strip():
        raise BadRequest("body is not valid JSON")
    value, exact = _parse(body)
    dumps = _dumps_exact if exact else orjson.dumps
    if isinstance(value, list):
        if not value and not allow_empty:
            raise BadRequest("empty JSON array: nothing to append")
        return [dumps(item) for item in value]
    return [dumps(value)]


_JSON_WHITESPACE = b" \t\n\r"


def entry(body: bytes, *, allow_empty: bool) -> tuple[bytes, int]:
    """Validate an append body and return what one stream entry stores: the
    messages, comma-joined, and how many there are.

    The body is parsed only to validate it and count a top-level array; the
    stored text is the client's own (the inside of the array, or the value), so
    numbers keep their exact digits and no message is serialised again.
    """
    text = body.strip(_JSON_WHITESPACE)
    if not text:
        raise BadRequest("body is not valid JSON")
    # Only validity and the array's length matter here, never the parsed numbers,
    # so orjson decides alone whenever it accepts the body (no scan for risky
    # numbers: that regex costs several times the parse on a batch).
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = _loads_exact(text)  # valid JSON orjson refuses, or a 400
    if isinstance(value, list):
        if not value and not allow_empty:
            raise BadRequest("empty JSON array: nothing to append")
        # The array's inside is its elements joined by commas (and whitespace).
        return text[1:-1].strip(_JSON_WHITESPACE), len(value)
    return text, 1


def join(messages: list[bytes]) -> bytes:
    """Fragments of one entry, as stored in Redis."""
    return b",".join(messages)


def split(fragment: bytes) -> list[bytes]:
    """Inverse of join: the messages of one stored entry."""
    if not fragment:
        return []
    return flatten(b"[" + fragment + b"]", allow_empty=True)
