"""Bad input over a real socket: every malformed request gets a 4xx with a short
text reason, writes nothing, and never turns into a 500.

The module runs its own gateway (hypercorn, the console script's own server, granian
RSGI, granian ASGI in turn) with a 1 KiB body limit against the
session redis-server; "writes nothing" is checked by comparing a snapshot of
every key in Redis before and after, and every test ends by checking that the
gateway logged no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from support.gateway_server import GatewayServer
from support.live import parked, released_by_server
from support.raw_http import read_response

pytestmark = pytest.mark.timeout(60)

MAX_BODY = 1024
ZERO = "0" * 16 + "_" + "0" * 16


@pytest.fixture(
    scope="module",
    params=["hypercorn", "console-script", "console-script-rsgi", "console-script-asgi"],
)
def gw(request: pytest.FixtureRequest, redis_url: str) -> Iterator[GatewayServer]:
    """Every case runs against each way of serving the app: hypercorn (ASGI), the
    console script's own server (its default), granian over RSGI and over ASGI."""
    env = {"DS_MAX_BODY_BYTES": str(MAX_BODY), "DS_LONG_POLL_TIMEOUT_MS": "1000"}
    with GatewayServer(redis_url=redis_url, env=env, server=request.param) as server:
        yield server


@pytest.fixture(autouse=True)
def no_tracebacks(gw: GatewayServer) -> Iterator[None]:
    """Whatever a test sends, the gateway must not log an unhandled error."""
    with open(gw.log_path, "rb") as log:
        log.seek(0, 2)
        start = log.tell()
    yield
    with open(gw.log_path, "rb") as log:
        log.seek(start)
        new = log.read().decode("utf-8", "replace")
    assert "Traceback" not in new and "unhandled error" not in new, new[-4000:]


@pytest.fixture
async def client(gw: GatewayServer) -> AsyncIterator[httpx.AsyncClient]:
    # A new connection per request: connection reuse after an early error
    # response has its own test (test_keep_alive_survives_an_early_error_response).
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=f"{gw.url}/v1/stream/", timeout=5, limits=limits) as c:
        yield c


async def snapshot(r: aioredis.Redis) -> dict[bytes, Any]:
    """Every key and its content (the whole visible state of every stream)."""
    state: dict[bytes, Any] = {}
    for key in sorted(await r.keys("*")):
        kind = await r.type(key)
        if kind == b"hash":
            state[key] = await r.hgetall(key)
        elif kind == b"stream":
            state[key] = await r.xrange(key)
        else:
            state[key] = kind
        state[key + b" ttl"] = await r.pttl(key) > 0
    return state


def assert_rejected(response: httpx.Response, *statuses: int) -> None:
    """A 4xx (one of ``statuses``) with a short, one-line, plain-text reason."""
    expected = statuses or (400,)
    assert response.status_code in expected, (
        f"{response.request.method} {response.request.url} -> {response.status_code} "
        f"{response.text!r}, expected {expected}"
    )
    if response.request.method == "HEAD":
        return
    assert response.headers["content-type"].startswith("text/plain")
    reason = response.text.strip()
    assert reason and len(reason) < 200 and "\n" not in reason, repr(response.text)


def utf8(headers: dict[str, str]) -> dict[str, bytes]:
    """Header values as UTF-8 bytes (httpx refuses non-ASCII str values)."""
    return {name: value.encode("utf-8") for name, value in headers.items()}


async def make_stream(
    client: httpx.AsyncClient, path: str, body: bytes = b"hello", content_type: str = "text/plain"
) -> str:
    r = await client.put(path, content=body, headers={"Content-Type": content_type})
    assert r.status_code == 201, r.text
    return r.headers["stream-next-offset"]


# -- offsets (section 8) --------------------------------------------------------------

