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


# -- rate limits and live-reader quotas (gateway/storage/quotas.py) ---------------
#
#    ds:rate:{<principal>}:<operation>   string      GCRA theoretical arrival time, epoch µs
#    ds:live:{<principal>}               sorted set  live reader id -> lease expiry, epoch ms
#
# ``<principal>`` is ``sub:<subject>`` or ``ip:<client address>``; each key
# expires on its own once the principal is idle.


def rate_key(prefix: str, principal: str, operation: str) -> str:
    """The key counting ``principal``'s requests of one operation."""
    return f"{_tag(prefix)}:rate:{{{_tag(principal)}}}:{operation}"


def live_readers_key(prefix: str, principal: str) -> str:
    """The leases of ``principal``'s live readers."""
    return f"{_tag(prefix)}:live:{{{_tag(principal)}}}"
