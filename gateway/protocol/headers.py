"""Parsing and validation of the protocol's request headers.

Pure functions: each takes raw header text and returns a typed value or raises
BadRequest with a short reason. Nothing here touches I/O.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.protocol.errors import BadRequest

# Section 5.1: a non-negative decimal integer without leading zeros, signs,
# decimal points or exponents.
_CANONICAL_UINT = re.compile(r"\A(0|[1-9][0-9]*)\Z")
MAX_SAFE_INTEGER = 2**53 - 1  # Producer-Epoch/Seq limit (JavaScript interoperability)
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
MAX_STREAM_SEQ_LENGTH = 256
MAX_PRODUCER_ID_LENGTH = 256

DEFAULT_CONTENT_TYPE = "application/octet-stream"
# Control characters other than HTAB (RFC 9110 section 5.5): never part of a
# field value, and in a value the gateway stores and sends back they would
# split the response.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_MEDIA_TYPE = re.compile(r"\A[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+\Z")
# RFC 9110 section 5.6.1-2: a comma-separated list of tokens (header names).
_TOKEN_LIST = re.compile(
    r"\A[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*[ \t]*\Z"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_uint(raw: str, name: str, maximum: int = MAX_SAFE_INTEGER) -> int:
    value = raw.strip()
    if not _CANONICAL_UINT.match(value):
        raise BadRequest(f"{name} must be a non-negative integer without leading zeros")
    # More digits than the maximum has: too large, whatever they are (and int()
    # refuses strings of over 4,300 digits with a ValueError).
    number = int(value) if len(value) <= len(str(maximum)) else maximum + 1
    if number > maximum:
        raise BadRequest(f"{name} must be at most {maximum}")
    return number


def parse_ttl(raw: str | None) -> int | None:
    if raw is None:
        return None
    return parse_uint(raw, "Stream-TTL", MAX_TTL_SECONDS)


def parse_retention_max_age(raw: str | None) -> int | None:
    """``Stream-Retention-Max-Age``: seconds; 0 keeps everything (overrides a
    server default)."""
    if raw is None:
        return None
    return parse_uint(raw, "Stream-Retention-Max-Age", MAX_TTL_SECONDS)


def parse_retention_max_bytes(raw: str | None) -> int | None:
    """``Stream-Retention-Max-Bytes``: bytes of data; 0 keeps everything."""
    if raw is None:
        return None
    return parse_uint(raw, "Stream-Retention-Max-Bytes")


def parse_expires_at(raw: str | None) -> int | None:
    """RFC 3339 timestamp -> epoch milliseconds."""
    if raw is None:
        return None
    text = raw.strip()
    # RFC 3339 requires a date, a 'T' (or space) and a zone; fromisoformat alone
    # would also accept bare dates and naive times.
    if not re.match(
        r"\A\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z", text
    ):
        raise BadRequest("Stream-Expires-At must be an RFC 3339 timestamp")
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadRequest("Stream-Expires-At must be an RFC 3339 timestamp") from exc
    # Integer arithmetic: float timestamps lose a millisecond past 2038.
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def format_expires_at(epoch_ms: int) -> str:
    moment = datetime.fromtimestamp(epoch_ms // 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def is_closed(raw: str | None) -> bool:
    """Section 4.1: only the exact value ``true`` (any case) means closed."""
    return raw is not None and raw.strip().lower() == "true"


@functools.lru_cache(maxsize=256)
def media_type(content_type: str) -> str:
    """``"Application/JSON; charset=utf-8"`` -> ``"application/json"``."""
    return content_type.split(";", 1)[0].strip().lower()


JSON = "application/json"


def is_json(content_type: str) -> bool:
    return media_type(content_type) == JSON


def is_text(content_type: str) -> bool:
    """SSE carries text/* and application/json natively; everything else is base64."""
    mt = media_type(content_type)
    return mt.startswith("text/") or mt == "application/json"


@functools.lru_cache(maxsize=256)
def normalize_content_type(raw: str | None) -> str | None:
    if raw is None:
        return None
    value = raw.strip()
    if not value:
        return None
    mt = media_type(value)
    # The parameters too (the media type's own pattern has no control
    # characters), including any that strip() would drop from the ends.
    if _CONTROL_CHARACTERS.search(raw) or not _MEDIA_TYPE.match(mt):
        raise BadRequest("malformed Content-Type")
    return value


def is_token_list(raw: str) -> bool:
    """True for a comma-separated list of tokens, such as a CORS preflight's
    ``Access-Control-Request-Headers`` (``content-type, producer-id``)."""
    return _TOKEN_LIST.match(raw) is not None


@dataclass(frozen=True)
class Producer:
    """Section 5.2.1: the (Producer-Id, Producer-Epoch, Producer-Seq) triple."""

    id: str
    epoch: int
    seq: int


def parse_producer(pid: str | None, epoch: str | None, seq: str | None) -> Producer | None:
    if pid is None and epoch is None and seq is None:
        return None  # most appends
    if pid is None or epoch is None or seq is None:
        raise BadRequest("Producer-Id, Producer-Epoch and Producer-Seq must be sent together")
    if not pid.strip():
        raise BadRequest("Producer-Id must not be empty")
    if len(pid) > MAX_PRODUCER_ID_LENGTH:
        raise BadRequest(f"Producer-Id must be at most {MAX_PRODUCER_ID_LENGTH} bytes")
    return Producer(
        id=pid,
        epoch=parse_uint(epoch, "Producer-Epoch"),
        seq=parse_uint(seq, "Producer-Seq"),
    )


def parse_stream_seq(raw: str | None) -> str | None:
    if raw is None:
        return None
    if raw == "":
        raise BadRequest("Stream-Seq must not be empty")
    if len(raw) > MAX_STREAM_SEQ_LENGTH:
        raise BadRequest(f"Stream-Seq must be at most {MAX_STREAM_SEQ_LENGTH} bytes")
    return raw


def parse_sub_offset(raw: str | None) -> int | None:
    if raw is None:
        return None
    return parse_uint(raw, "Stream-Fork-Sub-Offset")