BAD_OFFSETS = [
    "$",
    "+",
    "-",
    ">",
    "*",
    "0-0",
    "0",
    "1",
    "-2",
    "",
    " ",
    "NOW",
    "Now",
    "now ",
    " now",
    "-1 ",
    " -1",
    ZERO + " ",
    " " + ZERO,
    ZERO + "\n",
    "0" * 17 + "_" + "0" * 16,  # 17-digit parts
    "0" * 16 + "_" + "0" * 17,
    "9" * 20 + "_" + "0" * 16,
    "0" * 15 + "_" + "0" * 16,
    "0" * 16 + "-" + "0" * 16,
    "0" * 16 + "_" + "0" * 15 + "x",
    "\uff10" * 16 + "_" + "\uff10" * 16,  # fullwidth digits
    "\u0660" * 16 + "_" + "\u0660" * 16,  # Arabic-Indic digits
    "\u00b9" * 16 + "_" + "0" * 16,  # superscript one (str.isdigit() says yes)
    ZERO + "," + ZERO,
    ZERO + "/x",
]


@pytest.mark.parametrize("offset", BAD_OFFSETS, ids=[repr(o) for o in BAD_OFFSETS])
async def test_malformed_offsets_are_rejected_in_every_read_mode(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, offset: str
) -> None:
    await make_stream(client, "off")
    before = await snapshot(redis_client)
    for live in (None, "long-poll", "sse"):
        params = {"offset": offset} if live is None else {"offset": offset, "live": live}
        response = await client.get("off", params=params)
        assert_rejected(response, 400)
        # A live read rejects at once instead of waiting: a 400 is decided before
        # any wait (a wait ends in a 204 or 200, after the 1 s long-poll timeout).
        assert "stream-next-offset" not in response.headers
    assert await snapshot(redis_client) == before


