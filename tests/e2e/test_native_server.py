"""The console script's own server (gateway/server.py, gateway/http1.py) over
HTTP/1.1, byte for byte: real loopback sockets, a real Redis.

What is checked here is the part of the server around the app: keep-alive and
``Connection: close``, HTTP/1.0, pipelining, chunked request bodies,
``Expect: 100-continue``, the limits on the request head, the keep-alive and
read timeouts, SSE framing, clients that leave, the connection limit, forked
workers and their stop, and a large response read slowly.

Three gateways serve the module: ``gw`` (short timeouts, shared by most tests),
``limited`` (``--max-connections 3``) and, for the one test that stops it,
``workers`` (``--workers 2``). Every test ends by checking that the gateways it
used logged no traceback and no error.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import os
import select
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from support.gateway_server import GatewayServer
from support.live import held_by_server, parked
from support.raw_http import read_response

pytestmark = pytest.mark.timeout(60)

KEEP_ALIVE_S = 1.0  # --keep-alive-timeout of `gw`
READ_TIMEOUT_S = 2.0  # --read-timeout of `gw`
SWEEP_S = 1.0  # the server checks deadlines once a second
MAX_READ = 8 * 1024 * 1024  # DS_MAX_READ_BYTES of `gw`: a 4 MiB append is one page
ALLOW = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
PLAIN = "text/plain; charset=utf-8"


# -- gateways ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(redis_url: str) -> Iterator[GatewayServer]:
    env = {
        "DS_MAX_READ_BYTES": str(MAX_READ),
        "DS_LONG_POLL_TIMEOUT_MS": "2000",
        # An idle SSE response writes a comment this often: a reader that left
        # is noticed at the next one.
        "DS_SSE_KEEPALIVE_MS": "200",
    }
    args = ["--keep-alive-timeout", f"{KEEP_ALIVE_S:g}", "--read-timeout", f"{READ_TIMEOUT_S:g}"]
    with GatewayServer(redis_url=redis_url, env=env, server="console-script", args=args) as server:
        yield server


@pytest.fixture(scope="module")
def limited(redis_url: str) -> Iterator[GatewayServer]:
    args = ["--max-connections", "3", "--keep-alive-timeout", "10"]
    with GatewayServer(redis_url=redis_url, server="console-script", args=args) as server:
        yield server


@pytest.fixture
def workers(redis_url: str) -> Iterator[GatewayServer]:
    env = {"DS_LONG_POLL_TIMEOUT_MS": "30000"}
    args = ["--workers", "2"]
    with GatewayServer(redis_url=redis_url, env=env, server="console-script", args=args) as server:
        yield server


def _log_size(server: GatewayServer) -> int:
    return os.path.getsize(server.log_path)


@pytest.fixture(autouse=True)
def clean_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Whatever a test sends, the gateways it used log no traceback and no error."""
    servers = [
        request.getfixturevalue(name)
        for name in ("gw", "limited", "workers")
        if name in request.fixturenames
    ]
    marks = [_log_size(server) for server in servers]
    yield
    for server, mark in zip(servers, marks, strict=True):
        with open(server.log_path, "rb") as log:
            log.seek(mark)
            new = log.read().decode("utf-8", "replace")
        assert "Traceback" not in new and "[ERROR]" not in new, new[-4000:]


@pytest.fixture
async def http(gw: GatewayServer) -> AsyncIterator[httpx.AsyncClient]:
    """For set-up and checks: a new connection per request, so that no request
    meets a keep-alive connection the server is closing (the timeout is 1 s)."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=f"{gw.url}/v1/stream/", timeout=10, limits=limits
    ) as client:
        yield client


# -- helpers -------------------------------------------------------------------------


def unique(name: str) -> str:
    return f"native-{name}-{time.monotonic_ns()}"


@contextlib.asynccontextmanager
async def connect(
    server: GatewayServer, *, rcvbuf: int | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    if rcvbuf is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def response(
    reader: asyncio.StreamReader, within: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    status, headers, body, _ = await asyncio.wait_for(read_response(reader), within)
    return status, headers, body


async def head_lines(reader: asyncio.StreamReader) -> tuple[bytes, list[tuple[str, str]]]:
    """The status line and every header line as sent (repeats kept)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, *lines = head[:-4].split(b"\r\n")
    pairs = []
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        pairs.append((name.strip().lower(), value.strip()))
    return status, pairs


async def assert_closed_by_server(reader: asyncio.StreamReader, within: float = 2.0) -> None:
    """Nothing more arrives, and the server closes the connection."""
    rest = await asyncio.wait_for(reader.read(), within)
    assert rest == b"", rest[:200]


