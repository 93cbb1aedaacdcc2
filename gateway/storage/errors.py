"""The one place where Redis failures become protocol errors.

Every storage call runs inside ``storage_errors``: an unreachable, stuck,
loading or read-only Redis (and a cluster in the middle of a failover) becomes
the protocol's fast ``503`` with ``Retry-After``; anything else propagates.
"""

from __future__ import annotations

from types import TracebackType

from redis import exceptions as redis_errors

from gateway import metrics
from gateway.protocol.errors import Unavailable

_UNAVAILABLE = (
    TimeoutError,
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.MaxConnectionsError,
    redis_errors.RedisClusterException,
    OSError,
)
# Error replies that mean "not now" rather than "wrong".
_UNAVAILABLE_REPLIES = ("OOM", "MASTERDOWN", "LOADING", "NOREPLICAS")


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, _UNAVAILABLE) or (
        isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(_UNAVAILABLE_REPLIES)
    )


class _StorageErrors:
    """A plain class rather than ``@asynccontextmanager``: it wraps every
    storage call, and a generator-based manager costs a generator per use.

    ``refused``: what to call a script Redis refuses outright (an ACL without
    its commands, a key of another type) when the caller would rather treat
    that as unavailable too (the quota checks, gateway/storage/quotas.py);
    None lets such errors propagate."""

    __slots__ = ("refused",)

    def __init__(self, refused: str | None = None) -> None:
        self.refused = refused

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Never swallows: other errors propagate as they are.
        if exc is None:
            return
        if is_unavailable(exc):
            if metrics.LOCAL is not None:
                metrics.LOCAL.redis_errors.labels(type(exc).__name__).inc()
            raise Unavailable() from exc
        if self.refused is not None and isinstance(exc, redis_errors.ResponseError):
            raise Unavailable(f"Redis refused {self.refused}: {str(exc)[:200]}") from exc


storage_errors = _StorageErrors()
# The quota checks: a refused script means the limit cannot be checked either.
quota_errors = _StorageErrors(refused="a quota check")
