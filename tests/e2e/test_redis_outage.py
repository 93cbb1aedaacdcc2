"""Redis outages, end to end: a real gateway on its own redis-server, which the
tests stop (by pid), freeze, and start again on the same port and data dir.

While Redis is away every request must fail fast with 503 + Retry-After (never
hang), /readyz must say so, and once Redis is back the same gateway process
must recover by itself -- including its wake-up listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest
import redis.asyncio as aioredis
from support.gateway_server import GatewayServer
from support.procs import stop_process
from support.procs import tail as log_tail
from support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(90)

# A failed request must come back within this: the 1 s connect timeout plus
# room for a loaded machine, and still far below the long-poll timeout (a
# request that waited for Redis instead of failing fast would take that long).
FAST_S = 4.0
LONG_POLL_MS = 20_000


class RestartableRedis(RedisServer):
    """A RedisServer that can be stopped and started again on the same port and
    data dir (RedisServer.stop also deletes the dir)."""

    def kill(self) -> None:
        """Stop the server by pid (SIGTERM: AOF is flushed), keeping its dir."""
        assert self.proc is not None
        stop_process(self.proc)
        self.proc = None

    def restart(self) -> None:
        assert self.proc is None and self.port is not None
        self._start_once(self.port)

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)


@dataclass
class Setup:
    redis: RestartableRedis
    gateway: GatewayServer
    client: httpx.AsyncClient

    def admin(self) -> aioredis.Redis:
        return aioredis.from_url(self.redis.url, socket_timeout=2, socket_connect_timeout=2)


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Awaitable[Setup]]]:
    """Start a redis-server and a gateway on it (with extra gateway env)."""
    setups: list[Setup] = []

    async def _start(redis_up: bool = True, **env: str) -> Setup:
        redis = RestartableRedis()
        await asyncio.to_thread(redis.start)
        gateway = GatewayServer(
            redis_url=redis.url, env={"DS_LONG_POLL_TIMEOUT_MS": str(LONG_POLL_MS), **env}
        )
        setup = Setup(redis, gateway, httpx.AsyncClient(timeout=10))
        setups.append(setup)
        if not redis_up:
            await asyncio.to_thread(redis.kill)
        await asyncio.to_thread(gateway.start)
        setup.client.base_url = gateway.url
        return setup

    yield _start
    for setup in setups:
        await setup.client.aclose()
        setup.redis.thaw()
        await asyncio.to_thread(setup.gateway.stop)
        await asyncio.to_thread(setup.redis.stop)


async def timed(coro: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = await coro
    return response, time.monotonic() - start


def assert_unavailable(response: httpx.Response, elapsed: float, what: str) -> None:
    assert response.status_code == 503, (what, response.status_code, response.text)
    assert response.headers["retry-after"].isdigit(), what
    assert elapsed < FAST_S, (what, elapsed)


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> float:
    start = time.monotonic()
    while True:
        with contextlib.suppress(httpx.TransportError):
            if await check():
                return time.monotonic() - start
        assert time.monotonic() - start < within_s, f"{what} not within {within_s}s"
        await asyncio.sleep(0.05)


async def wake_listener_connected(setup: Setup) -> None:
    """Wait for the gateway's pub/sub connection to be back on the new Redis."""
    admin = setup.admin()
    try:

        async def listening() -> bool:
            return any(c["flags"] == "P" for c in await admin.client_list())

        await eventually(listening, 5, "the wake-up listener's reconnection")
    finally:
        await admin.aclose()


async def parked(setup: Setup, path: str) -> None:
    admin = setup.admin()
    channel = f"ds:{{{path}}}:wake"
    try:

        async def subscribed() -> bool:
            return dict(await admin.pubsub_numsub(channel))[channel.encode()] >= 1

        await eventually(subscribed, 5, f"subscription of {channel}")
    finally:
        await admin.aclose()


S = "/v1/stream"
TEXT = {"Content-Type": "text/plain"}


def live(offset: str, mode: str) -> dict[str, str]:
    return {"offset": offset, "live": mode}


