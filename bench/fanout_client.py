"""One process of the fan-out client (scenario d): N raw-socket SSE readers.

    python -m bench.fanout_client --host H --port P --path /v1/stream/x --count N --marker M

Protocol with the coordinator (bench.scenarios), one JSON object per line on stdout:
1. opens N readers at `offset=now&live=sse` (at most --concurrency opening at a
   time) and prints {"ready": k, "failed": f, "stalled": bool} once every reader
   has its first control event with "upToDate":true, or has failed, or no reader
   became ready for --stall-timeout seconds (a server that stops accepting or
   answering new connections: the readers still waiting are closed and failed);
2. prints {"times": [...], "lost": l} once every ready reader has received the
   marker (time.monotonic() at arrival; CLOCK_MONOTONIC is system-wide, so the
   coordinator compares it with its own clock), or when stdin says "report";
3. closes every reader and exits on "close" or end of stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

from bench.httpc import AUTH_TOKEN, Dechunker

UP_TO_DATE = b'"upToDate":true'


class Reader(asyncio.Protocol):
    def __init__(self, request: bytes, marker: bytes, client: Client) -> None:
        self.request, self.marker, self.client = request, marker, client
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.headers_done = False
        self.dechunker: Dechunker | None = None
        self.window = b""  # tail of the decoded body, to find patterns across reads
        self.ready = asyncio.get_running_loop().create_future()
        # A reader given up on may fail later: its exception is expected, not "never retrieved".
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.delivered_at: float | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.headers_done:
            self.head += data
            i = self.head.find(b"\r\n\r\n")
            if i < 0:
                return
            head, data = bytes(self.head[:i]), bytes(self.head[i + 4 :])
            self.headers_done = True
            if not head.startswith(b"HTTP/1.1 200"):
                self._fail(f"status {head.split(b' ', 2)[1:2]}")
                return
            if b"transfer-encoding: chunked" in head.lower():
                self.dechunker = Dechunker()
        payload = self.dechunker.feed(data) if self.dechunker else data
        text = self.window + payload
        if not self.ready.done():
            if UP_TO_DATE in text:
                self.ready.set_result(True)
        elif self.delivered_at is None and self.marker in text:
            self.delivered_at = now
            self.client.delivered(self)
        self.window = text[-(len(self.marker) + 64) :]

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed: {exc}"))
        else:
            self.client.lost(self)


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.request = (
            f"GET {args.path}?offset=now&live=sse HTTP/1.1\r\n"
            f"Host: {args.host}:{args.port}\r\nAccept: text/event-stream\r\n"
            + (f"Authorization: Bearer {AUTH_TOKEN}\r\n" if AUTH_TOKEN else "")
            + "\r\n"
        ).encode()
        self.marker = args.marker.encode()
        self.readers: list[Reader] = []
        self.failed = 0
        self.pending = 0
        self.lost_count = 0
        self.all_delivered = asyncio.Event()
        self.stalled = asyncio.Event()
        self.last_progress = time.monotonic()

    async def open_one(self, sem: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        async with sem:
            for attempt in range(3):
                if self.stalled.is_set():
                    break
                reader = Reader(self.request, self.marker, self)
                try:
                    await asyncio.wait_for(
                        loop.create_connection(lambda r=reader: r, self.args.host, self.args.port),
                        30,
                    )
                    stall = asyncio.ensure_future(self.stalled.wait())
                    try:
                        await asyncio.wait(
                            [reader.ready, stall], return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        stall.cancel()
                    if not reader.ready.done():
                        break  # the server stopped serving new readers: give up
                    reader.ready.result()  # raises if the reader failed
                    self.readers.append(reader)
                    self.last_progress = time.monotonic()
                    return
                except (OSError, TimeoutError, ConnectionError):
                    if reader.transport is not None:
                        reader.transport.close()
                    await asyncio.sleep(0.2 * (attempt + 1))
                finally:
                    if reader not in self.readers and reader.transport is not None:
                        reader.transport.close()
            self.failed += 1

    async def watchdog(self) -> None:
        """Stop opening once no reader has become ready for --stall-timeout seconds."""
        while True:
            await asyncio.sleep(0.5)
            if time.monotonic() - self.last_progress > self.args.stall_timeout:
                self.stalled.set()
                return

    def delivered(self, reader: Reader) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.all_delivered.set()

    def lost(self, reader: Reader) -> None:
        if reader.delivered_at is None:
            self.lost_count += 1
            self.pending -= 1
            if self.pending <= 0:
                self.all_delivered.set()


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    client = Client(args)
    sem = asyncio.Semaphore(args.concurrency)
    watchdog = asyncio.ensure_future(client.watchdog())
    await asyncio.gather(*(client.open_one(sem) for _ in range(args.count)))
    watchdog.cancel()
    client.pending = sum(1 for r in client.readers if not r.closed)
    if client.pending == 0:
        client.all_delivered.set()
    ready = len(client.readers)
    emit({"ready": ready, "failed": client.failed, "stalled": client.stalled.is_set()})

    report = asyncio.ensure_future(stdin.readline())
    delivered = asyncio.ensure_future(client.all_delivered.wait())
    await asyncio.wait([report, delivered], return_when=asyncio.FIRST_COMPLETED)
    delivered.cancel()
    times = [r.delivered_at for r in client.readers if r.delivered_at is not None]
    emit({"times": times, "lost": client.lost_count})

    line = await report  # "report", "close" or end of stdin
    while line not in (b"", b"close\n"):
        line = await stdin.readline()
    for reader in client.readers:
        if reader.transport is not None:
            reader.transport.close()
    await asyncio.sleep(0.2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--marker", required=True)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--stall-timeout", type=float, default=10.0)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
