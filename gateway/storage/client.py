"""One Redis-client interface for the store, whichever library talks to Redis.

Standalone Redis on ``redis://`` or ``unix://`` goes through the pipelined client
(gateway/storage/resp.py); TLS (``rediss://``) and Redis Cluster go through
redis-py. Both give the store the same reply shapes: RESP replies as Redis sent
them (bytes, integers, nested lists, None), never redis-py's parsed forms (an
XRANGE entry's fields as a dict, SMEMBERS as a set), and the same exception
types (redis-py's), which gateway/storage/errors.py translates.

``evalsha_wait`` is a script call followed by Redis ``WAIT`` on the same
connection, sent together (DS_WAIT_REPLICAS): WAIT counts the replicas that
have everything this connection wrote, so it must follow the script on its
connection; elsewhere it would vouch for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any, NamedTuple, Protocol

from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster

from gateway import metrics

# The commands the store sends besides EVALSHA, whose replies redis-py would
# otherwise parse into other shapes.
_RAW_COMMANDS = ("XRANGE", "SMEMBERS", "HGET", "EXISTS", "PING")
# A script sent to the node that no longer serves its slot, or not yet, or not at all.
_NOT_RUN_HERE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.MovedError,
    redis_errors.AskError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
)


class ReplicaWait(NamedTuple):
    """Acknowledge a write only once ``replicas`` replicas have it, waiting at
    most ``timeout_ms`` for them (Redis ``WAIT replicas timeout_ms``)."""

    replicas: int
    timeout_ms: int

    def check(self, acknowledged: Any) -> None:
        """Raise NOREPLICAS (a 503, gateway/storage/errors.py) when WAIT
        counted fewer replicas than wanted. The write stays in Redis: it may
        still reach the replicas, or be lost in a failover."""
        if int(acknowledged) < self.replicas:
            raise redis_errors.ResponseError(
                f"NOREPLICAS the write reached {int(acknowledged)} of {self.replicas} "
                f"replicas within {self.timeout_ms} ms"
            )


class RedisClient(Protocol):
    """What the store needs of a connection to Redis."""

    def execute_command(self, *args: Any) -> Awaitable[Any]:
        """Send a command; the awaitable gives its raw reply."""
        ...

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Awaitable[Any]: ...

    def evalsha_wait(
        self, wait: ReplicaWait, sha: str, numkeys: int, *keys_and_args: Any
    ) -> Awaitable[Any]:
        """``evalsha``, then ``WAIT`` on the same connection: the script's reply
        once enough replicas acknowledged it (NOREPLICAS otherwise)."""
        ...

    async def script_load(self, source: str) -> Any: ...

    async def ping(self) -> bool: ...

    def flush(self) -> None:
        """Write what this loop turn issued so far now (a no-op where commands
        are written as they are awaited)."""
        ...

    async def aclose(self) -> None: ...


async def _timed(reply: Awaitable[Any]) -> Any:
    """``reply``, its latency observed when metrics are collected."""
    local = metrics.LOCAL
    if local is None:
        return await reply
    start = time.monotonic()
    try:
        return await reply
    finally:
        local.redis.observe(time.monotonic() - start)


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
            return await _timed(self.client.execute_command(*args))
        async with self._limit:
            return await _timed(self.client.execute_command(*args))

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        # Through redis-py's own method: the cluster client routes it by its keys.
        if self._limit is None:
            return await _timed(self.client.evalsha(sha, numkeys, *keys_and_args))
        async with self._limit:
            return await _timed(self.client.evalsha(sha, numkeys, *keys_and_args))

    async def evalsha_wait(
        self, wait: ReplicaWait, sha: str, numkeys: int, *keys_and_args: Any
    ) -> Any:
        if self._limit is None:
            return await self._evalsha_wait(wait, sha, numkeys, *keys_and_args)
        async with self._limit:
            return await self._evalsha_wait(wait, sha, numkeys, *keys_and_args)

    async def _evalsha_wait(
        self, wait: ReplicaWait, sha: str, numkeys: int, *keys_and_args: Any
    ) -> Any:
        script_command = ("EVALSHA", sha, numkeys, *keys_and_args)
        wait_command = ("WAIT", wait.replicas, wait.timeout_ms)
        if isinstance(self.client, RedisCluster):
            script, acknowledged = await self._on_slot_master(
                keys_and_args[0], script_command, wait_command
            )
        else:
            # A plain pipeline: one connection from the pool, both commands in one write.
            pipe = self.client.pipeline(transaction=False)
            pipe.execute_command(*script_command)
            pipe.execute_command(*wait_command)
            script, acknowledged = await pipe.execute(raise_on_error=False)
        if isinstance(script, BaseException):
            raise script
        if isinstance(acknowledged, BaseException):
            raise acknowledged
        wait.check(acknowledged)
        return script

    async def _on_slot_master(
        self, key: Any, script_command: tuple[Any, ...], wait_command: tuple[Any, ...]
    ) -> tuple[Any, Any]:
        """The script and WAIT on one connection to the master of ``key``'s
        slot: their replies (or errors), in order. The cluster client would
        route WAIT (which has no key) elsewhere, and retry a redirected script
        without it; so this goes to the node directly and, when that fails, lets
        the cluster client learn the new topology from a harmless command on the
        same slot before answering 503."""
        cluster = self.client
        await cluster.initialize()  # a topology refresh, when one is due
        node: ClusterNode = cluster.get_node_from_key(key)
        commands = [PipelineCommand(0, *script_command), PipelineCommand(1, *wait_command)]
        failed: BaseException | None = None
        try:
            await node.execute_pipeline(commands)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            failed = exc
        script = commands[0].result
        if isinstance(script, _NOT_RUN_HERE):
            failed = script
        if failed is not None:
            with contextlib.suppress(Exception):  # what matters is what the client learns
                await cluster.execute_command("EXISTS", key)
            raise redis_errors.TryAgainError(f"write not acknowledged: {failed}") from failed
        return script, commands[1].result

    async def script_load(self, source: str) -> Any:
        # The cluster client sends it to every primary.
        return await self.client.script_load(source)

    async def ping(self) -> bool:
        return await self.execute_command("PING") in (b"PONG", "PONG", True)

    def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        await self.client.aclose()
