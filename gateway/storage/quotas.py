"""Rate limits and live-reader quotas, counted in Redis so that every replica
shares them.

Each check is one script call on the principal's key (``rate_limit.lua``,
``live_lease.lua``; key names in gateway/storage/keys.py), on the same
connections as the store's commands. Redis failures become ``Unavailable``
here, like every storage call; what to do then (let the request through) is
the caller's decision.
"""

from __future__ import annotations

from .client import RedisClient
from .errors import storage_errors
from .keys import live_readers_key, rate_key
from .scripts import Scripts


class Quotas:
    def __init__(self, client: RedisClient, scripts: Scripts, key_prefix: str) -> None:
        self.client = client
        self.scripts = scripts
        self.key_prefix = key_prefix

    async def hit(self, principal: str, operation: str, count: int, period_ms: int) -> int:
        """Count one request of ``principal`` against ``count`` per ``period_ms``:
        0 when it is within the rate, else the ms until the next one would be."""
        period_us = period_ms * 1000
        args = [period_us // count, period_us]
        keys = [rate_key(self.key_prefix, principal, operation)]
        async with storage_errors:
            return int(await self.scripts.rate_limit(self.client, keys, args))

    async def acquire_lease(self, principal: str, reader: str, lease_ms: int, most: int) -> int:
        """Take a live-reader lease of ``lease_ms`` for ``reader``: 0 when taken,
        else (``principal`` holds ``most`` already) the ms until the earliest
        of its leases expires."""
        keys = [live_readers_key(self.key_prefix, principal)]
        async with storage_errors:
            return int(await self.scripts.live_lease(self.client, keys, [reader, lease_ms, most]))

    async def release_lease(self, principal: str, reader: str) -> None:
        key = live_readers_key(self.key_prefix, principal)
        async with storage_errors:
            await self.client.execute_command("ZREM", key, reader)
