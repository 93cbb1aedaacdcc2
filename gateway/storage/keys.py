"""Redis key layout.

Every key of one stream shares the hash tag ``{<path>}`` so that all of them live
in one Redis Cluster slot and every multi-key change is one Lua script:

    ds:{<path>}:meta       hash    content type, tail id, closure, TTL/expiry, fork links
    ds:{<path>}:data       stream  one entry per append (field d = bytes, n = JSON count)
    ds:{<path>}:producers  hash    producer id -> "epoch:last_seq"
    ds:{<path>}:forks      set     paths of the forks that read this stream
    ds:{<path>}:wake       channel pub/sub wake-ups for live readers

``{``, ``}`` and ``%`` in a path are percent-encoded so a path can never end the
hash tag early (which would scatter one stream's keys across slots).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

LAYOUT_VERSION = 1


def _tag(path: str) -> str:
    return path.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


@dataclass(frozen=True)
class StreamKeys:
    meta: str
    data: str
    producers: str
    forks: str
    wake: str

    @property
    def all(self) -> list[str]:
        """The keys every script takes, in KEYS order."""
        return [self.meta, self.data, self.producers, self.forks]


@functools.lru_cache(maxsize=4096)
def stream_keys(prefix: str, path: str) -> StreamKeys:
    """The keys of one stream (cached: every request needs them, and they are
    immutable)."""
    # The prefix is escaped too: braces in it would become the hash tag.
    base = f"{_tag(prefix)}:{{{_tag(path)}}}"
    return StreamKeys(
        meta=f"{base}:meta",
        data=f"{base}:data",
        producers=f"{base}:producers",
        forks=f"{base}:forks",
        wake=f"{base}:wake",
    )
