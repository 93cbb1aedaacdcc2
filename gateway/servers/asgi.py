"""The ASGI adapter (``hypercorn gateway.main:app``, or mounted inside a
Starlette/FastAPI application): the request interface over ASGI messages, and
the lifespan protocol around the app's start-up and shutdown."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gateway.web.app import Gateway
from gateway.web.request import (
    REQUEST_ID_HEADER,
    ClientGone,
    Headers,
    Request,
    Response,
    bodiless,
    check_decoded_path,
    check_header_value,
    collect_headers,
    decode_url_path,
)

from .signals import drain_on_signals

_REQUEST_ID = REQUEST_ID_HEADER.encode()

log = logging.getLogger("gateway")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class AsgiRequest(Request):
    __slots__ = ("receive", "scope")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        super().__init__()
        self.scope = scope
        self.receive = receive
        self.method = scope["method"]
        self.http1 = scope.get("http_version", "1.1") in ("1.0", "1.1")
        self.scheme = scope.get("scheme", "http")
        client = scope.get("client")
        self.peer = client[0] if client else None
        self.root_path = scope.get("root_path", "").rstrip("/")
        self.query_string = scope.get("query_string", b"").decode("utf-8", "replace")
        # Header names are lower case in ASGI.
        self._headers, self._repeated = collect_headers(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]
        )

    def authority(self) -> str:
        host = self._headers.get("host")
        if host:
            return host
        server = self.scope.get("server") or ("localhost", None)
        return f"{server[0]}:{server[1]}" if server[1] else str(server[0])

    def _decode_path(self) -> str:
        scope = self.scope
        raw = scope.get("raw_path")
        path = check_decoded_path(scope["path"]) if raw is None else decode_url_path(raw)
        # Mounted inside another application (Starlette's Mount): the paths we
        # serve are relative to where we are mounted.
        root = self.root_path
        if root and (path == root or path.startswith(root + "/")):
            path = path[len(root) :] or "/"
        return path

    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


def _encoded(headers: Headers) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in headers:
        check_header_value(name, value)
        out.append((name.encode("latin-1"), value.encode("latin-1")))
    return out


class AsgiResponse(Response):
    __slots__ = ("_send",)

    def __init__(self, send: Send) -> None:
        super().__init__()
        self._send = send

    async def send(
        self, status: int, headers: Headers, body: bytes = b"", *, head: bool = False
    ) -> None:
        raw = _encoded(headers)
        if self.request_id is not None:
            raw.append((_REQUEST_ID, self.request_id.encode()))
        if bodiless(status, head):
            body = b""
        else:
            raw.append((b"content-length", str(len(body)).encode()))
        self.started = True
        self.status = status
        self.sent = len(body)
        await self._send({"type": "http.response.start", "status": status, "headers": raw})
        await self._send({"type": "http.response.body", "body": body})

    async def start_stream(self, status: int, headers: Headers) -> None:
        raw = _encoded(headers)
        if self.request_id is not None:
            raw.append((_REQUEST_ID, self.request_id.encode()))
        self.started = True
        self.status = status
        await self._send({"type": "http.response.start", "status": status, "headers": raw})

    async def write(self, chunk: bytes) -> None:
        self.sent += len(chunk)
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def end_stream(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


class AsgiApp:
    """The gateway as an ASGI application.

    Served directly, it runs its start-up and shutdown from the ASGI lifespan
    protocol. Mounted inside a host application (Starlette and FastAPI do not
    pass the lifespan on to mounted apps), hand ``lifespan`` to the host::

        served = ServedApp(Gateway())
        host = Starlette(routes=[Mount("/streams", app=served)], lifespan=served.lifespan)
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @contextlib.asynccontextmanager
    async def lifespan(self, host_app: object = None) -> AsyncIterator[None]:
        """The gateway's start-up and shutdown around a host application's life."""
        await self.gateway.startup()
        drain_on_signals(self.gateway.drain)
        try:
            yield
        finally:
            await self.gateway.shutdown()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.gateway.handle(AsgiRequest(scope, receive), AsgiResponse(send))
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await gateway.startup()
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                drain_on_signals(gateway.drain)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await gateway.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
