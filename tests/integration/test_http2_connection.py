"""The HTTP/2 connection (gateway/http2.py) over real loopback sockets.

httpx (h2c with prior knowledge) is the ordinary client. What httpx cannot do
(reset a stream, hold back flow-control credit, send garbage) is done with an
``h2`` client driven by hand; where even ``h2`` gets in the way (it refuses
every frame after a GOAWAY, python-hyper/h2 #1181) frames are read bare.

A last test runs the main scenarios again on uvloop, which our server uses.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import h2.events
import httpx
import pytest
import uvloop
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

from gateway.protocol.errors import BadRequest
from gateway.servers.native.http2 import CONNECTION_WINDOW, PREFACE, STREAM_WINDOW, Http2Connection
from gateway.web.request import ClientGone, Request, Response

Handle = Callable[[Request, Response], Awaitable[None]]
TEXT = [("content-type", "text/plain")]
TIMEOUT = 5.0  # for anything the tests wait for


class Http1Stub(asyncio.Protocol):
    """Stands in for the HTTP/1.1 protocol: on the preface it hands the
    connection over the way gateway/http1.py does."""

    def __init__(self, make: Callable[[], Http2Connection]) -> None:
        self.make = make
        self.received = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= len(PREFACE):
            assert self.received.startswith(PREFACE)
            conn = self.make()
            self.transport.set_protocol(conn)
            conn.connection_made(self.transport)
            conn.data_received(self.received)


class Server:
    """Http2Connection as the protocol of a listener on 127.0.0.1 (or taking
    over from a stand-in HTTP/1.1 protocol)."""

    def __init__(self, handle: Handle, *, takeover: bool = False, **options: Any) -> None:
        self.handle = handle
        self.takeover = takeover
        self.options = options
        self.conns: list[Http2Connection] = []
        self.closed: list[Http2Connection] = []
        self.changed = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Server:
        def protocol() -> Http2Connection:
            conn = Http2Connection(self.handle, on_close=self.on_close, **self.options)
            self.conns.append(conn)
            return conn

        loop = asyncio.get_running_loop()
        factory = (lambda: Http1Stub(protocol)) if self.takeover else protocol
        self.server = await loop.create_server(factory, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A bare client socket, closed (at the latest) on the way out."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.append(writer)
        return reader, writer

    async def raw_client(self) -> RawClient:
        return RawClient(*await self.connect())

    async def __aexit__(self, *exc_info: object) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()
        for conn in self.conns:
            if conn not in self.closed:
                conn.transport.abort()
        await self.all_closed()
        await self.server.wait_closed()

    def on_close(self, conn: Http2Connection) -> None:
        self.closed.append(conn)
        self.changed.set()

    async def all_closed(self) -> None:
        async with asyncio.timeout(TIMEOUT):
            while len(self.closed) < len(self.conns):
                self.changed.clear()
                await self.changed.wait()


def h2c_client(**options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(http1=False, http2=True, timeout=10, **options)


class RawClient:
    """An ``h2`` client driven by hand: requests, events, flow-control credit."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.flush()
        self.pending: list[h2.events.Event] = []

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    def request(
        self, method: bytes, path: bytes, *, end_stream: bool = True, stream_id: int | None = None
    ) -> int:
        stream_id = stream_id or self.h2.get_next_available_stream_id()
        headers = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":authority", b"localhost"),
            (b":path", path),
        ]
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        self.flush()
        return stream_id

    async def receive(self) -> bool:
        """Read once; False at EOF."""
        data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
        if not data:
            return False
        self.pending.extend(self.h2.receive_data(data))
        self.flush()
        return True

    async def quiet(self, seconds: float) -> None:
        """Take in whatever arrives during ``seconds``."""
        try:
            async with asyncio.timeout(seconds):
                while await self.receive():
                    pass
        except TimeoutError:
            pass

    async def event(self, kind: type, stream_id: int | None = None) -> Any:
        """The next event of ``kind`` (on ``stream_id``); others stay pending."""
        while True:
            for event in self.pending:
                if isinstance(event, kind) and stream_id in (None, getattr(event, "stream_id", 0)):
                    self.pending.remove(event)
                    return event
            if not await self.receive():
                raise EOFError("connection closed")

    async def response(self, stream_id: int) -> tuple[int, dict[bytes, bytes], bytes, int | None]:
        """Status, headers, body and the reset code (None if it ended normally),
        giving flow-control credit back as the body arrives."""
        status, headers, body, reset = 0, {}, b"", None
        while True:
            event = await self.event(h2.events.Event, stream_id)
            if isinstance(event, h2.events.ResponseReceived):
                headers = dict(event.headers)
                status = int(headers[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
                self.flush()
            elif isinstance(event, h2.events.StreamEnded):
                break
            elif isinstance(event, h2.events.StreamReset):
                reset = event.error_code
                break
        return status, headers, body, reset

    async def eof(self) -> None:
        async with asyncio.timeout(TIMEOUT):
            while await self.receive():
                pass

    def close(self) -> None:
        self.writer.close()


class FrameReader:
    """Bare frames from a socket, without any state machine."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    async def next(self) -> Frame | None:
        try:
            header = await asyncio.wait_for(self.reader.readexactly(9), TIMEOUT)
        except asyncio.IncompleteReadError:
            return None
        frame, length = Frame.parse_frame_header(memoryview(header))
        frame.parse_body(memoryview(await self.reader.readexactly(length)))
        return frame


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# -- requests and responses ---------------------------------------------------------


async def echo(req: Request, res: Response) -> None:
    body = await req.body(8 * 1024 * 1024)
    headers = [
        ("content-type", "application/octet-stream"),
        ("x-method", req.method),
        ("x-path", req.path),
        ("x-query", req.query_string),
        ("x-header", req.header("x-test") or "-"),
        ("x-base", f"{req.scheme}://{req.authority()}"),
        # HTTP/1-only headers the connection must drop.
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("transfer-encoding", "chunked"),
    ]
    await res.send(200, headers, body)


async def test_get_and_post_round_trip() -> None:
    async with Server(echo) as server, h2c_client() as http:
        latin1 = {"x-test": "hé".encode("latin-1")}  # header bytes are latin-1
        got = await http.get(f"{server.url}/a/b?x=1&y=%20", headers=latin1)
        assert (got.http_version, got.status_code, got.content) == ("HTTP/2", 200, b"")
        assert got.headers["x-method"] == "GET"
        assert got.headers["x-path"] == "/a/b"
        assert got.headers["x-query"] == "x=1&y=%20"
        assert got.headers["x-header"] == "hé"
        assert got.headers["x-base"] == server.url  # from :authority
        assert got.headers["content-length"] == "0"
        for name in ("connection", "keep-alive", "transfer-encoding"):
            assert name not in got.headers

        body = bytes(range(256)) * 10
        posted = await http.post(f"{server.url}/p", content=body)
        assert (posted.status_code, posted.content) == (200, body)
        assert posted.headers["x-method"] == "POST"
        assert posted.headers["content-type"] == "application/octet-stream"
        assert posted.headers["content-length"] == str(len(body))
        assert "connection" not in posted.headers
    assert len(server.conns) == 1  # both requests on one connection


async def test_connection_taken_over_from_http1() -> None:
    async with Server(echo, takeover=True) as server, h2c_client() as http:
        for _ in range(3):
            posted = await http.post(f"{server.url}/p", content=b"over h2")
            assert (posted.http_version, posted.content) == ("HTTP/2", b"over h2")
    assert len(server.conns) == 1


async def test_large_bodies_both_ways_respect_flow_control() -> None:
    big_response = os.urandom(4 * 1024 * 1024)

    async def handle(req: Request, res: Response) -> None:
        if req.method == "POST":
            body = await req.body(8 * 1024 * 1024)
            await res.send(200, TEXT, f"{len(body)} {hashlib.sha256(body).hexdigest()}".encode())
        else:
            await res.send(200, TEXT, big_response)

    upload = os.urandom(1024 * 1024)
    async with Server(handle) as server, h2c_client() as http:
        posted = await http.post(f"{server.url}/up", content=upload)
        assert posted.text == f"{len(upload)} {hashlib.sha256(upload).hexdigest()}"
        got = await http.get(f"{server.url}/down")
        assert got.headers["content-length"] == str(len(big_response))
        assert got.content == big_response


async def test_many_concurrent_streams_share_one_connection() -> None:
    arrived = 0
    hundred_open = asyncio.Event()

    async def handle(req: Request, res: Response) -> None:
        nonlocal arrived
        arrived += 1
        if arrived == 100:  # httpx opens up to 100 streams at a time
            hundred_open.set()
        await asyncio.wait_for(hundred_open.wait(), 5)  # all open together, or a timeout
        await res.send(200, TEXT, req.path.encode())

    async with Server(handle) as server, h2c_client() as http:
        responses = await asyncio.gather(*(http.get(f"{server.url}/n{i}") for i in range(250)))
        assert [r.text for r in responses] == [f"/n{i}" for i in range(250)]
    assert len(server.conns) == 1


async def test_streaming_response_arrives_as_written() -> None:
    first_read = asyncio.Event()

    async def handle(req: Request, res: Response) -> None:
        assert req.path == "/sse" and req.header("user-agent")
        await res.start_stream(200, [("content-type", "text/event-stream")])
        req.release()  # as live SSE readers do: what is left still answers
        assert (req.path, req.header("user-agent"), req.query) == ("/sse", None, {})
        await res.write(b"data: one\n\n")
        await first_read.wait()  # the client must see it before we go on
        await res.write(b"data: two\n\n")
        await res.write(b"data: three\n\n")
        await res.end_stream()

    async with Server(handle) as server, h2c_client() as http:
        async with http.stream("GET", f"{server.url}/sse") as response:
            assert response.headers["content-type"] == "text/event-stream"
            assert "content-length" not in response.headers
            chunks = response.aiter_raw()
            assert await anext(chunks) == b"data: one\n\n"
            first_read.set()
            rest = b"".join([chunk async for chunk in chunks])
        assert rest == b"data: two\n\ndata: three\n\n"


async def test_handler_that_leaves_the_stream_open_or_never_answers() -> None:
    async def handle(req: Request, res: Response) -> None:
        if req.path == "/open":
            await res.start_stream(200, TEXT)
            await res.write(b"partial")
        # /silent: no response at all

    async with Server(handle) as server, h2c_client() as http:
        left_open = await http.get(f"{server.url}/open")
        assert (left_open.status_code, left_open.content) == (200, b"partial")
        silent = await http.get(f"{server.url}/silent")
        assert silent.status_code == 500


async def test_head_send_has_no_body_and_no_content_length() -> None:
    async def handle(req: Request, res: Response) -> None:
        await res.send(200, [("content-type", "text/plain"), ("etag", '"1"')], head=True)

    async with Server(handle) as server:
        # A GET on purpose: a body or a length sent by mistake would show.
        client = await server.raw_client()
        stream_id = client.request(b"GET", b"/h")
        event = await client.event(h2.events.ResponseReceived, stream_id)
        assert event.stream_ended is not None  # END_STREAM on the HEADERS frame
        headers = dict(event.headers)
        assert headers[b":status"] == b"200" and headers[b"etag"] == b'"1"'
        assert b"content-length" not in headers
        assert not [e for e in client.pending if isinstance(e, h2.events.DataReceived)]
        client.close()


async def test_path_is_percent_decoded_strictly() -> None:
    async def handle(req: Request, res: Response) -> None:
        try:
            await res.send(200, TEXT, req.path.encode())
        except BadRequest as exc:
            await res.send(400, TEXT, exc.reason.encode())

    async with Server(handle) as server, h2c_client() as http:
        spaced = await http.get(f"{server.url}/a%20b")
        assert (spaced.status_code, spaced.text) == (200, "/a b")
        utf8 = await http.get(f"{server.url}/%C3%A9t%C3%A9")
        assert (utf8.status_code, utf8.text) == (200, "/été")
        invalid = await http.get(f"{server.url}/x%ff")
        assert (invalid.status_code, invalid.text) == (400, "URL path is not valid UTF-8")


# -- flow control -------------------------------------------------------------------


async def test_slow_reader_holds_the_response_back() -> None:
    body = os.urandom(300 * 1024)
    sent = asyncio.Event()

    async def handle(req: Request, res: Response) -> None:
        await res.send(200, TEXT, body)
        sent.set()

    async with Server(handle) as server:
        client = await server.raw_client()
        stream_id = client.request(b"GET", b"/big")
        # The client gives no credit back: the server stops at its window.
        await client.quiet(0.3)
        received = sum(len(e.data) for e in client.pending if isinstance(e, h2.events.DataReceived))
        assert received == 65535  # h2's default window, not one byte more
        assert not sent.is_set()
        client.pending = [e for e in client.pending if not isinstance(e, h2.events.DataReceived)]
        client.h2.acknowledge_received_data(received, stream_id)
        client.flush()
        status, _, rest, reset = await client.response(stream_id)
        assert (status, reset) == (200, None)
        assert body[:received] + rest == body
        await asyncio.wait_for(sent.wait(), 1)
        client.close()


async def test_request_body_credit_follows_the_handler_not_the_socket() -> None:
    total = 1024 * 1024
    first_taken = asyncio.Event()
    go_on = asyncio.Event()

    async def handle(req: Request, res: Response) -> None:
        chunks = req._chunks()
        first = await anext(chunks)
        first_taken.set()
        await go_on.wait()
        body = first + b"".join([chunk async for chunk in chunks])
        await res.send(200, TEXT, hashlib.sha256(body).hexdigest().encode())

    upload = os.urandom(total)
    async with Server(handle) as server:
        client = await server.raw_client()
        await client.event(h2.events.RemoteSettingsChanged)
        stream_id = client.request(b"POST", b"/up", end_stream=False)
        offset = 0

        def send_what_the_window_allows() -> None:
            nonlocal offset
            window = client.h2.local_flow_control_window(stream_id)
            while window and offset < total:
                size = min(window, client.h2.max_outbound_frame_size, total - offset)
                end = offset + size == total
                client.h2.send_data(stream_id, upload[offset : offset + size], end_stream=end)
                offset += size
                window -= size
            client.flush()

        send_what_the_window_allows()
        assert offset == STREAM_WINDOW
        await asyncio.wait_for(first_taken.wait(), 5)
        await client.quiet(0.3)
        # The handler took one chunk and waits: no room for more.
        assert client.h2.local_flow_control_window(stream_id) < 64 * 1024

        go_on.set()
        while offset < total:
            await client.event(h2.events.WindowUpdated, stream_id)
            send_what_the_window_allows()
        status, _, answer, reset = await client.response(stream_id)
        assert (status, reset) == (200, None)
        assert answer.decode() == hashlib.sha256(upload).hexdigest()
        client.close()


async def test_answer_before_the_whole_body_resets_with_no_error() -> None:
    async def handle(req: Request, res: Response) -> None:
        await res.send(413, TEXT, b"too large")

    async with Server(handle) as server:
        client = await server.raw_client()
        stream_id = client.request(b"POST", b"/up", end_stream=False)
        client.h2.send_data(stream_id, b"x" * 1000)
        client.flush()
        status, _, body, reset = await client.response(stream_id)
        assert (status, body, reset) == (413, b"too large", None)
        event = await client.event(h2.events.StreamReset, stream_id)
        assert event.error_code == ErrorCodes.NO_ERROR
        # The connection goes on.
        status, _, body, _ = await client.response(client.request(b"GET", b"/next"))
        assert status == 413
        client.close()


async def test_bodies_nobody_reads_give_the_connection_window_back() -> None:
    release = asyncio.Event()

    async def handle(req: Request, res: Response) -> None:
        await release.wait()  # never reads the body
        await res.send(200, TEXT, b"late")

    async with Server(handle) as server:
        client = await server.raw_client()
        await client.event(h2.events.WindowUpdated, 0)  # the larger connection window
        window = client.h2.outbound_flow_control_window
        assert window == CONNECTION_WINDOW
        # Padded DATA on streams that are reset unread: more than half the
        # connection window, so the server must hand it back to go on.
        for _ in range(12):
            stream_id = client.request(b"POST", b"/up", end_stream=False)
            for _ in range(12):
                client.h2.send_data(stream_id, b"p" * 16000, pad_length=200)
            client.flush()
            await asyncio.sleep(0.01)
            client.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
            client.flush()
        assert client.h2.outbound_flow_control_window < window / 2
        await client.event(h2.events.WindowUpdated, 0)
        # h2 hands credit back in batches of half the window: less is pending.
        assert window - client.h2.outbound_flow_control_window < CONNECTION_WINDOW / 2
        release.set()
        client.close()


# -- clients that go away -----------------------------------------------------------


async def test_client_reset_reaches_the_handler_quietly(caplog: pytest.LogCaptureFixture) -> None:
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handle(req: Request, res: Response) -> None:
        if req.path == "/after":
            await res.send(200, TEXT, b"still serving")
            return
        await res.start_stream(200, [("content-type", "text/event-stream")])
        try:
            while True:
                await res.write(b": keep-alive\n\n")
                await asyncio.sleep(0.01)
        except ClientGone:
            outcome.set_result("client gone")
            raise

    async with Server(handle) as server:
        client = await server.raw_client()
        stream_id = client.request(b"GET", b"/sse")
        await client.event(h2.events.DataReceived, stream_id)
        client.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        client.flush()
        assert await asyncio.wait_for(outcome, 5) == "client gone"
        status, _, body, _ = await client.response(client.request(b"GET", b"/after"))
        assert (status, body) == (200, b"still serving")
        assert server.conns[0].idle
        client.close()
        await server.all_closed()
    assert errors_logged(caplog) == []


async def test_reset_streams_still_running_count_against_the_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def handle(req: Request, res: Response) -> None:
        if req.path == "/slow":
            await release.wait()  # keeps running after the client reset it
        await res.send(200, TEXT, b"ok")

    async with Server(handle, max_concurrent_streams=2) as server:
        client = await server.raw_client()
        await client.event(h2.events.RemoteSettingsChanged)
        for _ in range(2):
            stream_id = client.request(b"GET", b"/slow")
            client.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        # Closed for h2, but two handlers still run: a third stream is refused.
        refused = client.request(b"GET", b"/slow")
        event = await client.event(h2.events.StreamReset, refused)
        assert event.error_code == ErrorCodes.REFUSED_STREAM
        release.set()
        await asyncio.sleep(0.05)
        status, _, body, _ = await client.response(client.request(b"GET", b"/fast"))
        assert (status, body) == (200, b"ok")
        client.close()
    assert errors_logged(caplog) == []


async def _trickle_until_gone(res: Response, outcome: asyncio.Future[str]) -> None:
    """Write a byte every 10 ms until the client is gone; then resolve ``outcome``."""
    try:
        while True:
            await res.write(b".")
            await asyncio.sleep(0.01)
    except ClientGone:
        outcome.set_result("gone")


async def test_lost_connection_ends_body_reads_and_writes() -> None:
    reading: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    writing: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    started = asyncio.Event()

    async def handle(req: Request, res: Response) -> None:
        if req.method == "POST":
            try:
                await req.body(1024)
            except ClientGone:
                reading.set_result("gone")
            return
        await res.start_stream(200, TEXT)
        started.set()
        await _trickle_until_gone(res, writing)

    async with Server(handle) as server:
        client = await server.raw_client()
        client.request(b"POST", b"/up", end_stream=False)
        client.request(b"GET", b"/sse")
        await asyncio.wait_for(started.wait(), 5)
        client.writer.transport.abort()
        assert await asyncio.wait_for(reading, 5) == "gone"
        assert await asyncio.wait_for(writing, 5) == "gone"
        await server.all_closed()
        assert server.closed == server.conns  # on_close, once


async def test_client_goaway_closes_the_connection() -> None:
    writing: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handle(req: Request, res: Response) -> None:
        await res.start_stream(200, TEXT)
        await _trickle_until_gone(res, writing)

    async with Server(handle) as server:
        client = await server.raw_client()
        stream_id = client.request(b"GET", b"/sse")
        await client.event(h2.events.DataReceived, stream_id)
        client.h2.close_connection()
        client.flush()
        assert await asyncio.wait_for(writing, 5) == "gone"
        await server.all_closed()
        client.close()


async def test_handler_error_resets_the_stream_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handle(req: Request, res: Response) -> None:
        await res.start_stream(200, TEXT)
        raise RuntimeError("boom")

    async with Server(handle) as server:
        client = await server.raw_client()
        _, _, _, reset = await client.response(client.request(b"GET", b"/x"))
        assert reset == ErrorCodes.INTERNAL_ERROR
        client.close()
    assert any("unhandled error on GET" in message for message in errors_logged(caplog))


# -- closing ------------------------------------------------------------------------


async def test_shutdown_refuses_new_streams_and_goes_away_after_the_open_one() -> None:
    release = asyncio.Event()

    async def handle(req: Request, res: Response) -> None:
        await res.start_stream(200, TEXT)
        await res.write(b"first ")
        await release.wait()
        await res.write(b"second")
        await res.end_stream()

    async with Server(handle) as server:
        reader, writer = await server.connect()
        client = RawClient(reader, writer)  # to send; frames are read bare below
        frames = FrameReader(reader)
        client.request(b"GET", b"/slow")

        async def next_on(stream_id: int) -> Frame:
            while True:
                frame = await frames.next()
                assert frame is not None
                if frame.stream_id == stream_id:
                    return frame

        assert isinstance(await next_on(1), HeadersFrame)
        first = await next_on(1)
        assert isinstance(first, DataFrame) and first.data == b"first "

        conn = server.conns[0]
        conn.shutdown()
        assert not conn.idle

        # A stream opened after the shutdown is refused; the open one goes on.
        client.request(b"GET", b"/late", stream_id=3)
        refused = await next_on(3)
        assert isinstance(refused, RstStreamFrame)
        assert refused.error_code == ErrorCodes.REFUSED_STREAM

        release.set()
        rest = b""
        while True:
            frame = await next_on(1)
            assert isinstance(frame, DataFrame)
            rest += frame.data
            if "END_STREAM" in frame.flags:
                break
        assert rest == b"second"
        # Only then the GOAWAY (clients on h2 drop whatever follows one), and
        # the server closes its side.
        goaway = await next_on(0)
        while not isinstance(goaway, GoAwayFrame):
            goaway = await next_on(0)
        assert goaway.error_code == ErrorCodes.NO_ERROR
        assert await frames.next() is None
        writer.close()
        await server.all_closed()
        assert conn.idle


async def test_shutdown_of_an_idle_connection_closes_it_at_once() -> None:
    async with Server(echo) as server, h2c_client() as http:
        assert (await http.get(f"{server.url}/x")).status_code == 200
        server.conns[0].shutdown()
        await server.all_closed()


async def test_idle_connection_is_closed_after_the_timeout() -> None:
    async with Server(echo, idle_timeout_s=0.3) as server:
        client = await server.raw_client()
        status, _, _, _ = await client.response(client.request(b"GET", b"/x"))
        assert status == 200
        await asyncio.sleep(0.15)
        status, _, _, _ = await client.response(client.request(b"GET", b"/y"))
        assert status == 200  # the timer counts from the last stream's end
        started = asyncio.get_running_loop().time()
        terminated = await client.event(h2.events.ConnectionTerminated)
        assert terminated.error_code == ErrorCodes.NO_ERROR
        assert 0.2 < asyncio.get_running_loop().time() - started < 2
        await client.eof()
        client.close()
        await server.all_closed()


@pytest.mark.parametrize(
    "garbage",
    [
        PREFACE + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not frames after the preface
        PREFACE + b"\x00\x00\x04\x01\x00\x00\x00\x00\x00junk",  # SETTINGS of a wrong length
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 30,  # no preface at all
    ],
)
async def test_garbage_closes_the_connection_quietly(
    garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with Server(echo) as server:
        reader, writer = await server.connect()
        writer.write(garbage)
        frames = FrameReader(reader)
        goaway = None
        while (frame := await frames.next()) is not None:  # until the server closes
            if isinstance(frame, GoAwayFrame):
                goaway = frame
        writer.close()
        await server.all_closed()
    if garbage.startswith(PREFACE):
        assert goaway is not None
        assert goaway.error_code in (ErrorCodes.PROTOCOL_ERROR, ErrorCodes.FRAME_SIZE_ERROR)
    assert errors_logged(caplog) == []


# -- the same on uvloop -------------------------------------------------------------


def test_main_scenarios_on_uvloop(caplog: pytest.LogCaptureFixture) -> None:
    async def scenarios() -> None:
        await test_get_and_post_round_trip()
        await test_connection_taken_over_from_http1()
        await test_large_bodies_both_ways_respect_flow_control()
        await test_streaming_response_arrives_as_written()
        await test_slow_reader_holds_the_response_back()
        await test_request_body_credit_follows_the_handler_not_the_socket()
        await test_client_reset_reaches_the_handler_quietly(caplog)
        await test_shutdown_refuses_new_streams_and_goes_away_after_the_open_one()
        await test_idle_connection_is_closed_after_the_timeout()
        for garbage in (PREFACE + b"GET / HTTP/1.1\r\n\r\n", b"nonsense" * 5):
            await test_garbage_closes_the_connection_quietly(garbage, caplog)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenarios())
