"""The console script's own HTTP/1.1 server (gateway/servers/native/http1.py)
against abusive clients, over real loopback sockets with a real Redis.

Each class of abuse is checked for its bound (what the abuser gets, and when
its connection ends) and for its cost to everybody else: a well-behaved client
on its own connection appends and reads throughout every test (the autouse
``bystander``), and each of its requests must be answered within ``FAST_S``.

- slowloris: a request head that trickles in gets 408 at ``--read-timeout``
  after its first byte, however steadily it trickles (200 such connections at
  once); a body keeps the between-bytes timeout;
- RFC 9112 framing: HTTP versions (505), repeated Host, Content-Length
  whitespace, transfer codings (501 or 400), and a table of classic
  request-smuggling payloads, each refused with a 400 and a closed connection
  (the request smuggled after it is never answered);
- headers: no CR, LF or NUL reaches the wire in a response header line, even
  from a stream whose stored content type was edited in Redis (a 500 without
  it); content types with control characters are not stored, and a CORS
  preflight echoes only a list of header names.

Every test ends by checking that the gateway logged no traceback and no error
line, but for the one line about a corrupted stored value in the tests that
corrupt one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis
from support.gateway_server import GatewayServer
from support.raw_http import read_response

pytestmark = pytest.mark.timeout(90)

READ_TIMEOUT_S = 2.0  # --read-timeout of `gw`
SWEEP_S = 1.0  # the server checks deadlines once a second
# Scheduling slack on a loaded 2-core machine, on top of the sweep interval.
SLACK_S = 1.5
FAST_S = 1.0  # the well-behaved client's bound, per request
SLOW_CLIENTS = 200


@pytest.fixture(scope="module")
def gw(redis_url: str) -> Iterator[GatewayServer]:
    args = ["--read-timeout", f"{READ_TIMEOUT_S:g}", "--keep-alive-timeout", "30"]
    with GatewayServer(redis_url=redis_url, server="console-script", args=args) as server:
        yield server


STORE_ERROR = "holds CR, LF or NUL"


@pytest.fixture
def corrupted_store() -> None:
    """Requested by the tests that edit a stream's keys in Redis: for them (and
    only them) the gateway's error line about the stored value is expected."""


@pytest.fixture(autouse=True)
def clean_log(gw: GatewayServer, request: pytest.FixtureRequest) -> Iterator[None]:
    """Whatever a client sends, the gateway logs no error and no traceback."""
    mark = os.path.getsize(gw.log_path)
    yield
    with open(gw.log_path, "rb") as log:
        log.seek(mark)
        new = log.read().decode("utf-8", "replace")
    assert "Traceback" not in new, new[-4000:]
    errors = [line for line in new.splitlines() if "[ERROR]" in line]
    if "corrupted_store" in request.fixturenames:
        assert errors and all(STORE_ERROR in line for line in errors), new[-4000:]
    else:
        assert not errors, new[-4000:]


def unique(name: str) -> str:
    return f"abuse-{name}-{time.monotonic_ns()}"


