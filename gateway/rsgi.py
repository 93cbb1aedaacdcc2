"""The RSGI side of gateway/http.py: granian's native interface, used by
``durable-streams-gateway``.

RSGI passes the body as bytes and takes a response in one call, with no message
dicts in between; under load that is most of what a server costs per request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from .errors import BadRequest
from .http import ClientGone, Headers, Request, Response, check_decoded_path


class RsgiRequest(Request):
    __slots__ = ("_headers", "proto", "scope")

    def __init__(self, scope: Any, proto: Any) -> None:
        super().__init__()
        self.scope = scope
        self.proto = proto
        self.method = scope.method
        self.http1 = scope.http_version in ("1.0", "1.1")
        self.query_string = scope.query_string
        # Names are lower case; a repeated header gives its first value.
        self._headers = scope.headers

    def header(self, name: str) -> str | None:
        value = self._headers.get(name)
        if value is None and name in self._headers:
            # granian hides values that are not visible ASCII (get() gives None)
            # but still lists the name: refuse instead of reading it as absent.
            raise BadRequest(f"{_title(name)} must be visible ASCII")
        return value

    def has_header(self, name: str) -> bool:
        return name in self._headers

    def _decode_path(self) -> str:
        # granian hands over the path already percent-decoded (invalid UTF-8 as
        # U+FFFD); no raw form is available.
        return check_decoded_path(self.scope.path)

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.proto:
                if chunk:
                    yield chunk
        except (RuntimeError, OSError) as exc:  # the client went away mid-body
            raise ClientGone() from exc

    async def _whole_body(self) -> bytes:
        try:
            return await self.proto()
        except (RuntimeError, OSError) as exc:
            raise ClientGone() from exc

    def base_url(self) -> str:
        scope = self.scope
        host = self._headers.get("host") or scope.authority or scope.server
        return f"{scope.scheme}://{host}"


class RsgiResponse(Response):
    __slots__ = ("_proto", "_transport")

    def __init__(self, proto: Any) -> None:
        super().__init__()
        self._proto = proto
        self._transport: Any = None

    async def send(
        self, status: int, headers: Headers, body: bytes = b"", *, head: bool = False
    ) -> None:
        self.started = True
        if head or status in (204, 304):
            self._proto.response_empty(status, headers)
        else:
            self._proto.response_bytes(status, headers, body)

    async def start_stream(self, status: int, headers: Headers) -> None:
        self.started = True
        self._transport = self._proto.response_stream(status, headers)

    async def write(self, chunk: bytes) -> None:
        try:
            await self._transport.send_bytes(chunk)
        except RuntimeError as exc:  # RSGIProtocolClosed: the client went away
            raise ClientGone() from exc

    async def end_stream(self) -> None:
        """The stream ends when the application returns."""


def _title(name: str) -> str:
    """``stream-ttl`` -> ``Stream-Ttl``, for error messages."""
    return "-".join(part.capitalize() for part in name.split("-"))
