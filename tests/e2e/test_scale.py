"""Scale-out guarantees of live reads, end to end over real sockets.

Two gateway replicas (A and B) share one Redis. These tests show that an append
through A wakes readers on B within milliseconds; that B holds a small, fixed
number of Redis connections however many SSE readers wait on it (2,000 here);
that one append costs B O(1) Redis reads however many readers it wakes; and that
killing B's pub/sub connection loses no wake-up. Figures are printed (run with
-s to see them); the assertions are deliberately loose bounds, not benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from support.gateway_server import GatewayServer
from support.live import parked
from support.redis_cluster import RedisCluster
from support.redis_server import RedisServer, redis7_binary, redis62_binary

READERS = 2000
MAX_CONNECTIONS_PER_REPLICA = 4


@pytest.fixture(scope="module", params=["standalone", "cluster"])
def replicas(request) -> Iterator[tuple[list[str], GatewayServer, GatewayServer]]:
    """(URLs of every Redis node, replica a, replica b)."""
    binary = redis7_binary() or redis62_binary()
    env = {"DS_SSE_MAX_DURATION_MS": "120000", "DS_LONG_POLL_TIMEOUT_MS": "20000"}
    with contextlib.ExitStack() as stack:
        if request.param == "standalone":
            redis = stack.enter_context(RedisServer(binary))
            nodes, redis_url = [redis.url], redis.url
        else:
            cluster = stack.enter_context(RedisCluster(binary))
            nodes = [f"redis://{host}:{port}/0" for host, port in cluster.nodes]
            redis_url = cluster.url
            env["REDIS_CLUSTER_URL"] = cluster.url
        a = stack.enter_context(
            GatewayServer(redis_url=redis_url, env={**env, "DS_INSTANCE_ID": "a"})
        )
        b = stack.enter_context(
            GatewayServer(redis_url=redis_url, env={**env, "DS_INSTANCE_ID": "b"})
        )
        yield nodes, a, b


async def _on_each_node(nodes: list[str], command: Any) -> list[Any]:
    results = []
    for url in nodes:
        client = aioredis.Redis.from_url(url)
        try:
            results.append(await command(client))
        finally:
            await client.aclose()
    return results


async def _connections_per_node(nodes: list[str], instance: str) -> list[int]:
    async def count(client: aioredis.Redis) -> int:
        clients = await client.client_list()
        return sum(1 for c in clients if c.get("name", "").startswith(f"ds-gateway:{instance}:"))

    return await _on_each_node(nodes, count)


async def _evalsha_calls(nodes: list[str]) -> int:
    async def calls(client: aioredis.Redis) -> int:
        stats = await client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    return sum(await _on_each_node(nodes, calls))


def _tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and its descendants (hypercorn runs a worker child)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open(f"/proc/{current}/task/{current}/children") as children:
                pending.extend(int(c) for c in children.read().split())
        except FileNotFoundError:
            continue
    return total


async def test_append_on_a_wakes_long_poll_on_b(replicas) -> None:
    """Each wait on a fresh stream (whose wake channel only b's reader
    subscribes), so the append always finds the reader parked and must wake it
    across replicas. The latency is printed; bounds belong to bench/."""
    nodes, a, b = replicas
    latencies = []
    clients = [aioredis.Redis.from_url(url) for url in nodes]
    async with httpx.AsyncClient(timeout=30) as http:
        for i in range(40):
            path = f"xwake-{i}-{time.monotonic_ns()}"
            url_a, url_b = f"{a.url}/v1/stream/{path}", f"{b.url}/v1/stream/{path}"
            created = await http.put(url_a, headers={"content-type": "text/plain"})
            assert created.status_code == 201
            tail = created.headers["stream-next-offset"]
            poll = asyncio.create_task(
                http.get(url_b, params={"offset": tail, "live": "long-poll"})
            )
            await parked(clients, path)
            assert not poll.done(), "the long-poll answered before there was data"
            started = time.perf_counter()
            posted = await http.post(url_a, content=f"m{i}", headers={"content-type": "text/plain"})
            assert posted.status_code == 204
            response = await poll
            latencies.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
            assert response.headers["x-ds-instance"] == "b"
            assert response.text == f"m{i}"
    for client in clients:
        await client.aclose()
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(
        f"\ncross-replica append->long-poll delivery (incl. the POST): p50 {p50:.1f} ms, "
        f"p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms over {len(latencies)}"
    )


async def _open_sse(
    host: str, port: int, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    return reader, writer


async def _read_until(reader: asyncio.StreamReader, needle: bytes, within_s: float) -> bytes:
    seen = b""
    async with asyncio.timeout(within_s):
        while needle not in seen:
            chunk = await reader.read(65536)
            if not chunk:
                raise ConnectionError(f"connection closed before {needle!r}; got {seen[-300:]!r}")
            seen += chunk
    return seen


async def test_thousands_of_sse_readers_share_a_few_connections_and_one_read(replicas) -> None:
    nodes, a, b = replicas
    host, port = "127.0.0.1", int(b.url.rsplit(":", 1)[1])
    path = "/v1/stream/fanout"
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            put = await http.put(f"{a.url}{path}", headers={"content-type": "text/plain"})
            assert put.status_code == 201
            rss_before = _tree_rss_kib(b.pid)

            # Open the readers in batches; each is caught up once its first
            # control event (upToDate) has arrived.
            for start in range(0, READERS, 250):
                batch = await asyncio.gather(
                    *(
                        _open_sse(host, port, f"{path}?offset=now&live=sse")
                        for _ in range(start, min(start + 250, READERS))
                    )
                )
                await asyncio.gather(*(_read_until(r, b'"upToDate":true', 30) for r, _ in batch))
                connections.extend(batch)
            rss_after = _tree_rss_kib(b.pid)
            held = await _connections_per_node(nodes, "b")
            per_reader = (rss_after - rss_before) * 1024 / READERS
            print(
                f"\n{READERS} SSE readers on replica b: Redis connections per node {held}; "
                f"memory {per_reader / 1024:.1f} KiB per idle reader"
            )
            assert max(held) <= MAX_CONNECTIONS_PER_REPLICA

            calls_before = await _evalsha_calls(nodes)
            started = time.perf_counter()
            posted = await http.post(
                f"{a.url}{path}", content="hello-all", headers={"content-type": "text/plain"}
            )
            assert posted.status_code == 204
            await asyncio.gather(*(_read_until(r, b"hello-all", 60) for r, _ in connections))
            elapsed_ms = (time.perf_counter() - started) * 1000
            calls = await _evalsha_calls(nodes) - calls_before
            print(
                f"one append reached all {READERS} readers in {elapsed_ms:.0f} ms; "
                f"Redis script calls for it: {calls} (1 append + reads)"
            )
            # One append plus a handful of coalesced reads, not one read per reader.
            assert calls <= 10
            assert max(await _connections_per_node(nodes, "b")) <= MAX_CONNECTIONS_PER_REPLICA
    finally:
        for _, writer in connections:
            writer.close()


async def test_killing_the_pubsub_connection_loses_no_wake_up(replicas) -> None:
    """Twenty long-polls on replica b, each on its own fresh stream so that each
    one's subscription proves it waits; b's pub/sub connection is killed and
    every stream gets an append through a: every reader gets its append."""
    nodes, a, b = replicas
    paths = [f"killwake-{i}-{time.monotonic_ns()}" for i in range(20)]
    clients = [aioredis.Redis.from_url(url) for url in nodes]
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            polls = []
            for path in paths:
                created = await http.put(
                    f"{a.url}/v1/stream/{path}", headers={"content-type": "text/plain"}
                )
                assert created.status_code == 201
                tail = created.headers["stream-next-offset"]
                polls.append(
                    asyncio.create_task(
                        http.get(
                            f"{b.url}/v1/stream/{path}",
                            params={"offset": tail, "live": "long-poll"},
                        )
                    )
                )
            for path in paths:
                await parked(clients, path)
            assert not any(poll.done() for poll in polls)
            killed = await _on_each_node(
                nodes, lambda c: c.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            )
            assert sum(int(k) for k in killed) >= 1
            # Appended while b's listener is (probably) still reconnecting.
            posted = await asyncio.gather(
                *(
                    http.post(
                        f"{a.url}/v1/stream/{path}",
                        content=f"after-kill {path}",
                        headers={"content-type": "text/plain"},
                    )
                    for path in paths
                )
            )
            assert [p.status_code for p in posted] == [204] * 20
            responses = await asyncio.wait_for(asyncio.gather(*polls), 30)
            assert [r.status_code for r in responses] == [200] * 20
            assert [r.text for r in responses] == [f"after-kill {path}" for path in paths]
    finally:
        for client in clients:
            await client.aclose()


def test_replica_pids_are_distinct(replicas) -> None:
    _, a, b = replicas
    assert a.pid != b.pid and os.path.exists(f"/proc/{b.pid}")
