"""Redis connections: standalone (REDIS_URL), behind Sentinel (REDIS_SENTINELS)
or Redis Cluster (REDIS_CLUSTER_URL).

Two kinds of connection per gateway process:
- a bounded pool for commands (every stream operation is one EVALSHA routed by
  its keys, which share one hash slot);
- one pub/sub connection for wake-ups (gateway/wakeups.py). In a cluster a
  PUBLISH reaches every node, so one subscription on any node hears all of them;
  after a failure the listener moves on to the next node. Behind Sentinel it
  subscribes on the master, found through the sentinels on every (re)connection:
  a replica hears the master's PUBLISHes too, but only while its replication
  link holds, and a link that breaks and resynchronises from a snapshot drops
  the messages in between without the listener noticing. The master's
  connection breaks when the master dies, and every reconnect of the listener
  wakes all readers to re-check (gateway/live/wakeups.py), so a failover can
  delay a wake-up but not lose one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from gateway.config import Settings, sentinel_addresses

from .client import RedisClient, RedisPyClient
from .resp import PipelinedClient


@dataclass
class Backend:
    client: RedisClient  # what the store talks to
    cluster: bool
    settings: Settings
    # The cluster client (for its node list) or the standalone URL: where the
    # wake-up listener connects, on each (re)connection a new PubSub.
    _cluster_client: Any = None
    _standalone_url: str | None = None
    _sentinel: Sentinel | None = None
    _pubsub_clients: list[Any] = field(default_factory=list)
    _node_cycle: Any = None

    def pubsub(self) -> Any:
        if self._sentinel is not None:
            if not self._pubsub_clients:
                self._pubsub_clients.append(
                    self._sentinel.master_for(
                        self.settings.redis_sentinel_master, **_listener_options(self.settings)
                    )
                )
            return self._pubsub_clients[0].pubsub()
        if not self.cluster:
            if not self._pubsub_clients:
                assert self._standalone_url is not None
                self._pubsub_clients.append(
                    aioredis.Redis.from_url(
                        self._standalone_url, **_listener_options(self.settings)
                    )
                )
            return self._pubsub_clients[0].pubsub()
        cluster = self._cluster_client
        nodes = cluster.get_nodes() or []
        if self._node_cycle is None or not nodes:
            self._node_cycle = itertools.cycle(nodes or cluster.startup_nodes.values())
        node = next(self._node_cycle)
        client = aioredis.Redis(host=node.host, port=node.port, **_listener_options(self.settings))
        self._pubsub_clients.append(client)
        if len(self._pubsub_clients) > 8:  # keep the last few; close the rest
            old = self._pubsub_clients.pop(0)
            asyncio.get_running_loop().create_task(old.aclose())
        return client.pubsub()

    async def aclose(self) -> None:
        for client in [self.client, *self._pubsub_clients, self._sentinel]:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()


def client_name(settings: Settings) -> str:
    """How this process's connections appear in CLIENT LIST."""
    return f"ds-gateway:{settings.instance_id or socket.gethostname()}:{os.getpid()}"


def _common_options(settings: Settings) -> dict[str, Any]:
    return {
        "client_name": client_name(settings),
        "socket_connect_timeout": settings.redis_connect_timeout_ms / 1000,
        # Fail fast: an unreachable Redis must become a 503 within about a second.
        "retry": Retry(NoBackoff(), 0),
    }


def _listener_options(settings: Settings) -> dict[str, Any]:
    # The listener idles for long stretches: no read timeout (it pings instead).
    return {**_common_options(settings), "socket_timeout": None}


def connect(settings: Settings, url: str, *, cluster: bool, pipelined: bool = True) -> Backend:
    """Connections to the Redis at ``url``. ``pipelined=False`` uses redis-py
    for a standalone ``redis://`` Redis too (the tests run the store on both)."""
    command_timeout = settings.redis_command_timeout_ms / 1000
    if cluster:
        cluster_client = RedisCluster.from_url(
            url,
            max_connections=max(settings.redis_pool_size, 1),
            socket_timeout=command_timeout,
            **_common_options(settings),
        )
        return Backend(
            RedisPyClient(cluster_client, limit=settings.redis_pool_size),
            True,
            settings,
            _cluster_client=cluster_client,
        )
    if pipelined and urlparse(url).scheme in ("redis", "unix"):
        client: RedisClient = PipelinedClient(
            url,
            connections=settings.redis_pool_size,
            connect_timeout=settings.redis_connect_timeout_ms / 1000,
            command_timeout=command_timeout,
            client_name=client_name(settings),
        )
        return Backend(client, False, settings, _standalone_url=url)
    # TLS (rediss://) and anything else: redis-py's pool.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_pool_size,
        timeout=command_timeout,
        socket_timeout=command_timeout,
        **_common_options(settings),
    )
    # from_pool: the client owns the pool, so closing it closes the connections.
    client = RedisPyClient(aioredis.Redis.from_pool(pool))
    return Backend(client, False, settings, _standalone_url=url)


def connect_sentinel(settings: Settings) -> Backend:
    """Connections to the master that the sentinels in ``REDIS_SENTINELS``
    monitor under ``REDIS_SENTINEL_MASTER``. Every new connection asks the
    sentinels where the master is, so after a failover the gateway follows the
    promoted replica by itself: connections to the old master fail (503 with
    Retry-After) and their replacements reach the new one."""
    assert settings.redis_sentinels is not None
    command_timeout = settings.redis_command_timeout_ms / 1000
    sentinel = Sentinel(
        sentinel_addresses(settings.redis_sentinels),
        sentinel_kwargs={
            "socket_connect_timeout": settings.redis_connect_timeout_ms / 1000,
            "socket_timeout": command_timeout,
            "username": settings.redis_sentinel_username,
            "password": settings.redis_sentinel_password,
        },
    )
    master = sentinel.master_for(
        settings.redis_sentinel_master,
        max_connections=settings.redis_pool_size,
        socket_timeout=command_timeout,
        **_common_options(settings),
    )
    # The sentinel pool raises rather than waits when all its connections are
    # busy: the client's limit makes callers wait for one instead.
    client = RedisPyClient(master, limit=settings.redis_pool_size)
    return Backend(client, False, settings, _sentinel=sentinel)
