"""Retention over a real gateway: the headers, 410 for offsets before the
earliest retained position, ``offset=-1``, and live readers (long-poll, SSE)
that fall behind the retention window and restart from ``-1``.

The module's gateway has a default max bytes (DS_RETENTION_MAX_BYTES) and short
live timings; streams here set their own limits or take that default. One test
starts a gateway of its own, with two workers and metrics, to count what
retention removes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from support.gateway_server import GatewayServer
from support.procs import free_port

from gateway.storage.keys import stream_keys

pytestmark = pytest.mark.timeout(60)

DEFAULT_MAX_BYTES = 4000


@pytest.fixture(scope="module")
def gw(redis_url: str) -> Iterator[GatewayServer]:
    env = {
        "DS_RETENTION_MAX_BYTES": str(DEFAULT_MAX_BYTES),
        "DS_LONG_POLL_TIMEOUT_MS": "1000",
        "DS_SSE_MAX_DURATION_MS": "3000",
    }
    with GatewayServer(redis_url=redis_url, env=env) as server:
        yield server
        with open(server.log_path, encoding="utf-8", errors="replace") as log:
            text = log.read()
        # A reader behind the retention window is a client's matter, never an error.
        assert "Traceback" not in text and "ERROR" not in text, text[-4000:]


@pytest.fixture
async def client(gw: GatewayServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"{gw.url}/v1/stream/", timeout=10) as c:
        yield c


@pytest.fixture
def path() -> str:
    return f"ret-{uuid.uuid4().hex[:12]}"


async def create(client: httpx.AsyncClient, path: str, **headers: str) -> httpx.Response:
    r = await client.put(path, headers={"Content-Type": "text/plain", **headers})
    assert r.status_code == 201, r.text
    return r


async def append(client: httpx.AsyncClient, path: str, body: bytes) -> str:
    r = await client.post(path, content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 204, r.text
    return r.headers["stream-next-offset"]


def line(i: int) -> bytes:
    return f"line {i:05d} ".encode().ljust(100, b".")


async def appends(client: httpx.AsyncClient, path: str, numbers: range) -> list[str]:
    return [await append(client, path, line(i)) for i in numbers]


async def test_retention_headers_are_echoed_compared_and_allowed_by_cors(
    client: httpx.AsyncClient, path: str
) -> None:
    await create(
        client, path, **{"Stream-Retention-Max-Age": "3600", "Stream-Retention-Max-Bytes": "1000"}
    )
    head = await client.head(path)
    assert head.headers["stream-retention-max-age"] == "3600"
    assert head.headers["stream-retention-max-bytes"] == "1000"
    same = {"Stream-Retention-Max-Age": "3600", "Stream-Retention-Max-Bytes": "1000"}
    r = await client.put(path, headers={"Content-Type": "text/plain", **same})
    assert r.status_code == 200
    r = await client.put(
        path, headers={"Content-Type": "text/plain", "Stream-Retention-Max-Age": "60"}
    )
    assert r.status_code == 409

    # Without its own, a stream reports the server default; 0 opts out of it.
    await create(client, path + "-default")
    head = await client.head(path + "-default")
    assert head.headers["stream-retention-max-bytes"] == str(DEFAULT_MAX_BYTES)
    assert "stream-retention-max-age" not in head.headers
    await create(client, path + "-forever", **{"Stream-Retention-Max-Bytes": "0"})
    assert "stream-retention-max-bytes" not in (await client.head(path + "-forever")).headers

    for name in ("Stream-Retention-Max-Age", "Stream-Retention-Max-Bytes"):
        for bad in ("-1", "1.5", "01", "abc", "9" * 5000):
            r = await client.put(path + "-bad", headers={"Content-Type": "text/plain", name: bad})
            assert r.status_code == 400, (name, bad)
            assert name in r.text

    exposed = head.headers["access-control-expose-headers"]
    assert "Stream-Retention-Max-Age" in exposed and "Stream-Retention-Max-Bytes" in exposed
    preflight = await client.options(path)
    allowed = preflight.headers["access-control-allow-headers"]
    assert "Stream-Retention-Max-Age" in allowed and "Stream-Retention-Max-Bytes" in allowed


async def test_catch_up_before_the_earliest_retained_entry_is_gone(
    client: httpx.AsyncClient, path: str
) -> None:
    await create(client, path, **{"Stream-Retention-Max-Bytes": "1000"})
    offsets = await appends(client, path, range(50))
    r = await client.get(path, params={"offset": offsets[0]})
    assert r.status_code == 410
    assert "earliest retained position" in r.text
    assert r.headers["cache-control"] == "no-store"

    r = await client.get(path, params={"offset": "-1"})
    assert r.status_code == 200
    kept = len(r.content) // 100
    assert 0 < kept <= 10
    assert r.content == b"".join(line(i) for i in range(50 - kept, 50))
    assert r.headers["stream-next-offset"] == offsets[-1]
    # The offset just before the retained range is still a valid place to read from.
    at_boundary = await client.get(path, params={"offset": offsets[-kept - 1]})
    assert at_boundary.status_code == 200
    assert at_boundary.content == r.content
    assert (await client.get(path, params={"offset": offsets[-kept - 2]})).status_code == 410


async def test_max_age_over_http(client: httpx.AsyncClient, path: str) -> None:
    await create(client, path, **{"Stream-Retention-Max-Age": "1"})
    await append(client, path, b"old ")
    deadline = time.monotonic() + 15
    while True:
        await append(client, path, b"new ")
        r = await client.get(path, params={"offset": "-1"})
        if not r.content.startswith(b"old"):
            break
        assert time.monotonic() < deadline, "the old entry was never trimmed"
        await asyncio.sleep(0.1)
    zero = "0" * 16 + "_" + "0" * 16
    assert (await client.get(path, params={"offset": zero})).status_code == 410


async def test_a_long_poll_reader_behind_the_window_gets_410_and_restarts_from_minus_one(
    client: httpx.AsyncClient, path: str
) -> None:
    await create(client, path, **{"Stream-Retention-Max-Bytes": "1000"})
    reader_at = (await appends(client, path, range(3)))[-1]
    # The reader is away while the stream moves on past its position.
    await appends(client, path, range(3, 40))
    r = await client.get(path, params={"offset": reader_at, "live": "long-poll"})
    assert r.status_code == 410
    assert "offset=-1" in r.text

    r = await client.get(path, params={"offset": "-1", "live": "long-poll"})
    assert r.status_code == 200
    assert r.content.endswith(line(39))
    # And it follows on from there: the next long-poll gets the next append
    # (whether it is already waiting when the append lands or not).
    poll = asyncio.create_task(
        client.get(path, params={"offset": r.headers["stream-next-offset"], "live": "long-poll"})
    )
    await append(client, path, b"next")
    r = await poll
    assert r.status_code == 200 and r.content == b"next"


async def sse_data(response: httpx.Response, want: bytes) -> tuple[bytes, str]:
    """Read events until the data seen ends with ``want``; the data and the
    last control event's offset."""
    seen, offset, buffer = b"", "", b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            lines = [x.split(b":", 1) for x in event.split(b"\n")]
            fields = [(name, value.removeprefix(b" ")) for name, value in lines if name]
            kind = b"".join(value for name, value in fields if name == b"event")
            payload = b"\n".join(value for name, value in fields if name == b"data")
            if kind == b"data":
                seen += payload
            elif kind == b"control":
                offset = payload.split(b'"streamNextOffset":"', 1)[1].split(b'"', 1)[0].decode()
                if seen.endswith(want):
                    return seen, offset
    raise AssertionError(f"the event stream ended before {want!r}; saw {seen[-300:]!r}")


