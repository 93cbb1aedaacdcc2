"""The request log's writer on a real pipe whose reader stops reading."""

from __future__ import annotations

import os
import time

from gateway.web.log_writer import LogWriter

LINE = b"x" * 99 + b"\n"


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_a_reader_that_stops_costs_dropped_lines_never_a_blocked_writer() -> None:
    read_end, write_end = os.pipe()
    drops: list[int] = []
    writer = LogWriter(write_end, max_pending=64 * 1024, on_drop=drops.append)
    try:
        # 10 MB into a 64 KiB pipe nobody reads plus a 64 KiB queue: every call
        # returns at once, and what does not fit is dropped and counted.
        started = time.monotonic()
        for _ in range(1000):
            writer.write(LINE * 100, 100)
        assert time.monotonic() - started < 5.0
        assert writer.dropped_lines > 90_000
        assert sum(drops) == writer.dropped_lines

        # The reader comes back: the queued lines arrive, then a notice where
        # lines are missing, then what is written afterwards.
        writer.write(b"after\n", 1)
        deadline = time.monotonic() + 10
        got = b""
        while not got.endswith(b"after\n") and time.monotonic() < deadline:
            got += read_all(read_end)
            time.sleep(0.01)
        lines = got.splitlines()
        assert lines[-1] == b"after"
        notices = [line for line in lines if line.startswith(b"request log: ")]
        assert notices, lines[-3:]
        missing = sum(int(line.split()[2]) for line in notices)
        assert missing == writer.dropped_lines
        assert len(lines) - len(notices) - 1 + missing == 100_000
    finally:
        writer.close(timeout=5)
        os.close(read_end)
        os.close(write_end)


def test_close_writes_what_is_queued() -> None:
    read_end, write_end = os.pipe()
    writer = LogWriter(write_end)
    for number in range(100):
        writer.write(b"line %d\n" % number, 1)
    writer.close(timeout=5)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        assert f.read().splitlines() == [b"line %d" % n for n in range(100)]
    assert writer.dropped_lines == 0


def test_a_closed_output_stops_the_thread() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # writes now fail with EPIPE (SIGPIPE is ignored by Python)
    writer = LogWriter(write_end)
    writer.write(LINE, 1)
    writer._thread.join(5)
    assert not writer._thread.is_alive()
    writer.write(LINE, 1)  # still never blocks nor raises
    writer.close(timeout=1)
    os.close(write_end)