async def _requests_while_down(client: httpx.AsyncClient, tail: str) -> None:
    kinds: list[tuple[str, Callable[[], Awaitable[httpx.Response]]]] = [
        ("PUT new", lambda: client.put(f"{S}/new", content=b"x", headers=TEXT)),
        ("PUT existing", lambda: client.put(f"{S}/s", headers=TEXT)),
        ("PUT fork", lambda: client.put(f"{S}/fork", headers={"Stream-Forked-From": "s"})),
        ("POST", lambda: client.post(f"{S}/s", content=b"more", headers=TEXT)),
        ("POST close", lambda: client.post(f"{S}/s", headers={"Stream-Closed": "true"})),
        ("GET", lambda: client.get(f"{S}/s", params={"offset": "-1"})),
        ("GET now", lambda: client.get(f"{S}/s", params={"offset": "now"})),
        ("HEAD", lambda: client.head(f"{S}/s")),
        ("long-poll tail", lambda: client.get(f"{S}/s", params=live(tail, "long-poll"))),
        ("long-poll now", lambda: client.get(f"{S}/s", params=live("now", "long-poll"))),
        ("long-poll -1", lambda: client.get(f"{S}/s", params=live("-1", "long-poll"))),
        ("SSE", lambda: client.get(f"{S}/s", params=live(tail, "sse"))),
        ("SSE -1", lambda: client.get(f"{S}/s", params=live("-1", "sse"))),
        ("DELETE", lambda: client.delete(f"{S}/s")),
    ]
    for what, request in kinds:
        response, elapsed = await timed(request())
        assert_unavailable(response, elapsed, what)
        if what == "HEAD":
            assert response.content == b""


async def test_redis_down_means_fast_503s_and_recovery_without_restart(
    start: Callable[..., Awaitable[Setup]],
) -> None:
    setup = await start()
    client = setup.client
    assert (await client.put(f"{S}/s", content=b"kept", headers=TEXT)).status_code == 201
    tail = (await client.head(f"{S}/s")).headers["stream-next-offset"]
    assert (await client.get("/readyz")).status_code == 200

    setup.redis.kill()
    await _requests_while_down(client, tail)

    # Many at once: none waits for another's timeout.
    started = time.monotonic()
    burst = await asyncio.gather(
        *(client.get(f"{S}/s", params={"offset": "-1", "live": "long-poll"}) for _ in range(30))
    )
    assert {r.status_code for r in burst} == {503}
    assert time.monotonic() - started < FAST_S * 2

    ready, elapsed = await timed(client.get("/readyz"))
    assert ready.status_code == 503 and elapsed < FAST_S
    assert (await client.get("/healthz")).status_code == 200  # alive, just not ready
    assert setup.gateway.alive()

    # Redis is back on the same port with the same data: the same gateway recovers.
    setup.redis.restart()

    async def serving() -> bool:
        return (await client.get(f"{S}/s", params={"offset": "-1"})).status_code == 200

    recovery = await eventually(serving, 15, "recovery")
    read = await client.get(f"{S}/s", params={"offset": "-1"})
    assert read.content == b"kept"  # nothing was written while Redis was down
    assert read.headers["stream-next-offset"] == tail
    assert (await client.get("/readyz")).status_code == 200
    assert (await client.head(f"{S}/new")).status_code == 404
    assert (await client.head(f"{S}/fork")).status_code == 404
    print(f"recovered {recovery:.2f} s after Redis restarted")

    # Live reads work again: a long-poll is woken by an append through the
    # re-established wake-up listener.
    await wake_listener_connected(setup)
    poll = asyncio.create_task(client.get(f"{S}/s", params={"offset": tail, "live": "long-poll"}))
    await parked(setup, "s")
    sent = time.monotonic()
    assert (await client.post(f"{S}/s", content=b"+new", headers=TEXT)).status_code == 204
    woken = await asyncio.wait_for(poll, LONG_POLL_MS / 1000 + 5)
    assert woken.status_code == 200 and woken.content == b"+new"
    assert time.monotonic() - sent < FAST_S  # woken, not timed out (20 s)
    log = log_tail(setup.gateway.log_path, 1_000_000)
    assert "Traceback" not in log, log[-4000:]


async def test_a_long_poll_waiting_when_redis_dies_gets_503(
    start: Callable[..., Awaitable[Setup]],
) -> None:
    setup = await start()
    client = setup.client
    put = await client.put(f"{S}/lp", content=b"x", headers=TEXT)
    tail = put.headers["stream-next-offset"]
    poll = asyncio.create_task(client.get(f"{S}/lp", params={"offset": tail, "live": "long-poll"}))
    await parked(setup, "lp")
    assert not poll.done()

    killed = time.monotonic()
    await asyncio.to_thread(setup.redis.kill)
    response = await asyncio.wait_for(poll, LONG_POLL_MS / 1000 + 5)
    elapsed = time.monotonic() - killed
    assert response.status_code == 503, (response.status_code, response.headers)
    assert response.headers["retry-after"].isdigit()
    assert elapsed < FAST_S + 0.5, elapsed  # not the 20 s long-poll timeout


