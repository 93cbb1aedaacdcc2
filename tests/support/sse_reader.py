"""A reader of Server-Sent Events over an httpx streaming response, parsing
lines and events as the HTML living standard's event-stream rules define them."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx


@dataclass
class Event:
    type: str  # "data", "control", ... or "comment"
    data: str
    at: float  # time.monotonic() when it arrived

    def json(self) -> dict:
        return json.loads(self.data)


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """Lines as an event stream defines them: ended by CRLF, LF or CR only
    (httpx's aiter_lines would also split on U+2028 and friends)."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        while True:
            cr, lf = buffer.find(b"\r"), buffer.find(b"\n")
            if cr < 0 and lf < 0:
                break
            if cr >= 0 and (lf < 0 or cr < lf):
                if cr + 1 == len(buffer):
                    break  # a CR at the end may be the first half of a CRLF
                end = cr + 2 if buffer[cr + 1 : cr + 2] == b"\n" else cr + 1
                line, buffer = buffer[:cr], buffer[end:]
            else:
                line, buffer = buffer[:lf], buffer[lf + 1 :]
            yield line.decode("utf-8")
    if buffer:
        yield buffer.removesuffix(b"\r").decode("utf-8")


class SSE:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = sse_lines(response)

    async def next(self) -> Event | None:
        """The next event (or comment); None once the server closed the stream."""
        kind, data = "", []
        async for line in self._lines:
            if line == "":
                if data or kind:
                    return Event(kind or "message", "\n".join(data), time.monotonic())
                continue
            if line.startswith(":"):
                return Event("comment", line[1:].strip(), time.monotonic())
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")  # exactly one leading space is syntax
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)
        return None

    async def next_event(self) -> Event:
        """The next data or control event, skipping comments; fails at end of stream."""
        while True:
            event = await self.next()
            assert event is not None, "the SSE connection closed unexpectedly"
            if event.type != "comment":
                return event
