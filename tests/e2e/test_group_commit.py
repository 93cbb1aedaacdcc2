"""Group commit, end to end: many concurrent appends to several streams through
one gateway each take one place, and each stream's content is exactly its
appends in the order of their acknowledged offsets, message by message.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from support.gateway_server import GatewayServer

pytestmark = pytest.mark.timeout(120)

STREAMS = 5
APPENDS_PER_STREAM = 60
JSON = {"content-type": "application/json"}


async def _script_runs(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.fixture(scope="module")
def native(redis_url: str) -> Iterator[GatewayServer]:
    """The console script's own server: it reads every connection that is ready
    in one event-loop turn, so concurrent appends meet in one batch. (Under
    hypercorn each request starts in a task of its own, and on a loaded machine
    they may each find an empty batch.)"""
    with GatewayServer(redis_url=redis_url, server="console-script") as server:
        yield server


async def test_concurrent_appends_land_in_the_order_of_their_acknowledged_offsets(
    native: GatewayServer, redis_client: aioredis.Redis
) -> None:
    base = f"{native.url}/v1/stream/commit-{time.monotonic_ns()}"
    limits = httpx.Limits(max_connections=STREAMS * APPENDS_PER_STREAM)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        created = {}
        for s in range(STREAMS):
            response = await http.put(f"{base}-{s}", headers=JSON)
            assert response.status_code == 201
            created[s] = response.headers["stream-next-offset"]
        await redis_client.config_resetstat()

        async def append(s: int, i: int) -> tuple[int, str, dict[str, int]]:
            message = {"stream": s, "i": i}
            response = await http.post(f"{base}-{s}", content=json.dumps(message), headers=JSON)
            assert response.status_code in (200, 204), response.text
            return s, response.headers["stream-next-offset"], message

        # Interleaved across streams, all in flight at once.
        acked = await asyncio.gather(
            *(append(s, i) for i in range(APPENDS_PER_STREAM) for s in range(STREAMS))
        )
        runs = await _script_runs(redis_client)
        # At most one script run per append, and fewer whenever requests meet in
        # one event-loop turn. How many meet depends on timing (a fast gateway
        # takes them one by one), so sharing itself is shown where timing is
        # ours to set: tests/integration/test_store.py's batch tests.
        assert runs <= STREAMS * APPENDS_PER_STREAM, runs

        for s in range(STREAMS):
            mine = sorted((offset, message) for stream, offset, message in acked if stream == s)
            offsets = [offset for offset, _ in mine]
            assert len(set(offsets)) == APPENDS_PER_STREAM, "every append has its own offset"
            in_order = [message for _, message in mine]
            read = await http.get(f"{base}-{s}", params={"offset": "-1"})
            assert read.status_code == 200
            assert read.json() == in_order
            assert read.headers["stream-next-offset"] == offsets[-1]
            # Message by message: what follows each acknowledged offset starts with
            # the append acknowledged next.
            previous = [created[s], *offsets[:-1]]
            for before, (offset, message) in zip(previous, mine, strict=True):
                after = await http.get(f"{base}-{s}", params={"offset": before})
                assert after.status_code == 200
                assert after.json()[0] == message, (before, offset, message)
