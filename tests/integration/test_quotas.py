"""Rate limits and live-reader leases (gateway/storage/quotas.py) against a real
redis-server: what the scripts decide and what Redis then holds."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from support.store_reads import store_client

from gateway.protocol.errors import Unavailable
from gateway.storage.client import RedisPyClient
from gateway.storage.quotas import Quotas
from gateway.storage.scripts import Scripts

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def quotas(redis_client: aioredis.Redis) -> Quotas:
    return Quotas(store_client(redis_client), Scripts(), "ds")


async def test_a_periods_worth_of_requests_pass_at_once_then_one_per_interval(
    quotas: Quotas, redis_client: aioredis.Redis
) -> None:
    results = [await quotas.hit("ip:10.0.0.1", "append", 5, 1_000) for _ in range(6)]
    assert results[:5] == [0] * 5
    assert 1 <= results[5] <= 200  # the next slot is one interval (200 ms) away
    # The key holds the theoretical arrival time in µs and expires with it.
    tat = int(await redis_client.get("ds:rate:{ip:10.0.0.1}:append"))
    assert abs(tat - (time.time() * 1e6 + 1e6)) < 0.5e6
    assert 0 < await redis_client.pttl("ds:rate:{ip:10.0.0.1}:append") <= 1_000
    await asyncio.sleep(results[5] / 1000 + 0.01)
    assert await quotas.hit("ip:10.0.0.1", "append", 5, 1_000) == 0


async def test_one_turns_requests_of_a_principal_are_counted_by_one_call(
    quotas: Quotas, redis_client: aioredis.Redis
) -> None:
    async def evalsha_calls() -> int:
        stats = await redis_client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    await quotas.hit("sub:warm", "append", 4, 1_000)  # the script is loaded by now
    before = await evalsha_calls()
    results = await asyncio.gather(*(quotas.hit("sub:zoe", "append", 4, 1_000) for _ in range(10)))
    assert await evalsha_calls() - before == 1
    assert results[:4] == [0] * 4  # the first four, in the order they came
    assert all(1 <= wait <= 250 for wait in results[4:]), results
    # Only those four were counted: one interval later the next one passes.
    await asyncio.sleep(0.26)
    assert await quotas.hit("sub:zoe", "append", 4, 1_000) == 0
    assert await quotas.hit("sub:zoe", "append", 4, 1_000) > 0


async def test_principals_and_operations_count_apart(quotas: Quotas) -> None:
    assert await quotas.hit("sub:alice", "append", 1, 60_000) == 0
    assert await quotas.hit("sub:alice", "append", 1, 60_000) > 0
    assert await quotas.hit("sub:alice", "read", 1, 60_000) == 0
    assert await quotas.hit("sub:bob", "append", 1, 60_000) == 0


async def test_a_refused_request_is_not_counted(quotas: Quotas) -> None:
    assert await quotas.hit("sub:carol", "create", 2, 60_000) == 0
    assert await quotas.hit("sub:carol", "create", 2, 60_000) == 0
    waits = [await quotas.hit("sub:carol", "create", 2, 60_000) for _ in range(20)]
    # Still one interval (30 s) away, however many were refused meanwhile.
    assert all(29_000 <= wait <= 30_000 for wait in waits), waits


async def test_live_reader_leases_are_bounded_and_released(
    quotas: Quotas, redis_client: aioredis.Redis
) -> None:
    assert await quotas.acquire_lease("sub:dave", "r1", 60_000, 2) == 0
    assert await quotas.acquire_lease("sub:dave", "r2", 30_000, 2) == 0
    wait = await quotas.acquire_lease("sub:dave", "r3", 60_000, 2)
    assert 29_000 <= wait <= 30_000  # until r2's lease expires
    members = await redis_client.zrange("ds:live:{sub:dave}", 0, -1, withscores=True)
    assert [m for m, _ in members] == [b"r2", b"r1"]
    # The set lives as long as its longest lease.
    assert 59_000 <= await redis_client.pttl("ds:live:{sub:dave}") <= 60_000
    await quotas.release_lease("sub:dave", "r1")
    assert await quotas.acquire_lease("sub:dave", "r3", 60_000, 2) == 0
    assert await quotas.acquire_lease("sub:erin", "r4", 60_000, 2) == 0


async def test_an_expired_lease_frees_its_place(quotas: Quotas) -> None:
    """A crashed replica never releases: its readers' leases expire."""
    assert await quotas.acquire_lease("sub:frank", "crashed", 300, 1) == 0
    assert await quotas.acquire_lease("sub:frank", "next", 60_000, 1) > 0
    deadline = time.monotonic() + 5
    while await quotas.acquire_lease("sub:frank", "next", 60_000, 1) != 0:
        assert time.monotonic() < deadline, "the expired lease still counts"
        await asyncio.sleep(0.05)


async def test_an_unreachable_redis_is_unavailable_not_an_error() -> None:
    dead = aioredis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    quotas = Quotas(RedisPyClient(dead), Scripts(), "ds")
    try:
        with pytest.raises(Unavailable):
            await quotas.hit("ip:10.0.0.1", "append", 5, 1_000)
        with pytest.raises(Unavailable):
            await quotas.acquire_lease("ip:10.0.0.1", "r", 1_000, 1)
        with pytest.raises(Unavailable):
            await quotas.release_lease("ip:10.0.0.1", "r")
    finally:
        await dead.aclose()


async def test_a_script_redis_refuses_is_unavailable_and_the_limiter_lets_requests_through(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    """An ACL user without the quota commands (the deploy guide's rule before
    they were added): the checks cannot run, so limits fail open, never a 500."""
    from gateway.web.auth import Operation
    from gateway.web.auth.limits import LiveReaderQuota, RateLimited, parse_rates
    from gateway.web.forwarded import TrustedProxies

    await redis_client.execute_command(
        "ACL", "SETUSER", "ds-quota-test", "on", ">pw", "resetkeys", "~ds:*", "-@all",
        "+evalsha", "+script|load", "+time", "+ping",
    )  # fmt: skip
    limited_user = aioredis.from_url(redis_url, username="ds-quota-test", password="pw")
    try:
        quotas = Quotas(RedisPyClient(limited_user), Scripts(), "ds")
        with pytest.raises(Unavailable, match="Redis refused a quota check"):
            await quotas.hit("ip:10.0.0.9", "append", 5, 1_000)
        with pytest.raises(Unavailable, match="Redis refused a quota check"):
            await quotas.acquire_lease("ip:10.0.0.9", "r", 1_000, 1)
        live = LiveReaderQuota(quotas, 1, long_poll_ms=1_000, sse_ms=1_000)
        limited = RateLimited(None, TrustedProxies(""), quotas, parse_rates("append=1/m"), live)

        class Peer:
            peer = "10.0.0.9"

            def header(self, name: str) -> None:
                return None

        for _ in range(3):
            principal = await limited.authorize(Peer(), Operation.APPEND, "p")  # type: ignore[arg-type]
            async with live.lease(principal, "long-poll"):
                pass
    finally:
        await limited_user.aclose()
        await redis_client.execute_command("ACL", "DELUSER", "ds-quota-test")
