"""The Lua scripts' replies, decoded by name rather than by position.

Each script's header comment (gateway/storage/lua/*.lua) lists its reply; the
types here follow those lists field by field, so the store reads
``reply.fork_offset`` rather than ``reply[7]``. Replies vary in length (a
refusal carries only its status): missing fields decode as empty.
"""

from __future__ import annotations

from typing import Any, NamedTuple


def text(value: Any) -> str:
    """A reply field as str (Redis sends bytes; integers come as int)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(reply: list[Any], count: int) -> list[str]:
    return [text(reply[i]) if i < len(reply) else "" for i in range(count)]


class CreateReply(NamedTuple):
    """create.lua: {'created', tail, closed} | {'exists', tail, closed, content type}
    | {'conflict'} | {'gone'}"""

    status: str
    tail: str  # entry id
    closed: bool
    content_type: str

    @classmethod
    def parse(cls, reply: list[Any]) -> CreateReply:
        status, tail, closed, content_type = _fields(reply, 4)
        return cls(status, tail, closed == "1", content_type)


class ForkAcquireReply(NamedTuple):
    """fork_acquire.lua: {'ok', content type, media type, fork offset id, ttl,
    expires-at, '1' if newly registered} | {'not_found'} | {'gone'} |
    {'ct_mismatch'} | {'beyond_tail'}"""

    status: str
    content_type: str
    media_type: str
    fork_offset: str  # entry id
    ttl: str
    expires_at: str
    registered: bool

    @classmethod
    def parse(cls, reply: list[Any]) -> ForkAcquireReply:
        status, ct, mt, fork_offset, ttl, exp, registered = _fields(reply, 7)
        return cls(status, ct, mt, fork_offset, ttl, exp, registered == "1")


class AppendRunReply(NamedTuple):
    """append.lua, one run of a group commit: {replies, messages, trimmed}:
    one reply per request (each an ``AppendReply``, or a plain append's entry
    id alone), per stream its wake-up message or empty, and how many entries
    retention trimmed in the run, over all its streams."""

    replies: list[Any]
    messages: list[bytes]
    trimmed: int  # entries removed by retention

    @classmethod
    def parse(cls, reply: list[Any]) -> AppendRunReply:
        # Once per run on the append path, so kept to one call: the fields
        # need no decoding (Redis sends the count as an integer).
        return cls._make(reply)


class AppendReply(NamedTuple):
    """One request's reply in append.lua's run (see its header): a plain
    append's is its entry id alone (bytes); the others a list
    {status, tail, closed, epoch, seq} (the epoch and seq fields carry the
    expected and received seq for 'seq_gap')."""

    status: str
    tail: str  # entry id
    closed: bool
    epoch: str
    seq: str

    @classmethod
    def parse(cls, reply: list[Any]) -> AppendReply:
        status, tail, closed, epoch, seq = _fields(reply, 5)
        return cls(status, tail, closed == "1", epoch, seq)


class ReadReply(NamedTuple):
    """read.lua: {status, content type, tail, closed, ttl, expires-at, fork
    source, fork offset, entries, last id, '1' if more follow, count, retention
    max age, retention max bytes, last trimmed id}"""

    status: str
    content_type: str
    tail: str  # entry id
    closed: bool
    ttl: int | None
    expires_at: int | None
    fork_source: str
    fork_offset: str  # entry id
    entries: list[bytes]
    last: str  # entry id
    more: bool
    entry_count: int  # 'xrange': how many entries to fetch
    retention_max_age: str  # as set at creation ('0': none), '' when unset
    retention_max_bytes: str
    trimmed_to: str  # entry id of the last entry retention trimmed, or ''

    @classmethod
    def parse(cls, reply: list[Any]) -> ReadReply:
        status, ct, tail, closed, ttl, exp, fsrc, foff = _fields(reply, 8)
        entries: list[bytes] = reply[8] if len(reply) > 8 else []
        last, more, count, max_age, max_bytes, trimmed_to = _fields(reply[9:], 6)
        return cls(
            status,
            ct,
            tail,
            closed == "1",
            int(ttl) if ttl else None,
            int(exp) if exp else None,
            fsrc,
            foff,
            entries,
            last,
            more == "1",
            int(count) if count else 0,
            max_age,
            max_bytes,
            trimmed_to,
        )


class DeleteReply(NamedTuple):
    """delete.lua: {'deleted', fork source path or ''} | {'soft'} | {'not_found'} | {'gone'};
    fork_release.lua: {'held'} | {'released'} | {'deleted', fork source path or ''}
    | {'not_member'} | {'missing'}"""

    status: str
    fork_source: str

    @classmethod
    def parse(cls, reply: list[Any]) -> DeleteReply:
        status, source = _fields(reply, 2)
        return cls(status, source)
