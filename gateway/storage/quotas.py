"""Rate limits and live-reader quotas, counted in Redis so that every replica
shares them.

Each check is one script call on the principal's key (``rate_limit.lua``,
``live_lease.lua``; key names in gateway/storage/keys.py), on the same
connections as the store's commands; the rate checks of one principal and
operation in one event-loop turn share one call. Redis failures, and scripts
Redis refuses (an ACL without the quota commands), become ``Unavailable`` here;
what to do then (let the request through) is the caller's decision.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from .client import RedisClient
from .errors import quota_errors
from .keys import live_readers_key, rate_key
from .scripts import Scripts


class _Hits:
    """The requests of one principal and operation in one event-loop turn."""

    __slots__ = ("args", "waiters")

    def __init__(self, count: int, period_ms: int) -> None:
        period_us = period_ms * 1000
        self.args = [period_us // count, period_us]
        self.waiters: list[asyncio.Future[int]] = []


class Quotas:
    def __init__(self, client: RedisClient, scripts: Scripts, key_prefix: str) -> None:
        self.client = client
        self.scripts = scripts
        self.key_prefix = key_prefix
        # This turn's requests by rate key, and the checks in flight.
        self._hits: dict[str, _Hits] = {}
        self._checks: set[asyncio.Task[None]] = set()

    def hit(self, principal: str, operation: str, count: int, period_ms: int) -> Awaitable[int]:
        """Count one request of ``principal`` against ``count`` per ``period_ms``:
        its awaitable gives 0 when it is within the rate, else the ms until the
        next one would be. The requests of one principal and operation in one
        event-loop turn are counted by one script call (like group commit: a
        busy principal costs Redis one call per turn, not one per request)."""
        key = rate_key(self.key_prefix, principal, operation)
        hits = self._hits.get(key)
        loop = asyncio.get_running_loop()
        if hits is None:
            hits = self._hits[key] = _Hits(count, period_ms)
            # A task of its own, run once this turn's requests have had theirs:
            # no request's cancellation stops the others' check.
            task = loop.create_task(self._check(key, hits))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)
        waiter: asyncio.Future[int] = loop.create_future()
        hits.waiters.append(waiter)
        return waiter

    async def _check(self, key: str, hits: _Hits) -> None:
        del self._hits[key]
        waiters = hits.waiters
        try:
            async with quota_errors:
                reply = await self.scripts.rate_limit(
                    self.client, [key], [*hits.args, len(waiters)]
                )
        except Exception as exc:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        except BaseException:
            for waiter in waiters:
                waiter.cancel()
            raise
        allowed, wait_ms = int(reply[0]), int(reply[1])
        for index, waiter in enumerate(waiters):
            if not waiter.done():
                waiter.set_result(0 if index < allowed else wait_ms)

    async def acquire_lease(self, principal: str, reader: str, lease_ms: int, most: int) -> int:
        """Take a live-reader lease of ``lease_ms`` for ``reader``: 0 when taken,
        else (``principal`` holds ``most`` already) the ms until the earliest
        of its leases expires."""
        keys = [live_readers_key(self.key_prefix, principal)]
        async with quota_errors:
            return int(await self.scripts.live_lease(self.client, keys, [reader, lease_ms, most]))

    async def release_lease(self, principal: str, reader: str) -> None:
        key = live_readers_key(self.key_prefix, principal)
        async with quota_errors:
            await self.client.execute_command("ZREM", key, reader)
