"""The ASGI side of gateway/http.py (``hypercorn gateway.main:app``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from .http import (
    ClientGone,
    Headers,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    check_decoded_path,
    decode_url_path,
)


class AsgiRequest(Request):
    __slots__ = ("_headers", "receive", "scope")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        super().__init__()
        self.scope = scope
        self.receive = receive
        self.method = scope["method"]
        self.http1 = scope.get("http_version", "1.1") in ("1.0", "1.1")
        self.query_string = scope.get("query_string", b"").decode("utf-8", "replace")
        # Header names are lower case in ASGI; a repeated header keeps its last value.
        self._headers: dict[str, str] = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }

    def header(self, name: str) -> str | None:
        return self._headers.get(name)

    def release(self) -> None:
        super().release()
        self._headers = {}

    def _decode_path(self) -> str:
        raw = self.scope.get("raw_path")
        if raw is None:
            return check_decoded_path(self.scope["path"])
        return decode_url_path(raw)

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

    def base_url(self) -> str:
        scheme = self.scope.get("scheme", "http")
        host = self._headers.get("host")
        if not host:
            server = self.scope.get("server") or ("localhost", None)
            host = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
        return f"{scheme}://{host}"


def _encoded(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


class AsgiResponse(Response):
    __slots__ = ("_send",)

    def __init__(self, send: Send) -> None:
        super().__init__()
        self._send = send

    async def send(
        self, status: int, headers: Headers, body: bytes = b"", *, head: bool = False
    ) -> None:
        raw = _encoded(headers)
        if not head and status not in (204, 304):
            raw.append((b"content-length", str(len(body)).encode()))
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": raw})
        await self._send({"type": "http.response.body", "body": b"" if head else body})

    async def start_stream(self, status: int, headers: Headers) -> None:
        self.started = True
        await self._send(
            {"type": "http.response.start", "status": status, "headers": _encoded(headers)}
        )

    async def write(self, chunk: bytes) -> None:
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def end_stream(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})