@contextlib.asynccontextmanager
async def connect(
    server: GatewayServer,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
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


async def closed_by_server(reader: asyncio.StreamReader, within: float = 3.0) -> bytes:
    """What arrives before the server closes the connection (a reset after
    the client's unread bytes counts as closed)."""
    try:
        return await asyncio.wait_for(reader.read(), within)
    except ConnectionResetError:
        return b""


def request(
    method: str, target: str, *headers: str, body: bytes = b"", version: str = "1.1"
) -> bytes:
    """A request as bytes; ``Content-Length`` is added for a body."""
    lines = [f"{method} {target} HTTP/{version}", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def simple(server: GatewayServer, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` on a new connection; the response, the connection closed."""
    async with connect(server) as (reader, writer):
        writer.write(data)
        got = await response(reader)
        assert await closed_by_server(reader) == b""
        return got


# -- the well-behaved client ---------------------------------------------------------


@dataclass
class Bystander:
    """Appends to and reads a stream of its own, one request after another on
    one keep-alive connection, and times every response."""

    server: GatewayServer
    latencies: list[float] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        name = unique("bystander")
        async with connect(self.server) as (reader, writer):
            await self._exchange(
                reader,
                writer,
                request("PUT", f"/v1/stream/{name}", "Host: t", "Content-Type: text/plain"),
                201,
            )
            while True:
                await self._exchange(
                    reader,
                    writer,
                    request(
                        "POST",
                        f"/v1/stream/{name}",
                        "Host: t",
                        "Content-Type: text/plain",
                        body=b"tick",
                    ),
                    204,
                )
                await self._exchange(
                    reader, writer, request("GET", f"/v1/stream/{name}?offset=-1", "Host: t"), 200
                )
                await asyncio.sleep(0.05)

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, status: int
    ) -> None:
        start = time.monotonic()
        writer.write(data)
        got, _, body = await response(reader, within=10)
        self.latencies.append(time.monotonic() - start)
        assert got == status, (got, body)


async def _served(watcher: Bystander, count: int) -> None:
    """Wait until the bystander has had ``count`` responses."""
    while len(watcher.latencies) < count:
        assert watcher.task is not None
        if watcher.task.done():
            watcher.task.result()  # its failure, if it failed
        await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
async def bystander(gw: GatewayServer) -> AsyncIterator[Bystander]:
    """A well-behaved client working throughout every test (served before it
    starts and after it ends); every one of its requests must be answered
    within ``FAST_S``."""
    watcher = Bystander(gw)
    watcher.task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(_served(watcher, 2), 10)
        yield watcher
        await asyncio.wait_for(_served(watcher, len(watcher.latencies) + 2), 10)
    finally:
        watcher.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher.task
    assert max(watcher.latencies) < FAST_S, max(watcher.latencies)


# -- 1. slowloris --------------------------------------------------------------------


async def _trickle_head(server: GatewayServer, interval: float, cap: float) -> tuple[float, int]:
    """Send a request head one byte every ``interval`` seconds, never finishing
    it; return (seconds from the first byte until the server answered and
    closed, status). Fails after ``cap`` seconds."""
    head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"s" * 10_000
    async with connect(server) as (reader, writer):
        answer = asyncio.create_task(read_response(reader))
        start = time.monotonic()
        try:
            for byte in head:
                if answer.done() or time.monotonic() - start > cap:
                    break
                with contextlib.suppress(ConnectionError):
                    writer.write(bytes([byte]))
                await asyncio.wait([answer], timeout=interval)
            assert answer.done(), (
                f"still open {time.monotonic() - start:.1f} s after its first byte"
            )
            status, headers, body, arrived = answer.result()
        finally:
            answer.cancel()
        assert (status, body, headers["connection"]) == (408, b"request timeout\n", "close")
        assert await closed_by_server(reader) == b""
        return arrived - start, status


async def test_a_trickling_request_head_gets_408_at_the_read_timeout(
    gw: GatewayServer, bystander: Bystander
) -> None:
    """One byte every half second (well within the between-bytes timeout) from
    200 connections at once: each gets a 408 at ``--read-timeout`` after its first
    byte, and the well-behaved client is served fast all along."""
    cap = READ_TIMEOUT_S + SWEEP_S + SLACK_S + 5
    served = len(bystander.latencies)
    results = await asyncio.gather(*(_trickle_head(gw, 0.5, cap) for _ in range(SLOW_CLIENTS)))
    # (The fixture checks every response took under FAST_S.)
    assert len(bystander.latencies) - served >= 10, bystander.latencies
    waited = [seconds for seconds, _ in results]
    assert min(waited) > READ_TIMEOUT_S - 0.1, min(waited)
    assert max(waited) < READ_TIMEOUT_S + SWEEP_S + SLACK_S, max(waited)


async def test_a_head_trickling_in_behind_a_waiting_request_keeps_its_deadline(
    gw: GatewayServer,
) -> None:
    """The next request's head starts while a long-poll waits on the same
    connection: its deadline still counts from its first byte, not from the
    end of the long-poll's response."""
    name = unique("behind")
    head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"s" * 100
    async with connect(gw) as (reader, writer):
        writer.write(request("PUT", f"/v1/stream/{name}", "Host: t", "Content-Type: text/plain"))
        status, headers, _ = await response(reader)
        assert status == 201
        tail = headers["stream-next-offset"]
        writer.write(request("GET", f"/v1/stream/{name}?offset={tail}&live=long-poll", "Host: t"))
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < READ_TIMEOUT_S / 2:  # the long-poll waits
            writer.write(head[sent : sent + 1])
            sent += 1
            await asyncio.sleep(0.25)
        async with connect(gw) as (other, other_writer):
            other_writer.write(
                request(
                    "POST", f"/v1/stream/{name}", "Host: t", "Content-Type: text/plain", body=b"x"
                )
            )
            assert (await response(other))[0] == 204
        assert (await response(reader))[::2] == (200, b"x")
        answer = asyncio.create_task(read_response(reader))
        try:
            while not answer.done() and time.monotonic() - start < READ_TIMEOUT_S + 10:
                with contextlib.suppress(ConnectionError):
                    writer.write(head[sent : sent + 1])
                sent += 1
                await asyncio.wait([answer], timeout=0.5)
            assert answer.done(), "the trickling head was never refused"
            status, _, body, arrived = answer.result()
        finally:
            answer.cancel()
        assert (status, body) == (408, b"request timeout\n")
        assert await closed_by_server(reader) == b""
    waited = arrived - start
    assert READ_TIMEOUT_S - 0.1 < waited < READ_TIMEOUT_S + SWEEP_S + SLACK_S, waited


async def test_a_slow_body_keeps_the_between_bytes_timeout(gw: GatewayServer) -> None:
    """The total deadline is for the head: a body may take longer than the read
    timeout as long as its bytes keep coming."""
    name = unique("slow-body")
    body = b"0123456789"
    interval = READ_TIMEOUT_S / 4
    async with connect(gw) as (reader, writer):
        writer.write(request("PUT", f"/v1/stream/{name}", "Host: t", "Content-Type: text/plain"))
        assert (await response(reader))[0] == 201
        start = time.monotonic()
        writer.write(
            request(
                "POST",
                f"/v1/stream/{name}",
                "Host: t",
                "Content-Type: text/plain",
                f"Content-Length: {len(body)}",
            )
        )
        for byte in body:
            await asyncio.sleep(interval)
            writer.write(bytes([byte]))
        assert (await response(reader))[0] == 204
        assert time.monotonic() - start > 2 * READ_TIMEOUT_S
        writer.write(request("GET", f"/v1/stream/{name}?offset=-1", "Host: t"))
        assert (await response(reader))[::2] == (200, body)


async def test_a_stalled_body_still_gets_the_read_timeout(gw: GatewayServer) -> None:
    name = unique("stalled-body")
    async with connect(gw) as (reader, writer):
        writer.write(request("PUT", f"/v1/stream/{name}", "Host: t", "Content-Type: text/plain"))
        assert (await response(reader))[0] == 201
        writer.write(
            request(
                "POST",
                f"/v1/stream/{name}",
                "Host: t",
                "Content-Type: text/plain",
                "Content-Length: 10",
            )
            + b"12345"
        )
        start = time.monotonic()
        assert await closed_by_server(reader, READ_TIMEOUT_S + SWEEP_S + SLACK_S + 2) == b""
        waited = time.monotonic() - start
        assert READ_TIMEOUT_S - 0.1 < waited < READ_TIMEOUT_S + SWEEP_S + SLACK_S, waited


# -- 2. RFC 9112 framing -------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.9", "1.2", "2.0", "3.0", "9.9"])
async def test_http_versions_other_than_1x_get_505(gw: GatewayServer, version: str) -> None:
    status, headers, body = await simple(gw, request("GET", "/healthz", "Host: t", version=version))
    assert (status, body) == (505, b"HTTP version not supported\n")
    assert headers["connection"] == "close"


@pytest.mark.parametrize("version", ["1.0", "1.1"])
async def test_http_10_and_11_are_served(gw: GatewayServer, version: str) -> None:
    async with connect(gw) as (reader, writer):
        writer.write(request("GET", "/healthz", "Host: t", "Connection: close", version=version))
        assert (await response(reader))[::2] == (200, b"ok\n")


@pytest.mark.parametrize(
    "hosts", [("a", "b"), ("t", "t"), ("t", "")], ids=["different", "same", "second-empty"]
)
async def test_two_host_headers_get_400(gw: GatewayServer, hosts: tuple[str, str]) -> None:
    status, headers, body = await simple(
        gw, request("GET", "/healthz", *(f"Host: {host}" for host in hosts))
    )
    assert (status, body) == (400, b"more than one Host header\n")
    assert headers["connection"] == "close"


@pytest.mark.parametrize("spacing", [" {} ", "{}\t", "\t{} \t", "  {}"])
async def test_content_length_with_optional_whitespace_is_accepted(
    gw: GatewayServer, spacing: str
) -> None:
    name = unique("cl-ows")
    body = b"hello"
    async with connect(gw) as (reader, writer):
        writer.write(request("PUT", f"/v1/stream/{name}", "Host: t", "Content-Type: text/plain"))
        assert (await response(reader))[0] == 201
        length = spacing.format(len(body))
        writer.write(
            f"POST /v1/stream/{name} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
            f"Content-Length:{length}\r\n\r\n".encode()
            + body
        )
        assert (await response(reader))[0] == 204
        writer.write(request("GET", f"/v1/stream/{name}?offset=-1", "Host: t"))
        assert (await response(reader))[::2] == (200, body)


CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    "headers,version,status,reason",
    [
        (["Transfer-Encoding: gzip"], "1.1", 501, b"unsupported transfer coding\n"),
        (["Transfer-Encoding: identity"], "1.1", 501, b"unsupported transfer coding\n"),
        (["Transfer-Encoding: gzip, chunked"], "1.1", 501, b"unsupported transfer coding\n"),
        (
            ["Transfer-Encoding: gzip", "Transfer-Encoding: chunked"],
            "1.1",
            501,
            b"unsupported transfer coding\n",
        ),
        (["Transfer-Encoding: chunked, gzip"], "1.1", 400, None),
        (["Transfer-Encoding: chunked, chunked"], "1.1", 400, None),
        (["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], "1.1", 400, None),
        (
            ["Transfer-Encoding: chunked"],
            "1.0",
            400,
            b"Transfer-Encoding in an HTTP/1.0 request\n",
        ),
    ],
    ids=[
        "gzip",
        "identity",
        "gzip-then-chunked",
        "gzip-then-chunked-two-lines",
        "chunked-not-last",
        "chunked-twice",
        "chunked-twice-two-lines",
        "chunked-in-http10",
    ],
)
async def test_transfer_codings_other_than_a_final_chunked_are_refused(
    gw: GatewayServer, headers: list[str], version: str, status: int, reason: bytes | None
) -> None:
    name = unique("te")
    async with connect(gw) as (reader, writer):
        writer.write(
            request(
                "PUT",
                f"/v1/stream/{name}",
                "Host: t",
                "Content-Type: text/plain",
                "Connection: close",
            )
        )
        assert (await response(reader))[0] == 201
    data = (
        request(
            "POST",
            f"/v1/stream/{name}",
            "Host: t",
            "Content-Type: text/plain",
            *headers,
            version=version,
        )
        + CHUNKED_HELLO
    )
    got, out, body = await simple(gw, data)
    assert got == status, (got, body)
    assert out["connection"] == "close"
    if reason is not None:
        assert body == reason
    async with connect(gw) as (reader, writer):
        writer.write(request("GET", f"/v1/stream/{name}?offset=-1", "Host: t"))
        assert (await response(reader))[::2] == (200, b"")  # nothing was appended


async def test_chunked_in_any_case_is_accepted(gw: GatewayServer) -> None:
    name = unique("te-case")
    async with connect(gw) as (reader, writer):
        writer.write(request("PUT", f"/v1/stream/{name}", "Host: t", "Content-Type: text/plain"))
        assert (await response(reader))[0] == 201
        writer.write(
            request(
                "POST",
                f"/v1/stream/{name}",
                "Host: t",
                "Content-Type: text/plain",
                "Transfer-Encoding: Chunked",
            )
            + CHUNKED_HELLO
        )
        assert (await response(reader))[0] == 204
        writer.write(request("GET", f"/v1/stream/{name}?offset=-1", "Host: t"))
        assert (await response(reader))[::2] == (200, b"hello")


SMUGGLED = b"GET /healthz HTTP/1.1\r\nHost: smuggled\r\n\r\n"


def _smuggling_payloads() -> list[tuple[str, bytes]]:
    """(id, request) pairs; each is followed on the wire by ``SMUGGLED``."""
    post = b"POST /v1/stream/smuggle HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
    return [
        ("cl-te", post + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("te-cl", post + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
        ("cl-cl-different", post + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ("cl-cl-same", post + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        ("cl-list", post + b"Content-Length: 5, 5\r\n\r\nhello"),
        ("cl-plus", post + b"Content-Length: +5\r\n\r\nhello"),
        ("cl-negative", post + b"Content-Length: -5\r\n\r\nhello"),
        ("cl-hex", post + b"Content-Length: 0x5\r\n\r\nhello"),
        ("cl-overflow", post + b"Content-Length: 99999999999999999999999\r\n\r\nhello"),
        ("cl-space-before-colon", post + b"Content-Length : 5\r\n\r\nhello"),
        ("te-space-before-colon", post + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n"),
        ("te-obs-fold", post + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"),
        ("te-chunked-twice", post + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
        (
            "te-two-lines",
            post + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n",
        ),
        ("te-chunked-not-last", post + b"Transfer-Encoding: chunked, x\r\n\r\n0\r\n\r\n"),
        ("te-empty", post + b"Transfer-Encoding: \r\n\r\n0\r\n\r\n"),
        (
            "te-in-http10",
            post.replace(b"HTTP/1.1", b"HTTP/1.0") + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        ("obs-fold", b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n"),
        ("bare-lf-request-line", b"GET /healthz HTTP/1.1\nHost: t\r\n\r\n"),
        ("bare-lf-header", b"GET /healthz HTTP/1.1\r\nHost: t\nX-A: a\r\n\r\n"),
        ("bare-lf-end-of-head", b"GET /healthz HTTP/1.1\r\nHost: t\n\n"),
        ("bare-cr-header", b"GET /healthz HTTP/1.1\r\nHost: t\rX-A: a\r\n\r\n"),
        ("bare-lf-chunk-size", post + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"),
        ("chunk-size-space", post + b"Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n"),
        (
            "chunk-size-overflow",
            post + b"Transfer-Encoding: chunked\r\n\r\n1" + b"0" * 17 + b"\r\n",
        ),
        ("nul-in-header", b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n"),
        ("leading-space-header", b"GET /healthz HTTP/1.1\r\n Host: t\r\n\r\n"),
        ("two-hosts", b"GET /healthz HTTP/1.1\r\nHost: t\r\nHost: smuggled\r\n\r\n"),
    ]


SMUGGLING = _smuggling_payloads()


@pytest.mark.parametrize("payload", [p[1] for p in SMUGGLING], ids=[p[0] for p in SMUGGLING])
async def test_request_smuggling_payloads_get_400_and_a_closed_connection(
    gw: GatewayServer, payload: bytes
) -> None:
    """The classic request-smuggling payloads: each is refused with a 400 and
    the connection closed, so the request sent after it is never answered."""
    async with connect(gw) as (reader, writer):
        writer.write(payload + SMUGGLED)
        status, headers, body = await response(reader)
        assert status == 400, (status, body)
        assert headers["connection"] == "close"
        assert await closed_by_server(reader) == b""  # no second response


# -- 3. response headers -------------------------------------------------------------


def _head_lines(raw: bytes) -> list[bytes]:
    head, sep, _ = raw.partition(b"\r\n\r\n")
    assert sep, raw[:300]
    return head.split(b"\r\n")


@pytest.mark.parametrize(
    "stored",
    [
        b"text/plain\r\nX-Injected: 1",
        b"text/plain\nX-Injected: 1",
        b"text/plain\x00X-Injected: 1",
        b"text/plain\rX-Injected: 1",
    ],
    ids=["crlf", "lf", "nul", "cr"],
)
async def test_a_stored_content_type_with_control_characters_never_reaches_the_wire(
    gw: GatewayServer, redis_url: str, corrupted_store: None, stored: bytes
) -> None:
    """Only a store edited behind the gateway's back can hold such a value: the
    read gets a 500 without it (and the operator an error line naming it)."""
    name = unique("corrupt")
    async with connect(gw) as (reader, writer):
        writer.write(
            request(
                "PUT", f"/v1/stream/{name}", "Host: t", "Content-Type: text/plain", body=b"data"
            )
        )
        assert (await response(reader))[0] == 201
    # (Not the redis_client fixture: it flushes Redis, the bystander's stream too.)
    edit = aioredis.from_url(redis_url)
    try:
        assert await edit.hset(f"ds:{{{name}}}:meta", "ct", stored) == 0
    finally:
        await edit.aclose()
    for method in ("GET", "HEAD"):
        async with connect(gw) as (reader, writer):
            writer.write(
                request(method, f"/v1/stream/{name}?offset=-1", "Host: t", "Connection: close")
            )
            raw = await asyncio.wait_for(reader.read(), 5)
        lines = _head_lines(raw)
        assert lines[0] == b"HTTP/1.1 500 Internal Server Error", raw[:300]
        body = raw.partition(b"\r\n\r\n")[2]
        assert body == (b"internal error\n" if method == "GET" else b""), body
        for line in lines[1:]:
            assert b"\r" not in line and b"\n" not in line and b"\x00" not in line, line
            assert line.split(b":", 1)[0].lower() not in (b"x-injected", b"content-type") or (
                line == b"content-type: text/plain; charset=utf-8"
            ), line
        assert b"X-Injected" not in raw


async def test_content_types_with_control_characters_are_refused(gw: GatewayServer) -> None:
    """The parser refuses control characters in any header value (HTAB aside),
    before the app sees them."""
    name = unique("ct-ctl")
    for value in (b"text/plain; a=\x01", b"text/plain\x7f", b"text/plain; a=b\x00"):
        got = await simple(
            gw,
            b"PUT /v1/stream/"
            + name.encode()
            + b" HTTP/1.1\r\nHost: t\r\nContent-Type: "
            + value
            + b"\r\n\r\n",
        )
        assert got[0] == 400, got
    async with connect(gw) as (reader, writer):
        writer.write(request("HEAD", f"/v1/stream/{name}", "Host: t"))
        assert (await response(reader))[0] == 404


@pytest.mark.parametrize(
    "requested,echoed",
    [
        ("content-type, producer-id", True),
        ("Content-Type,Stream-Seq", True),
        ("x-custom", True),
        ("content-type producer-id", False),
        ("content-type;x", False),
        ("content-type,,x", False),
        ("content-type,", False),
        ('"quoted"', False),
        ("x\x7f", None),  # refused by the parser: 400
    ],
)
async def test_options_echoes_only_a_valid_token_list(
    gw: GatewayServer, requested: str, echoed: bool | None
) -> None:
    got, headers, _ = await simple(
        gw,
        request(
            "OPTIONS",
            "/v1/stream/any",
            "Host: t",
            "Origin: http://example.com",
            "Access-Control-Request-Method: POST",
            f"Access-Control-Request-Headers: {requested}",
            "Connection: close",
        ),
    )
    if echoed is None:
        assert got == 400
        return
    assert got == 204
    allowed = headers["access-control-allow-headers"]
    if echoed:
        assert allowed == requested
    else:
        assert allowed.startswith("Content-Type, If-None-Match, Authorization"), allowed
