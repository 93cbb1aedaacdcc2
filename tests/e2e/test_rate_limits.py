"""Rate limits and live-reader quotas per principal, end to end: two gateway
replicas on one Redis behind a real HAProxy (tests/support/haproxy.py), so every
limit is shared by both; and what happens when Redis is away.

The principal is the client address: HAProxy passes the test's
``X-Forwarded-For`` through and the replicas trust their loopback peer, so each
test names clients of its own. Figures are printed (run with -s).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import jwt
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from support.gateway_server import GatewayServer
from support.haproxy import HAProxy
from support.procs import stop_process
from support.redis_cluster import RedisCluster
from support.redis_server import RedisServer, redis7_binary, redis62_binary

from gateway.protocol.errors import Unavailable
from gateway.storage.client import RedisPyClient
from gateway.storage.quotas import Quotas
from gateway.storage.scripts import Scripts
from gateway.web.auth import Operation
from gateway.web.auth.limits import LiveReaderQuota, RateLimited, parse_rates
from gateway.web.forwarded import TrustedProxies

pytestmark = pytest.mark.timeout(120)

# Modest, so that the test can offer 3x as much on a loaded 2-core machine.
APPENDS_PER_S = 15
MAX_LIVE_READERS = 3
TEXT = {"content-type": "text/plain"}
_clients = itertools.count(1)


def new_client() -> dict[str, str]:
    """Headers making a principal of its own (one client address)."""
    return {"x-forwarded-for": f"203.0.113.{next(_clients)}"}


@pytest.fixture(scope="module")
def cluster(redis_url: str) -> Iterator[tuple[GatewayServer, GatewayServer, HAProxy]]:
    env = {
        "DS_RATE_LIMIT": f"append={APPENDS_PER_S}/s;create=20/m",
        "DS_MAX_LIVE_READERS": str(MAX_LIVE_READERS),
        "DS_KEY_PREFIX": "rl",
        "DS_LONG_POLL_TIMEOUT_MS": "20000",
        "DS_SSE_MAX_DURATION_MS": "60000",
        # An idle SSE reader whose client left is found at its next keep-alive.
        "DS_SSE_KEEPALIVE_MS": "1000",
    }
    with (
        GatewayServer(
            redis_url=redis_url, env={**env, "DS_INSTANCE_ID": "a"}, server="console-script"
        ) as a,
        GatewayServer(
            redis_url=redis_url, env={**env, "DS_INSTANCE_ID": "b"}, server="console-script"
        ) as b,
        HAProxy([("127.0.0.1", a.port), ("127.0.0.1", b.port)]) as lb,
    ):
        yield a, b, lb


def _log(server: GatewayServer) -> str:
    with open(server.log_path, encoding="utf-8", errors="replace") as log:
        return log.read()


async def test_an_append_rate_is_shared_by_two_replicas(cluster) -> None:
    """3x the limit for 10 s through HAProxy: accepted/s after the first
    second's burst is the limit within 15%, and both replicas took part."""
    _, _, lb = cluster
    client = new_client()
    url = f"{lb.url}/v1/stream/{client['x-forwarded-for']}/rate"
    offered_per_s, duration_s = 3 * APPENDS_PER_S, 10.0
    accepted: list[tuple[float, str]] = []  # (sent at, replica)
    statuses: collections.Counter[int] = collections.Counter()
    retry_after: set[str] = set()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=10, limits=limits) as http:
        assert (await http.put(url, headers={**TEXT, **client})).status_code == 201

        async def append(sent_at: float) -> None:
            answer = await http.post(url, headers={**TEXT, **client}, content=b"x")
            statuses[answer.status_code] += 1
            if answer.status_code == 204:
                accepted.append((sent_at, answer.headers["x-lb-server"]))
            elif answer.status_code == 429:
                retry_after.add(answer.headers["retry-after"])

        tasks = []
        start = time.monotonic()
        for i in range(int(offered_per_s * duration_s)):
            due = start + i / offered_per_s
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(append(time.monotonic() - start)))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
    assert set(statuses) <= {204, 429}, statuses
    sent_per_s = sum(statuses.values()) / elapsed
    steady = [at for at, _ in accepted if at >= 1.0]
    steady_per_s = len(steady) / (elapsed - 1.0)
    total_per_s = len(accepted) / elapsed
    by_replica = collections.Counter(replica for _, replica in accepted)
    print(
        f"\noffered {sent_per_s:.1f}/s for {elapsed:.1f} s, limit {APPENDS_PER_S}/s: accepted "
        f"{len(accepted)} ({total_per_s:.1f}/s overall incl. the first second's burst, "
        f"{steady_per_s:.1f}/s after it = {steady_per_s / APPENDS_PER_S:.3f}x the limit); "
        f"refused {statuses[429]}; by replica {dict(by_replica)}"
    )
    assert sent_per_s >= 1.5 * APPENDS_PER_S, "the test could not offer enough load to measure"
    assert abs(steady_per_s - APPENDS_PER_S) <= 0.15 * APPENDS_PER_S
    assert set(by_replica) == {"s0", "s1"}
    assert min(by_replica.values()) >= 0.25 * len(accepted)
    assert retry_after == {"1"}
    async with httpx.AsyncClient(timeout=10) as http:
        body = (await http.get(url, params={"offset": "-1"}, headers=new_client())).content
    assert len(body) == len(accepted)  # each accepted append stored, nothing else


