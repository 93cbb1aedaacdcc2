"""What the store takes and returns: small immutable values in protocol words."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from gateway.protocol import headers


class StreamInfo(NamedTuple):
    """What HEAD reports (section 5.5); also the metadata of every read."""

    content_type: str
    tail: str  # offset token
    closed: bool
    ttl: int | None
    expires_at: int | None  # epoch ms
    # Retention in force (the stream's own, or the server default): max age in
    # seconds and max bytes of data, None for none.
    retention_max_age: int | None = None
    retention_max_bytes: int | None = None

    @property
    def is_json(self) -> bool:
        return headers.is_json(self.content_type)


class Page(NamedTuple):
    """One read: the stream's metadata and the data after an offset."""

    info: StreamInfo
    body: bytes  # concatenated bytes, or comma-joined JSON messages
    next_offset: str
    more: bool  # True when the page was cut at the size limit

    @property
    def up_to_date(self) -> bool:
        return not self.more and self.next_offset >= self.info.tail

    @property
    def at_closed_tail(self) -> bool:
        return self.info.closed and self.up_to_date


@dataclass(frozen=True)
class CreateRequest:
    content_type: str
    ttl: int | None = None
    expires_at: int | None = None
    closed: bool = False
    entries: tuple[tuple[bytes, int | None], ...] = ()  # (data, JSON message count)
    fork_source: str | None = None
    fork_offset: str | None = None  # offset token, None for the source's tail
    fork_sub_offset: int | None = None
    retention_max_age: int | None = None  # seconds; 0 keeps everything
    retention_max_bytes: int | None = None  # 0 keeps everything


@dataclass(frozen=True)
class CreateResult:
    created: bool
    tail: str
    closed: bool
    content_type: str


class AppendRequest(NamedTuple):
    media_type: str
    body: bytes | None  # None for close-only
    json_count: int | None
    close: bool
    stream_seq: str | None
    producer: headers.Producer | None


class AppendResult(NamedTuple):
    status: str  # 'ok', 'dup', 'closed_noop'
    tail: str
    closed: bool
    producer_epoch: str | None
    producer_seq: str | None
