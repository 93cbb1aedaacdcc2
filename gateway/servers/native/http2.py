"""HTTP/2 for our own server: one connection as an ``asyncio.Protocol`` on top
of the ``h2`` state machine, serving the app through gateway/http.py.

Cleartext with prior knowledge only (h2c): the client opens with the HTTP/2
preface. The HTTP/1.1 protocol hands the socket over when it sees the preface
(``transport.set_protocol(conn)``, ``conn.connection_made(transport)``,
``conn.data_received(bytes_already_read)``), or this class serves a listener
by itself.

Every request stream gets one task, started as soon as its HEADERS arrive, so
that a handler can answer before (or without) reading the body. The body
reaches the handler chunk by chunk, and flow-control credit goes back to the
client only as the handler takes chunks: a slow consumer slows the sender down
instead of filling our memory. The other way round, responses are written no
faster than the client's flow-control windows and the socket allow.

Most streams are idle SSE readers, tens of thousands per process, so the state
kept per stream and per connection is small (``__slots__``, no helper tasks,
one idle timer per connection).

A client cannot make us buffer without bound, run handlers without limit or
keep the event loop to itself:

- reading stops while the socket's write buffer is full (PING and SETTINGS
  make h2 queue replies), and an oversized frame is refused on its header;
- at most FRAMES_PER_STEP frames (HEADERS_PER_STEP HEADERS) are handled per
  turn of the event loop; reading pauses until the rest of a read is handled;
- handlers still running count against ``max_concurrent_streams`` even once
  the client has reset their streams, which h2 itself does not count; a
  handler sees ClientGone at its next read or write, and one that does
  neither (a long-poll waiting for data) is cancelled GONE_GRACE_S after the
  reset;
- resets, refused streams, PING, SETTINGS, WINDOW_UPDATE, PRIORITY, empty DATA
  and new streams each have a budget per connection (a burst, refilled at a
  steady rate, FLOOD_LIMITS); a client beyond one gets GOAWAY
  ENHANCE_YOUR_CALM ("rapid reset", CVE-2023-44487, and its cousins);
- a response the client does not take holds at most what its handler had in
  hand: while the bytes handlers wait to send plus the socket's write buffer
  exceed SEND_BUDGET, new streams wait before their handler starts, and no
  more than STARTING_LIMIT handlers start per STARTING_S until they have
  answered or waited (a burst of requests cannot all read a page at once);
- a write held back (flow control or a full socket) for ``write_timeout_s``
  without progress gives the client up, and request bodies awaited for
  ``read_timeout_s`` without a byte are reset, as on HTTP/1.1: the server's
  sweep asks ``has_expired`` and calls ``expire``.

``h2`` refuses every frame once a GOAWAY has gone either way (python-hyper/h2
#1181), so a graceful ``shutdown`` writes its GOAWAY itself, outside the state
machine, and keeps serving the open streams; on the client's GOAWAY we close.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings

from gateway.web.request import (
    INTERNAL_ERROR_BODY,
    INTERNAL_ERROR_HEADERS,
    INTERNAL_ERROR_STATUS,
    REQUEST_ID_HEADER,
    ClientGone,
    Headers,
    Request,
    Response,
    bodiless,
    check_header_value,
    collect_headers,
    decode_url_path,
)

log = logging.getLogger("gateway.http2")

_REQUEST_ID = REQUEST_ID_HEADER.encode()
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

Handler = Callable[[Request, Response], Awaitable[None]]

# Inbound flow control. A request body buffers at most STREAM_WINDOW bytes
# that the handler has not taken yet; the connection window is larger so that
# a few stalled uploads do not stop every other stream on the connection.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 4 * 1024 * 1024
H2_DEFAULT_WINDOW = 65535

# After our last frame, how long we keep reading (and dropping) what the client
# still sends before closing: closing a socket with unread input makes the
# kernel send RST, which can destroy the response still in the client's buffer.
LINGER_S = 2.0
# On a graceful stop, how long the GOAWAY waits after the last response. Clients
# built on httpcore (httpx) fail a response that is still being read when a
# GOAWAY arrives with it, even though it came first on the wire.
GOAWAY_AFTER_S = 0.1

# Frames handled per turn of the event loop, and bytes handed to h2 at most per
# turn: a connection that sends thousands of small frames in one read yields
# to the others between steps. HEADERS frames cost more: h2 counts the open
# streams for each new one, a walk over all of them (up to
# max_concurrent_streams), so fewer of them make a step.
FRAMES_PER_STEP = 100
HEADERS_PER_STEP = 4
BYTES_PER_STEP = 256 * 1024
FRAME_HEADER = 9
_HEADERS_FRAME = 0x1  # the frame type
_ALL_TAKEN, _STEP_FULL, _OVERSIZED = range(3)  # how a step ends (_step_end)

# What a client may send per connection before GOAWAY ENHANCE_YOUR_CALM: a
# burst, refilled at a steady rate per second. Legitimate clients stay far
# below: browsers cancel a few streams on navigation, ping and change settings
# rarely, and send WINDOW_UPDATE as they take our data (each DATA frame we send
# gives two back).
FLOOD_LIMITS: dict[str, tuple[float, float]] = {
    "reset": (200, 100),  # RST_STREAM from the client, and streams we refuse
    "ping": (50, 10),
    "settings": (50, 10),
    "window_update": (1000, 200),
    "priority": (200, 50),
    "empty_data": (100, 20),  # DATA frames that carry nothing and end nothing
    "headers": (2000, 1000),  # new streams and trailers
}

# Bytes handlers may wait to send (beyond the flow-control windows) plus the
# socket's write buffer, per connection, before new streams wait to start.
SEND_BUDGET = 1024 * 1024
# Handlers started that have not yet answered or waited for anything: at most
# STARTING_LIMIT at a time, counted afresh every STARTING_S.
STARTING_LIMIT = 16
STARTING_S = 0.05
# A handler whose stream the client reset (or whose connection is gone) sees
# ClientGone at its next read or write; one that reads and writes nothing for
# this long (a long-poll waiting for data) is cancelled.
GONE_GRACE_S = 0.1

# Connection-specific headers HTTP/2 forbids (RFC 9113 section 8.2.2).
_CONNECTION_HEADERS = frozenset(
    ["connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection"]
)
# One string per method for all requests, not one per request.
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")}


class _Stream:
    """One request stream: the body received so far and what became of it."""

    __slots__ = (
        "chunks",
        "conn",
        "ended",
        "gone",
        "held",
        "id",
        "responded",
        "starting",
        "task",
        "unacked",
        "waiter",
    )

    def __init__(self, conn: Http2Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.chunks: list[bytes] | None = None  # received, not yet taken by the handler
        self.unacked = 0  # body bytes received whose flow-control credit is not back
        self.ended = False  # the client sent END_STREAM
        self.gone = False  # reset, or the connection is closing/lost
        self.responded = False  # we sent END_STREAM (or reset the stream)
        self.waiter: asyncio.Future[None] | None = None  # the task sleeps here
        self.task: asyncio.Task[None] | None = None  # None while waiting to start
        self.held = 0  # bytes the handler waits to send (flow control, full socket)
        self.starting = False  # started, and not yet answered or waited


class H2Request(Request):
    __slots__ = ("_authority", "_raw_path", "_stream")

    def __init__(
        self,
        stream: _Stream,
        method: str,
        raw_path: bytes,
        authority: str | None,
        headers: dict[str, str],
        repeated: frozenset[str] | None,
    ) -> None:
        super().__init__()
        self._stream = stream
        self.method = method
        self.http1 = False
        self.scheme = stream.conn._scheme
        self.peer = stream.conn.peer
        self._repeated = repeated
        path, _, query = raw_path.partition(b"?")
        self._raw_path = path
        self.query_string = query.decode("latin-1")
        self._authority = authority
        self._headers = headers

    def authority(self) -> str:
        return self._authority or self._headers.get("host", "")

    def _decode_path(self) -> str:
        return decode_url_path(self._raw_path)

    async def _chunks(self) -> AsyncIterator[bytes]:
        stream = self._stream
        conn = stream.conn
        while True:
            if stream.gone:
                raise ClientGone()
            if stream.chunks:
                chunks, stream.chunks = stream.chunks, None
                for chunk in chunks:
                    # The handler takes this chunk now: only now may the client
                    # send more in its place.
                    conn._consumed(stream, len(chunk))
                    yield chunk
                    if stream.gone:
                        raise ClientGone()
                continue
            if stream.ended:
                return
            conn._await_body(stream)
            try:
                await conn._wait(stream)
            finally:
                conn._body_came(stream)

    def release(self) -> None:
        super().release()
        if self._path is not None:  # decoded already: the raw form is not needed
            self._raw_path = b""


class H2Response(Response):
    __slots__ = ("_stream",)

    def __init__(self, stream: _Stream) -> None:
        super().__init__()
        self._stream = stream

    async def send(
        self, status: int, headers: Headers, body: bytes = b"", *, head: bool = False
    ) -> None:
        out = _response_headers(status, headers)  # refused values: nothing started yet
        self.started = True
        self.status = status
        stream = self._stream
        conn = stream.conn
        if self.request_id is not None:
            out.append((_REQUEST_ID, self.request_id.encode()))
        if bodiless(status, head):
            body = b""
        else:
            out.append((b"content-length", str(len(body)).encode()))
            self.sent = len(body)
        await conn._send_headers(stream, out, end_stream=not body, body_size=len(body))
        if body:
            await conn._send_data(stream, body, end_stream=True)

    async def start_stream(self, status: int, headers: Headers) -> None:
        out = _response_headers(status, headers)
        self.started = True
        self.status = status
        if self.request_id is not None:
            out.append((_REQUEST_ID, self.request_id.encode()))
        stream = self._stream
        await stream.conn._send_headers(stream, out, False)

    async def write(self, chunk: bytes) -> None:
        self.sent += len(chunk)
        stream = self._stream
        await stream.conn._send_data(stream, chunk, end_stream=False)

    async def end_stream(self) -> None:
        stream = self._stream
        if not stream.responded and not stream.gone:
            with contextlib.suppress(ClientGone):  # quiet, also after the client left
                stream.conn._end(stream)


# What h2 itself enforces of the stream limit: nothing (see connection_made).
_UNLIMITED_STREAMS = 2**31 - 1


def _local_settings(max_concurrent_streams: int, max_header_list_size: int) -> Settings:
    return Settings(
        client=False,
        initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        },
    )


def _response_headers(status: int, headers: Headers) -> list[tuple[bytes, bytes]]:
    out = [(b":status", str(status).encode())]
    for name, value in headers:
        if name.lower() not in _CONNECTION_HEADERS:
            # h2 does not refuse CR/LF in values it sends (4.4 still passes
            # them): an HTTP/1.1 hop behind us could split the response.
            check_header_value(name, value)
            out.append((name.encode("latin-1"), value.encode("latin-1")))
    return out


class Http2Connection(asyncio.Protocol):
    """One HTTP/2 connection: frames in and out through ``h2``, one task per
    request stream running ``handle``."""

    __slots__ = (
        "_blocked",
        "_body_awaited",
        "_body_left",
        "_closing",
        "_doom_timer",
        "_doomed",
        "_drain_waiters",
        "_floods",
        "_goaway_sent",
        "_h2",
        "_handle",
        "_held",
        "_idle_since",
        "_idle_timeout",
        "_idle_timer",
        "_inbox",
        "_linger",
        "_loop",
        "_lost",
        "_max_streams",
        "_on_close",
        "_paused",
        "_queued",
        "_read_timeout",
        "_scheme",
        "_starting",
        "_starting_timer",
        "_step",
        "_streams",
        "_write_timeout",
        "peer",
        "read_deadline",
        "transport",
        "write_deadline",
    )

    def __init__(
        self,
        handle: Handler,
        *,
        on_close: Callable[[Http2Connection], None] | None = None,
        max_concurrent_streams: int = 1000,
        max_header_list_size: int = 65536,
        idle_timeout_s: float = 5.0,
        write_timeout_s: float = 30.0,
        read_timeout_s: float = 30.0,
        scheme: str = "http",
    ) -> None:
        self._handle = handle
        self._on_close = on_close
        self._idle_timeout = idle_timeout_s
        self._scheme = scheme
        self._max_streams = max_concurrent_streams
        h2 = H2Connection(
            H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True)
        )
        # Initial values apply at once, not when the client acknowledges them.
        # The larger window only lets the client send more than it assumes at
        # first; the header limit binds a client before it has read it.
        h2.local_settings = _local_settings(max_concurrent_streams, max_header_list_size)
        h2.decoder.max_header_list_size = max_header_list_size
        self._h2 = h2
        self._streams: dict[int, _Stream] = {}
        self._blocked: set[_Stream] = set()  # waiting for flow-control window
        self._drain_waiters: list[asyncio.Future[None]] = []
        # Public, as on the HTTP/1.1 protocol: the server aborts what a shutdown
        # has not closed in time.
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused = False  # the transport's write buffer is full
        self._goaway_sent = False  # shutdown: no new streams
        self._closing = False  # no more frames either way
        self._lost = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._linger: asyncio.TimerHandle | None = None
        self.peer: str | None = None  # the client's address
        # Inbound: what was read and not yet handed to h2 (more than one step's
        # worth), and how much of the frame h2 has begun is still to come (the
        # preface first: it is not a frame).
        self._inbox = b""
        self._body_left = len(PREFACE)
        self._step: asyncio.Handle | None = None  # the next step's call_soon
        # Flood budgets, by kind (FLOOD_LIMITS): (level, when), made on first use.
        self._floods: dict[str, tuple[float, float]] | None = None
        # Outbound: bytes handlers wait to send, streams waiting to start, and
        # handlers started and not yet settled (see _may_start).
        self._held = 0
        self._queued: deque[tuple[_Stream, H2Request, H2Response]] | None = None
        self._starting = 0
        self._starting_timer: asyncio.TimerHandle | None = None
        # While something cannot be written: when we give up on the client.
        self._write_timeout = write_timeout_s
        self.write_deadline = 0.0
        # While handlers wait for request bodies: when we give up on those.
        self._body_awaited: set[_Stream] | None = None
        self._read_timeout = read_timeout_s
        self.read_deadline = 0.0
        # Streams gone whose handlers are cancelled unless they end first.
        self._doomed: deque[tuple[float, _Stream]] | None = None
        self._doom_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        self._loop = asyncio.get_running_loop()
        self._h2.initiate_connection()
        # The client is told max_concurrent_streams, but h2 would end the
        # connection (PROTOCOL_ERROR) on one stream more; _on_request refuses
        # such streams itself, and counts them against the reset budget.
        self._h2.local_settings = _local_settings(
            _UNLIMITED_STREAMS, self._h2.decoder.max_header_list_size
        )
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - H2_DEFAULT_WINDOW)
        self._flush()
        self._became_idle()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # lingering: drop what the client still sends
        self._inbox = self._inbox + data if self._inbox else data
        if self._step is None:
            self._next_step()

    def _next_step(self, held_over: bool = False) -> None:
        """Hand h2 the next FRAMES_PER_STEP frames read; if more are left, read
        nothing new and come back on the event loop's next turn (``held_over``:
        this is such a turn, reading is paused)."""
        self._step = None
        if self._closing:
            self._inbox = b""
            return
        data = self._inbox
        end, stop = self._step_end(data)
        if end < len(data):
            chunk, self._inbox = data[:end], data[end:]
        else:
            chunk, self._inbox = data, b""
        if chunk:
            self._receive(chunk)
        if self._closing:
            self._inbox = b""
            return
        if stop == _OVERSIZED:
            # h2 checks a frame's length only once the whole frame has arrived,
            # so a client announcing a 16 MiB frame would have us buffer 16 MiB.
            self._h2.close_connection(ErrorCodes.FRAME_SIZE_ERROR)
            self._close()
        elif stop == _STEP_FULL:
            if not held_over:
                self.transport.pause_reading()
            self._step = self._loop.call_soon(self._next_step, True)
        elif held_over and not self._paused:
            self.transport.resume_reading()

    def _step_end(self, data: bytes) -> tuple[int, int]:
        """Where this step's frames end in ``data``, and why: all of it handed
        over (the rest of a frame header, if any, waits for the next read),
        the step is full, or the next frame is larger than allowed."""
        pos = min(self._body_left, len(data))
        self._body_left -= pos
        frames = headers = 0
        limit = self._h2.max_inbound_frame_size
        while len(data) - pos >= FRAME_HEADER:
            if frames == FRAMES_PER_STEP or pos >= BYTES_PER_STEP:
                return pos, _STEP_FULL
            if data[pos + 3] == _HEADERS_FRAME:
                if headers == HEADERS_PER_STEP:
                    return pos, _STEP_FULL
                headers += 1
            length = int.from_bytes(data[pos : pos + 3], "big")
            if length > limit:
                return pos, _OVERSIZED
            frames += 1
            end = pos + FRAME_HEADER + length
            if end > len(data):
                self._body_left = end - len(data)
                return len(data), _ALL_TAKEN
            pos = end
        return pos, _ALL_TAKEN

    def _receive(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except ProtocolError as exc:
            # h2 has queued a GOAWAY with the right error code: send it, close.
            log.debug("HTTP/2 protocol error from the client: %s", exc)
            self._close()
            return
        except Exception:
            log.exception("HTTP/2: failed to parse the client's frames")
            self._close()
            return
        try:
            for event in events:
                on_event = _EVENT_HANDLERS.get(type(event))
                if on_event is not None:
                    on_event(self, event)
                    if self._closing:
                        return
        except Exception:
            log.exception("HTTP/2: failed to handle the client's frames")
            self._close()
            return
        self._flush()

    def _charge(self, kind: str) -> bool:
        """Count one frame of ``kind`` against its budget; over it, GOAWAY
        ENHANCE_YOUR_CALM and close (True)."""
        floods = self._floods
        if floods is None:
            floods = self._floods = {}
        now = self._loop.time()
        burst, rate = FLOOD_LIMITS[kind]
        level, since = floods.get(kind, (0.0, now))
        level = max(0.0, level - (now - since) * rate) + 1.0
        floods[kind] = (level, now)
        if level <= burst:
            return False
        log.info("HTTP/2 client over its %s budget: GOAWAY ENHANCE_YOUR_CALM", kind)
        self._h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        self._close()
        return True

    def eof_received(self) -> bool | None:
        # A client that half-closes is done with the connection (and while we
        # linger, this is what we wait for): let the transport close.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        for timer in (self._idle_timer, self._linger, self._step, self._starting_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._linger = self._step = self._starting_timer = None
        self._inbox = b""
        self._fail_streams()
        self._start_queued()  # the queued streams, all gone now, are settled
        self._resume_writers()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close(self)

    def pause_writing(self) -> None:
        self._paused = True
        self._held_back()
        # Stop reading as well: frames such as PING make h2 queue replies, and a
        # client that sends without reading would pile them up here.
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        self._progressed()
        if not self._closing and self._step is None:
            self.transport.resume_reading()
        self._resume_writers()
        self._start_queued()

    # -- public --------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self._streams

    def has_expired(self, now: float) -> bool:
        """A write has been held back (a closed flow-control window, or a
        socket the client does not read) for the write timeout, or request
        bodies have been awaited for the read timeout without a byte."""
        return 0.0 < self.write_deadline < now or 0.0 < self.read_deadline < now

    def expire(self) -> None:
        """The server's sweep calls this once ``has_expired``. A client that
        does not take what we send is given up (its handlers see ClientGone);
        request bodies that stopped coming are reset (CANCEL), and their
        handlers see ClientGone, as on HTTP/1.1."""
        if self.transport is None or self._lost:
            return
        now = self._loop.time()
        if 0.0 < self.write_deadline < now:
            log.debug("HTTP/2 client took nothing for %g s: closing", self._write_timeout)
            self.transport.abort()
            return
        self.read_deadline = 0.0
        for stream in list(self._body_awaited or ()):
            if not stream.gone:
                self._reset(stream.id, ErrorCodes.CANCEL)
                self._stream_gone(stream)
        self._flush()

    def shutdown(self) -> None:
        """Graceful close: refuse new streams now (REFUSED_STREAM, so clients
        retry elsewhere), and once the open streams have finished send GOAWAY
        and close.

        The GOAWAY waits for the open streams: clients built on h2 (httpx among
        them) reject every frame that follows a GOAWAY, so a response still in
        flight would be lost to them. The server's stop ends live reads at
        once, so open streams finish within moments.
        """
        if self.transport is None or self._closing or self._goaway_sent:
            return
        self._goaway_sent = True
        if not self._streams:
            self._goaway_and_close()

    # -- events from the client ----------------------------------------------------

    def _on_request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        if self._charge("headers"):
            return
        if self._goaway_sent or len(self._streams) >= self._max_streams:
            # Opened after our GOAWAY, or while as many streams as allowed have
            # a handler (running or waiting to start). Every stream h2 counts
            # as open has one (_finish closes the stream when its handler
            # ends), and so do streams the client has reset whose handler still
            # runs ("rapid reset"), which h2 does not count.
            # Refused, so the client may retry.
            if not self._charge("reset"):
                self._reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        method = raw_path = authority = None
        regular: list[tuple[str, str]] = []
        for name, value in event.headers:
            if name[:1] == b":":  # pseudo-headers (h2 checked that they come first)
                if name == b":method":
                    method = _METHODS.get(value) or value.decode("latin-1")
                elif name == b":path":
                    raw_path = value
                elif name == b":authority":
                    authority = value.decode("latin-1")
            else:
                regular.append((name.decode("latin-1"), value.decode("latin-1")))
        headers, repeated = collect_headers(regular)
        if method is None or not raw_path:  # CONNECT, which we do not serve
            if not self._charge("reset"):
                self._reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        stream = _Stream(self, stream_id)
        self._streams[stream_id] = stream
        req = H2Request(stream, method, raw_path, authority, headers, repeated)
        res = H2Response(stream)
        if not self._queued and self._may_start():
            self._start(stream, req, res)
        else:
            if self._queued is None:
                self._queued = deque()
            self._queued.append((stream, req, res))

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self._h2.reset_stream(stream_id, code)
        except StreamClosedError:
            pass  # the client reset it already (in the same read)

    def _on_data(self, event: DataReceived) -> None:
        if not event.flow_controlled_length and event.stream_ended is None:
            if self._charge("empty_data"):
                return
        stream = self._streams.get(event.stream_id)
        data = event.data
        if stream is None or stream.gone:
            # Nobody will read it: hand the connection's credit back at once.
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        padding = event.flow_controlled_length - len(data)
        if padding:
            self._h2.acknowledge_received_data(padding, stream.id)
        if data:
            if stream.chunks is None:
                stream.chunks = [data]
            else:
                stream.chunks.append(data)
            stream.unacked += len(data)
            if self.read_deadline:
                self.read_deadline = self._loop.time() + self._read_timeout
            _wake(stream)

    def _on_stream_ended(self, event: StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.ended = True
            _wake(stream)

    def _on_stream_reset(self, event: StreamReset) -> None:
        if event.remote_reset and self._charge("reset"):
            return
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            self._stream_gone(stream)
            if stream.task is None:  # still waiting to start: it never will
                self._unqueue(stream)

    def _on_trailers(self, event: TrailersReceived) -> None:
        self._charge("headers")

    def _on_ping(self, event: PingReceived) -> None:
        self._charge("ping")

    def _on_priority(self, event: PriorityUpdated) -> None:
        self._charge("priority")

    def _on_window_updated(self, event: WindowUpdated) -> None:
        if self._charge("window_update"):
            return
        if event.stream_id == 0:
            self._wake_blocked()
        else:
            stream = self._streams.get(event.stream_id)
            if stream is not None and stream in self._blocked:
                _wake(stream)

    def _on_settings(self, event: RemoteSettingsChanged) -> None:
        if self._charge("settings"):
            return
        changed = event.changed_settings
        if SettingCodes.INITIAL_WINDOW_SIZE in changed or SettingCodes.MAX_FRAME_SIZE in changed:
            self._wake_blocked()

    def _on_terminated(self, event: ConnectionTerminated) -> None:
        # h2 sends nothing after the client's GOAWAY, so the open streams cannot
        # finish: close now (a client sends it when it is done with us anyway).
        log.debug("HTTP/2 client sent GOAWAY (error code %s)", event.error_code)
        self._close()

    # -- streams -------------------------------------------------------------------

    def _may_start(self) -> bool:
        """Whether another handler may start now (see SEND_BUDGET and
        STARTING_LIMIT); when not, a stream waits in ``_queued``."""
        if self._held + self.transport.get_write_buffer_size() >= SEND_BUDGET:
            return False  # started again as the held-back bytes go out
        if self._starting >= STARTING_LIMIT:
            if self._starting_timer is None:
                self._starting_timer = self._loop.call_later(STARTING_S, self._recount_starting)
            return False
        return True

    def _start(self, stream: _Stream, req: H2Request, res: H2Response) -> None:
        stream.starting = True
        self._starting += 1
        stream.task = self._loop.create_task(self._run(stream, req, res))

    def _start_queued(self) -> None:
        queued = self._queued
        if queued is None:
            return
        while queued:
            stream = queued[0][0]
            if stream.gone:  # reset, or the connection is gone: never started
                queued.popleft()
                self._finish(stream)
            elif self._closing or not self._may_start():
                return
            else:
                self._start(*queued.popleft())

    def _settled(self, stream: _Stream) -> None:
        """The handler answered, or waits for something: it no longer counts
        as starting."""
        if stream.starting:
            stream.starting = False
            self._starting -= 1
            if self._queued:
                self._start_queued()

    def _recount_starting(self) -> None:
        """Handlers started STARTING_S ago and still silent wait for something
        the server cannot see (a long-poll's wake-up): let the next ones start."""
        self._starting_timer = None
        for stream in self._streams.values():
            stream.starting = False
        self._starting = 0
        self._start_queued()

    def _unqueue(self, stream: _Stream) -> None:
        for index, queued in enumerate(self._queued or ()):
            if queued[0] is stream:
                del self._queued[index]
                break
        self._finish(stream)

    def _doom(self, stream: _Stream) -> None:
        """The stream is gone: a handler that has not noticed (it reads or
        writes nothing, as a waiting long-poll) is cancelled GONE_GRACE_S later."""
        if stream.task is None or stream.task.done():
            return
        if self._doomed is None:
            self._doomed = deque()
        self._doomed.append((self._loop.time() + GONE_GRACE_S, stream))
        if self._doom_timer is None:
            self._doom_timer = self._loop.call_later(GONE_GRACE_S, self._cancel_doomed)

    def _cancel_doomed(self) -> None:
        self._doom_timer = None
        doomed = self._doomed
        if doomed is None:
            return
        now = self._loop.time()
        while doomed and doomed[0][0] <= now:
            stream = doomed.popleft()[1]
            task = stream.task
            if task is not None and not task.done():
                task.cancel()
                task.add_done_callback(functools.partial(self._cancelled, stream))
        if doomed:
            self._doom_timer = self._loop.call_at(doomed[0][0], self._cancel_doomed)

    def _await_body(self, stream: _Stream) -> None:
        """The handler waits for more of the request body: the read timeout
        runs (from the first such wait; body data restarts it)."""
        awaited = self._body_awaited
        if awaited is None:
            awaited = self._body_awaited = set()
        awaited.add(stream)
        if not self.read_deadline and self._read_timeout > 0:
            self.read_deadline = self._loop.time() + self._read_timeout

    def _body_came(self, stream: _Stream) -> None:
        awaited = self._body_awaited
        if awaited is not None:
            awaited.discard(stream)
            if not awaited:
                self.read_deadline = 0.0

    def _cancelled(self, stream: _Stream, task: asyncio.Task[None]) -> None:
        # A task cancelled before its first step never runs _run's ``finally``.
        if self._streams.get(stream.id) is stream:
            self._finish(stream)

    def _held_back(self) -> None:
        """Something cannot be written now: start the write timeout."""
        if not self.write_deadline and self._write_timeout > 0:
            self.write_deadline = self._loop.time() + self._write_timeout

    def _progressed(self) -> None:
        """The client took data: the write timeout starts over, if still needed."""
        if self._blocked or self._paused:
            if self._write_timeout > 0:
                self.write_deadline = self._loop.time() + self._write_timeout
        else:
            self.write_deadline = 0.0

    async def _run(self, stream: _Stream, req: H2Request, res: H2Response) -> None:
        try:
            await self._handle(req, res)
            if not res.started:
                await res.send(INTERNAL_ERROR_STATUS, INTERNAL_ERROR_HEADERS, INTERNAL_ERROR_BODY)
            elif not stream.responded:
                await res.end_stream()
        except ClientGone:
            pass
        except Exception:
            log.exception("HTTP/2: unhandled error on %s stream %d", req.method, stream.id)
        finally:
            self._finish(stream)

    def _finish(self, stream: _Stream) -> None:
        """The stream's task is over: settle the stream with the client."""
        del self._streams[stream.id]
        self._blocked.discard(stream)
        stream.chunks = None
        if stream.starting:
            stream.starting = False
            self._starting -= 1
        if not self._closing:
            try:
                if not stream.gone:
                    if not stream.responded:
                        # The handler failed (or was cancelled) mid-response.
                        self._h2.reset_stream(stream.id, ErrorCodes.INTERNAL_ERROR)
                    elif not stream.ended:
                        # Answered before the whole body arrived: the client may
                        # stop sending it (RFC 9113 section 8.1).
                        self._h2.reset_stream(stream.id, ErrorCodes.NO_ERROR)
                if stream.unacked:
                    # A body nobody read still holds the connection's window.
                    self._h2.acknowledge_received_data(stream.unacked, stream.id)
                    stream.unacked = 0
            except ProtocolError:
                pass  # the stream was closed meanwhile
            self._flush()
            if self._queued and stream.task is not None:
                self._start_queued()  # (one never started changes nothing there)
        if not self._streams:
            if self._goaway_sent:
                self._loop.call_later(GOAWAY_AFTER_S, self._goaway_and_close)
            elif not self._closing:
                self._became_idle()

    def _stream_gone(self, stream: _Stream) -> None:
        """Reset by the client, or the connection is going: the handler sees
        ClientGone at its next read or write."""
        stream.gone = True
        stream.chunks = None
        if stream.unacked and not self._closing:
            self._h2.acknowledge_received_data(stream.unacked, stream.id)
        stream.unacked = 0
        _wake(stream)
        self._doom(stream)

    def _fail_streams(self) -> None:
        for stream in self._streams.values():
            if not stream.gone:
                self._stream_gone(stream)

    def _consumed(self, stream: _Stream, size: int) -> None:
        """The handler took ``size`` body bytes: give the client the credit."""
        stream.unacked -= size
        if not self._closing:
            self._h2.acknowledge_received_data(size, stream.id)
            self._flush()

    async def _wait(self, stream: _Stream) -> None:
        """Sleep until something happens to the stream (callers check what)."""
        if stream.starting:
            self._settled(stream)
        waiter = self._loop.create_future()
        stream.waiter = waiter
        try:
            await waiter
        finally:
            stream.waiter = None

    def _wake_blocked(self) -> None:
        for stream in self._blocked:
            _wake(stream)

    # -- sending -------------------------------------------------------------------

    async def _send_headers(
        self,
        stream: _Stream,
        headers: list[tuple[bytes, bytes]],
        end_stream: bool,
        body_size: int = 0,
    ) -> None:
        """Send the response's HEADERS; ``body_size`` is what the handler has
        in hand to send next (held back, and counted, while the socket is full)."""
        if stream.gone:
            raise ClientGone()
        try:
            self._h2.send_headers(stream.id, headers, end_stream=end_stream)
        except StreamClosedError as exc:
            raise ClientGone() from exc
        if end_stream:
            stream.responded = True
        self._flush()
        if stream.starting:
            self._settled(stream)
        if self._paused:
            self._hold(stream, body_size)
            try:
                await self._drain(stream)
            finally:
                self._hold(stream, 0)

    async def _send_data(self, stream: _Stream, data: bytes, end_stream: bool) -> None:
        """Send ``data`` in frames as the flow-control windows allow."""
        h2 = self._h2
        view = memoryview(data)
        total = len(data)
        sent = 0
        while True:
            if stream.gone:
                raise ClientGone()
            if sent == total:
                if end_stream:
                    self._end(stream)
                return
            try:
                window = h2.local_flow_control_window(stream.id)
            except StreamClosedError as exc:
                raise ClientGone() from exc
            if window <= 0:
                self._blocked.add(stream)
                self._held_back()
                self._hold(stream, total - sent)
                try:
                    await self._wait(stream)
                finally:
                    self._blocked.discard(stream)
                    self._hold(stream, 0)
                    if not self._blocked and not self._paused:
                        self.write_deadline = 0.0  # nothing held back any more
                continue
            size = min(window, h2.max_outbound_frame_size, total - sent)
            last = end_stream and sent + size == total
            h2.send_data(stream.id, view[sent : sent + size], end_stream=last)
            sent += size
            if last:
                stream.responded = True
            self._flush()
            self._sent_data_frame()
            if self._paused:
                self._hold(stream, total - sent)
                try:
                    await self._drain(stream)
                finally:
                    self._hold(stream, 0)
            if last:
                return

    def _hold(self, stream: _Stream, size: int) -> None:
        """The handler of ``stream`` waits with ``size`` bytes still to send."""
        self._held += size - stream.held
        stream.held = size
        if not size and self._queued:
            self._start_queued()

    def _sent_data_frame(self) -> None:
        """A DATA frame went out: the client may answer it with two
        WINDOW_UPDATEs, which its budget then allows; the write timeout
        starts over."""
        floods = self._floods
        if floods is not None and "window_update" in floods:
            level, since = floods["window_update"]
            floods["window_update"] = (max(0.0, level - 2.0), since)
        if self.write_deadline:
            self._progressed()

    def _end(self, stream: _Stream) -> None:
        try:
            self._h2.end_stream(stream.id)
        except StreamClosedError as exc:
            raise ClientGone() from exc
        stream.responded = True
        self._flush()

    async def _drain(self, stream: _Stream) -> None:
        """Wait until the transport takes writes again."""
        if stream.starting:
            self._settled(stream)
        while self._paused and not self._lost:
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if stream.gone:
            raise ClientGone()

    def _resume_writers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        # A closing transport takes nothing more (a TLS one shuts down on the
        # client's close_notify before connection_lost, and complains of writes).
        if data and not self._lost and not self.transport.is_closing():
            self.transport.write(data)

    # -- closing -------------------------------------------------------------------

    def _became_idle(self) -> None:
        """No stream open: close after ``idle_timeout_s`` unless one opens.

        One timer at a time: one left from an earlier idle spell is not
        cancelled, it re-arms itself for the rest of this one when it fires.
        """
        if self._idle_timeout <= 0:
            return
        self._idle_since = self._loop.time()
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_later(self._idle_timeout, self._on_idle_timer)

    def _on_idle_timer(self) -> None:
        self._idle_timer = None
        if self._streams or self._closing:
            return  # busy: re-armed when the connection becomes idle again
        remaining = self._idle_since + self._idle_timeout - self._loop.time()
        if remaining > 0:
            self._idle_timer = self._loop.call_later(remaining, self._on_idle_timer)
        else:
            self._goaway_and_close()

    def _goaway_and_close(self) -> None:
        if self._closing or self._lost:
            return
        try:
            self._h2.close_connection(ErrorCodes.NO_ERROR)
        except ProtocolError:
            pass  # h2 can send nothing more anyway
        self._close()

    def _close(self) -> None:
        """Send what is queued, stop the streams, close.

        The write side is shut first and the socket closed when the client
        closes its side (or after LINGER_S), so our last frames reach it.
        """
        if self._closing:
            return
        self._flush()
        self._closing = True
        self._fail_streams()
        transport = self.transport
        if self._lost or transport is None:
            return
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except (OSError, RuntimeError):
                transport.abort()
                return
            self._linger = self._loop.call_later(LINGER_S, transport.abort)
        else:
            transport.close()


def _wake(stream: _Stream) -> None:
    waiter = stream.waiter
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


_EVENT_HANDLERS: dict[type, Callable[[Http2Connection, Any], None]] = {
    RequestReceived: Http2Connection._on_request,
    TrailersReceived: Http2Connection._on_trailers,
    PingReceived: Http2Connection._on_ping,
    PriorityUpdated: Http2Connection._on_priority,
    DataReceived: Http2Connection._on_data,
    StreamEnded: Http2Connection._on_stream_ended,
    StreamReset: Http2Connection._on_stream_reset,
    WindowUpdated: Http2Connection._on_window_updated,
    RemoteSettingsChanged: Http2Connection._on_settings,
    ConnectionTerminated: Http2Connection._on_terminated,
}
