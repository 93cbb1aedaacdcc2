"""The request interface: one Request and one Response shape, whichever server
carries them, and the one place for the rules every server must apply alike.

The gateway serves one kind of resource, so it speaks the server interfaces
directly instead of going through a routing framework: one dispatch on the
method, no per-request middleware stack. The adapters live in gateway/servers/
(ASGI, RSGI, and the native HTTP/1.1 and HTTP/2 connections); each subclasses
``Request`` and ``Response`` and supplies only how bytes and headers move.
The rules live here:

- a protocol header sent twice is a ``400``, under every server
  (``collect_headers``, ``Request.header``); list-valued headers are joined;
- the base URL honours forwarded headers only from trusted peers
  (gateway/web/forwarded.py, from ``Request.scheme``, ``authority`` and ``peer``);
- HEAD, ``1xx``, ``204`` and ``304`` responses carry no body (``bodiless``);
- the ``500`` a failed handler gets (``INTERNAL_ERROR``);
- no header value with CR, LF or NUL is written (``check_header_value``).

Handlers see only ``Request`` and ``Response``; headers are ``(name, value)``
pairs of ``str`` with lower-case names.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterable
from urllib.parse import parse_qs, unquote_to_bytes

from gateway.protocol.errors import BadRequest, PayloadTooLarge

Headers = list[tuple[str, str]]

# Headers a browser may read from our responses (CORS).
EXPOSED_HEADERS = ", ".join(
    [
        "Stream-Next-Offset",
        "Stream-Cursor",
        "Stream-Up-To-Date",
        "Stream-Closed",
        "Stream-TTL",
        "Stream-Expires-At",
        "Stream-Retention-Max-Age",
        "Stream-Retention-Max-Bytes",
        "Stream-SSE-Data-Encoding",
        "Producer-Epoch",
        "Producer-Seq",
        "Producer-Expected-Seq",
        "Producer-Received-Seq",
        "ETag",
        "Location",
        "Retry-After",
        "WWW-Authenticate",
    ]
)
ALLOWED_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
ALLOWED_REQUEST_HEADERS = ", ".join(
    [
        "Content-Type",
        "If-None-Match",
        "Authorization",
        "Stream-TTL",
        "Stream-Expires-At",
        "Stream-Retention-Max-Age",
        "Stream-Retention-Max-Bytes",
        "Stream-Seq",
        "Stream-Closed",
        "Stream-Forked-From",
        "Stream-Fork-Offset",
        "Stream-Fork-Sub-Offset",
        "Producer-Id",
        "Producer-Epoch",
        "Producer-Seq",
    ]
)


_NO_HEADERS: dict[str, str] = {}  # shared by released requests; never mutated


def header_title(name: str) -> str:
    """``stream-ttl`` -> ``Stream-Ttl``, for error messages."""
    return "-".join(part.capitalize() for part in name.split("-"))


def base_headers(cors_origin: str, instance_id: str | None = None) -> Headers:
    """Headers on every response: MIME-sniffing and embedding protection
    (section 12.7), CORS, and optionally which replica answered."""
    headers = [
        ("x-content-type-options", "nosniff"),
        ("cross-origin-resource-policy", "cross-origin"),
        ("access-control-allow-origin", cors_origin),
        ("access-control-expose-headers", EXPOSED_HEADERS),
    ]
    if instance_id:
        headers.append(("x-ds-instance", instance_id))
    return headers


# How much of an oversized body we read (and drop) past the limit before the 413.
DISCARD_BUDGET = 64 * 1024 * 1024

_BODYLESS_METHODS = ("GET", "HEAD", "OPTIONS", "DELETE")


class ClientGone(Exception):
    """The client disconnected before we finished reading its request."""


# Headers whose repetitions are one list (RFC 9110 section 5.3): joined with
# ", " instead of refused. Every other header the gateway reads is a single
# value, and sending it twice is ambiguous (first or last?): a 400.
LIST_HEADERS = frozenset(
    {
        "if-none-match",
        "x-forwarded-for",
        "forwarded",
        "access-control-request-headers",
        "accept",
        "accept-encoding",
        "cache-control",
        "te",
        "via",
    }
)


def collect_headers(
    pairs: Iterable[tuple[str, str]],
) -> tuple[dict[str, str], frozenset[str] | None]:
    """Headers by lower-case name, and the names sent more than once that are
    not lists (None when there are none, as nearly always)."""
    headers: dict[str, str] = {}
    repeated: set[str] | None = None
    for name, value in pairs:
        if name in headers:
            if name in LIST_HEADERS:
                headers[name] += ", " + value
            elif name == "cookie":
                # HTTP/2 clients split Cookie into one field per cookie
                # (RFC 9113 section 8.2.3); forward auth wants them whole.
                headers[name] += "; " + value
            else:
                repeated = repeated or set()
                repeated.add(name)
        else:
            headers[name] = value
    return headers, (frozenset(repeated) if repeated else None)


class Request:
    """What handlers read: method, path, query, headers and the body.

    Adapters set ``method``, ``query_string``, ``http1``, ``scheme``, ``peer``
    (the client's address, or None), ``root_path`` (ASGI mounts), ``_headers``
    and ``_repeated`` (see ``collect_headers``), and supply ``_decode_path``,
    ``authority``, ``_chunks`` and optionally ``_whole_body``/``_body_at_hand``.
    ``_headers.get(name)`` is what the request log reads (gateway/web/
    telemetry.py): the first value sent, never refused; an adapter with a
    header map of its own (RSGI) may set that instead of a dict.
    """

    __slots__ = (
        "_headers",
        "_path",
        "_query",
        "_repeated",
        "body_read",
        "http1",
        "method",
        "peer",
        "query_string",
        "root_path",
        "scheme",
    )

    method: str
    query_string: str
    http1: bool  # HTTP/1.x: an unread body makes the connection unusable

    def __init__(self) -> None:
        self._path: str | None = None
        self._query: dict[str, list[str]] | None = None
        self._headers: dict[str, str] = {}
        self._repeated: frozenset[str] | None = None
        self.body_read = False
        self.scheme = "http"
        self.peer: str | None = None
        # Where the gateway is mounted inside a host application (ASGI's
        # root_path); ``path`` is relative to it. Empty when served directly.
        self.root_path = ""

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (lower case), or None; 400 when a
        single-valued header was sent more than once."""
        if self._repeated is not None and name in self._repeated:
            raise BadRequest(f"{header_title(name)} sent more than once")
        return self._headers.get(name)

    def has_header(self, name: str) -> bool:
        return name in self._headers

    # -- interface-specific --------------------------------------------------------

    def authority(self) -> str:
        """The host (and port) the client addressed: Host, or :authority."""
        raise NotImplementedError

    def _decode_path(self) -> str:
        raise NotImplementedError

    def _chunks(self) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def _whole_body(self) -> bytes:
        """The body when its declared length is within the limit."""
        return b"".join([chunk async for chunk in self._chunks()])

    def _body_at_hand(self) -> bytes | None:
        """The whole body if it has already arrived (no await needed), else None."""
        return None

    def release(self) -> None:
        """Forget the parsed query and the headers: called once a long-lived
        response (SSE) has started and needs neither, so an idle reader does not
        hold them for the connection's lifetime."""
        self._query = None
        self.query_string = ""
        self._headers = _NO_HEADERS

    # -- common --------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The URL path, percent-decoded strictly as UTF-8 (400 otherwise)."""
        if self._path is None:
            self._path = self._decode_path()
        return self._path

    def loggable_path(self) -> str:
        """The path for logs and metrics, which must not fail: as decoded, or a
        placeholder when the client sent one that is not UTF-8 (it got a 400)."""
        try:
            return self.path
        except BadRequest:
            return "<not UTF-8>"

    @property
    def query(self) -> dict[str, list[str]]:
        if self._query is None:
            self._query = parse_qs(self.query_string, keep_blank_values=True, strict_parsing=False)
        return self._query

    def single(self, name: str) -> str | None:
        values = self.query.get(name)
        if values is None:
            return None
        if len(values) > 1:
            raise BadRequest(f"{name} given more than once")
        if "\ufffd" in values[0]:
            raise BadRequest(f"{name} is not valid UTF-8")
        return values[0]

    async def body(self, limit: int) -> bytes:
        """The whole request body; 413 as soon as it exceeds ``limit`` bytes."""
        declared = self.header("content-length")
        if declared is not None:
            declared = declared.strip(" \t")  # optional whitespace (RFC 9110 section 5.5)
            if not (declared.isascii() and declared.isdigit()):
                raise BadRequest("malformed Content-Length")
            if len(declared) > 18:  # (int() refuses over 4,300 digits; no limit has 19)
                declared = declared.lstrip("0") or "0"
            if len(declared) > 18 or int(declared) > limit:
                raise PayloadTooLarge(f"body larger than {limit} bytes")
            body = self._body_at_hand()
            if body is None:
                body = await self._whole_body()
            self.body_read = True
            return body
        chunks: list[bytes] = []
        size = 0
        chunk_iter = self._chunks()
        async for chunk in chunk_iter:
            size += len(chunk)
            if size > limit:
                self.body_read = True
                await _discard(chunk_iter, max(limit, DISCARD_BUDGET))
                raise PayloadTooLarge(f"body larger than {limit} bytes")
            chunks.append(chunk)
        self.body_read = True
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @property
    def unread_body(self) -> bool:
        """True when a request refused on its headers may still have a body in
        flight; its HTTP/1.1 connection cannot carry another request."""
        if self.body_read or self.method in _BODYLESS_METHODS:
            return False
        # Through the interface, not ``_headers``: an adapter may keep its
        # server's own header map (RSGI does).
        try:
            declared = self.header("content-length")
        except BadRequest:
            return True  # sent twice or unreadable: assume a body follows
        if declared is not None:
            return declared.strip(" \t") != "0"
        return self.has_header("transfer-encoding")


async def _discard(chunks: AsyncIterator[bytes], budget: int) -> None:
    """Read (and drop) a little more of an oversized body, so that a client
    still sending it reads our 413 instead of a connection reset."""
    async for chunk in chunks:
        budget -= len(chunk)
        if budget <= 0:
            return


def decode_url_path(raw: bytes) -> str:
    """Percent-decode a raw URL path strictly as UTF-8.

    Servers decode leniently (invalid bytes become U+FFFD), which would make
    ``/x%ff`` and ``/x%fe`` the same stream; we decode raw bytes ourselves.
    """
    return _decode_path(raw.partition(b"?")[0])


@functools.lru_cache(maxsize=4096)
def _decode_path(raw: bytes) -> str:
    # Cached: the URLs of busy streams repeat on every request, and the query
    # (which does not) is cut off before.
    try:
        path = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("URL path is not valid UTF-8") from exc
    return check_decoded_path(path)


def check_decoded_path(path: str) -> str:
    """Refuse U+FFFD: where a server decoded the path for us it marks the bytes
    that were not UTF-8, and one rule for all servers keeps streams reachable
    under the same names whichever server runs the gateway."""
    if "\ufffd" in path:
        raise BadRequest("URL path is not valid UTF-8")
    return path


# Responses that never carry a body, whatever the handler passes.
BODILESS_STATUSES = frozenset({204, 304})


def bodiless(status: int, head: bool) -> bool:
    """HEAD responses, 1xx, 204 and 304 have no body (RFC 9110 sections 9.3.2, 15)."""
    return head or status in BODILESS_STATUSES or status < 200


class UnsafeHeader(ValueError):
    """A response header value that would split the response on the wire."""


def check_header_value(name: str, value: str) -> None:
    """Refuse a header value holding CR, LF or NUL. Request parsers refuse them
    inbound, so only a corrupted store (say, a content type edited in Redis) can
    supply one: the response becomes a 500 rather than a split response."""
    # Three scans beat one regular expression on values this short; the
    # native server calls this for every header line it has not cached.
    if "\r" in value or "\n" in value or "\0" in value:
        raise UnsafeHeader(f"response header {name!r} holds CR, LF or NUL")


# The response of a handler that failed: the one 500, whatever the server.
INTERNAL_ERROR_STATUS = 500
INTERNAL_ERROR_HEADERS: Headers = [
    ("content-type", "text/plain; charset=utf-8"),
    ("cache-control", "no-store"),
]
INTERNAL_ERROR_REASON = "internal error"
INTERNAL_ERROR_BODY = (INTERNAL_ERROR_REASON + "\n").encode()


# Added to every response when the request log is on (gateway/web/telemetry.py).
REQUEST_ID_HEADER = "x-request-id"


class Response:
    """How handlers answer: one whole response, or a stream of chunks (SSE).

    Adapters note on the way what the request metrics and log report: the
    ``status`` sent (0 until then) and the body bytes ``sent``; and when
    ``request_id`` is set, they add it as ``X-Request-Id`` to the response
    (a token of safe characters: gateway/web/recorder.py checks it), or add
    ``id_line``, set with it: its HTTP/1.1 header line.

    With metrics or the request log on, the recorder's ``begin`` also notes
    here when the request started (``start``), its query as it came
    (``query``) and its live operation (``live``), for ``add`` to record when
    it ends; those slots stay unset otherwise.
    """

    __slots__ = ("id_line", "live", "query", "request_id", "sent", "start", "started", "status")
    id_line: bytes
    live: str | None
    query: str
    start: int

    def __init__(self) -> None:
        self.started = False  # once true, errors can no longer become responses
        self.status = 0
        self.sent = 0
        self.request_id: str | None = None

    async def send(
        self, status: int, headers: Headers, body: bytes = b"", *, head: bool = False
    ) -> None:
        """A complete response. ``head``: headers only, without Content-Length."""
        raise NotImplementedError

    async def start_stream(self, status: int, headers: Headers) -> None:
        raise NotImplementedError

    async def write(self, chunk: bytes) -> None:
        """The next chunk of a streamed response."""
        raise NotImplementedError

    async def end_stream(self) -> None:
        """Finish a streamed response (also after the client went away)."""
