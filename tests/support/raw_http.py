"""Reading an HTTP/1.1 response off a raw socket, for tests that must control
the bytes on the wire (httpx would normalise them)."""

from __future__ import annotations

import asyncio
import time


async def read_response(
    reader: asyncio.StreamReader,
) -> tuple[int, dict[str, str], bytes, float]:
    """(status, lower-cased headers, body, monotonic time the head arrived).
    The body is read by Content-Length (none without it)."""
    head = await reader.readuntil(b"\r\n\r\n")
    arrived = time.monotonic()
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body, arrived
