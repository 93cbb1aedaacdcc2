"""One Redis-client interface for the store, whichever library talks to Redis.

Standalone Redis on ``redis://`` or ``unix://`` goes through the pipelined client
(gateway/storage/resp.py); TLS (``rediss://``) and Redis Cluster go through
redis-py. Both give the store the same reply shapes: RESP replies as Redis sent
them (bytes, integers, nested lists, None), never redis-py's parsed forms (an
XRANGE entry's fields as a dict, SMEMBERS as a set), and the same exception
types (redis-py's), which gateway/storage/errors.py translates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Protocol

# The commands the store sends besides EVALSHA, whose replies redis-py would
# otherwise parse into other shapes.
_RAW_COMMANDS = ("XRANGE", "SMEMBERS", "HGET", "EXISTS", "PING")


class RedisClient(Protocol):
    """What the store needs of a connection to Redis."""

    def execute_command(self, *args: Any) -> Awaitable[Any]:
        """Send a command; the awaitable gives its raw reply."""
        ...

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Awaitable[Any]: ...

    async def script_load(self, source: str) -> Any: ...

    async def ping(self) -> bool: ...

    def flush(self) -> None:
        """Write what this loop turn issued so far now (a no-op where commands
        are written as they are awaited)."""
        ...

    async def aclose(self) -> None: ...


def _raw(response: Any, **options: Any) -> Any:
    return response


class RedisPyClient:
    """redis-py's asyncio client (``Redis`` or ``RedisCluster``) as a RedisClient.

    ``limit`` bounds the commands in flight: the cluster client opens
    connections per node on demand and raises when a node's limit is reached,
    so callers wait for a slot here instead.
    """

    def __init__(self, client: Any, limit: int | None = None) -> None:
        for command in _RAW_COMMANDS:
            client.set_response_callback(command, _raw)
        self.client = client
        self._limit = asyncio.Semaphore(limit) if limit else None

    async def execute_command(self, *args: Any) -> Any:
        if self._limit is None:
            return await self.client.execute_command(*args)
        async with self._limit:
            return await self.client.execute_command(*args)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        # Through redis-py's own method: the cluster client routes it by its keys.
        if self._limit is None:
            return await self.client.evalsha(sha, numkeys, *keys_and_args)
        async with self._limit:
            return await self.client.evalsha(sha, numkeys, *keys_and_args)

    async def script_load(self, source: str) -> Any:
        # The cluster client sends it to every primary.
        return await self.client.script_load(source)

    async def ping(self) -> bool:
        return await self.execute_command("PING") in (b"PONG", "PONG", True)

    def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        await self.client.aclose()