async def test_an_sse_reader_behind_the_window_gets_410_and_restarts_from_minus_one(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, path: str
) -> None:
    await create(client, path, **{"Stream-Retention-Max-Bytes": "1000"})
    await appends(client, path, range(3))
    params = {"offset": "-1", "live": "sse"}
    async with client.stream("GET", path, params=params) as response:
        assert response.status_code == 200
        _, reader_at = await sse_data(response, line(2))
    # The reader disconnected; the stream moves past its position meanwhile.
    await appends(client, path, range(3, 40))
    params = {"offset": reader_at, "live": "sse"}
    async with client.stream("GET", path, params=params) as response:
        assert response.status_code == 410
        assert "earliest retained position" in (await response.aread()).decode()

    params = {"offset": "-1", "live": "sse"}
    async with client.stream("GET", path, params=params) as response:
        assert response.status_code == 200
        reader = asyncio.create_task(sse_data(response, b"after restart"))
        await append(client, path, b"after restart")
        seen, _ = await asyncio.wait_for(reader, 10)
    kept = (len(seen) - len(b"after restart")) // 100
    assert 0 < kept <= 10
    assert seen == b"".join(line(i) for i in range(40 - kept, 40)) + b"after restart"


async def test_fork_offset_before_the_earliest_retained_entry_is_refused(
    client: httpx.AsyncClient, path: str
) -> None:
    await create(client, path, **{"Stream-Retention-Max-Bytes": "500"})
    offsets = await appends(client, path, range(20))
    r = await client.put(
        path + "-fork",
        headers={"Stream-Forked-From": f"/v1/stream/{path}", "Stream-Fork-Offset": offsets[0]},
    )
    assert r.status_code == 400
    assert "earliest retained" in r.text
    r = await client.put(
        path + "-fork",
        headers={"Stream-Forked-From": f"/v1/stream/{path}", "Stream-Fork-Offset": offsets[-2]},
    )
    assert r.status_code == 201
    r = await client.get(path + "-fork", params={"offset": "-1"})
    assert r.status_code == 200 and r.content.endswith(line(18))