async def test_malformed_query_parameters(
    client: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    await make_stream(client, "q")
    before = await snapshot(redis_client)
    bad = [
        "offset=-1&offset=-1",  # repeated
        "offset=-1&live=poll",
        "offset=-1&live=SSE",
        "offset=-1&live=",
        "live=long-poll",  # live reads need an offset
        "live=sse",
        "offset=%ff%fe",  # not UTF-8
        "offset=" + "%00" * 3,
    ]
    for query in bad:
        assert_rejected(await client.get(f"q?{query}"), 400)
    # A garbage cursor is not an error: the server just mints a fresh one.
    cursors = ("abc", "\u00b2\u00b3", "9" * 40, "-5", "")
    polls = await asyncio.gather(
        *(
            client.get("q", params={"offset": "now", "live": "long-poll", "cursor": cursor})
            for cursor in cursors
        )
    )
    for cursor, r in zip(cursors, polls, strict=True):
        assert r.status_code == 204 and r.headers["stream-cursor"].isdigit(), (cursor, r)
    assert await snapshot(redis_client) == before


@pytest.mark.parametrize(
    "fork_offset", ["$", "-1", "now", "0", "0-0", ZERO + "x", "\uff10" * 16 + "_" + "0" * 16]
)
async def test_malformed_fork_offsets_create_nothing(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, fork_offset: str
) -> None:
    await make_stream(client, "fsrc")
    before = await snapshot(redis_client)
    r = await client.put(
        "fork", headers=utf8({"Stream-Forked-From": "fsrc", "Stream-Fork-Offset": fork_offset})
    )
    assert_rejected(r, 400)
    assert await snapshot(redis_client) == before  # no fork, no reference taken


@pytest.mark.parametrize(
    "sub",
    ["-1", "+1", "01", "1.0", "abc", "", "9007199254740992", "9" * 5000],
    ids=lambda sub: repr(sub[:24]),
)
async def test_malformed_fork_sub_offsets_create_nothing(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, sub: str
) -> None:
    await make_stream(client, "fsrc")
    before = await snapshot(redis_client)
    r = await client.put(
        "fork",
        headers={
            "Stream-Forked-From": "fsrc",
            "Stream-Fork-Offset": ZERO,
            "Stream-Fork-Sub-Offset": sub,
        },
    )
    assert_rejected(r, 400)
    assert await snapshot(redis_client) == before


# -- Stream-TTL and Stream-Expires-At (section 5.1) ------------------------------------------------

BAD_TTLS = [
    "-1",
    "+60",
    "060",
    "00",
    "1.5",
    "60.0",
    "1e3",
    "abc",
    "",
    "0x10",
    "60s",
    "60 60",
    "\uff16\uff10",
    "\u0666\u0660",
    "\u00b9",
    "99999999999999999999999",
    "9" * 5000,  # past the 4,300 digits int() converts
]
BAD_EXPIRES = [
    "tomorrow",
    "2030-01-01",
    "2030-01-01T00:00:00",
    "2030-01-01T00:00",
    "20300101T000000Z",
    "2030-13-01T00:00:00Z",
    "2030-02-30T00:00:00Z",
    "2030-01-01T25:00:00Z",
    "2030-01-01T00:00:00+25:00",
    "2030-01-01T00:00:00.Z",
    "1893456000",
    "",
    "\uff12\uff10\uff13\uff10-01-01T00:00:00Z",
    "2030-01-01T00:00:00Z2",
]


@pytest.mark.parametrize(
    "headers",
    [{"Stream-TTL": v} for v in BAD_TTLS]
    + [{"Stream-Expires-At": v} for v in BAD_EXPIRES]
    + [{"Stream-TTL": "60", "Stream-Expires-At": "2030-01-01T00:00:00Z"}],
    ids=[f"ttl={v[:24]!r}" for v in BAD_TTLS] + [f"exp={v!r}" for v in BAD_EXPIRES] + ["both"],
)
async def test_malformed_expiry_headers_create_nothing(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, headers: dict[str, str]
) -> None:
    await make_stream(client, "existing")
    before = await snapshot(redis_client)
    headers = {"Content-Type": "text/plain", **headers}
    assert_rejected(await client.put("new", content=b"x", headers=utf8(headers)), 400)
    # Nor may a bad header touch an existing stream of that path.
    assert_rejected(await client.put("existing", headers=utf8(headers)), 400)
    assert await snapshot(redis_client) == before
    assert (await client.head("new")).status_code == 404


# -- producer headers (section 5.2.1) --------------------------------------------------------------

BAD_PRODUCERS = [
    {"Producer-Id": "p"},
    {"Producer-Id": "p", "Producer-Epoch": "0"},
    {"Producer-Id": "p", "Producer-Seq": "0"},
    {"Producer-Epoch": "0", "Producer-Seq": "0"},
    {"Producer-Seq": "0"},
    *(
        {"Producer-Id": "p", "Producer-Epoch": v, "Producer-Seq": "0"}
        for v in ("a", "1.5", "-1", "01", "+1", "1e3", "", "9007199254740992", "\uff11", "9" * 5000)
    ),
    *(
        {"Producer-Id": "p", "Producer-Epoch": "0", "Producer-Seq": v}
        for v in ("a", "0.0", "-1", "00", "9007199254740992", "18446744073709551616", "9" * 5000)
    ),
    {"Producer-Id": "", "Producer-Epoch": "0", "Producer-Seq": "0"},
    {"Producer-Id": "x" * 257, "Producer-Epoch": "0", "Producer-Seq": "0"},
]


@pytest.mark.parametrize("headers", BAD_PRODUCERS, ids=[str(h)[:60] for h in BAD_PRODUCERS])
async def test_malformed_producer_headers_write_nothing(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, headers: dict[str, str]
) -> None:
    await make_stream(client, "prod")
    before = await snapshot(redis_client)
    r = await client.post(
        "prod", content=b"data", headers=utf8({"Content-Type": "text/plain", **headers})
    )
    assert_rejected(r, 400)
    # Also as a close: a malformed producer must not close the stream.
    r = await client.post("prod", headers=utf8({"Stream-Closed": "true", **headers}))
    assert_rejected(r, 400)
    assert await snapshot(redis_client) == before


async def test_largest_safe_producer_values_are_accepted(client: httpx.AsyncClient) -> None:
    await make_stream(client, "maxprod")
    big = str(2**53 - 1)
    r = await client.post(
        "maxprod",
        content=b"x",
        headers={
            "Content-Type": "text/plain",
            "Producer-Id": "p",
            "Producer-Epoch": big,
            "Producer-Seq": "0",
        },
    )
    assert r.status_code == 200 and r.headers["producer-epoch"] == big


async def test_other_malformed_headers_write_nothing(
    client: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    await make_stream(client, "hdr")
    before = await snapshot(redis_client)
    text = {"Content-Type": "text/plain"}
    cases = [
        ("post", {}, b"no content type"),  # a body needs a Content-Type
        ("post", {"Content-Type": "text"}, b"x"),
        ("post", {"Content-Type": "a b/c"}, b"x"),
        ("post", {**text, "Stream-Seq": ""}, b"x"),
        ("post", {**text, "Stream-Seq": "s" * 257}, b"x"),
        ("post", text, b""),  # an empty append
        ("post", {**text, "Stream-Closed": "false"}, b""),  # ... even with a non-true close
        ("put", {"Content-Type": "/json"}, b""),
        ("put", {"Content-Type": "json"}, b""),
        ("put", {"Stream-Fork-Offset": ZERO}, b""),  # fork headers without a source
        ("put", {"Stream-Fork-Sub-Offset": "1"}, b""),
        ("put", {"Stream-Forked-From": ""}, b""),
        ("put", {"Stream-Forked-From": "/"}, b""),
    ]
    for method, headers, body in cases:
        path = "hdr" if method == "post" else "hdr-new"
        r = await client.request(method.upper(), path, content=body, headers=headers)
        assert_rejected(r, 400)
    assert await snapshot(redis_client) == before


# -- Stream-Closed values (section 4.1) -------------------------------------------------------


@pytest.mark.parametrize("value", ["false", "yes", "1", "", "no", "true1", "truee", "t", "0"])
async def test_non_true_stream_closed_values_are_ignored(
    client: httpx.AsyncClient, value: str
) -> None:
    r = await client.put("sc", headers={"Content-Type": "text/plain", "Stream-Closed": value})
    assert r.status_code == 201 and "stream-closed" not in r.headers
    r = await client.post(
        "sc", content=b"more", headers={"Content-Type": "text/plain", "Stream-Closed": value}
    )
    assert r.status_code == 204 and "stream-closed" not in r.headers
    head = await client.head("sc")
    assert head.status_code == 200 and "stream-closed" not in head.headers
    assert (await client.get("sc", params={"offset": "-1"})).text == "more"
    # The stream is still open: it takes another append.
    r = await client.post("sc", content=b"!", headers={"Content-Type": "text/plain"})
    assert r.status_code == 204
    await client.delete("sc")


@pytest.mark.parametrize("value", ["true", "TRUE", "True", "tRuE"])
async def test_true_in_any_case_closes(client: httpx.AsyncClient, value: str) -> None:
    await make_stream(client, "tc")
    r = await client.post("tc", headers={"Stream-Closed": value})
    assert r.status_code == 204 and r.headers["stream-closed"] == "true"
    await client.delete("tc")


# -- JSON mode (section 9.1) ---------------------------------------------------------------------

INVALID_JSON = [
    b"{",
    b"[1,",
    b"]",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"[NaN]",
    b"{'a': 1}",
    b"undefined",
    b" ",
    b"\n\t",
    b"\xff\xfe",
    b"[1] [2]",
    b"{}{}",
    b'{"a":}',
    b'"\\x"',
    b"01",
    b"1.",
    b".5",
    b"+1",
    b"tru",
    b'{"a" 1}',
    b"[1,]",
    b'{"a":1,}',
    b"\x00",
    b'"unterminated',
    b"[" * 100_000,  # deeper than any parser allows
]
EMPTY_ARRAYS = [b"[]", b"[ ]", b" [\n] "]


@pytest.mark.parametrize(
    "body", INVALID_JSON + EMPTY_ARRAYS, ids=[repr(b[:20]) for b in INVALID_JSON + EMPTY_ARRAYS]
)
async def test_invalid_json_and_empty_arrays_append_nothing(
    gw: GatewayServer, redis_client: aioredis.Redis, body: bytes
) -> None:
    # A body limit big enough for the deep-nesting case is not needed: over the
    # limit is 413, which is also a rejection that writes nothing.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=f"{gw.url}/v1/stream/", timeout=5, limits=limits
    ) as client:
        await make_stream(client, "js", b'[{"a":1}]', "application/json")
        before = await snapshot(redis_client)
        r = await client.post("js", content=body, headers={"Content-Type": "application/json"})
        assert_rejected(r, 400, 413)
        if len(body) <= MAX_BODY:
            assert r.status_code == 400
        assert await snapshot(redis_client) == before
        # A new JSON stream with that body is not created (an empty array is fine, though).
        r = await client.put("js-new", content=body, headers={"Content-Type": "application/json"})
        if body in EMPTY_ARRAYS:
            assert r.status_code == 201
            assert (await client.get("js-new", params={"offset": "-1"})).json() == []
        else:
            assert_rejected(r, 400, 413)
            assert (await client.head("js-new")).status_code == 404


async def test_valid_json_is_stored_exactly(client: httpx.AsyncClient) -> None:
    await make_stream(client, "exact", b"[]", "application/json")
    body = (
        b"[123456789012345678901234567890, -98765432109876543210, 1e400, 0.1, "
        b'"\\ud800", "\\u0000", {"k": [1, 2.50, -0.0]}, 9007199254740993]'
    )
    r = await client.post("exact", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 204, r.text
    got = (await client.get("exact", params={"offset": "-1"})).content
    parsed = json.loads(got, parse_float=Decimal, parse_int=int)
    assert parsed == [
        123456789012345678901234567890,
        -98765432109876543210,
        Decimal("1e400"),
        Decimal("0.1"),
        "\ud800",
        "\u0000",
        {"k": [1, Decimal("2.5"), Decimal("-0.0")]},
        9007199254740993,
    ]


# -- body size (DS_MAX_BODY_BYTES=1024) -------------------------------------------------------


async def _chunks(total: int, size: int = 256) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield b"c" * n
        sent += n


async def test_bodies_over_the_limit_are_413(
    client: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    await make_stream(client, "big", b"")
    before = await snapshot(redis_client)
    text = {"Content-Type": "text/plain"}

    r = await client.post("big", content=b"x" * (MAX_BODY + 1), headers=text)
    assert_rejected(r, 413)
    r = await client.post("big", content=_chunks(MAX_BODY + 1), headers=text)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_rejected(r, 413)
    r = await client.post("big", content=_chunks(2 * MAX_BODY), headers=text)
    assert_rejected(r, 413)
    r = await client.put("big-new", content=b"x" * (MAX_BODY + 1), headers=text)
    assert_rejected(r, 413)
    r = await client.put("big-new", content=_chunks(MAX_BODY + 1), headers=text)
    assert_rejected(r, 413)
    r = await client.post(
        "big", content=b"x" * (MAX_BODY + 1), headers={**text, "Stream-Closed": "true"}
    )
    assert_rejected(r, 413)
    assert await snapshot(redis_client) == before
    assert (await client.head("big-new")).status_code == 404
    assert "stream-closed" not in (await client.head("big")).headers

    # Exactly at the limit is fine, with and without Content-Length.
    assert (await client.post("big", content=b"y" * MAX_BODY, headers=text)).status_code == 204
    assert (await client.post("big", content=_chunks(MAX_BODY), headers=text)).status_code == 204
    read = await client.get("big", params={"offset": "-1"})
    assert read.content == b"y" * MAX_BODY + b"c" * MAX_BODY


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_a_large_chunked_body_over_the_limit_gets_413_not_a_reset(
    gw: GatewayServer, redis_client: aioredis.Redis, method: str
) -> None:
    """A client streaming 64 KiB (chunked) to a 1 KiB limit must be told 413.
    Rejecting mid-body and closing the connection with the rest of the body
    unread makes the kernel reset it, and the client never sees the 413."""
    async with httpx.AsyncClient(base_url=f"{gw.url}/v1/stream/", timeout=5) as client:
        await make_stream(client, "chunked", b"")
    before = await snapshot(redis_client)
    outcomes = []
    for _ in range(3):
        async with httpx.AsyncClient(base_url=f"{gw.url}/v1/stream/", timeout=5) as client:
            try:
                r = await client.request(
                    method,
                    "chunked" if method == "POST" else "chunked-new",
                    content=_chunks(64 * MAX_BODY),
                    headers={"Content-Type": "text/plain"},
                )
                outcomes.append(r.status_code)
            except httpx.TransportError as exc:
                outcomes.append(type(exc).__name__)
    assert await snapshot(redis_client) == before
    assert outcomes == [413, 413, 413]


# -- methods and paths -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PATCH", "TRACE", "PROPFIND", "MKCOL", "COPY", "FOO", "LINK"])
async def test_unknown_methods_get_405_with_allow(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, method: str
) -> None:
    await make_stream(client, "m")
    before = await snapshot(redis_client)
    for path in ("m", "not-there"):
        r = await client.request(
            method, path, content=b"payload", headers={"Content-Type": "text/plain"}
        )
        assert_rejected(r, 405)
        allowed = {m.strip() for m in r.headers["allow"].split(",")}
        assert allowed == {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"}
    assert await snapshot(redis_client) == before


@pytest.mark.parametrize(
    "path", ["__ds", "__ds/subscriptions/sub-1", "__ds/subscriptions", "__ds/keys/x"]
)
async def test_reserved_ds_paths_are_not_streams(
    client: httpx.AsyncClient, redis_client: aioredis.Redis, path: str
) -> None:
    for method, body in (
        ("PUT", b"x"),
        ("POST", b"x"),
        ("GET", b""),
        ("DELETE", b""),
        ("HEAD", b""),
    ):
        r = await client.request(method, path, content=body, headers={"Content-Type": "text/plain"})
        assert_rejected(r, 404, 501)
    r = await client.get(path, params={"offset": "-1", "live": "long-poll"})
    assert_rejected(r, 404, 501)
    assert await redis_client.keys("*") == []


async def _raw_request(gw: GatewayServer, method: str, target: str) -> tuple[int, bytes]:
    """Send a request line exactly as given (httpx would normalise the path)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
            f"Content-Length: 1\r\nConnection: close\r\n\r\nx".encode("latin-1")
        )
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


BAD_PATHS = [
    "/v1/stream/a/../b",
    "/v1/stream/../b",
    "/v1/stream/a/..",
    "/v1/stream/./a",
    "/v1/stream/a/./b",
    "/v1/stream/a//b",
    "/v1/stream//a",
    "/v1/stream/a/",
    "/v1/stream/",
    "/v1/stream/%2e%2e/b",
    "/v1/stream/a/%2E%2E/b",
    "/v1/stream/a%2F..%2Fb",
    "/v1/stream/a%2F%2Fb",
    "/v1/stream/%00",
    "/v1/stream/a%0Ab",
    "/v1/stream/a%7Fb",
    "/v1/stream/" + "p" * 1100,
    "/v1/streamx",
    "/v2/stream/a",
    "/",
]


@pytest.mark.parametrize("target", BAD_PATHS, ids=[p[:40] for p in BAD_PATHS])
async def test_bad_paths_are_404_and_create_nothing(
    gw: GatewayServer, redis_client: aioredis.Redis, target: str
) -> None:
    for method in ("PUT", "POST", "GET"):
        status, body = await _raw_request(gw, method, target)
        assert status == 404, (method, target, status, body)
        assert body.strip() and len(body) < 200
    assert await redis_client.keys("*") == []


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status, headers, body, _ = await asyncio.wait_for(read_response(reader), 5)
    return status, headers, body


EARLY_ERRORS = [
    ("PUT", "/v1/stream/ka-ttl", "Stream-TTL: abc\r\n", 400),
    ("POST", "/v1/stream/ka-prod", "Producer-Id: p\r\n", 400),
    ("PATCH", "/v1/stream/ka-method", "", 405),
    ("PUT", "/v1/stream/ka/../x", "", 404),
]


@pytest.mark.parametrize(
    "method,target,extra,status", EARLY_ERRORS, ids=[f"{m}-{s}" for m, _, _, s in EARLY_ERRORS]
)
async def test_keep_alive_survives_an_early_error_response(
    gw: GatewayServer, method: str, target: str, extra: str, status: int
) -> None:
    """A client that sends its headers, gets an error before it sent the body,
    then sends the body it announced and its next request on the same
    connection must get an answer -- unless the error said ``Connection: close``
    (RFC 9112 section 9.6). Many clients write headers and body separately."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
            f"{extra}Content-Length: 5\r\n\r\n".encode()
        )
        await writer.drain()
        got, headers, _ = await _read_response(reader)
        assert got == status
        if "close" in headers.get("connection", "").lower():
            return  # the client was told not to reuse the connection: fine
        writer.write(b"hello" + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
        try:
            second, _, body = await _read_response(reader)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            pytest.fail(
                f"the connection was dropped without 'Connection: close' "
                f"after the {status}: {exc!r}"
            )
        assert (second, body) == (200, b"ok\n")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_percent_encoded_paths_never_500(gw: GatewayServer) -> None:
    for target in (
        "/v1/stream/pe1-%ff",
        "/v1/stream/pe2-%c3%28",
        "/v1/stream/pe3-%e2%82",
        "/v1/stream/pe4-a%",
        "/v1/stream/pe5-a%zz",
        "/v1/stream/pe6-%F0%9F%92%A9",
    ):
        status, body = await _raw_request(gw, "PUT", target)
        assert status in (201, 400, 404), (target, status, body)


async def test_distinct_urls_never_share_a_stream(gw: GatewayServer) -> None:
    """Section 12.2: stream URLs are validated and sanitised. A path that is not
    valid UTF-8 once percent-decoded must be refused (or kept distinct), not
    folded into U+FFFD so that /x%ff, /x%fe and /x%EF%BF%BD are one stream."""
    status, _ = await _raw_request(gw, "PUT", "/v1/stream/alias-%ff")
    if status in (400, 404):
        return  # refused: fine
    assert status == 201
    for other in ("/v1/stream/alias-%fe", "/v1/stream/alias-%EF%BF%BD", "/v1/stream/alias-%80"):
        status, body = await _raw_request(gw, "GET", other)
        assert status in (400, 404), (
            f"GET {other} answered {status} {body!r}: it reads the stream created at "
            "/v1/stream/alias-%ff"
        )


@pytest.mark.parametrize("live", ["sse", "long-poll"])
async def test_readers_that_leave_are_not_errors(
    gw: GatewayServer, client: httpx.AsyncClient, redis_client: aioredis.Redis, live: str
) -> None:
    """A live reader whose client hung up gets its data written to a closed
    connection: that ends the request quietly (no traceback in the log, checked
    by the autouse fixture) and the stream goes on serving everyone else.

    The log is checked only after the server closed its side of the departed
    connection (it is done with that request) and served another reader of the
    stream a later append."""
    name = f"leave-{live}-{time.monotonic_ns()}"
    offset = await make_stream(client, name)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        f"GET /v1/stream/{name}?offset={offset}&live={live} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    )
    await writer.drain()
    if live == "sse":
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
    await parked(redis_client, name)  # the reader waits
    client_port = writer.get_extra_info("sockname")[1]
    writer.close()
    await writer.wait_closed()
    r = await client.post(name, content=b"after", headers={"Content-Type": "text/plain"})
    assert r.status_code == 204
    # The reader wakes up and writes to the closed socket, and its request ends.
    await released_by_server(gw.port, client_port)
    tail = r.headers["stream-next-offset"]
    poll = asyncio.create_task(client.get(name, params={"offset": tail, "live": "long-poll"}))
    r = await client.post(name, content=b"later", headers={"Content-Type": "text/plain"})
    assert r.status_code == 204
    woken = await asyncio.wait_for(poll, 10)
    assert woken.status_code == 200 and woken.content == b"later"
    r = await client.get(name, params={"offset": offset})
    assert r.status_code == 200 and r.content == b"afterlater"
