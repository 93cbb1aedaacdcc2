"""Offsets (protocol section 8).

An offset is a Redis stream entry id ``ms-seq`` written as two zero-padded,
16-digit decimal numbers joined by ``_``: ``0001732547000123_0000000000000004``.
Fixed width makes the tokens sort lexicographically in stream order, they never
contain ``, & = ? /`` and they can never equal the sentinels ``-1`` or ``now``.
The tail offset of a stream is the id of its last entry; an empty stream's tail
is ZERO. Parsing is strict: nothing a client sends reaches a Redis command unless
it matched the exact shape below (``$``, ``+``, ``-``, ``>`` are rejected).
"""

from __future__ import annotations

import re

from gateway.protocol.errors import BadRequest

WIDTH = 16
ZERO = "0" * WIDTH + "_" + "0" * WIDTH
ZERO_ID = "0-0"
BEGINNING = "-1"
NOW = "now"

_OFFSET = re.compile(r"\A([0-9]{16})_([0-9]{16})\Z")


def from_entry_id(entry_id: str) -> str:
    """``"1732547000123-4"`` -> ``"0001732547000123_0000000000000004"``."""
    ms, _, seq = entry_id.partition("-")
    return ms.zfill(WIDTH) + "_" + seq.zfill(WIDTH)


def to_entry_id(offset: str) -> str:
    """Inverse of from_entry_id for a token that already passed ``parse``."""
    ms, _, seq = offset.partition("_")
    return f"{int(ms)}-{int(seq)}"


def is_offset(token: str) -> bool:
    return _OFFSET.match(token) is not None


def parse(token: str, what: str = "offset") -> str:
    """Validate a client-supplied offset and return its Redis entry id."""
    if not _OFFSET.match(token):
        raise BadRequest(f"malformed {what}")
    return to_entry_id(token)


def id_key(entry_id: str) -> tuple[int, int]:
    """Numeric sort key of a Redis entry id."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)