async def test_each_principal_and_operation_has_its_own_allowance(cluster) -> None:
    _, _, lb = cluster
    async with httpx.AsyncClient(timeout=10, base_url=lb.url) as http:
        first, second = new_client(), new_client()
        creates = [
            (await http.put(f"/v1/stream/own/{i}", headers={**TEXT, **first})).status_code
            for i in range(25)
        ]
        # 20 at once (a period's worth), then one per 3 s.
        assert creates.count(201) in range(20, 22), creates
        refused = creates.index(429)
        assert all(status == 429 for status in creates[refused + 2 :]), creates
        # Another client, and another operation of the same client, are untouched.
        assert (await http.put("/v1/stream/own/x", headers={**TEXT, **second})).status_code == 201
        answer = await http.post("/v1/stream/own/0", headers={**TEXT, **first}, content=b"y")
        assert answer.status_code == 204
        # Reads are not limited by this configuration.
        reads = [
            (await http.get("/v1/stream/own/0", params={"offset": "-1"}, headers=first)).status_code
            for _ in range(30)
        ]
        assert reads == [200] * 30
        # Limits alone authenticate nobody: reads stay as cacheable as configured.
        read = await http.get("/v1/stream/own/0", params={"offset": "-1"}, headers=first)
        assert read.headers["cache-control"].startswith("public,")


async def _open_sse(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], stack: contextlib.AsyncExitStack
) -> httpx.Response:
    """An SSE reader whose response has started (its lease is taken by then)."""
    return await stack.enter_async_context(
        http.stream("GET", url, params={"offset": "-1", "live": "sse"}, headers=headers)
    )


async def test_live_readers_per_principal_are_bounded_across_replicas(cluster) -> None:
    a, b, lb = cluster
    client = new_client()
    url = f"{lb.url}/v1/stream/{client['x-forwarded-for']}/live"
    async with httpx.AsyncClient(timeout=30, base_url=lb.url) as http:
        assert (await http.put(url, headers={**TEXT, **client})).status_code == 201
        appended = await http.post(url, headers={**TEXT, **client}, content=b"hello")
        assert appended.status_code == 204
        async with contextlib.AsyncExitStack() as readers:
            opened = [await _open_sse(http, url, client, readers) for _ in range(MAX_LIVE_READERS)]
            assert [r.status_code for r in opened] == [200] * MAX_LIVE_READERS
            assert {r.headers["x-lb-server"] for r in opened} == {"s0", "s1"}
            # A fourth, on either replica, long-poll or SSE: 429.
            for _ in range(2):
                refused = await http.get(
                    url, params={"offset": "-1", "live": "sse"}, headers=client
                )
                assert refused.status_code == 429, refused.text
                assert 1 <= int(refused.headers["retry-after"]) <= 5
                poll = await http.get(
                    url, params={"offset": "now", "live": "long-poll"}, headers=client
                )
                assert poll.status_code == 429
            # Catch-up reads are not live readers; other principals have their own quota.
            assert (await http.get(url, params={"offset": "-1"}, headers=client)).status_code == 200
            other = await http.get(
                url, params={"offset": "-1", "live": "long-poll"}, headers=new_client()
            )
            assert other.status_code == 200  # data at hand: answered at once
            # A reader that ends releases its lease: another is admitted.
            await opened[0].aclose()
            deadline = time.monotonic() + 10
            while True:
                again = await _open_sse(http, url, client, readers)
                if again.status_code == 200:
                    break
                assert again.status_code == 429
                assert time.monotonic() < deadline, "a closed reader's lease was not released"
                await asyncio.sleep(0.05)
    for server in (a, b):
        log = _log(server)
        assert "Traceback" not in log
        assert not re.search(r"\bERROR\b", log)


