"""Live reads over a real socket: long-poll (section 5.7) and SSE (section 5.8).

The module runs its own gateway with short live timings (long-poll 1 s, SSE
connections 1.5 s, keep-alive every 200 ms) against the session redis-server.
A reader counts as "parked" once the gateway has subscribed the stream's wake
channel in Redis (``PUBSUB NUMSUB``, see ``support.live``), so no test guesses
with a sleep.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from support.gateway_server import GatewayServer
from support.live import eventually, parked, subscribers, wake_channel
from support.raw_http import read_response
from support.sse_reader import SSE, Event

pytestmark = pytest.mark.timeout(60)

LONG_POLL_S = 1.0
SSE_MAX_S = 1.5
KEEPALIVE_S = 0.2


@pytest.fixture(scope="module")
def gw(redis_url: str) -> Iterator[GatewayServer]:
    env = {
        "DS_LONG_POLL_TIMEOUT_MS": str(int(LONG_POLL_S * 1000)),
        "DS_SSE_MAX_DURATION_MS": str(int(SSE_MAX_S * 1000)),
        "DS_SSE_KEEPALIVE_MS": str(int(KEEPALIVE_S * 1000)),
    }
    with GatewayServer(redis_url=redis_url, env=env) as server:
        yield server


@pytest.fixture
async def client(gw: GatewayServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"{gw.url}/v1/stream/", timeout=10) as c:
        yield c


@pytest.fixture
def path() -> str:
    """A fresh stream path (wake channels linger, so never reuse one)."""
    return f"live-{uuid.uuid4().hex[:12]}"


async def create(
    client: httpx.AsyncClient,
    path: str,
    body: bytes = b"",
    content_type: str = "text/plain",
    **headers: str,
) -> str:
    r = await client.put(path, content=body, headers={"Content-Type": content_type, **headers})
    assert r.status_code == 201, r.text
    return r.headers["stream-next-offset"]


async def append(
    client: httpx.AsyncClient,
    path: str,
    body: bytes,
    content_type: str = "text/plain",
    **headers: str,
) -> str:
    r = await client.post(path, content=body, headers={"Content-Type": content_type, **headers})
    assert r.status_code in (200, 204), r.text
    return r.headers["stream-next-offset"]


def sse_params(offset: str) -> dict[str, str]:
    return {"offset": offset, "live": "sse"}


# -- long-poll ----------------------------------------------------------------------------------


async def test_a_parked_long_poll_is_woken_by_an_append(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, path: str
) -> None:
    """Each wait on its own fresh stream, so that its subscription proves this
    reader is parked (a lingering channel would prove nothing). The answer is
    the appended data, not the 204 of a timeout. (Latency is measured by bench/.)"""
    for i in range(5):
        stream = f"{path}-{i}"
        offset = await create(client, stream)
        poll = asyncio.create_task(
            client.get(stream, params={"offset": offset, "live": "long-poll"})
        )
        await parked(redis_client, stream)
        assert not poll.done(), "the long-poll answered before there was data"
        tail = await append(client, stream, b"msg-%d" % i)
        response = await poll
        assert response.status_code == 200
        assert response.content == b"msg-%d" % i
        assert response.headers["stream-next-offset"] == tail
        assert response.headers["stream-up-to-date"] == "true"
        assert response.headers["stream-cursor"].isdigit()
        assert "stream-closed" not in response.headers


async def _scripts_run(redis: aioredis.Redis) -> int:
    """EVALSHA calls (reads and appends) since the last CONFIG RESETSTAT."""
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.parametrize("size", [10, 16384, 16385, 100_000])
async def test_a_long_poll_on_a_listened_stream_reads_once(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, path: str, size: int
) -> None:
    """While the replica already listens to the stream, a long-poll captures its
    wake-up before its first read, so it waits without a second read. Appends
    up to 16 KiB travel in their wake-up message and are answered without a
    read; larger ones are read back. Either way the reader gets exactly the
    appended bytes and the right offsets."""
    offset = await create(client, path)
    warm = asyncio.create_task(client.get(path, params={"offset": offset, "live": "long-poll"}))
    await parked(redis_client, path)
    offset = await append(client, path, b"w")
    assert (await warm).content == b"w"
    # The channel stays subscribed for a while after its last reader left.
    await redis_client.config_resetstat()
    poll = asyncio.create_task(client.get(path, params={"offset": offset, "live": "long-poll"}))

    async def first_read_done() -> bool:
        return await _scripts_run(redis_client) >= 1

    # The channel is already subscribed, so the reader's first read is what says
    # it waits: it captured the wake-up before that read.
    await eventually(first_read_done, what="the long-poll's first read")
    assert not poll.done()
    assert await _scripts_run(redis_client) == 1, "one read before waiting"
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    tail = await append(client, path, body)
    response = await poll
    assert response.status_code == 200 and response.content == body
    assert response.headers["stream-next-offset"] == tail
    assert response.headers.get("stream-up-to-date") == "true"
    reads_after_wake = await _scripts_run(redis_client) - 2  # minus the first read, the append
    assert reads_after_wake == (0 if size <= 16384 else 1)


async def test_sse_readers_get_pushed_appends_in_order(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, path: str
) -> None:
    """A burst of small appends reaches an SSE reader complete and in order,
    whether each one came from its wake-up message or from a read. The burst
    may outlast one SSE connection (1.5 s) on a slow machine: the reader then
    resumes from the last control event, as clients do."""
    offset = await create(client, path)
    expected = b"".join(f"m{i};".encode() for i in range(200))
    received = bytearray()

    async def follow(offset: str) -> str:
        """Read one SSE connection; the offset to resume from."""
        async with client.stream("GET", path, params=sse_params(offset)) as response:
            assert response.status_code == 200
            sse = SSE(response)
            while (event := await sse.next()) is not None:
                if event.type == "data":
                    received.extend(event.data.encode())
                elif event.type == "control":
                    offset = event.json()["streamNextOffset"]
                    if len(received) >= len(expected):
                        break
        return offset

    reading = asyncio.create_task(follow(offset))
    await parked(redis_client, path)
    for i in range(200):
        await append(client, path, f"m{i};".encode())
    async with asyncio.timeout(30):
        offset = await reading
        while len(received) < len(expected):
            offset = await follow(offset)
    assert bytes(received) == expected


async def test_concurrent_appends_reach_live_readers_exactly_once(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, path: str
) -> None:
    """Concurrent appends share one script run (group commit) and one
    wake-up: an SSE reader and a long-poll reader each get every one of them
    exactly once."""
    offset = await create(client, path)
    bodies = [f"c{i:02d};".encode() for i in range(30)]
    received = bytearray()
    async with client.stream("GET", path, params={"offset": offset, "live": "sse"}) as response:
        lines = response.aiter_lines()
        await parked(redis_client, path)
        await redis_client.config_resetstat()
        poll = asyncio.create_task(client.get(path, params={"offset": offset, "live": "long-poll"}))

        async def first_read_done() -> bool:
            return await _scripts_run(redis_client) >= 1

        # The channel is subscribed already (the SSE reader): the long-poll's first
        # read (after capturing the wake-up) says it waits.
        await eventually(first_read_done, what="the long-poll's first read")
        await redis_client.config_resetstat()
        tails = await asyncio.gather(*(append(client, path, body) for body in bodies))
        async with asyncio.timeout(10):
            async for line in lines:
                if line.startswith("data:") and not line.startswith("data:{"):
                    received += line[5:].encode()
                if len(received) >= sum(map(len, bodies)):
                    break
    # Fewer script runs than appends: some of them were committed together.
    stats = await redis_client.info("commandstats")
    assert int(stats["cmdstat_evalsha"]["calls"]) < len(bodies)
    assert sorted(received.split(b";")[:-1]) == sorted(b[:-1] for b in bodies)
    first = (await poll).content
    assert first and bytes(received).startswith(first)
    # Read back in full: the same bytes in offset order.
    read = await client.get(path, params={"offset": offset})
    assert read.content == bytes(received)
    assert read.headers["stream-next-offset"] == max(tails)


async def test_long_poll_at_now_waits_for_new_data_only(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, path: str
) -> None:
    await create(client, path, b"old")
    poll = asyncio.create_task(client.get(path, params={"offset": "now", "live": "long-poll"}))
    await parked(redis_client, path)
    tail = await append(client, path, b"new")
    response = await asyncio.wait_for(poll, 10)
    assert response.status_code == 200 and response.content == b"new"
    assert response.headers["stream-next-offset"] == tail


async def test_long_poll_times_out_with_204_and_the_tail(
    client: httpx.AsyncClient, path: str
) -> None:
    tail = await create(client, path, b"data")
    cursors = []
    for _ in range(2):
        params = {"offset": tail, "live": "long-poll"}
        if cursors:
            params["cursor"] = cursors[-1]
        start = time.monotonic()
        response = await client.get(path, params=params)
        elapsed = time.monotonic() - start
        assert response.status_code == 204 and response.content == b""
        assert LONG_POLL_S - 0.05 <= elapsed < LONG_POLL_S + 10, elapsed
        assert response.headers["stream-up-to-date"] == "true"
        assert response.headers["stream-next-offset"] == tail
        assert response.headers["stream-cursor"].isdigit()
        assert "stream-closed" not in response.headers
        cursors.append(response.headers["stream-cursor"])
    # Echoing a cursor yields a strictly greater one (section 10.1).
    assert int(cursors[1]) > int(cursors[0])


async def never_waited(redis: aioredis.Redis, path: str) -> bool:
    """No reader of ``path`` ever waited: nobody subscribed its wake channel
    (channels linger for 10 s after their last reader, so this holds for a
    fresh path)."""
    return await subscribers(redis, wake_channel(path)) == 0


async def test_long_poll_on_a_closed_stream_at_its_tail_returns_at_once(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, path: str
) -> None:
    """ "At once": the reader never waited (no subscription), which a timed-out
    204 would have done for LONG_POLL_S."""
    first = await create(client, path, b"a")
    await append(client, path, b"b")
    r = await client.post(path, headers={"Stream-Closed": "true"})
    tail = r.headers["stream-next-offset"]
    for offset in (tail, "now"):
        start = time.monotonic()
        response = await client.get(path, params={"offset": offset, "live": "long-poll"})
        assert time.monotonic() - start < LONG_POLL_S
        assert response.status_code == 204
        assert response.headers["stream-closed"] == "true"
        assert response.headers["stream-up-to-date"] == "true"
        assert response.headers["stream-next-offset"] == tail
    # Before the tail: the final data at once, marked closed (it reaches the end).
    start = time.monotonic()
    response = await client.get(path, params={"offset": first, "live": "long-poll"})
    assert time.monotonic() - start < LONG_POLL_S
    assert response.status_code == 200 and response.content == b"b"
    assert response.headers["stream-closed"] == "true"
    assert await never_waited(redis_client, path)


async def test_a_waiting_long_poll_sees_the_close(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, path: str
) -> None:
    tail = await create(client, path, b"x")
    poll = asyncio.create_task(client.get(path, params={"offset": tail, "live": "long-poll"}))
    await parked(redis_client, path)
    sent = time.monotonic()
    await client.post(path, headers={"Stream-Closed": "true"})
    response = await poll
    assert time.monotonic() - sent < LONG_POLL_S, "woken, not timed out"
    assert response.status_code == 204
    assert response.headers["stream-closed"] == "true"
    assert response.headers["stream-next-offset"] == tail


async def test_a_waiting_long_poll_of_a_deleted_stream_ends(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, path: str
) -> None:
    tail = await create(client, path, b"x")
    poll = asyncio.create_task(client.get(path, params={"offset": tail, "live": "long-poll"}))
    await parked(redis_client, path)
    sent = time.monotonic()
    assert (await client.delete(path)).status_code == 204
    response = await poll
    assert time.monotonic() - sent < LONG_POLL_S, "woken, not timed out"
    assert response.status_code == 404


async def _raw_long_poll(
    port: int, path: str, offset: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /v1/stream/{path}?offset={offset}&live=long-poll HTTP/1.1\r\n"
        "Host: t\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    return reader, writer


async def test_many_concurrent_long_polls_all_receive_one_append(
    gateway_server: GatewayServer, redis_client: aioredis.Redis, path: str
) -> None:
    """200 readers on the session gateway (3 s long-poll) share one subscription
    and all get the one append. (Raw sockets: httpx's pool is slow at 200.)"""
    async with httpx.AsyncClient(base_url=f"{gateway_server.url}/v1/stream/", timeout=10) as client:
        tail = await create(client, path, b"", "application/json")
        await redis_client.config_resetstat()

        async def all_first_reads_done() -> bool:
            return await _scripts_run(redis_client) >= 200

        conns = await asyncio.gather(
            *(_raw_long_poll(gateway_server.port, path, tail) for _ in range(200))
        )
        try:
            await parked(redis_client, path)
            # Every reader after the first captures the wake-up before its first
            # read, so once all 200 first reads ran, all 200 wait.
            await eventually(all_first_reads_done, what="200 first reads")
            new_tail = await append(client, path, b'{"to":"everyone"}', "application/json")
            responses = await asyncio.wait_for(
                asyncio.gather(*(read_response(reader) for reader, _ in conns)), 30
            )
        finally:
            for _, writer in conns:
                writer.close()
            await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    # Nobody answered early (a 204 would be the first response read): all got the data.
    assert [status for status, _, _, _ in responses] == [200] * 200
    assert {body for _, _, body, _ in responses} == {b'[{"to":"everyone"}]'}
    assert {h["stream-next-offset"] for _, h, _, _ in responses} == {new_tail}
    # One subscription for all of them.
    channel = f"ds:{{{path}}}:wake"
    assert dict(await redis_client.pubsub_numsub(channel))[channel.encode()] == 1


# -- SSE ----------------------------------------------------------------------------------------


async def test_sse_text_events_and_closure(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, path: str
) -> None:
    tail = await create(client, path, b"hello\nworld", "text/plain; charset=utf-8")
    async with client.stream("GET", path, params=sse_params("-1")) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "stream-sse-data-encoding" not in response.headers
        sse = SSE(response)

        data = await sse.next_event()
        assert (data.type, data.data) == ("data", "hello\nworld")
        control = await sse.next_event()
        assert control.type == "control"
        assert control.json() == {
            "streamNextOffset": tail,
            "upToDate": True,
            "streamCursor": control.json()["streamCursor"],
        }
        assert control.json()["streamCursor"].isdigit()

        await parked(redis_client, path)
        # Leading spaces, CRLF and a lone CR survive the SSE framing.
        tail = await append(client, path, b"  indented\r\nnext\rlast", "text/plain")
        data = await sse.next_event()
        assert (data.type, data.data) == ("data", "  indented\nnext\nlast")
        control = await sse.next_event()
        assert control.json()["streamNextOffset"] == tail and control.json()["upToDate"]

        closed = await client.post(path, headers={"Stream-Closed": "true"})
        final = await sse.next_event()
        assert final.type == "control"
        assert final.json() == {
            "streamNextOffset": closed.headers["stream-next-offset"],
            "streamClosed": True,
            "upToDate": True,
        }
        # The server closes the connection after the final control event.
        assert await asyncio.wait_for(sse.next(), 1) is None


async def test_sse_on_a_closed_stream_at_its_tail(client: httpx.AsyncClient, path: str) -> None:
    tail = await create(client, path, b"done", **{"Stream-Closed": "true"})
    for offset in (tail, "now"):
        start = time.monotonic()
        async with client.stream("GET", path, params=sse_params(offset)) as response:
            sse = SSE(response)
            event = await sse.next_event()
            assert event.json() == {
                "streamNextOffset": tail,
                "streamClosed": True,
                "upToDate": True,
            }
            assert await sse.next() is None
        assert time.monotonic() - start < SSE_MAX_S, "closed at once, not at the max duration"


async def test_sse_base64_for_binary_streams(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, path: str
) -> None:
    payload = bytes(range(256)) + b"\r\n\n\r\x00data: x\n\n"
    await create(client, path, payload, "application/octet-stream")
    async with client.stream("GET", path, params=sse_params("-1")) as response:
        assert response.headers["stream-sse-data-encoding"] == "base64"
        sse = SSE(response)
        data = await sse.next_event()
        assert data.type == "data"
        text = data.data.replace("\n", "").replace("\r", "")
        assert len(text) % 4 == 0
        assert base64.b64decode(text, validate=True) == payload
        await sse.next_event()  # control

        await parked(redis_client, path)
        await append(client, path, b"\xff\xfe", "application/octet-stream")
        data = await sse.next_event()
        assert base64.b64decode(data.data, validate=True) == b"\xff\xfe"
        control = await sse.next_event()
        assert control.type == "control" and "streamNextOffset" in control.json()


async def test_sse_json_events_are_arrays(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, path: str
) -> None:
    await create(client, path, b'[{"n":1},{"n":2}]', "application/json")
    async with client.stream("GET", path, params=sse_params("-1")) as response:
        assert "stream-sse-data-encoding" not in response.headers
        sse = SSE(response)
        data = await sse.next_event()
        assert json.loads(data.data) == [{"n": 1}, {"n": 2}]
        await sse.next_event()
        await parked(redis_client, path)
        await append(client, path, b'[{"n":3},["x","y\\nz"],"line\\u2028sep"]', "application/json")
        data = await sse.next_event()
        assert json.loads(data.data) == [{"n": 3}, ["x", "y\nz"], "line\u2028sep"]


async def test_sse_sends_keep_alive_comments_while_idle(
    client: httpx.AsyncClient, path: str
) -> None:
    tail = await create(client, path, b"x")
    comments: list[float] = []
    async with client.stream("GET", path, params=sse_params(tail)) as response:
        sse = SSE(response)
        opened = time.monotonic()
        first = await sse.next_event()
        assert first.type == "control" and first.json()["upToDate"]
        while (event := await sse.next()) is not None:
            assert event.type == "comment", event
            comments.append(event.at)
        closed_after = time.monotonic() - opened
    # One every 200 ms over a 1.5 s connection: at most 7 (the server's pace,
    # whatever the client's), and several even when the machine is slow.
    assert 3 <= len(comments) <= int(SSE_MAX_S / KEEPALIVE_S), comments
    # The idle connection still ends at DS_SSE_MAX_DURATION_MS (not before it).
    assert SSE_MAX_S - 0.1 < closed_after < SSE_MAX_S + 10, closed_after


async def test_sse_connections_end_after_max_duration_and_resume_without_loss(
    client: httpx.AsyncClient, path: str
) -> None:
    """A writer appends a numbered message every 20 ms while a reader follows the
    stream over several SSE connections, each closed by the server after 1.5 s;
    the reader resumes from the last control event's streamNextOffset and must
    see every message exactly once, in order."""
    await create(client, path, b"", "application/json")
    total = 150  # ~3 s of appends: at least two connection lifetimes

    async def writer() -> None:
        for i in range(total):
            await append(client, path, json.dumps({"i": i}).encode(), "application/json")
            await asyncio.sleep(0.02)  # the pace of the producer, not a wait

    writing = asyncio.create_task(writer())
    received: list[int] = []
    durations: list[float] = []
    offset = "-1"
    for _ in range(10):
        opened = time.monotonic()
        last: Event | None = None
        async with client.stream("GET", path, params=sse_params(offset)) as response:
            assert response.status_code == 200
            sse = SSE(response)
            while (event := await sse.next()) is not None:
                if event.type == "data":
                    received += [m["i"] for m in json.loads(event.data)]
                if event.type != "comment":
                    last = event
        durations.append(time.monotonic() - opened)
        assert last is not None and last.type == "control", "must end on a control event"
        offset = last.json()["streamNextOffset"]
        if writing.done() and len(received) >= total:
            break
    await writing
    assert received == list(range(total))
    assert len(durations) >= 2
    for duration in durations[:-1]:
        assert SSE_MAX_S - 0.1 < duration < SSE_MAX_S + 10, durations
