"""HTTP/1.1 connections of the gateway's own server (gateway/server.py).

One ``asyncio.Protocol`` per connection, parsed by httptools (llhttp, the
parser in Node): bytes go from the socket to the handler without any message
dict or thread hand-off in between, and an idle live reader costs a few
kilobytes, not the tens of kilobytes of a general-purpose server.

What a connection does, in the order a request meets it:

- a connection that opens with the HTTP/2 preface is handed to
  ``Http2Connection`` (cleartext HTTP/2 with prior knowledge), and so is a
  TLS connection whose ALPN chose ``h2``;
- header limits (431), malformed requests (400), HTTP versions other than
  1.0 and 1.1 (505), transfer codings other than chunked (501) and a slow
  client (408: a request head must arrive whole within the read timeout of its
  first byte, a body must not pause for longer) are answered here, before the
  app sees anything;
- the handler starts as soon as the headers are in, in the connection's one
  task (a task per request would cost more than the rest of a small append's
  dispatch); the body streams to it (``Expect: 100-continue`` is answered when
  it first reads), and reading pauses while a body piles up that nobody reads
  yet;
- pipelined requests wait their turn: one response at a time, in order;
- responses are written straight to the transport, waiting for it to drain
  when the client reads slowly; SSE goes out with chunked encoding. No header
  value holding CR, LF or NUL is ever written (``check_header_value``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httptools

from gateway.servers.native.http2 import PREFACE
from gateway.servers.native.tls import selected_alpn
from gateway.web.request import (
    ALLOWED_METHODS,
    INTERNAL_ERROR_REASON,
    INTERNAL_ERROR_STATUS,
    LIST_HEADERS,
    ClientGone,
    Headers,
    Request,
    Response,
    bodiless,
    check_header_value,
    decode_url_path,
)

if TYPE_CHECKING:
    from gateway.servers.native.server import ServerState

log = logging.getLogger("gateway.server")

# While this much body is buffered and unread, stop reading from the socket.
BODY_HIGH_WATER = 1024 * 1024
MAX_HEADERS = 200

# Connection states, for the timeout sweep.
IDLE = 0  # between requests: the keep-alive timeout applies
# a request is arriving: its head has one deadline from its first byte, its
# body the read timeout between bytes
READING = 1
BUSY = 2  # the handler has the whole request: no timeout (live reads wait here)

_STATUS_LINES = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("latin-1") for s in HTTPStatus
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
# Bodies above this size are written beside the header block instead of being
# copied into one buffer with it.
_COPY_LIMIT = 16 * 1024

# Most of a response head is the same few lines every time (the base headers,
# cache-control, content types): they are encoded once and kept, up to a bound,
# except for the headers whose values seldom repeat. The connection header is
# never kept, as each response must look at it.
_header_lines: dict[tuple[str, str], bytes] = {}
# Request header names as sent -> lower-case str: the same few on every request.
_header_names: dict[bytes, str] = {}
# Both caches are bounded in entries and in entry size: clients choose request
# header names (and, through stream content types, some response values).
_MAX_HEADER_NAMES = 1024
_MAX_HEADER_LINES = 1024
_MAX_CACHED_BYTES = 256
_VARYING_HEADERS = frozenset(
    {
        "stream-next-offset",
        "stream-cursor",
        "etag",
        "location",
        "producer-epoch",
        "producer-seq",
        "producer-expected-seq",
        "producer-received-seq",
        "content-length",
        "x-request-id",
        "stream-expires-at",
        "stream-ttl",
    }
)


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else f"HTTP/1.1 {status} Status\r\n".encode("latin-1")


def _plain_response(status: int, reason: str, extra: bytes = b"") -> bytes:
    """A response of the server itself (the app never saw the request)."""
    body = (reason + "\n").encode()
    return b"".join(
        [
            _status_line(status),
            b"content-type: text/plain; charset=utf-8\r\nx-content-type-options: nosniff\r\n",
            b"cache-control: no-store\r\nconnection: close\r\n",
            extra,
            b"content-length: %d\r\n\r\n" % len(body),
            body,
        ]
    )


# llhttp knows the registered methods only; any other is refused as the app
# refuses a known method it does not serve.
_UNKNOWN_METHOD = b"allow: %s\r\n" % ALLOWED_METHODS.encode()
# llhttp reports any first bytes that start no known method as an invalid
# method, binary garbage (a TLS handshake sent to this plain-HTTP port, say)
# included: only a method token followed by a space is an unknown method.
_METHOD_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ ")
# Room for the framing of a request head besides its URL and header names and
# values (request line, separators, whitespace).
_HEAD_FRAMING = 16 * 1024
# llhttp's error for a well-formed HTTP-version it does not know (HTTP/1.2,
# HTTP/3.0); HTTP/0.9 and HTTP/2.0 it passes on to on_headers_complete.
_UNKNOWN_VERSION = "Invalid HTTP version"
_SUPPORTED_VERSIONS = ("1.1", "1.0")


class _HeadRefused(Exception):
    """A request refused on its head alone (too large, or missing Host)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Http1Request(Request):
    __slots__ = (
        "_body",
        "_buffered",
        "_conn",
        "_continue",
        "_raw_url",
        "_waiter",
        "complete",
        "http_version",
        "keep_alive",
    )

    def __init__(
        self,
        conn: Http1Connection,
        raw_url: bytes,
        headers: dict[str, str],
        repeated: frozenset[str] | None,
    ) -> None:
        super().__init__()
        self._conn = conn
        self._raw_url = raw_url
        self._headers = headers
        self._repeated = repeated
        self.scheme = conn.server.scheme
        self.peer = conn.peer
        self._body: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._continue = headers.get("expect", "").lower() == "100-continue"
        self.complete = False  # the whole body has arrived
        self.http_version = "1.1"
        self.keep_alive = True

    # -- fed by the connection --------------------------------------------------------

    def feed(self, chunk: bytes) -> bool:
        """Buffer a body chunk; True when reading should pause."""
        self._body.append(chunk)
        self._buffered += len(chunk)
        self._wake()
        return self._buffered > BODY_HIGH_WATER

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- read by the handler ----------------------------------------------------------

    def authority(self) -> str:
        return self._headers.get("host") or self._conn.server.default_host

    def release(self) -> None:
        super().release()
        self._raw_url = b""

    def _decode_path(self) -> str:
        raw = self._raw_url
        if raw[:1] != b"/":
            # The absolute form (``GET http://host/path``), which servers must
            # accept too (RFC 9112 section 3.2.2): the path follows the authority.
            _, sep, rest = raw.partition(b"://")
            raw = b"/" + rest.partition(b"/")[2] if sep else raw
        return decode_url_path(raw)

    async def _more(self) -> None:
        """Wait for more body (or its end); ClientGone if the client left."""
        conn = self._conn
        if conn.closed:
            raise ClientGone()
        if self._continue:
            self._continue = False
            conn.transport.write(_CONTINUE)
        conn.want_body()
        waiter = self._waiter = conn.loop.create_future()
        await waiter
        if conn.closed and not self.complete:
            raise ClientGone()

    def _take(self) -> list[bytes]:
        body, self._body, self._buffered = self._body, [], 0
        return body

    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self._body:
                for chunk in self._take():
                    yield chunk
            elif self.complete:
                return
            else:
                await self._more()

    async def _whole_body(self) -> bytes:
        while not self.complete:
            await self._more()
        return self._joined()

    def _body_at_hand(self) -> bytes | None:
        # The common case: a small body arrived with its headers.
        return self._joined() if self.complete else None

    def _joined(self) -> bytes:
        body = self._take()
        return body[0] if len(body) == 1 else b"".join(body)


