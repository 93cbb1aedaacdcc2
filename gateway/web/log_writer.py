"""The request log's output: written from the event loop, never blocking it,
and never tearing a line.

Standard output is usually a pipe (a container runtime, ``| tee``), a socket
(systemd's journal) or a file. A pipe whose reader stalls fills in 64 KiB, and
a blocking write to it then blocks the whole worker. So lines are written
without blocking, on a handle of our own:

- a pipe, FIFO or terminal is opened anew through ``/proc/self/fd`` with
  ``O_NONBLOCK``: a description of its own, so the flag touches nobody else
  sharing the output (the other workers, the shell, a supervisor);
- a socket is sent to with ``MSG_DONTWAIT``, a flag of the call alone;
- a regular file takes every write at once (the page cache), as it is.

What the reader cannot take yet waits, and is written as the output becomes
writable again (``loop.add_writer``). Past ``max_pending`` bytes waiting
(``DS_ACCESS_LOG_BUFFER_BYTES``, 4 MiB), whole batches are dropped and counted
(``dropped_lines``, and ``durable_streams_request_log_dropped_lines_total``
when metrics are on), and once writing resumes the log itself says how many
lines are missing, at the place of the gap.

Every worker writes to the same output. A pipe keeps a write of at most
``PIPE_BUF`` (4 KiB) bytes whole, so lines go out in chunks of whole lines no
bigger than that: the workers' lines never interleave inside a line.

Writing from the event loop itself, rather than from a thread, also spares
every batch the handing over of the interpreter lock, which on a busy machine
cost more than the writes do.

The gateway's own messages (stderr) go the same way, through
``NonBlockingLogHandler``: a warning logged while stdout and stderr share a
pipe that nobody reads (``2>&1``, a stalled log shipper) must not stop the
worker either.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import select
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("gateway")

# Lines waiting for a slow reader, at most (about 25,000 lines).
MAX_PENDING_BYTES = 4 * 1024 * 1024
# At shutdown, how long the last lines may take to leave.
CLOSE_TIMEOUT_S = 2.0
# The most a pipe writes whole (POSIX guarantees at least 512; Linux: 4096).
ATOMIC_BYTES = select.PIPE_BUF


class LogWriter:
    """Writes batches of whole lines to ``fd`` without blocking the caller."""

    def __init__(
        self,
        fd: int,
        *,
        max_pending: int = MAX_PENDING_BYTES,
        on_drop: Callable[[int], None] | None = None,
        name: str = "request log",
    ) -> None:
        self.max_pending = max_pending
        self.name = name  # in the notice of dropped lines
        self.dropped_lines = 0  # since the start, for tests and metrics
        self._on_drop = on_drop
        # Bytes waiting for the reader, and where lines were dropped: the count
        # of lines dropped at that point, written there as a notice.
        self._queue: deque[bytes | int] = deque()
        self._pending = 0  # bytes queued
        # The loop watching the output while bytes wait, and its thread.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._chunked = True  # in whole-line chunks of ATOMIC_BYTES at most
        # Where bytes go (and whose writability the loop watches), and how:
        # os.write, or a socket's send without waiting. ``_own``: what close
        # releases (a handle or a socket of this writer's own).
        self._fd = fd
        self._send: Callable[[memoryview], int] = functools.partial(os.write, fd)
        self._own: socket.socket | int | None = None
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            self._chunked = False  # a file's write is whole, and never waits long
        elif stat.S_ISSOCK(mode):
            # A duplicate shares the description: MSG_DONTWAIT, not O_NONBLOCK.
            sock = self._own = socket.socket(fileno=os.dup(fd))
            self._fd = sock.fileno()
            self._send = functools.partial(_send_now, sock)
        else:
            try:
                self._fd = self._own = os.open(
                    f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
                )
            except OSError as exc:
                # No /proc (not Linux): the shared handle, as it is. A reader
                # that stops then stops this worker too.
                log.warning("request log: writing to fd %d may block (%s)", fd, exc)
            else:
                self._send = functools.partial(os.write, self._fd)

    # -- writing ---------------------------------------------------------------------

    def write(self, data: bytes, lines: int) -> None:
        """Write ``data`` (``lines`` whole lines) now, or queue it; never blocks."""
        if self._queue and self._loop is None:
            self._resume()  # nothing watches the output (no loop): try now
        if not self._queue:
            rest = self._write_some(data)
            if rest is None:
                return
            data = rest  # (written in part: the rest goes first, whatever the limit)
        elif self._pending + len(data) > self.max_pending:
            self._drop(lines)
            return
        self._queue.append(data)
        self._pending += len(data)
        self._watch()

    def _drop(self, lines: int) -> None:
        """Lines the reader had no room for: counted, and a notice at the gap."""
        queue = self._queue
        if queue and isinstance(queue[-1], int):
            queue[-1] += lines
        else:
            queue.append(lines)
        self._count_lost(lines)

    def _count_lost(self, lines: int) -> None:
        self.dropped_lines += lines
        if self._on_drop is not None and lines:
            self._on_drop(lines)

    def _write_some(self, data: bytes) -> bytes | None:
        """Write as much of ``data`` as the output takes now: None when all of
        it went (or the output is gone), else what is left."""
        view = memoryview(data)
        size = len(data)
        start = 0
        while start < size:
            end = size
            if self._chunked and size - start > ATOMIC_BYTES:
                # The last whole line within ATOMIC_BYTES (a longer line: whole).
                end = data.rfind(b"\n", start, start + ATOMIC_BYTES) + 1
                if end <= start:
                    end = data.find(b"\n", start) + 1 or size
            try:
                start += self._send(view[start:end])
            except BlockingIOError:
                return data[start:]
            except OSError:
                # The output is gone (EPIPE) or failing (ENOSPC): these lines
                # are lost, and counted.
                self._count_lost(data.count(b"\n", start))
                return None
        return None

    def _watch(self) -> None:
        if self._loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (a tool, a test): written at close
            try:
                loop.add_writer(self._fd, self._resume)
            except (OSError, ValueError, NotImplementedError):
                # Not pollable (a regular file never needs it): retried with
                # the next batch, and at close.
                return
            self._loop = loop
            self._thread = threading.get_ident()

    @property
    def watching(self) -> tuple[asyncio.AbstractEventLoop, int] | None:
        """The loop that writes what waits (and its thread), while bytes wait."""
        return None if self._loop is None else (self._loop, self._thread)

    def _unwatch(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._fd)
            self._loop = None

    def _resume(self) -> None:
        """The output takes bytes again: write what waits, in order."""
        queue = self._queue
        while queue:
            item = queue[0]
            if isinstance(item, int):
                item = queue[0] = _notice(self.name, item)
                self._pending += len(item)
            rest = self._write_some(item)
            if rest is not None:
                queue[0] = rest
                self._pending -= len(item) - len(rest)
                return
            queue.popleft()
            self._pending -= len(item)
        self._unwatch()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued, waiting at most ``timeout`` for the reader,
        and release the output."""
        self.flush(timeout)
        own, self._own = self._own, None
        if isinstance(own, socket.socket):
            own.close()
        elif own is not None:
            os.close(own)

    def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued, waiting at most ``timeout`` for the reader."""
        self._unwatch()
        deadline = time.monotonic() + timeout
        while self._queue:
            pending = self._pending
            self._resume()
            self._unwatch()
            if not self._queue:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if self._pending == pending:
                with contextlib.suppress(OSError, ValueError):
                    select.select([], [self._fd], [], min(left, 0.1))


def _send_now(sock: socket.socket, data: memoryview) -> int:
    return sock.send(data, socket.MSG_DONTWAIT)


def _notice(name: str, dropped: int) -> bytes:
    return f"{name}: {dropped} lines dropped here (the output was not read)\n".encode()


class NonBlockingLogHandler(logging.Handler):
    """A logging handler that writes to ``fd`` (stderr) through a LogWriter:
    a reader that stops costs dropped lines, noted where they are missing,
    never a blocked event loop.

    Records logged on the thread of the loop that watches the output are
    written there and then; from any other thread they are handed to that
    loop, so that one thread at a time touches the writer. A forked worker
    gets a writer of its own. ``flush`` (at a worker's exit, and at
    ``logging.shutdown``) waits up to ``CLOSE_TIMEOUT_S`` for what is queued.
    """

    def __init__(self, fd: int = 2, *, max_pending: int = 1024 * 1024) -> None:
        super().__init__()
        self._fd = fd
        self._max_pending = max_pending
        self._writer: LogWriter | None = None
        self._pid = 0

    def _here(self) -> LogWriter:
        if self._writer is None or self._pid != os.getpid():
            # (A writer inherited through fork stays the parent's: its queue is
            # the parent's to write.)
            self._writer = LogWriter(self._fd, max_pending=self._max_pending, name="gateway log")
            self._pid = os.getpid()
        return self._writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            writer = self._here()
            watching = writer.watching
            if watching is not None and watching[1] != threading.get_ident():
                watching[0].call_soon_threadsafe(writer.write, data, data.count(b"\n"))
            else:
                writer.write(data, data.count(b"\n"))
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        if self._writer is not None and self._pid == os.getpid():
            self._writer.flush()

    def close(self) -> None:
        try:
            if self._writer is not None and self._pid == os.getpid():
                self._writer.close()
            self._writer = None
        finally:
            super().close()