async def test_an_sse_reader_waiting_when_redis_dies_is_disconnected(
    start: Callable[..., Awaitable[Setup]],
) -> None:
    setup = await start(DS_SSE_MAX_DURATION_MS="60000", DS_SSE_KEEPALIVE_MS="5000")
    client = setup.client
    put = await client.put(f"{S}/sse", content=b"x", headers=TEXT)
    tail = put.headers["stream-next-offset"]
    async with client.stream("GET", f"{S}/sse", params={"offset": tail, "live": "sse"}) as r:
        assert r.status_code == 200
        chunks = r.aiter_bytes()
        first = await anext(chunks)
        assert b"event: control" in first
        await parked(setup, "sse")
        killed = time.monotonic()
        await asyncio.to_thread(setup.redis.kill)
        rest = b""
        async for chunk in chunks:  # ends when the gateway ends the response
            rest += chunk
        elapsed = time.monotonic() - killed
    assert elapsed < FAST_S + 0.5, elapsed  # not the 60 s connection lifetime
    assert b"streamClosed" not in rest  # an outage is not the end of the stream


async def test_a_frozen_redis_means_503_after_the_command_timeout(
    start: Callable[..., Awaitable[Setup]],
) -> None:
    """SIGSTOP: the TCP connections stay up but nothing answers. Requests must be
    bounded by DS_REDIS_COMMAND_TIMEOUT_MS, and the gateway recovers on SIGCONT."""
    setup = await start(DS_REDIS_COMMAND_TIMEOUT_MS="500", DS_REDIS_CONNECT_TIMEOUT_MS="500")
    client = setup.client
    assert (await client.put(f"{S}/f", content=b"a", headers=TEXT)).status_code == 201
    producer = {"Producer-Id": "p", "Producer-Epoch": "0"}
    setup.redis.freeze()
    try:
        kinds: list[tuple[str, Callable[[], Awaitable[httpx.Response]]]] = [
            ("GET", lambda: client.get(f"{S}/f", params={"offset": "-1"})),
            ("HEAD", lambda: client.head(f"{S}/f")),
            (
                "POST",
                lambda: client.post(
                    f"{S}/f", content=b"b", headers={**TEXT, **producer, "Producer-Seq": "0"}
                ),
            ),
            (
                "long-poll",
                lambda: client.get(f"{S}/f", params={"offset": "now", "live": "long-poll"}),
            ),
            ("PUT", lambda: client.put(f"{S}/g", headers=TEXT)),
        ]
        for what, request in kinds:
            response, elapsed = await timed(request())
            assert_unavailable(response, elapsed, what)
        ready, elapsed = await timed(client.get("/readyz"))
        assert ready.status_code == 503 and elapsed < FAST_S
    finally:
        setup.redis.thaw()

    async def serving() -> bool:
        return (await client.head(f"{S}/f")).status_code == 200

    await eventually(serving, 15, "recovery after SIGCONT")
    # The POST that got 503 may or may not have been applied once Redis woke up;
    # retrying it with the same producer tuple never duplicates it.
    retry = await client.post(
        f"{S}/f", content=b"b", headers={**TEXT, **producer, "Producer-Seq": "0"}
    )
    assert retry.status_code in (200, 204)
    assert (await client.get(f"{S}/f", params={"offset": "-1"})).content == b"ab"


async def test_a_gateway_started_without_redis_serves_503_then_recovers(
    start: Callable[..., Awaitable[Setup]],
) -> None:
    setup = await start(redis_up=False)
    client = setup.client
    response, elapsed = await timed(client.put(f"{S}/late", content=b"x", headers=TEXT))
    assert_unavailable(response, elapsed, "PUT before Redis")
    assert (await client.get("/readyz")).status_code == 503

    setup.redis.restart()

    async def created() -> bool:
        r = await client.put(f"{S}/late", content=b"x", headers=TEXT)
        return r.status_code in (200, 201)

    await eventually(created, 15, "PUT after Redis started")
    assert (await client.get(f"{S}/late", params={"offset": "-1"})).content == b"x"
    await wake_listener_connected(setup)
    tail = (await client.head(f"{S}/late")).headers["stream-next-offset"]
    poll = asyncio.create_task(
        client.get(f"{S}/late", params={"offset": tail, "live": "long-poll"})
    )
    await parked(setup, "late")
    await client.post(f"{S}/late", content=b"y", headers=TEXT)
    woken = await asyncio.wait_for(poll, 2)
    assert woken.status_code == 200 and woken.content == b"y"