TRIMMED_TOTAL = "durable_streams_retention_trimmed_entries_total"


def trimmed_total(metrics_url: str) -> float:
    """The counter as a scrape of every worker shows it (0 before its first trim)."""
    response = httpx.get(metrics_url, timeout=5)
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == TRIMMED_TOTAL:
                return sample.value
    return 0.0


def test_the_trimmed_entries_counter_grows_by_exactly_the_entries_retention_removed(
    redis_url: str,
) -> None:
    metrics_port = free_port()
    with GatewayServer(
        redis_url=redis_url,
        server="console-script",
        args=["--workers", "2", "--metrics-port", str(metrics_port)],
        env={"DS_RETENTION_MAX_BYTES": "2000"},
    ) as server:
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        before = trimmed_total(metrics_url)
        run = uuid.uuid4().hex[:12]
        # One stream with its own limit, one with the gateway's default; 30-byte
        # entries, so one trim removes several.
        own, default = f"count-own-{run}", f"count-default-{run}"
        headers = {"Content-Type": "text/plain"}
        base = f"{server.url}/v1/stream/"
        limits = {own: {"Stream-Retention-Max-Bytes": "1000"}, default: {}}
        for path, limit in limits.items():
            assert httpx.put(base + path, headers={**headers, **limit}).status_code == 201
        bodies = [f"entry {i:05d} ".encode().ljust(30, b".") for i in range(150)]
        for body in bodies:
            for path in limits:
                # A connection per append: both workers append, and trim.
                response = httpx.post(base + path, content=body, headers=headers)
                assert response.status_code == 204, response.text

        data = redis.Redis.from_url(redis_url)
        try:
            gone = 0
            for path in limits:
                kept = [fields[b"d"] for _, fields in data.xrange(stream_keys("ds", path).data)]
                # The head went, the newest entries are all there.
                assert 0 < len(kept) < len(bodies)
                assert kept == bodies[-len(kept) :]
                gone += len(bodies) - len(kept)
        finally:
            data.close()

        # Counted where each trim ran (either worker); a scrape sums the workers.
        deadline = time.monotonic() + 20
        while trimmed_total(metrics_url) - before != gone:
            assert time.monotonic() < deadline, (
                f"counted {trimmed_total(metrics_url) - before}, retention removed {gone}"
            )
            time.sleep(0.1)
        assert trimmed_total(metrics_url) - before == gone
    with open(server.log_path, encoding="utf-8", errors="replace") as log:
        text = log.read()
    assert "Traceback" not in text and "ERROR" not in text, text[-4000:]