class Http1Response(Response):
    __slots__ = ("_chunked", "_conn", "close", "ended")

    def __init__(self, conn: Http1Connection) -> None:
        super().__init__()
        self._conn = conn
        self._chunked = False
        self.close = False  # close the connection after this response
        self.ended = False

    def _head(self, status: int, headers: Headers, extra: str) -> bytes:
        conn = self._conn
        parts = [_status_line(status)]
        for pair in headers:
            line = _header_lines.get(pair)
            if line is None:  # (a cached line was checked when it was cached)
                name, value = pair
                check_header_value(name, value)
                line = f"{name}: {value}\r\n".encode("latin-1")
                if name == "connection":
                    if value.lower() == "close":
                        self.close = True
                elif (
                    name not in _VARYING_HEADERS
                    and len(_header_lines) < _MAX_HEADER_LINES
                    and len(line) <= _MAX_CACHED_BYTES
                ):
                    _header_lines[pair] = line
            parts.append(line)
        req = conn.request
        # The connection ends after this response (an Upgrade request,
        # or unparsable bytes after it): say so, or the client may reuse it.
        if req is None or not req.keep_alive or conn.server.stopping or conn._close_after_response:
            if not self.close:
                parts.append(b"connection: close\r\n")
            self.close = True
        elif req.http_version == "1.0" and not self.close:
            parts.append(b"connection: keep-alive\r\n")  # HTTP/1.0 closes by default
        parts.append(conn.server.date)
        if self.request_id is not None:  # (with its header line: Recorder.begin)
            parts.append(self.id_line)
        parts.append(extra.encode())
        return b"".join(parts)

    async def send(
        self, status: int, headers: Headers, body: bytes = b"", *, head: bool = False
    ) -> None:
        conn = self._conn
        # The head first: a header it refuses (UnsafeHeader) leaves the
        # response unstarted, so that the app can still answer with a 500.
        if bodiless(status, head):
            block = self._head(status, headers, "\r\n")
            body = b""
        else:
            block = self._head(status, headers, f"content-length: {len(body)}\r\n\r\n")
        self.started = True
        self.ended = True
        self.status = status
        self.sent = len(body)
        if conn.closed:
            return
        if len(body) <= _COPY_LIMIT:
            conn.transport.write(block + body)
        else:
            conn.transport.writelines([block, body])
        if conn._drain_waiter is not None:
            await conn.drain()

    async def start_stream(self, status: int, headers: Headers) -> None:
        conn = self._conn
        req = conn.request
        if req is not None and req.http_version == "1.1":
            block = self._head(status, headers, "transfer-encoding: chunked\r\n\r\n")
            self._chunked = True
        else:  # HTTP/1.0: the body ends when the connection does
            self.close = True  # (before _head, which would add a second close)
            block = self._head(status, headers, "connection: close\r\n\r\n")
        self.started = True
        self.status = status
        if conn.closed:
            raise ClientGone()
        conn.transport.write(block)

    async def write(self, chunk: bytes) -> None:
        conn = self._conn
        if conn.closed:
            raise ClientGone()
        if not chunk:
            return
        self.sent += len(chunk)
        if self._chunked:
            conn.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            conn.transport.write(chunk)
        await conn.drain()

    async def end_stream(self) -> None:
        self.end()

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        conn = self._conn
        if self._chunked and not conn.closed:
            conn.transport.write(_LAST_CHUNK)


