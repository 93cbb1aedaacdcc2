"""The HTTP/1.1 connection (gateway/http1.py) over real loopback sockets, with a
handler of the test's own: one task per connection, its end, and the bounds of
the header caches. (The e2e tests drive the same code through the gateway.)"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from support.raw_http import read_response

from gateway.servers.native import http1
from gateway.servers.native.http1 import Http1Connection
from gateway.servers.native.server import ServerOptions, ServerState
from gateway.web.request import Request, Response

Handle = Callable[[Request, Response], Awaitable[None]]
TIMEOUT = 5.0


class Listener:
    def __init__(self, handle: Handle) -> None:
        self.handle = handle
        self.conns: list[Http1Connection] = []

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.state = ServerState(self.handle, ServerOptions(), loop, "127.0.0.1")

        def protocol() -> Http1Connection:
            conn = Http1Connection(self.state)
            self.conns.append(conn)
            return conn

        self.server = await loop.create_server(protocol, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes
) -> tuple[int, bytes]:
    writer.write(head)
    await writer.drain()
    status, _, body, _ = await asyncio.wait_for(read_response(reader), TIMEOUT)
    return status, body


GET = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"


async def test_one_task_answers_every_request_of_a_connection_and_ends_with_it() -> None:
    seen: list[asyncio.Task[object] | None] = []

    async def handle(req: Request, res: Response) -> None:
        seen.append(asyncio.current_task())
        await asyncio.sleep(0)  # a handler that really waits in between
        await res.send(200, [("content-type", "text/plain")], b"ok")

    listener = Listener(handle)
    port = await listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            assert await _request(reader, writer, GET) == (200, b"ok")
        (conn,) = listener.conns
        task = conn._task
        assert task is not None and not task.done()  # idle, waiting for the next request
        assert seen == [task, task, task]

        writer.close()
        await asyncio.wait_for(task, TIMEOUT)  # the client left: the task ends
        assert conn._task is None and conn._next_request is None
        assert conn not in listener.state.connections
    finally:
        await listener.stop()


async def test_a_failing_handler_gets_a_500_and_its_connection_closes() -> None:
    seen: list[asyncio.Task[object] | None] = []

    async def handle(req: Request, res: Response) -> None:
        seen.append(asyncio.current_task())
        raise RuntimeError("boom")

    listener = Listener(handle)
    port = await listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, body = await _request(reader, writer, GET)
        assert (status, body) == (500, b"internal error\n")
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # closed
        (task,) = seen
        assert task is not None
        await asyncio.wait_for(task, TIMEOUT)
        writer.close()
    finally:
        await listener.stop()


async def test_header_caches_keep_only_short_entries_and_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http1, "_header_names", {})
    monkeypatch.setattr(http1, "_header_lines", {})
    monkeypatch.setattr(http1, "_MAX_HEADER_NAMES", 8)
    monkeypatch.setattr(http1, "_MAX_HEADER_LINES", 8)
    long_value = "v" * 300

    async def handle(req: Request, res: Response) -> None:
        # Every header the client sent comes back, under its lower-case name.
        assert req.header("x-long-" + "n" * 300) == "1"
        assert req.header("x-short") == "2"
        await res.send(
            200,
            [("x-same", "a"), ("x-long", long_value), ("stream-next-offset", "o")],
            b"ok",
        )

    listener = Listener(handle)
    port = await listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = b"GET /x HTTP/1.1\r\nHost: t\r\nX-Long-" + b"N" * 300 + b": 1\r\nX-Short: 2\r\n"
        for i in range(20):  # more distinct names than the cache may hold
            head += b"X-Extra-%d: e\r\n" % i
        assert await _request(reader, writer, head + b"\r\n") == (200, b"ok")
        writer.close()
    finally:
        await listener.stop()

    names = http1._header_names
    assert len(names) == 8
    assert names[b"Host"] == "host" and b"X-Short" in names
    assert all(len(name) <= http1._MAX_CACHED_BYTES for name in names)
    lines = http1._header_lines
    assert lines == {("x-same", "a"): b"x-same: a\r\n"}  # not the long or the varying one
