"""The pipelined Redis client (gateway/resp.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from gateway.storage.resp import READER_BUFFER_BYTES, PipelinedClient


def _client(url: str, **overrides: float) -> PipelinedClient:
    options = {"connections": 2, "connect_timeout": 1.0, "command_timeout": 2.0}
    options.update(overrides)
    return PipelinedClient(url, client_name="resp-test", **options)  # type: ignore[arg-type]


async def test_concurrent_commands_are_pipelined_and_answered_in_order(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    client = _client(redis_url)
    try:
        replies = await asyncio.gather(
            *(client.execute_command("INCRBY", "resp:counter", 1) for _ in range(2000))
        )
        # Every reply belongs to its own command: the values are a permutation 1..2000.
        assert sorted(replies) == list(range(1, 2001))
        assert int(await redis_client.get("resp:counter")) == 2000
        names = [c.get("name") for c in await redis_client.client_list()]
        assert names.count("resp-test") == 2  # two pipelined connections, no more
    finally:
        await client.aclose()


async def test_one_loop_turn_uses_one_connection_and_turns_take_turns(redis_url: str) -> None:
    """Commands issued in the same event-loop turn leave on one connection (one
    write); the next turn's commands go to the next connection."""
    client = _client(redis_url, connections=3)
    try:
        await asyncio.gather(*(client.ping() for _ in range(6)))  # all three connected
        turns = []
        for _ in range(6):
            ids = await asyncio.gather(*(client.execute_command("CLIENT", "ID") for _ in range(5)))
            assert len(set(ids)) == 1, ids
            turns.append(ids[0])
        assert len(set(turns)) == 3
        assert turns[:3] == turns[3:]  # in rotation
    finally:
        await client.aclose()


async def test_flush_writes_now_and_the_turn_stays_on_its_connection(redis_url: str) -> None:
    """A command flushed mid-turn is on the wire before the turn ends (Redis
    works on it meanwhile); the turn's later commands still share its
    connection, so Redis runs them in the order issued."""
    client = _client(redis_url, connections=3)
    try:
        await asyncio.gather(*(client.ping() for _ in range(6)))  # all three connected
        first = client.execute_command("CLIENT", "ID")
        [protocol] = [p for p in client._slots if p is not None and p.pending]
        assert protocol.outgoing  # held for the end of the turn
        client.flush()
        assert protocol.outgoing == []
        assert protocol.transport is not None
        assert protocol.transport.get_write_buffer_size() == 0  # handed to the kernel
        later = [client.execute_command("CLIENT", "ID") for _ in range(3)]
        assert len(protocol.pending) == 4  # the same connection, after the first
        ids = await asyncio.gather(first, *later)
        assert len(set(ids)) == 1, ids
    finally:
        await client.aclose()


async def test_replies_larger_and_smaller_than_the_kept_buffer_follow_each_other(
    redis_url: str,
) -> None:
    client = _client(redis_url, connections=1)
    sizes = [READER_BUFFER_BYTES * 3, 10, READER_BUFFER_BYTES // 2, READER_BUFFER_BYTES * 2, 0]
    try:
        for i, size in enumerate(sizes):
            await client.execute_command("SET", f"resp:big{i}", bytes([i]) * size)
        replies = await asyncio.gather(
            *(client.execute_command("GET", f"resp:big{i}") for i in range(len(sizes)))
        )
        assert replies == [bytes([i]) * size for i, size in enumerate(sizes)]
    finally:
        await client.aclose()


async def test_errors_keep_redis_py_types(redis_url: str) -> None:
    client = _client(redis_url)
    try:
        with pytest.raises(redis_errors.NoScriptError):
            await client.evalsha("0" * 40, 0)
        with pytest.raises(redis_errors.ResponseError):
            await client.execute_command("NO-SUCH-COMMAND")
        sha = await client.script_load("return ARGV[1] .. KEYS[1]")
        assert await client.evalsha(sha.decode(), 1, "k", "v") == b"vk"
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_a_killed_connection_fails_its_commands_and_reconnects(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    client = _client(redis_url, connections=1)
    try:
        await client.ping()
        await redis_client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        # The first command may find the connection dead; the next ones reconnect.
        try:
            await client.ping()
        except redis_errors.ConnectionError:
            pass
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_a_stalled_redis_becomes_a_timeout_not_a_hang(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    client = _client(redis_url, connections=1, command_timeout=0.5)
    try:
        await client.ping()
        await redis_client.execute_command("CLIENT", "PAUSE", 1500)
        started = time.monotonic()
        with pytest.raises((redis_errors.TimeoutError, redis_errors.ConnectionError)):
            await client.execute_command("SET", "resp:paused", "1")
        assert time.monotonic() - started < 1.2
        await asyncio.sleep(1.2)  # the pause ends
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_unreachable_redis_fails_fast() -> None:
    client = _client("redis://127.0.0.1:1/0", connect_timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(redis_errors.ConnectionError):
            await client.ping()
        assert time.monotonic() - started < 1.0
    finally:
        await client.aclose()


def test_urls_are_parsed_with_credentials_and_database() -> None:
    client = PipelinedClient(
        "redis://user:p%40ss@db.internal:6380/3",
        connections=1,
        connect_timeout=1,
        command_timeout=1,
    )
    assert (client.host, client.port, client.db) == ("db.internal", 6380, 3)
    assert (client.username, client.password) == ("user", "p@ss")
    unix = PipelinedClient(
        "unix:///tmp/redis.sock?db=2", connections=1, connect_timeout=1, command_timeout=1
    )
    assert (unix.unix_path, unix.db) == ("/tmp/redis.sock", 2)
    with pytest.raises(ValueError):
        PipelinedClient("rediss://x:6379/0", connections=1, connect_timeout=1, command_timeout=1)
