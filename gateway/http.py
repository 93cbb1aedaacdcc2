"""A thin HTTP layer over ASGI: the request as the protocol needs it, and the
headers every response carries.

The gateway serves one kind of resource, so it speaks ASGI directly instead of
going through a routing framework: one dispatch on the method, no per-request
middleware stack.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes

from .errors import BadRequest, PayloadTooLarge

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Headers a browser may read from our responses (CORS).
EXPOSED_HEADERS = ", ".join(
    [
        "Stream-Next-Offset",
        "Stream-Cursor",
        "Stream-Up-To-Date",
        "Stream-Closed",
        "Stream-TTL",
        "Stream-Expires-At",
        "Stream-SSE-Data-Encoding",
        "Producer-Epoch",
        "Producer-Seq",
        "Producer-Expected-Seq",
        "Producer-Received-Seq",
        "ETag",
        "Location",
        "Retry-After",
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


def base_headers(cors_origin: str, instance_id: str | None = None) -> list[tuple[bytes, bytes]]:
    """Headers on every response: MIME-sniffing and embedding protection
    (section 12.7), CORS, and optionally which replica answered."""
    headers = [
        (b"x-content-type-options", b"nosniff"),
        (b"cross-origin-resource-policy", b"cross-origin"),
        (b"access-control-allow-origin", cors_origin.encode()),
        (b"access-control-expose-headers", EXPOSED_HEADERS.encode()),
    ]
    if instance_id:
        headers.append((b"x-ds-instance", instance_id.encode()))
    return headers


# How much of an oversized body we read (and drop) past the limit before the 413.
DISCARD_BUDGET = 64 * 1024 * 1024


class Request:
    __slots__ = (
        "_query",
        "body_read",
        "headers",
        "method",
        "path",
        "query_string",
        "receive",
        "scope",
    )

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.path: str = _decoded_path(scope)
        self.query_string: bytes = scope.get("query_string", b"")
        self._query: dict[str, list[str]] | None = None
        self.body_read = False
        # Header names are lower case in ASGI; a repeated header keeps its last value.
        self.headers: dict[str, str] = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def query(self) -> dict[str, list[str]]:
        if self._query is None:
            try:
                self._query = parse_qs(
                    self.query_string.decode("utf-8"), keep_blank_values=True, strict_parsing=False
                )
            except UnicodeDecodeError as exc:
                raise BadRequest("query string is not UTF-8") from exc
        return self._query

    def single(self, name: str) -> str | None:
        values = self.query.get(name)
        if values is None:
            return None
        if len(values) > 1:
            raise BadRequest(f"{name} given more than once")
        return values[0]

    def base_url(self) -> str:
        scheme = self.scope.get("scheme", "http")
        host = self.headers.get("host")
        if not host:
            server = self.scope.get("server") or ("localhost", None)
            host = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
        return f"{scheme}://{host}"

    async def body(self, limit: int) -> bytes:
        """The whole request body; 413 as soon as it exceeds ``limit`` bytes."""
        declared = self.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest("malformed Content-Length")
            if int(declared) > limit:
                raise PayloadTooLarge(f"body larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    self.body_read = True
                    await self._discard_rest(message, limit)
                    raise PayloadTooLarge(f"body larger than {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        self.body_read = True
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @property
    def unread_body(self) -> bool:
        """True when a request refused on its headers may still have a body in
        flight; its HTTP/1.1 connection cannot carry another request."""
        if self.body_read or self.method in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return False
        declared = self.headers.get("content-length")
        return declared != "0" and (declared is not None or "transfer-encoding" in self.headers)

    async def _discard_rest(self, message: Message, limit: int) -> None:
        """Read (and drop) a little more of an oversized chunked body, so that a
        client still sending it reads our 413 instead of a connection reset."""
        budget = max(limit, DISCARD_BUDGET)
        while message.get("more_body", False) and budget > 0:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            budget -= len(message.get("body", b""))


def _decoded_path(scope: Scope) -> str:
    """The URL path, percent-decoded strictly as UTF-8.

    Servers decode ``path`` leniently (invalid bytes become U+FFFD), which would
    make ``/x%ff`` and ``/x%fe`` the same stream; we decode ``raw_path`` ourselves.
    """
    raw = scope.get("raw_path")
    if raw is None:
        path: str = scope["path"]
        if "\ufffd" in path:
            raise BadRequest("URL path is not valid UTF-8")
        return path
    try:
        return unquote_to_bytes(raw.split(b"?", 1)[0]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("URL path is not valid UTF-8") from exc


class ClientGone(Exception):
    """The client disconnected before we finished reading its request."""


async def send_response(
    send: Send,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
    *,
    head: bool = False,
) -> None:
    if not head and status not in (204, 304):
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
