"""The request log's output on real pipes, sockets and files: a reader that
stops costs dropped lines (counted), never a blocked event loop; workers
sharing one pipe never tear each other's lines."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pytest

from gateway.web.log_writer import ATOMIC_BYTES, LogWriter, NonBlockingLogHandler

LINE = b"x" * 99 + b"\n"


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


async def read_until(read: Callable[[], bytes], last: bytes, seconds: float = 10) -> bytes:
    """Everything read until ``last`` ends it, letting the loop run meanwhile."""
    got = b""
    deadline = time.monotonic() + seconds
    while not got.endswith(last) and time.monotonic() < deadline:
        got += read()
        await asyncio.sleep(0.01)
    return got


def check_gap_accounting(
    got: bytes, writer: LogWriter, written: int, name: bytes = b"request log"
) -> None:
    """Lines arrived whole and in order, with notices where lines are missing
    that add up to what the writer counted as dropped."""
    lines = got.splitlines()
    assert lines[-1] == b"after"
    notices = [line for line in lines if line.startswith(name + b": ")]
    assert notices, lines[-3:]
    missing = sum(int(line.split()[2]) for line in notices)
    assert missing == writer.dropped_lines
    kept = [line for line in lines[:-1] if not line.startswith(name + b": ")]
    assert set(kept) == {LINE.rstrip(b"\n")}
    assert len(kept) + missing == written


class Output(NamedTuple):
    """A standard output whose reader stops: where to write, how to read what
    arrived, and whether the shared handle is still blocking for the others."""

    fd: int
    read: Callable[[], bytes]
    still_blocking: Callable[[], bool]


@pytest.fixture(params=["pipe", "socket"])
def stalled_output(request: pytest.FixtureRequest) -> Iterator[Output]:
    if request.param == "pipe":  # a container runtime, | tee
        read_end, write_end = os.pipe()
        yield Output(write_end, lambda: read_all(read_end), lambda: os.get_blocking(write_end))
        os.close(read_end)
        os.close(write_end)
    else:  # systemd hands services a socket as standard output
        ours, journal = socket.socketpair()
        journal.setblocking(False)

        def read() -> bytes:
            chunks: list[bytes] = []
            while True:
                try:
                    chunk = journal.recv(1 << 16)
                except BlockingIOError:
                    return b"".join(chunks)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)

        yield Output(ours.fileno(), read, ours.getblocking)
        ours.close()
        journal.close()


def test_a_reader_that_stops_costs_dropped_lines_never_a_blocked_loop(
    stalled_output: Output,
) -> None:
    drops: list[int] = []

    async def scenario() -> None:
        writer = LogWriter(stalled_output.fd, max_pending=64 * 1024, on_drop=drops.append)
        try:
            # 10 MB into an output nobody reads (a pipe holds 64 KiB) plus a
            # 64 KiB queue: every call returns at once, and what does not fit is
            # dropped and counted.
            started = time.monotonic()
            for _ in range(1000):
                writer.write(LINE * 100, 100)
            assert time.monotonic() - started < 5.0
            assert writer.dropped_lines > 50_000
            assert sum(drops) == writer.dropped_lines
            # The output was never made non-blocking for the others sharing it
            # (a pipe: a handle of our own; a socket: MSG_DONTWAIT).
            assert stalled_output.still_blocking()

            # The reader comes back: the queued lines arrive as the loop runs,
            # then a notice where lines are missing, then what came afterwards.
            writer.write(b"after\n", 1)
            got = await read_until(stalled_output.read, b"after\n")
            check_gap_accounting(got, writer, 100_000)
        finally:
            writer.close(timeout=5)

    asyncio.run(scenario())


def test_the_gateways_own_messages_never_block_the_loop_either(stalled_output: Output) -> None:
    """stderr through NonBlockingLogHandler (the console script's logging):
    records from the loop's thread and from another thread, into an output
    nobody reads, then read again."""
    handler = NonBlockingLogHandler(stalled_output.fd, max_pending=64 * 1024)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"test.nonblocking.{id(handler)}")
    logger.propagate = False
    logger.addHandler(handler)
    message = LINE.rstrip(b"\n").decode()

    async def scenario() -> None:
        started = time.monotonic()
        for _ in range(50_000):  # 5 MB
            logger.warning(message)

        def from_a_thread() -> None:
            for _ in range(5_000):
                logger.warning(message)

        await asyncio.to_thread(from_a_thread)  # the loop runs while the thread logs
        assert time.monotonic() - started < 10
        writer = handler._here()
        assert writer.dropped_lines > 40_000
        assert stalled_output.still_blocking()
        logger.warning("after")
        got = await read_until(stalled_output.read, b"after\n")
        check_gap_accounting(got, writer, 55_000, name=b"gateway log")

    try:
        asyncio.run(scenario())
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_close_writes_what_is_queued() -> None:
    read_end, write_end = os.pipe()
    want = [b"line %d %s" % (number, b"y" * 50) for number in range(5000)]

    async def scenario() -> LogWriter:
        writer = LogWriter(write_end)
        for line in want:  # more than the pipe holds: the rest waits for close
            writer.write(line + b"\n", 1)
        assert writer._queue
        return writer

    writer = asyncio.run(scenario())
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(read_until_closed(read_end)))
    reader.start()
    writer.close(timeout=10)
    os.close(write_end)
    reader.join(10)
    os.close(read_end)
    assert bytes(got).splitlines() == want
    assert writer.dropped_lines == 0


def read_until_closed(fd: int) -> bytes:
    data = bytearray()
    while chunk := os.read(fd, 1 << 16):
        data += chunk
    return bytes(data)


def test_a_closed_output_counts_lines_lost_and_never_raises() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # writes now fail with EPIPE (SIGPIPE is ignored by Python)
    drops: list[int] = []
    writer = LogWriter(write_end, on_drop=drops.append)
    writer.write(LINE * 3, 3)
    writer.write(LINE, 1)
    assert writer.dropped_lines == 4
    assert sum(drops) == 4
    writer.close(timeout=1)
    os.close(write_end)


def test_a_regular_file_gets_every_line_in_order(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "access.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        writer = LogWriter(fd)
        for number in range(2000):
            writer.write(b"line %d\n" % number, 1)
        writer.close()
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read().splitlines() == [b"line %d" % n for n in range(2000)]


WORKERS = 4
BATCHES = 300
BATCH_LINES = 400  # a batch of about 40 KB: ten times what a pipe keeps whole


def _worker(number: int, write_end: int) -> None:
    async def run() -> None:
        writer = LogWriter(write_end, max_pending=1 << 30)
        for batch in range(BATCHES):
            lines = b"".join(
                b"worker=%d batch=%d line=%d %s\n" % (number, batch, line, b"z" * (line % 97))
                for line in range(BATCH_LINES)
            )
            writer.write(lines, BATCH_LINES)
            await asyncio.sleep(0)  # the loop writes what waits as the pipe takes it
        writer.close(timeout=30)

    asyncio.run(run())


WORKER_LINE = re.compile(rb"worker=(\d) batch=(\d+) line=(\d+) (z*)")


def test_workers_sharing_a_slow_pipe_never_tear_each_others_lines() -> None:
    """Like ``--workers 4 | slow-reader``: each worker's batches are far bigger
    than a pipe writes whole, and the reader is slow enough that the pipe is
    full most of the time. Every line must arrive whole, each worker's in order."""
    read_end, write_end = os.pipe()
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_worker, args=(n, write_end)) for n in range(WORKERS)]
    for worker in workers:
        worker.start()
    os.close(write_end)
    data = bytearray()
    while chunk := os.read(read_end, 8192):
        data += chunk
        time.sleep(0.0005)  # a slow reader: the pipe stays full
    os.close(read_end)
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    seen: dict[int, list[tuple[int, int]]] = {n: [] for n in range(WORKERS)}
    for line in bytes(data).splitlines():
        match = WORKER_LINE.fullmatch(line)
        assert match, line[:200]
        number, batch, index, pad = match.groups()
        assert len(pad) == int(index) % 97, line[:200]
        seen[int(number)].append((int(batch), int(index)))
    for number, order in seen.items():
        assert order == [(b, i) for b in range(BATCHES) for i in range(BATCH_LINES)], number
    assert ATOMIC_BYTES >= 512