def request(
    method: str, target: str, *headers: str, body: bytes = b"", version: str = "1.1"
) -> bytes:
    """A request as bytes; ``Content-Length`` is added for a body."""
    lines = [f"{method} {target} HTTP/{version}", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def wait_released(port: int, client_port: int | None, within: float) -> float:
    """Seconds until the server closed the client's connection (every connection
    when ``client_port`` is None); fails after ``within``."""
    start = time.monotonic()
    while (held := held_by_server(port)) and (client_port is None or client_port in held):
        if time.monotonic() - start > within:
            pytest.fail(f"the server still holds {held} after {within} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def create(http: httpx.AsyncClient, name: str, body: bytes = b"", **headers: str) -> str:
    r = await http.put(name, content=body, headers={"content-type": "text/plain", **headers})
    assert r.status_code == 201, r.text
    return r.headers["stream-next-offset"]


async def read_all(http: httpx.AsyncClient, name: str) -> tuple[bytes, str]:
    r = await http.get(name, params={"offset": "-1"})
    assert r.status_code == 200, r.text
    return r.content, r.headers["stream-next-offset"]


# -- 1. keep-alive -------------------------------------------------------------------


async def test_keep_alive_answers_requests_in_order(gw: GatewayServer) -> None:
    name = unique("ka")
    path = f"/v1/stream/{name}"
    async with connect(gw) as (reader, writer):
        writer.write(request("PUT", path, "Host: t", "Content-Type: text/plain", body=b"one"))
        status, headers, body = await response(reader)
        assert (status, body) == (201, b"")
        assert headers["location"] == f"http://t{path}"
        assert headers["content-length"] == "0"
        assert "connection" not in headers
        sent_at = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
        assert abs(sent_at - time.time()) < 3
        created = headers["stream-next-offset"]

        writer.write(request("POST", path, "Host: t", "Content-Type: text/plain", body=b"two"))
        status, headers, body = await response(reader)
        assert (status, body) == (204, b"")
        assert "content-length" not in headers and "connection" not in headers
        tail = headers["stream-next-offset"]
        assert tail > created

        writer.write(request("GET", f"{path}?offset=-1", "Host: t"))
        status, headers, body = await response(reader)
        assert (status, body) == (200, b"onetwo")
        assert headers["content-length"] == "6"
        assert headers["stream-next-offset"] == tail
        assert headers["stream-up-to-date"] == "true"

        writer.write(request("HEAD", path, "Host: t"))
        status, headers, body = await response(reader)
        assert (status, body) == (200, b"")
        assert headers["stream-next-offset"] == tail
        assert "content-length" not in headers

        writer.write(request("GET", "/healthz", "Host: t"))
        assert (await response(reader))[::2] == (200, b"ok\n")


async def test_connection_close_ends_the_connection_after_its_response(
    gw: GatewayServer,
) -> None:
    async with connect(gw) as (reader, writer):
        writer.write(request("GET", "/healthz", "Host: t"))
        status, headers, body = await response(reader)
        assert (status, body) == (200, b"ok\n")
        assert "connection" not in headers
        writer.write(request("GET", "/healthz", "Host: t", "Connection: close"))
        status, lines = await head_lines(reader)
        assert status == b"HTTP/1.1 200 OK"
        assert [v for n, v in lines if n == "connection"] == ["close"]
        assert await reader.readexactly(3) == b"ok\n"
        await assert_closed_by_server(reader)


async def test_http10_closes_unless_asked_to_keep_alive(gw: GatewayServer) -> None:
    async with connect(gw) as (reader, writer):
        writer.write(request("GET", "/healthz", version="1.0"))
        status, lines = await head_lines(reader)
        assert status == b"HTTP/1.1 200 OK"
        assert [v for n, v in lines if n == "connection"] == ["close"]
        assert dict(lines)["content-length"] == "3"
        assert await reader.readexactly(3) == b"ok\n"
        await assert_closed_by_server(reader)

    async with connect(gw) as (reader, writer):
        for _ in range(3):
            writer.write(request("GET", "/healthz", "Connection: keep-alive", version="1.0"))
            status, headers, body = await response(reader)
            assert (status, body) == (200, b"ok\n")
            # HTTP/1.0 closes by default: the response says it stays open.
            assert headers.get("connection") == "keep-alive"
        # Still open: a last request without keep-alive is answered, then it ends.
        writer.write(request("GET", "/healthz", version="1.0"))
        assert (await response(reader))[::2] == (200, b"ok\n")
        await assert_closed_by_server(reader)


async def test_half_closed_client_gets_its_responses_then_the_connection_ends(
    gw: GatewayServer,
) -> None:
    """A client that shuts down its sending side after its (pipelined) requests
    gets every response, then the server closes at once: nothing can follow, so
    there is nothing to keep the connection open for."""
    path = f"/v1/stream/{unique('half')}"
    async with connect(gw) as (reader, writer):
        writer.write(
            request("PUT", path, "Host: t", "Content-Type: text/plain", body=b"half")
            + request("GET", f"{path}?offset=-1", "Host: t")
        )
        writer.write_eof()
        assert (await response(reader))[::2] == (201, b"")
        status, headers, body = await response(reader)
        assert (status, body) == (200, b"half")
        assert "connection" not in headers
        await assert_closed_by_server(reader, within=KEEP_ALIVE_S / 2)


# -- 2. pipelining -------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(gw: GatewayServer) -> None:
    name = unique("pipe")
    path = f"/v1/stream/{name}"
    async with connect(gw) as (reader, writer):
        writer.write(
            request("PUT", path, "Host: t", "Content-Type: text/plain", body=b"first|")
            + request("POST", path, "Host: t", "Content-Type: text/plain", body=b"second")
            + request("GET", f"{path}?offset=-1", "Host: t")
        )
        created = await response(reader)
        appended = await response(reader)
        read = await response(reader)
        assert (created[0], created[2]) == (201, b"")
        assert created[1]["location"] == f"http://t{path}"
        assert (appended[0], appended[2]) == (204, b"")
        assert appended[1]["stream-next-offset"] > created[1]["stream-next-offset"]
        assert (read[0], read[2]) == (200, b"first|second")
        assert read[1]["stream-next-offset"] == appended[1]["stream-next-offset"]
        # The connection is still in step: one more request, one more answer.
        writer.write(request("GET", "/healthz", "Host: t"))
        assert (await response(reader))[::2] == (200, b"ok\n")


# -- 3. chunked request bodies -------------------------------------------------------


async def test_chunked_request_body_sent_with_pauses(
    gw: GatewayServer, http: httpx.AsyncClient
) -> None:
    name = unique("chunked")
    await create(http, name, b"<")
    payload = [b"he", b"llo, ", b"chunked \r\n", b"\x00\xff wor", b"ld>"]
    async with connect(gw) as (reader, writer):
        writer.write(
            f"POST /v1/stream/{name} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        for piece in payload:
            await asyncio.sleep(0.1)
            frame = b"%x\r\n%b\r\n" % (len(piece), piece)
            # Split each frame, the size line included, across two writes.
            writer.write(frame[:2])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(frame[2:])
            await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")
        status, headers, body = await response(reader)
        assert (status, body) == (204, b"")
        tail = headers["stream-next-offset"]
    assert await read_all(http, name) == (b"<" + b"".join(payload), tail)


# -- 4. Expect: 100-continue ---------------------------------------------------------


async def test_expect_100_continue_before_the_body_is_read(
    gw: GatewayServer, http: httpx.AsyncClient
) -> None:
    name = unique("expect")
    await create(http, name)
    async with connect(gw) as (reader, writer):
        writer.write(
            f"POST /v1/stream/{name} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
            "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert await asyncio.wait_for(reader.readexactly(len(CONTINUE)), 5) == CONTINUE
        writer.write(b"hello")
        status, headers, body = await response(reader)
        assert (status, body) == (204, b"")
        tail = headers["stream-next-offset"]
        # A second request on the connection, body sent at once: no 100 for it.
        writer.write(
            request(
                "POST",
                f"/v1/stream/{name}",
                "Host: t",
                "Content-Type: text/plain",
                "Expect: 100-continue",
                body=b"!",
            )
        )
        status, headers, body = await response(reader)
        assert (status, body) == (204, b"")
    assert await read_all(http, name) == (b"hello!", headers["stream-next-offset"])
    assert headers["stream-next-offset"] > tail


@pytest.mark.parametrize(
    "target,length,status,reason",
    [
        ("/not-a-stream", 5, 404, b"not found\n"),
        ("/v1/stream/expect-too-big", 17 * 1024 * 1024, 413, b"body larger than 16777216 bytes\n"),
    ],
    ids=["404-path", "413-declared-length"],
)
async def test_expect_100_continue_refused_on_headers_gets_no_100(
    gw: GatewayServer, target: str, length: int, status: int, reason: bytes
) -> None:
    async with connect(gw) as (reader, writer):
        writer.write(
            f"POST {target} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        got, headers, body = await response(reader)
        assert (got, body) == (status, reason)
        # The body was never read: the connection cannot carry another request.
        assert headers["connection"] == "close"
        await assert_closed_by_server(reader)


async def test_expect_100_continue_to_a_missing_stream(gw: GatewayServer) -> None:
    """The app reads the body before the store says the stream does not exist, so
    the client gets its 100 first, then the 404."""
    name = unique("missing")
    async with connect(gw) as (reader, writer):
        writer.write(
            f"POST /v1/stream/{name} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
            "Content-Length: 3\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert await asyncio.wait_for(reader.readexactly(len(CONTINUE)), 5) == CONTINUE
        writer.write(b"abc")
        status, headers, body = await response(reader)
        assert (status, body) == (404, b"stream not found\n")
        assert "connection" not in headers  # the body was read: the connection goes on
        writer.write(request("GET", "/healthz", "Host: t"))
        assert (await response(reader))[::2] == (200, b"ok\n")


# -- 5. limits on the request head ---------------------------------------------------

TLS_CLIENT_HELLO = bytes.fromhex("16030100c4010000c00303") + os.urandom(32) + b"\x00" * 16


# The header budget (64 KiB) counts the URL and every header name and value.
LARGEST_X_BIG = 64 * 1024 - len("/healthz") - len("host") - len("t") - len("x-big")


def _bad_requests() -> list[tuple[str, bytes, int, bytes, str | None]]:
    """(id, bytes sent, status, body, Allow)."""
    many = "".join(f"X-H{i}: v\r\n" for i in range(200))  # with Host: 201 headers
    return [
        (
            "http11-without-host",  # RFC 9112 section 3.2
            request("GET", "/healthz"),
            400,
            b"Host header required\n",
            None,
        ),
        (
            "url-over-16KiB",
            request("GET", "/v1/stream/" + "u" * 16 * 1024, "Host: t"),
            414,
            b"URL too long\n",
            None,
        ),
        (
            "header-over-64KiB",
            request("GET", "/healthz", "Host: t", "X-Big: " + "b" * (LARGEST_X_BIG + 1)),
            431,
            b"request headers too large\n",
            None,
        ),
        (
            "headers-over-64KiB",
            request("GET", "/healthz", "Host: t", *(f"X-H{i}: " + "b" * 1000 for i in range(70))),
            431,
            b"request headers too large\n",
            None,
        ),
        (
            "201-headers",
            b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + many.encode() + b"\r\n",
            431,
            b"too many request headers\n",
            None,
        ),
        ("tls-handshake", TLS_CLIENT_HELLO, 400, None, None),
        ("binary-garbage", b"\x00\x01\x02\x03\r\n\r\n", 400, None, None),
        ("no-target", b"GET\r\n\r\n", 400, None, None),
        (
            "bad-version",  # well-formed but unknown: 505 (tests/e2e/test_http1_abuse.py)
            b"GET /healthz HTTP/9.9\r\nHost: t\r\n\r\n",
            505,
            b"HTTP version not supported\n",
            None,
        ),
        (
            "malformed-version",
            b"GET /healthz HTTP/11.1\r\nHost: t\r\n\r\n",
            400,
            b"malformed HTTP/1.1 request: Expected dot\n",
            None,
        ),
        (
            "bad-header",
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n",
            400,
            b"malformed HTTP/1.1 request: Invalid header token\n",
            None,
        ),
        # Request smuggling: a body length given twice, or two ways.
        (
            "content-length-and-chunked",
            b"POST /v1/stream/x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            400,
            b"malformed HTTP/1.1 request: Transfer-Encoding can't be present with Content-Length\n",
            None,
        ),
        (
            "two-content-lengths",
            b"POST /v1/stream/x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
            b"Content-Length: 6\r\n\r\nhello!",
            400,
            b"malformed HTTP/1.1 request: Duplicate Content-Length\n",
            None,
        ),
        (
            "unknown-method",
            b"FOO /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
            405,
            b"method not allowed\n",
            ALLOW,
        ),
        (
            "lower-case-method",
            b"get /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
            405,
            b"method not allowed\n",
            ALLOW,
        ),
    ]


BAD_REQUESTS = _bad_requests()


@pytest.mark.parametrize(
    "data,status,reason,allow", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
async def test_bad_request_heads_are_refused_and_closed(
    gw: GatewayServer, data: bytes, status: int, reason: bytes | None, allow: str | None
) -> None:
    async with connect(gw) as (reader, writer):
        writer.write(data)
        got, headers, body = await response(reader)
        assert got == status, (got, body)
        assert headers["content-type"] == PLAIN
        assert headers["connection"] == "close"
        assert headers.get("allow") == allow
        if reason is not None:
            assert body == reason
        else:  # a short, one-line text reason
            assert body.endswith(b"\n") and b"\n" not in body[:-1] and 0 < len(body) < 120
        assert headers["content-length"] == str(len(body))
        await assert_closed_by_server(reader)


@pytest.mark.parametrize(
    "framing,body,reason",
    [
        (
            "Transfer-Encoding: chunked",
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"malformed HTTP/1.1 request: Invalid character in chunk size\n",
        ),
        (
            # (A coding other than chunked is refused on the head alone, with a
            # 501: tests/e2e/test_http1_abuse.py.)
            "Transfer-Encoding: chunked",
            b"1" + b"0" * 17 + b"\r\n",
            b"malformed HTTP/1.1 request: Chunk size overflow\n",
        ),
    ],
    ids=["bad-chunk-size", "chunk-size-overflow"],
)
async def test_unparsable_request_bodies_get_400_at_once(
    gw: GatewayServer, http: httpx.AsyncClient, framing: str, body: bytes, reason: bytes
) -> None:
    """The handler already has the request when its body turns out unparsable:
    the client still gets a 400 at once, not a silent close at the read timeout."""
    name = unique("bad-body")
    tail = await create(http, name, b"kept")
    async with connect(gw) as (reader, writer):
        start = time.monotonic()
        writer.write(
            f"POST /v1/stream/{name} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
            f"{framing}\r\n\r\n".encode()
            + body
        )
        status, headers, got = await response(reader)
        assert (status, got) == (400, reason)
        assert headers["connection"] == "close"
        await assert_closed_by_server(reader)
        assert time.monotonic() - start < READ_TIMEOUT_S / 2
    assert await read_all(http, name) == (b"kept", tail)


async def test_upgrade_requests_are_answered_then_closed(gw: GatewayServer) -> None:
    """No protocol switch on an HTTP/1.1 connection (h2c upgrades included): the
    request is answered, with ``Connection: close`` since the connection ends."""
    async with connect(gw) as (reader, writer):
        writer.write(
            request(
                "GET",
                "/healthz",
                "Host: t",
                "Connection: Upgrade, HTTP2-Settings",
                "Upgrade: h2c",
                "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
            )
        )
        status, headers, body = await response(reader)
        assert (status, body) == (200, b"ok\n")
        assert headers["connection"] == "close"
        await assert_closed_by_server(reader)


def _send_until_answered(port: int, head: bytes, filler: bytes, cap: int) -> tuple[bytes, int]:
    """Send ``head``, then ``filler`` again and again until the server answers
    (or ``cap`` bytes); return (every byte received, bytes of filler sent).

    A blocking socket: the server closes with our bytes unread, so its kernel
    resets the connection, and an asyncio stream would drop the answer it had
    buffered once it sees the reset; recv() returns queued bytes first."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent < cap and not select.select([sock], [], [], 0.001)[0]:
                sock.sendall(filler)
                sent += len(filler)
        received = b""
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(65536):
                received += chunk
    return received, sent


async def test_a_header_line_that_never_ends_gets_431(gw: GatewayServer) -> None:
    """The header limit holds for a line that never ends too, as it arrives:
    the server must not buffer it until the client stops."""
    received, sent = await asyncio.to_thread(
        _send_until_answered,
        gw.port,
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Endless: ",
        b"e" * 16 * 1024,
        8 * 1024 * 1024,
    )
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), received[:200]
    assert b"\r\nconnection: close\r\n" in head
    assert body == b"request headers too large\n"
    # Refused once the line passed the limit, not after megabytes.
    assert sent < 1024 * 1024, sent


async def test_largest_accepted_head(gw: GatewayServer) -> None:
    """Just within every limit: a 16 KiB URL, 200 headers, 64 KiB of headers."""
    async with connect(gw) as (reader, writer):
        url = "/v1/stream/" + "u" * (16 * 1024 - len("/v1/stream/"))
        writer.write(request("GET", url, "Host: t"))
        status, _, body = await response(reader)
        # The app's own limit on stream paths (1 KiB) answers, not the server's.
        assert (status, body) == (404, b"stream paths are limited to 1024 bytes\n")

        writer.write(request("GET", "/healthz", "Host: t", *(f"X-H{i}: v" for i in range(199))))
        assert (await response(reader))[::2] == (200, b"ok\n")

        writer.write(request("GET", "/healthz", "Host: t", "X-Big: " + "b" * LARGEST_X_BIG))
        assert (await response(reader))[::2] == (200, b"ok\n")


# -- 6. timeouts ---------------------------------------------------------------------


async def _closed_after(reader: asyncio.StreamReader) -> float:
    start = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    return time.monotonic() - start


async def test_idle_keep_alive_connections_are_closed(gw: GatewayServer) -> None:
    async def after_a_request() -> float:
        async with connect(gw) as (reader, writer):
            writer.write(request("GET", "/healthz", "Host: t"))
            assert (await response(reader))[::2] == (200, b"ok\n")
            return await _closed_after(reader)

    async def without_a_request() -> float:
        async with connect(gw) as (reader, _):
            return await _closed_after(reader)

    for waited in await asyncio.gather(after_a_request(), without_a_request()):
        assert KEEP_ALIVE_S - 0.1 < waited < KEEP_ALIVE_S + SWEEP_S + 0.5, waited


async def test_slow_requests_time_out(gw: GatewayServer, http: httpx.AsyncClient) -> None:
    name = unique("stalled")
    tail = await create(http, name, b"kept")

    async def half_a_request_line() -> float:
        async with connect(gw) as (reader, writer):
            writer.write(b"GET /heal")
            start = time.monotonic()
            status, headers, body = await response(reader, READ_TIMEOUT_S + SWEEP_S + 2)
            assert (status, body) == (408, b"request timeout\n")
            assert headers["connection"] == "close"
            assert headers["content-type"] == PLAIN
            await assert_closed_by_server(reader)
            return time.monotonic() - start

    async def half_a_body() -> float:
        async with connect(gw) as (reader, writer):
            writer.write(
                f"POST /v1/stream/{name} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
                "Content-Length: 10\r\n\r\n12345".encode()
            )
            # The handler has the request: the connection just ends, no response.
            return await _closed_after(reader)

    for waited in await asyncio.gather(half_a_request_line(), half_a_body()):
        assert READ_TIMEOUT_S - 0.1 < waited < READ_TIMEOUT_S + SWEEP_S + 0.5, waited
    assert await read_all(http, name) == (b"kept", tail)


# -- 7. SSE framing ------------------------------------------------------------------


async def _chunk(reader: asyncio.StreamReader) -> bytes:
    size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
    size = int(size_line[:-2], 16)
    data = await asyncio.wait_for(reader.readexactly(size + 2), 5)
    assert data[-2:] == b"\r\n", data[-10:]
    return data[:-2]


def _events(data: bytes) -> list[tuple[str, bytes]]:
    """(event type, data lines joined by LF) of complete events; comments skipped."""
    assert data.endswith(b"\n\n"), data
    out = []
    for block in data[:-2].split(b"\n\n"):
        kind, lines = "message", []
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                continue
            field, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if field == b"event":
                kind = value.decode()
            elif field == b"data":
                lines.append(value)
        if lines:
            out.append((kind, b"\n".join(lines)))
    return out


async def test_sse_over_http11_is_chunked(gw: GatewayServer, http: httpx.AsyncClient) -> None:
    name = unique("sse11")
    first = await create(http, name, b"hello\r\nworld")
    async with connect(gw) as (reader, writer):
        writer.write(request("GET", f"/v1/stream/{name}?offset=-1&live=sse", "Host: t"))
        status, lines = await head_lines(reader)
        headers = dict(lines)
        assert status == b"HTTP/1.1 200 OK"
        assert headers["transfer-encoding"] == "chunked"
        assert headers["content-type"] == "text/event-stream"
        assert "content-length" not in headers and "connection" not in headers

        events = _events(await _chunk(reader))
        assert events[0] == ("data", b"hello\nworld")
        kind, control = events[1]
        assert kind == "control" and len(events) == 2
        control = orjson.loads(control)
        assert control["streamNextOffset"] == first and control["upToDate"] is True

        r = await http.post(name, content=b"more", headers={"content-type": "text/plain"})
        tail = r.headers["stream-next-offset"]
        events = []
        while not any(kind == "data" for kind, _ in events):  # keep-alive comments meanwhile
            events += _events(await _chunk(reader))
        assert events[0] == ("data", b"more")
        assert orjson.loads(events[1][1])["streamNextOffset"] == tail

        r = await http.post(name, headers={"stream-closed": "true"})
        assert r.status_code == 204
        events = []
        while not events:
            events = _events(await _chunk(reader))
        assert events[0][0] == "control"
        assert orjson.loads(events[0][1]) == {
            "streamNextOffset": r.headers["stream-next-offset"],
            "streamClosed": True,
            "upToDate": True,
        }
        # The stream is closed: the last chunk ends the response, not the connection.
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"0\r\n\r\n"
        writer.write(request("GET", "/healthz", "Host: t"))
        assert (await response(reader))[::2] == (200, b"ok\n")


async def test_sse_over_http10_is_close_delimited(
    gw: GatewayServer, http: httpx.AsyncClient
) -> None:
    name = unique("sse10")
    tail = await create(http, name, b"bye", **{"stream-closed": "true"})
    async with connect(gw) as (reader, writer):
        writer.write(request("GET", f"/v1/stream/{name}?offset=-1&live=sse", version="1.0"))
        status, lines = await head_lines(reader)
        assert status == b"HTTP/1.1 200 OK"
        names = [n for n, _ in lines]
        assert "transfer-encoding" not in names and "content-length" not in names
        assert [v for n, v in lines if n == "connection"] == ["close"]
        body = await asyncio.wait_for(reader.read(), 5)  # up to the server's close
    control = orjson.dumps({"streamNextOffset": tail, "streamClosed": True, "upToDate": True})
    assert body == b"event: data\ndata:bye\n\nevent: control\ndata:" + control + b"\n\n"


# -- 8. clients that leave -----------------------------------------------------------


async def test_client_gone_mid_body_writes_nothing(
    gw: GatewayServer, http: httpx.AsyncClient
) -> None:
    name = unique("gone")
    before = await create(http, name, b"base")
    async with connect(gw) as (_, writer):
        writer.write(
            f"POST /v1/stream/{name} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
            "Content-Length: 1000\r\n\r\n0123456789".encode()
        )
        await writer.drain()
        client_port = writer.get_extra_info("sockname")[1]
        await asyncio.sleep(0.1)  # the handler waits for the rest of the body
    # The body can never be completed: the server lets go at once, not after the
    # read timeout.
    assert await wait_released(gw.port, client_port, READ_TIMEOUT_S / 2) < 1.0
    assert await read_all(http, name) == (b"base", before)


async def test_sse_reader_that_leaves_while_idle_is_not_an_error(
    gw: GatewayServer, http: httpx.AsyncClient
) -> None:
    name = unique("sse-leave")
    await create(http, name, b"x")
    async with connect(gw) as (reader, writer):
        writer.write(request("GET", f"/v1/stream/{name}?offset=now&live=sse", "Host: t"))
        status, _ = await head_lines(reader)
        assert status == b"HTTP/1.1 200 OK"
        assert _events(await _chunk(reader))[0][0] == "control"
        client_port = writer.get_extra_info("sockname")[1]
    # The next keep-alive comment (every 200 ms) finds the client gone.
    await wait_released(gw.port, client_port, 3.0)
    r = await http.post(name, content=b"y", headers={"content-type": "text/plain"})
    assert r.status_code == 204


# -- 9. connection limit -------------------------------------------------------------


async def _healthz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    writer.write(request("GET", "/healthz", "Host: t"))
    return (await response(reader))[0]


async def test_connection_limit(limited: GatewayServer) -> None:
    # The start-up health check's connection may not be closed on the server yet.
    await wait_released(limited.port, None, 2.0)
    async with contextlib.AsyncExitStack() as stack:
        held = []
        for _ in range(3):
            reader, writer = await stack.enter_async_context(connect(limited))
            assert await _healthz(reader, writer) == 200
            held.append((reader, writer))

        async with connect(limited) as (reader, writer):
            # Refused as it opens, before it sends anything.
            status, headers, body = await response(reader)
            assert (status, body) == (503, b"too many connections\n")
            assert headers["connection"] == "close"
            assert headers["content-type"] == PLAIN
            await assert_closed_by_server(reader)

        # One leaves: the next connection is served (once the server saw it go).
        reader, writer = held.pop()
        client_port = writer.get_extra_info("sockname")[1]
        writer.close()
        await wait_released(limited.port, client_port, 2.0)
        async with connect(limited) as (reader, writer):
            assert await _healthz(reader, writer) == 200
            for other in held:
                assert await _healthz(*other) == 200


# -- 10. workers ---------------------------------------------------------------------


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return {int(child) for child in fh.read().split()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _serving(server: GatewayServer) -> set[str]:
    """Pids of the workers that logged "worker PID serving ..."."""
    with open(server.log_path) as log:
        return {line.split()[3] for line in log if "gateway.server: worker" in line}


async def test_two_workers_serve_and_stop_on_sigterm(
    workers: GatewayServer, redis_client: aioredis.Redis
) -> None:
    assert workers.proc is not None
    supervisor = workers.pid
    children = _children(supervisor)
    assert len(children) == 2
    # /healthz answered once one worker served; the other may still be starting.
    deadline = time.monotonic() + 10
    while (serving := _serving(workers)) != {str(pid) for pid in children}:
        assert time.monotonic() < deadline, (serving, children)
        await asyncio.sleep(0.05)

    name = unique("workers")
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=f"{workers.url}/v1/stream/", timeout=10, limits=limits
    ) as client:
        r = await client.put(name, headers={"content-type": "text/plain"})
        assert r.status_code == 201
        appends = await asyncio.gather(
            *(
                client.post(name, content=b"%03d," % i, headers={"content-type": "text/plain"})
                for i in range(60)
            )
        )
        assert [a.status_code for a in appends] == [204] * 60
        reads = await asyncio.gather(
            *(client.get(name, params={"offset": "-1"}) for _ in range(20))
        )
        bodies = {r.content for r in reads}
        assert len(bodies) == 1
        assert sorted((bodies.pop()).split(b",")[:-1]) == [b"%03d" % i for i in range(60)]

    async with connect(workers) as (reader, writer):
        writer.write(request("GET", f"/v1/stream/{name}?offset=now&live=long-poll", "Host: t"))
        await parked(redis_client, name)  # the long-poll waits
        os.kill(supervisor, signal.SIGTERM)
        status, headers, body = await response(reader, 10.0)
        assert (status, body) == (204, b"")
        assert headers["stream-up-to-date"] == "true"
        assert headers["connection"] == "close"
        await assert_closed_by_server(reader)

    code = await asyncio.to_thread(workers.proc.wait, 15.0)
    assert code == 0
    assert not any(_alive(child) for child in children)


# -- 11. a large response, read slowly -----------------------------------------------


async def test_large_response_read_slowly_arrives_exactly(
    gw: GatewayServer, limited: GatewayServer, http: httpx.AsyncClient
) -> None:
    """Read through the server with the default 30 s read timeout: on a loaded
    machine a slow client's pauses may exceed `gw`'s 2 s."""
    name = unique("large")
    data = os.urandom(4 * 1024 * 1024)
    r = await http.put(name, content=data, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201
    tail = r.headers["stream-next-offset"]
    async with connect(limited, rcvbuf=32 * 1024) as (reader, writer):
        writer.write(request("GET", f"/v1/stream/{name}?offset=-1", "Host: t"))
        status, lines = await head_lines(reader)
        headers = dict(lines)
        assert status == b"HTTP/1.1 200 OK"
        assert headers["content-length"] == str(len(data))
        assert headers["stream-next-offset"] == tail
        received = bytearray()
        while len(received) < len(data):
            want = min(16 * 1024, len(data) - len(received))
            chunk = await asyncio.wait_for(reader.read(want), 5)
            assert chunk, f"the connection ended after {len(received)} bytes"
            received += chunk
            # Slow throughout, with one longer stop half-way.
            await asyncio.sleep(0.3 if len(received) == len(data) // 2 else 0.002)
        assert received == data
        writer.write(request("GET", "/healthz", "Host: t"))
        assert (await response(reader))[::2] == (200, b"ok\n")


async def test_a_client_that_stops_reading_is_disconnected(
    gw: GatewayServer, http: httpx.AsyncClient
) -> None:
    """A response the client leaves unread (its window full) holds the
    connection for the read timeout at most, then the server gives up on it."""
    name = unique("unread")
    r = await http.put(
        name, content=os.urandom(4 * 1024 * 1024), headers={"content-type": "text/plain"}
    )
    assert r.status_code == 201
    async with connect(gw, rcvbuf=16 * 1024) as (_reader, writer):
        writer.write(request("GET", f"/v1/stream/{name}?offset=-1", "Host: t"))
        client_port = writer.get_extra_info("sockname")[1]
        await asyncio.sleep(0.2)
        assert client_port in held_by_server(gw.port)
        waited = await wait_released(gw.port, client_port, READ_TIMEOUT_S + SWEEP_S + 2)
        assert waited > READ_TIMEOUT_S - 0.5, waited
    # The server still serves.
    assert (await http.get(f"{gw.url}/healthz")).status_code == 200


async def test_absolute_form_request_targets(gw: GatewayServer, http: httpx.AsyncClient) -> None:
    """``GET http://host/path`` names the same resource as ``GET /path``."""
    name = unique("absolute")
    await create(http, name, b"abs")
    async with connect(gw) as (reader, writer):
        writer.write(request("GET", f"http://t/v1/stream/{name}?offset=-1", "Host: t"))
        status, _, body = await response(reader)
        assert (status, body) == (200, b"abs")
        writer.write(request("GET", f"http://t:{gw.port}/healthz", "Host: t"))
        assert (await response(reader))[::2] == (200, b"ok\n")


# -- 12. no Host -----------------------------------------------------------------------


async def test_http10_create_without_host_gets_a_location(gw: GatewayServer) -> None:
    name = unique("nohost")
    async with connect(gw) as (reader, writer):
        writer.write(
            request(
                "PUT", f"/v1/stream/{name}", "Content-Type: text/plain", body=b"hi", version="1.0"
            )
        )
        status, headers, body = await response(reader)
        assert (status, body) == (201, b"")
        assert headers["location"] == f"http://127.0.0.1:{gw.port}/v1/stream/{name}"
        assert headers["connection"] == "close"
        await assert_closed_by_server(reader)