@pytest.fixture
async def lone_redis() -> AsyncIterator[RedisServer]:
    redis = RedisServer(redis62_binary())
    await asyncio.to_thread(redis.start)
    try:
        yield redis
    finally:
        await asyncio.to_thread(redis.stop)


def _kill(redis: RedisServer) -> None:
    """Stop the server by pid, keeping its port and dir to start it again."""
    assert redis.proc is not None
    stop_process(redis.proc)
    redis.proc = None


async def test_without_redis_limits_fail_open_and_requests_get_503_not_500(lone_redis) -> None:
    env = {"DS_RATE_LIMIT": "append=2/m;read=2/m", "DS_MAX_LIVE_READERS": "1"}
    gateway = GatewayServer(redis_url=lone_redis.url, env=env)
    await asyncio.to_thread(gateway.start)
    try:
        async with httpx.AsyncClient(timeout=10, base_url=gateway.url) as http:
            assert (await http.put("/v1/stream/down", headers=TEXT)).status_code == 201
            port = lone_redis.port
            await asyncio.to_thread(_kill, lone_redis)
            for method, params in [
                ("POST", {}),
                ("GET", {"offset": "-1"}),
                ("GET", {"offset": "-1", "live": "long-poll"}),
                ("GET", {"offset": "-1", "live": "sse"}),
            ]:
                started = time.monotonic()
                answer = await http.request(
                    method,
                    "/v1/stream/down",
                    params=params,
                    headers=TEXT,
                    content=b"z" if method == "POST" else None,
                )
                assert answer.status_code == 503, (method, params, answer.status_code)
                assert answer.headers["retry-after"] == "1"
                assert time.monotonic() - started < 6
            # Redis back: the limits count again.
            await asyncio.to_thread(lone_redis._start_once, port)
            deadline = time.monotonic() + 15
            while (await http.put("/v1/stream/up", headers=TEXT)).status_code != 201:
                assert time.monotonic() < deadline, "the gateway did not recover"
                await asyncio.sleep(0.1)
            appends = [
                (await http.post("/v1/stream/up", headers=TEXT, content=b"z")).status_code
                for _ in range(3)
            ]
            assert appends == [204, 204, 429]
    finally:
        await asyncio.to_thread(gateway.stop)
    log = _log(gateway)
    assert "Traceback" not in log
    assert not re.search(r"\bERROR\b", log)
    assert "rate limits not checked: storage unavailable" in log


class _Request:
    """Just enough of a request for RateLimited without an inner authorizer."""

    peer = "198.51.100.9"

    def header(self, name: str) -> None:
        return None


async def test_the_limiter_itself_lets_requests_through_when_redis_is_away() -> None:
    """Fail open, shown without a gateway: an unreachable Redis gives the
    principal, not an error (the handler then meets Redis itself)."""

    dead = aioredis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    quotas = Quotas(RedisPyClient(dead), Scripts(), "ds")
    live = LiveReaderQuota(quotas, 1, long_poll_ms=1_000, sse_ms=1_000)
    limited = RateLimited(None, TrustedProxies(""), quotas, parse_rates("append=1/m"), live)
    try:
        with pytest.raises(Unavailable):
            await quotas.hit("ip:x", "append", 1, 60_000)
        for _ in range(3):
            principal = await limited.authorize(_Request(), Operation.APPEND, "p")  # type: ignore[arg-type]
            assert principal.rate_key == "ip:198.51.100.9"
            async with live.lease(principal, "sse"):
                pass
    finally:
        await dead.aclose()


