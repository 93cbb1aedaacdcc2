"""The RSGI adapter: granian's native interface (``durable-streams-gateway
--server granian``).

RSGI passes the body as bytes and takes a response in one call, with no message
dicts in between; under load that is most of what a server costs per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from gateway.protocol.errors import BadRequest
from gateway.web.app import Gateway
from gateway.web.request import (
    LIST_HEADERS,
    REQUEST_ID_HEADER,
    ClientGone,
    Headers,
    Request,
    Response,
    bodiless,
    check_decoded_path,
    check_header_value,
    header_title,
)

from .signals import drain_on_signals


class RsgiRequest(Request):
    __slots__ = ("proto", "rsgi_scope")

    def __init__(self, scope: Any, proto: Any) -> None:
        super().__init__()
        self.rsgi_scope = scope
        self.proto = proto
        self.method = scope.method
        self.http1 = scope.http_version in ("1.0", "1.1")
        self.scheme = scope.scheme
        self.peer = scope.client.rsplit(":", 1)[0].strip("[]") if scope.client else None
        self.query_string = scope.query_string
        # granian's own header map (names lower case), read on demand: get()
        # gives the first value, as the base class's dict does.
        self._headers = scope.headers

    def header(self, name: str) -> str | None:
        headers: Any = self._headers
        values = headers.get_all(name)
        if not values:
            if name in headers:
                # granian hides values that are not visible ASCII (get() gives
                # None) but still lists the name: refuse instead of reading it
                # as absent.
                raise BadRequest(f"{header_title(name)} must be visible ASCII")
            return None
        if len(values) > 1:
            if name not in LIST_HEADERS:
                raise BadRequest(f"{header_title(name)} sent more than once")
            return ", ".join(values)
        value: str = values[0]
        return value

    def authority(self) -> str:
        scope = self.rsgi_scope
        host: str = self._headers.get("host") or scope.authority or scope.server
        return host

    def _decode_path(self) -> str:
        # granian hands over the path already percent-decoded (invalid UTF-8 as
        # U+FFFD); no raw form is available.
        return check_decoded_path(self.rsgi_scope.path)

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.proto:
                if chunk:
                    yield chunk
        except (RuntimeError, OSError) as exc:  # the client went away mid-body
            raise ClientGone() from exc

    async def _whole_body(self) -> bytes:
        try:
            body: bytes = await self.proto()
        except (RuntimeError, OSError) as exc:
            raise ClientGone() from exc
        return body


class RsgiResponse(Response):
    __slots__ = ("_proto", "_transport")

    def __init__(self, proto: Any) -> None:
        super().__init__()
        self._proto = proto
        self._transport: Any = None

    async def send(
        self, status: int, headers: Headers, body: bytes = b"", *, head: bool = False
    ) -> None:
        for name, value in headers:
            check_header_value(name, value)
        if self.request_id is not None:
            headers = [*headers, (REQUEST_ID_HEADER, self.request_id)]
        self.started = True
        self.status = status
        if bodiless(status, head):
            self._proto.response_empty(status, headers)
        else:
            self.sent = len(body)
            self._proto.response_bytes(status, headers, body)

    async def start_stream(self, status: int, headers: Headers) -> None:
        for name, value in headers:
            check_header_value(name, value)
        if self.request_id is not None:
            headers = [*headers, (REQUEST_ID_HEADER, self.request_id)]
        self.started = True
        self.status = status
        self._transport = self._proto.response_stream(status, headers)

    async def write(self, chunk: bytes) -> None:
        self.sent += len(chunk)
        try:
            await self._transport.send_bytes(chunk)
        except RuntimeError as exc:  # RSGIProtocolClosed: the client went away
            raise ClientGone() from exc

    async def end_stream(self) -> None:
        """The stream ends when the application returns."""


class RsgiApp:
    """The gateway as an RSGI application."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        await self.gateway.handle(RsgiRequest(scope, proto), RsgiResponse(proto))

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self._startup())

    async def _startup(self) -> None:
        await self.gateway.startup()
        drain_on_signals(self.gateway.drain)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self.gateway.shutdown())