class Http1Connection(asyncio.Protocol):
    __slots__ = (
        "_close_after_response",
        "_drain_waiter",
        "_eof",
        "_head_bytes",
        "_head_deadline",
        "_header_bytes",
        "_headers",
        "_in_head",
        "_next_request",
        "_parser",
        "_parsing",
        "_pending",
        "_preamble",
        "_reading_paused",
        "_repeated",
        "_response",
        "_task",
        "_url",
        "closed",
        "deadline",
        "loop",
        "peer",
        "request",
        "server",
        "state",
        "transport",
        "write_deadline",
    )

    def __init__(self, server: ServerState) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: Any = None
        self.closed = False
        self.state = IDLE
        self.deadline = 0.0
        self.write_deadline = 0.0  # while the client does not read what we write
        self._parser = httptools.HttpRequestParser(self)
        self._preamble: bytes | None = b""  # first bytes, until we know it is not HTTP/2
        self._url = b""
        self._headers: dict[str, str] = {}
        self._repeated: set[str] | None = None  # names sent twice (not list headers)
        self.peer: str | None = None  # the client's address
        self._header_bytes = 0
        self._in_head = False  # a request head has begun and not ended
        self._head_bytes = 0  # bytes of it read while it stayed unfinished
        self._head_deadline = 0.0  # when it must have arrived whole
        self._parsing: Http1Request | None = None  # the request being received
        self.request: Http1Request | None = None  # the request being answered
        self._response: Http1Response | None = None
        # The connection's task (see _serve), held here as the event loop holds
        # tasks only weakly; while idle it waits on _next_request.
        self._task: asyncio.Task[None] | None = None
        self._next_request: asyncio.Future[None] | None = None
        self._pending: list[Http1Request] = []  # pipelined requests, in order
        self._reading_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # Close once the response in progress is sent: an Upgrade request (we
        # speak no other protocol here), or a refused request after it.
        self._close_after_response = False
        self._eof = False  # the client sent all it will send

    # -- transport events ---------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        if not self.server.admit(self):
            transport.write(_plain_response(503, "too many connections"))
            transport.close()
            self.closed = True
            return
        if self.server.scheme == "https" and selected_alpn(transport) == "h2":
            self._switch_to_http2(b"")
            return
        self.deadline = self.loop.time() + self.server.keep_alive_timeout

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.server.forget(self)
        for req in (self._parsing, self.request, *self._pending):
            if req is not None:
                req._wake()
        waiter, self._next_request = self._next_request, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # the idle connection's task ends
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        if self._drain_waiter is None:
            self._drain_waiter = self.loop.create_future()
            # A client that stops reading must not hold its handler forever.
            self.write_deadline = self.loop.time() + self.server.read_timeout

    def resume_writing(self) -> None:
        self.write_deadline = 0.0
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None:
            await waiter
            if self.closed:
                raise ClientGone()

    def data_received(self, data: bytes) -> None:
        if self._preamble is not None and not self._check_preamble(data):
            return
        if self.state == READING and not self._in_head:
            # A body: the read timeout runs between bytes. A head keeps the one
            # deadline set by its first byte however slowly it trickles in, or a
            # byte every few seconds would hold the connection forever.
            self.deadline = self.loop.time() + self.server.read_timeout
        # The head still unfinished from earlier reads, if any (its header dict).
        head = self._headers if self._in_head else None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # We speak no other protocol on an HTTP/1.1 connection (h2c upgrades
            # included): the request is answered, then the connection ends.
            self._close_after_response = True
            self.transport.pause_reading()
        except _HeadRefused as exc:
            self._refuse(exc.status, exc.reason)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadRefused):  # raised in on_headers_complete
                self._refuse(cause.status, cause.reason)
            else:
                log.exception("HTTP/1.1 parser callback failed")
                self._refuse(INTERNAL_ERROR_STATUS, INTERNAL_ERROR_REASON)
        except httptools.HttpParserInvalidMethodError as exc:
            # With no request in progress, the refused request starts in ``data``
            # (a split method token leaves at least its end there).
            if _METHOD_TOKEN.match(data.lstrip(b"\r\n")):
                self._refuse(405, "method not allowed", _UNKNOWN_METHOD)
            else:
                self._refuse(400, f"malformed HTTP/1.1 request: {_reason(exc)}")
        except httptools.HttpParserError as exc:
            reason = _reason(exc)
            if reason == _UNKNOWN_VERSION:
                self._refuse(505, "HTTP version not supported")
            else:
                self._refuse(400, f"malformed HTTP/1.1 request: {reason}")
        else:
            if head is not None and self._in_head and self._headers is head:
                # httptools keeps a header line to itself until the line ends, so
                # on_header never sees one that does not: without this count, one
                # endless line would be buffered (and re-copied) without bound.
                # Every byte of this read belongs to the same unfinished head.
                self._head_bytes += len(data)
                limit = self.server.max_url_bytes + self.server.max_header_bytes + _HEAD_FRAMING
                if self._head_bytes > limit:
                    self._refuse(431, "request headers too large")

    def _check_preamble(self, data: bytes) -> bool:
        """Hand a connection that opens with the HTTP/2 preface to HTTP/2.
        False while the first bytes could still be either."""
        seen = self._preamble + data if self._preamble else data
        if seen.startswith(PREFACE):
            self._switch_to_http2(seen)
            return False
        if PREFACE.startswith(seen):
            self._preamble = seen
            return False
        self._preamble = None
        if seen is not data:
            self.data_received(seen)
            return False
        return True

    def _switch_to_http2(self, data: bytes) -> None:
        server = self.server
        server.forget(self)
        conn = server.http2_connection()
        self.transport.set_protocol(conn)
        conn.connection_made(self.transport)
        server.adopt(conn)
        if data:
            conn.data_received(data)

    def eof_received(self) -> bool | None:
        # A half-closed client may still read the response it is waiting for,
        # but a request body still arriving never will: close now, so that its
        # handler ends (ClientGone) instead of waiting for the read timeout.
        if self._parsing is not None or self.request is None:
            return False
        if self.server.scheme == "https":
            # The client's close_notify: a TLS transport cannot stay half-open
            # and shuts down now, so the client is gone for its handlers too.
            self.closed = True
            return False
        self._eof = True  # close once the responses in progress are sent
        return True

    def _refuse(self, status: int, reason: str, extra: bytes = b"") -> None:
        """Answer a request we cannot parse or accept, then close."""
        if self.closed:
            return
        res = self._response
        if self.request is None or (
            # What cannot be parsed is the body of the request being answered (a
            # bad chunk, a bad Transfer-Encoding) and nothing is sent yet: its
            # handler would wait for that body until the read timeout, and the
            # client would get no answer at all. Answer for it now.
            self._parsing is self.request and res is not None and not res.started
        ):
            self.transport.write(_plain_response(status, reason, extra))
            self.transport.close()
            self.closed = True  # the handler now writes nothing (it gets ClientGone)
        else:
            # A response is in progress: end after it, without a second one.
            self._pending.clear()
            self._parsing = None
            self._close_after_response = True
            self.transport.pause_reading()

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._repeated = None
        self._header_bytes = 0
        self._in_head = True
        self._head_bytes = 0
        self._head_deadline = self.loop.time() + self.server.read_timeout
        if self.state == IDLE:
            self.state = READING
            self.deadline = self._head_deadline

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if len(self._url) > self.server.max_url_bytes:
            raise _HeadRefused(414, "URL too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > self.server.max_header_bytes:
            raise _HeadRefused(431, "request headers too large")
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            raise _HeadRefused(431, "too many request headers")
        # Names are case-insensitive.
        key = _header_names.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if len(_header_names) < _MAX_HEADER_NAMES and len(name) <= _MAX_CACHED_BYTES:
                _header_names[name] = key
        # llhttp drops the whitespace before a value, not after it (RFC 9110
        # section 5.5: neither belongs to the value; "Content-Length: 5 " is 5).
        text = value.decode("latin-1").rstrip(" \t")
        if key in headers:  # a repeated header: a list, or refused when read
            if key == "host":  # refused now: it says where the request goes
                raise _HeadRefused(400, "more than one Host header")  # RFC 9112 section 3.2
            if key in LIST_HEADERS or key == "transfer-encoding":
                # (Transfer-Encoding lines are one list of codings, checked whole
                # in on_headers_complete: RFC 9112 section 6.1.)
                headers[key] += ", " + text
            else:
                if self._repeated is None:
                    self._repeated = set()
                self._repeated.add(key)
        else:
            headers[key] = text

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        repeated = frozenset(self._repeated) if self._repeated else None
        req = Http1Request(self, self._url, self._headers, repeated)
        req.method = parser.get_method().decode("ascii")
        req.http_version = parser.get_http_version()
        req.http1 = True
        req.keep_alive = parser.should_keep_alive()
        if req.http_version not in _SUPPORTED_VERSIONS:  # HTTP/0.9, HTTP/2.0
            raise _HeadRefused(505, "HTTP version not supported")
        if req.http_version == "1.1" and "host" not in self._headers:
            raise _HeadRefused(400, "Host header required")  # RFC 9112 section 3.2
        codings = self._headers.get("transfer-encoding")
        if codings is not None:
            _check_transfer_codings(codings, req.http_version)
        _, _, query = self._url.partition(b"?")
        req.query_string = query.decode("latin-1")
        self._parsing = req
        if self.request is None:
            self._start(req)
        else:
            self._pending.append(req)

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        if req is None:
            return
        if req.feed(body) and not self._reading_paused and req is not self._waiting_for():
            self._pause_reading()

    def on_message_complete(self) -> None:
        req = self._parsing
        self._parsing = None
        if req is not None:
            req.finish()
        if self.request is req and self.state == READING:
            self.state = BUSY
        if self._pending:
            # Let pipelined requests wait in the socket, not in our memory.
            self._pause_reading()

    def _waiting_for(self) -> Http1Request | None:
        req = self.request
        return req if req is not None and req._waiter is not None else None

    # -- requests -----------------------------------------------------------------------

    def _start(self, req: Http1Request) -> None:
        self.request = req
        if not req.complete and self._parsing is req:
            self.state = READING  # its body: the read timeout between bytes
            self.deadline = self.loop.time() + self.server.read_timeout
        else:
            self.state = BUSY
        self._response = Http1Response(self)
        waiter = self._next_request
        if waiter is not None:  # the connection's task waits for this request
            self._next_request = None
            waiter.set_result(None)
        elif self._task is None:
            self._task = self.loop.create_task(self._serve())

    async def _serve(self) -> None:
        """The connection's task: answers its requests one after another.

        One task for the connection's life rather than one per request: a
        request then costs a future instead of a task (whose creation and
        registration cost more than the rest of a small append's dispatch)."""
        try:
            while True:
                req, res = self.request, self._response
                if req is None or res is None:
                    return  # the connection ended while it was idle
                try:
                    await self.server.handle(req, res)
                except Exception:
                    log.exception("request handler failed")
                if not self._finished(req, res):
                    return
                if self.request is None:  # idle until the next request's head
                    waiter = self._next_request = self.loop.create_future()
                    await waiter
        finally:
            self._task = self._next_request = None

    def _finished(self, req: Http1Request, res: Http1Response) -> bool:
        """After a response: close, start the next request, or go idle. False
        when the connection is done."""
        self.request = self._response = None
        if self.closed:
            return False
        if not res.started:
            self.transport.write(_plain_response(INTERNAL_ERROR_STATUS, INTERNAL_ERROR_REASON))
            res.close = True
        elif not res.ended:
            res.end()
        done = res.close or self._close_after_response or self.server.stopping
        if done or (self._eof and not self._pending):
            # After EOF nothing can follow: closing now, not after the keep-alive
            # timeout, frees the connection (and its slot) at once.
            self.transport.close()
            return False
        if self._pending:
            self._start(self._pending.pop(0))
        elif self._parsing is not None:  # a request body is still arriving
            self.state = READING
            self.deadline = self.loop.time() + self.server.read_timeout
        elif self._in_head:  # the next request's head is arriving
            self.state = READING
            self.deadline = self._head_deadline
        else:
            self.state = IDLE
            self.deadline = self.loop.time() + self.server.keep_alive_timeout
        self.want_body()
        return True

    def want_body(self) -> None:
        """Someone waits for bytes from the client: make sure we read them."""
        if self._reading_paused and not self._pending:
            self._reading_paused = False
            self.transport.resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    # -- server events ------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return self.state == IDLE and self.request is None

    def has_expired(self, now: float) -> bool:
        return (self.state != BUSY and self.deadline < now) or 0.0 < self.write_deadline < now

    def expire(self) -> None:
        """A deadline passed (checked by the server's sweep)."""
        if self.closed:
            return
        if self.write_deadline:  # the client stopped reading: give up on it
            self.transport.abort()
        elif self.state == IDLE:
            self.transport.close()
        elif self.request is None:
            self.transport.write(_plain_response(408, "request timeout"))
            self.transport.close()
        else:  # the body stopped arriving: the handler sees ClientGone
            self.transport.close()

    def shutdown(self) -> None:
        """Stop after the response in progress (the server is stopping); a
        connection with none (idle, or a request still arriving) closes now."""
        if self.request is None and not self.closed:
            self.transport.close()


def _check_transfer_codings(value: str, http_version: str) -> None:
    """RFC 9112 section 6.1: the body of a request with Transfer-Encoding is
    framed by its final coding, which must be chunked; we decode no other.
    (llhttp refuses some of these itself and lets the others through.)"""
    if http_version == "1.0":
        # Section 6.1: an HTTP/1.0 message's framing is faulty with one.
        raise _HeadRefused(400, "Transfer-Encoding in an HTTP/1.0 request")
    codings = [coding for part in value.split(",") if (coding := part.strip(" \t").lower())]
    if "chunked" in codings and (codings.count("chunked") > 1 or codings[-1] != "chunked"):
        raise _HeadRefused(400, "chunked must be the final transfer coding, once")
    if any(coding != "chunked" for coding in codings):
        raise _HeadRefused(501, "unsupported transfer coding")
    if not codings:
        raise _HeadRefused(400, "empty Transfer-Encoding")


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text[:100] if text else "unparsable"