async def test_a_jwt_subject_is_the_principal_whatever_its_token(redis_url: str) -> None:
    """DS_AUTH=jwt wrapped in a limit: tokens of one ``sub`` share its allowance."""
    secret = "s" * 40
    env = {
        "DS_AUTH": "jwt",
        "DS_JWT_SECRET": secret,
        "DS_RATE_LIMIT": "create=2/m",
        "DS_KEY_PREFIX": "rljwt",
    }

    def bearer(subject: str, nonce: int) -> dict[str, str]:
        claims = {
            "sub": subject,
            "exp": int(time.time()) + 600,
            "jti": str(nonce),  # another token of the same subject
            "ds": {"create": ["**"], "read": ["**"], "append": ["**"], "delete": ["**"]},
        }
        return {**TEXT, "authorization": f"Bearer {jwt.encode(claims, secret, algorithm='HS256')}"}

    gateway = GatewayServer(redis_url=redis_url, env=env, server="console-script")
    await asyncio.to_thread(gateway.start)
    try:
        async with httpx.AsyncClient(timeout=10, base_url=gateway.url) as http:
            statuses = [
                (await http.put(f"/v1/stream/jwt/{n}", headers=bearer("alice", n))).status_code
                for n in range(3)
            ]
            assert statuses == [201, 201, 429]
            answer = await http.put("/v1/stream/jwt/b", headers=bearer("bob", 0))
            assert answer.status_code == 201
            # No token: 401 before any limit is counted.
            assert (await http.put("/v1/stream/jwt/x", headers=TEXT)).status_code == 401
    finally:
        await asyncio.to_thread(gateway.stop)


async def test_limits_and_leases_work_on_redis_cluster() -> None:
    """Each quota script takes one key, so each runs on its principal's slot."""
    env = {"DS_RATE_LIMIT": "create=2/m", "DS_MAX_LIVE_READERS": "1", "DS_SSE_KEEPALIVE_MS": "500"}
    with contextlib.ExitStack() as stack:
        cluster = await asyncio.to_thread(
            stack.enter_context, RedisCluster(redis7_binary() or redis62_binary())
        )
        gateway = GatewayServer(
            redis_url=cluster.url,
            env={**env, "REDIS_CLUSTER_URL": cluster.url},
            server="console-script",
        )
        await asyncio.to_thread(stack.enter_context, gateway)
        client = new_client()
        async with httpx.AsyncClient(timeout=10, base_url=gateway.url) as http:
            statuses = [
                (await http.put(f"/v1/stream/c/{n}", headers={**TEXT, **client})).status_code
                for n in range(3)
            ]
            assert statuses == [201, 201, 429]
            key = f"ds:rate:{{ip:{client['x-forwarded-for']}}}:create"
            host, port = cluster.slot_owner(key)
            owner = aioredis.Redis(host=host, port=port)
            try:
                assert await owner.exists(key) == 1
            finally:
                await owner.aclose()
            async with contextlib.AsyncExitStack() as readers:
                first = await _open_sse(http, "/v1/stream/c/0", client, readers)
                assert first.status_code == 200
                again = await http.get(
                    "/v1/stream/c/0", params={"offset": "-1", "live": "long-poll"}, headers=client
                )
                assert again.status_code == 429
                await first.aclose()
                deadline = time.monotonic() + 10
                while (await _open_sse(http, "/v1/stream/c/0", client, readers)).status_code != 200:
                    assert time.monotonic() < deadline, "the lease was not released"
                    await asyncio.sleep(0.05)
        log = _log(gateway)
    assert "Traceback" not in log
    assert not re.search(r"\bERROR\b", log)
