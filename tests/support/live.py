"""Waiting for observable states instead of sleeping.

A live reader (long-poll or SSE) counts as "parked" once the gateway has
subscribed the stream's wake channel in Redis: ``PUBSUB NUMSUB`` says so, and
the gateway subscribes (and has the subscription confirmed) before the reader's
first read, so an append from then on must reach the reader as a wake-up.

Wake channels linger for a while after their last reader left, so a count only
proves a new reader's arrival on a channel nobody listened to before: give every
wait its own fresh stream path.

In a Redis Cluster, (unsharded) ``SUBSCRIBE`` counts only on the node that the
subscriber's connection talks to, so the counts of every node are summed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

import redis
import redis.asyncio as aioredis

# Generous: the state is normally reached within milliseconds, but CI runs on a
# loaded 2-core machine. A wait returns as soon as the state is reached.
DEFAULT_WITHIN_S = 15.0


def wake_channel(path: str, key_prefix: str = "ds") -> str:
    return f"{key_prefix}:{{{path}}}:wake"


async def eventually(
    check: Callable[[], Awaitable[bool]],
    within_s: float = DEFAULT_WITHIN_S,
    what: str = "condition",
) -> None:
    """Poll ``check`` until it is true; fail after ``within_s``."""
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, f"{what} not reached within {within_s}s"
        await asyncio.sleep(0.005)  # poll interval, not a wait for the state


async def subscribers(clients: aioredis.Redis | Iterable[aioredis.Redis], channel: str) -> int:
    """Subscribers of ``channel``, summed over the given Redis nodes."""
    if isinstance(clients, aioredis.Redis):
        clients = [clients]
    total = 0
    for client in clients:
        total += int(dict(await client.pubsub_numsub(channel)).get(channel.encode(), 0))
    return total


async def parked(
    clients: aioredis.Redis | Iterable[aioredis.Redis],
    path: str,
    subscribers_at_least: int = 1,
    within_s: float = DEFAULT_WITHIN_S,
) -> None:
    """Wait until the gateway(s) listen on the stream's wake channel."""
    nodes = [clients] if isinstance(clients, aioredis.Redis) else list(clients)
    channel = wake_channel(path)

    async def subscribed() -> bool:
        return await subscribers(nodes, channel) >= subscribers_at_least

    await eventually(subscribed, within_s, f"subscription of {channel}")


def parked_sync(
    node_urls: Iterable[str],
    path: str,
    subscribers_at_least: int = 1,
    within_s: float = DEFAULT_WITHIN_S,
) -> None:
    """``parked`` for synchronous tests, given the URL of every Redis node."""
    channel = wake_channel(path)
    clients = [redis.Redis.from_url(url) for url in node_urls]
    try:
        deadline = time.monotonic() + within_s
        while True:
            count = sum(
                int(dict(c.pubsub_numsub(channel)).get(channel.encode(), 0)) for c in clients
            )
            if count >= subscribers_at_least:
                return
            assert time.monotonic() < deadline, (
                f"subscription of {channel} not reached within {within_s}s ({count} subscribers)"
            )
            time.sleep(0.005)  # poll interval, not a wait for the state
    finally:
        for client in clients:
            client.close()


def held_by_server(port: int) -> set[int]:
    """Client ports of the connections the server on ``port`` has not closed yet
    (Linux /proc/net/tcp: ESTABLISHED, or CLOSE_WAIT once the client closed)."""
    held = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            local, remote, state = line.split()[1:4]
            if int(local.rsplit(":", 1)[1], 16) == port and state in ("01", "08"):
                held.add(int(remote.rsplit(":", 1)[1], 16))
    return held


async def released_by_server(
    port: int, client_port: int, within_s: float = DEFAULT_WITHIN_S
) -> None:
    """Wait until the server on ``port`` closed its side of the connection from
    ``client_port`` (it does once it is done with the request on it)."""

    async def released() -> bool:
        return client_port not in held_by_server(port)

    await eventually(released, within_s, f"the server's close of the connection from {client_port}")
