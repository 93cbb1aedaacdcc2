"""A minimal HTTP/1.1 client on asyncio streams, and SSE parsing.

Small and predictable on purpose: no compression (so no server gzips a
catch-up read), keep-alive, Content-Length and chunked bodies, and a
streaming mode for SSE. Used for set-up, latency, catch-up and fan-out.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

# bench/run --auth jwt: every request carries this bearer token (set by
# bench/cli.py, and inherited through the environment by client processes).
AUTH_TOKEN = os.environ.get("BENCH_AUTH_TOKEN") or None


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class HttpError(Exception):
    pass


class Dechunker:
    """Incremental decoder of a chunked transfer-coded body."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.remaining = 0
        self.state = "size"
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        while not self.done:
            if self.state == "size":
                i = self.buf.find(b"\r\n")
                if i < 0:
                    break
                size = int(bytes(self.buf[:i]).split(b";")[0], 16)
                del self.buf[: i + 2]
                if size == 0:
                    self.done = True
                    break
                self.remaining, self.state = size, "data"
            elif self.state == "data":
                n = min(self.remaining, len(self.buf))
                if n == 0:
                    break
                out += self.buf[:n]
                del self.buf[:n]
                self.remaining -= n
                if self.remaining == 0:
                    self.state = "crlf"
            else:  # crlf after a chunk
                if len(self.buf) < 2:
                    break
                del self.buf[:2]
                self.state = "size"
        return bytes(out)


class SseParser:
    """Splits an SSE byte stream into (event, data) pairs."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        self.buf += data
        events = []
        while True:
            i = self.buf.find(b"\n\n")
            if i < 0:
                break
            block = bytes(self.buf[:i]).decode()
            del self.buf[: i + 2]
            event, data_lines = "message", []
            for line in block.split("\n"):
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                if value.startswith(" "):
                    value = value[1:]
                if name == "event":
                    event = value
                elif name == "data":
                    data_lines.append(value)
            if data_lines or event != "message":
                events.append((event, "\n".join(data_lines)))
        return events


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HttpError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


class Conn:
    """One keep-alive HTTP/1.1 connection (reopened when the server closed it)."""

    IDLE_REOPEN_S = 3.0  # the Node server closes idle connections after 5 s

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_used = 0.0

    async def open(self) -> None:
        await self.close()
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=1 << 22), self.timeout
        )
        self.last_used = time.monotonic()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 2)
            except (TimeoutError, OSError):
                pass
        self.reader = self.writer = None

    def _encode(self, method: str, path: str, headers: dict[str, str] | None, body: bytes) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if AUTH_TOKEN:
            lines.append(f"Authorization: Bearer {AUTH_TOKEN}")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def send(self, method: str, path: str, headers=None, body: bytes = b"") -> None:
        if self.writer is None or time.monotonic() - self.last_used > self.IDLE_REOPEN_S:
            await self.open()
        assert self.writer is not None
        self.writer.write(self._encode(method, path, headers, body))

    async def read_head(self) -> tuple[int, dict[str, str]]:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        return parse_head(head[:-4])

    async def read_body(self, method: str, status: int, headers: dict[str, str]) -> bytes:
        assert self.reader is not None
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")  # no trailers expected
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(parts)
        elif "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        else:
            body = await self.reader.read()
            await self.close()
            return body
        if headers.get("connection", "").lower() == "close":
            await self.close()
        self.last_used = time.monotonic()
        return body

    async def request(self, method: str, path: str, headers=None, body: bytes = b"") -> Response:
        async def go() -> Response:
            await self.send(method, path, headers, body)
            status, resp_headers = await self.read_head()
            return Response(
                status, resp_headers, await self.read_body(method, status, resp_headers)
            )

        try:
            return await asyncio.wait_for(go(), self.timeout)
        except BaseException:
            await self.close()
            raise
