"""HTTP/2 (cleartext, prior knowledge) through the console script's server.

Browsers open at most six HTTP/1.1 connections per origin, so live readers in
several tabs need HTTP/2; every operation, SSE and long-poll included, must work
over it, and no HTTP/1-only header (such as Connection) may appear.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from support.gateway_server import GatewayServer
from support.live import parked


@pytest.fixture(
    scope="module", params=["console-script", "console-script-rsgi", "console-script-asgi"]
)
def h2_gateway(request: pytest.FixtureRequest, redis_url: str) -> Iterator[str]:
    env = {"DS_LONG_POLL_TIMEOUT_MS": "5000"}
    with GatewayServer(redis_url=redis_url, env=env, server=request.param) as gateway:
        yield gateway.url


async def test_every_operation_over_http2(h2_gateway: str, redis_client: aioredis.Redis) -> None:
    path = f"h2-{time.monotonic_ns()}"
    stream = f"{h2_gateway}/v1/stream/{path}"
    plain = {"content-type": "text/plain"}
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as http:
        created = await http.put(stream, headers=plain, content=b"first")
        assert (created.http_version, created.status_code) == ("HTTP/2", 201)
        appended = await http.post(stream, headers=plain, content=b" second")
        assert appended.status_code == 204
        read = await http.get(stream)
        assert (read.status_code, read.text) == (200, "first second")
        assert read.headers["stream-up-to-date"] == "true"
        tail = read.headers["stream-next-offset"]

        # A long-poll and an SSE reader share the connection and are both woken.
        # The long-poll waits once the stream's wake channel is subscribed; the SSE
        # reader, started after that, captures its wake-up before its first read,
        # so it waits once its first control event arrived.
        poll = asyncio.create_task(http.get(stream, params={"offset": tail, "live": "long-poll"}))
        await parked(redis_client, path)
        sse_waiting = asyncio.Event()

        async def sse_until_third() -> str:
            seen = ""
            params = {"offset": tail, "live": "sse"}
            async with http.stream("GET", stream, params=params) as response:
                assert response.headers["content-type"] == "text/event-stream"
                async for chunk in response.aiter_text():
                    seen += chunk
                    if "event: control" in seen:
                        sse_waiting.set()
                    if "third" in seen and seen.count("event: control") >= 2:
                        return seen
            return seen

        sse = asyncio.create_task(sse_until_third())
        await asyncio.wait_for(sse_waiting.wait(), 10)
        assert not poll.done()
        assert (await http.post(stream, headers=plain, content=b"third")).status_code == 204
        polled = await asyncio.wait_for(poll, 10)
        assert (polled.status_code, polled.text) == (200, "third")
        events = await asyncio.wait_for(sse, 10)
        assert "data:third" in events

        refused = await http.put(f"{stream}-bad", headers={**plain, "stream-ttl": "abc"})
        assert refused.status_code == 400
        assert "connection" not in refused.headers  # connection-specific: not in HTTP/2
        assert (await http.delete(stream)).status_code == 204
