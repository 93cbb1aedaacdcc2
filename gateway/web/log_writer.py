"""The request log's writer: a thread of its own, so that a stdout nobody reads
never stops the event loop.

Standard output is usually a pipe (a container runtime, systemd, ``| tee``). A
pipe whose reader stalls fills in 64 KiB, and a blocking write to it then
blocks the whole worker: every client waited on the log consumer. Here the
event loop only queues each batch of lines (``write``); the thread writes them,
blocking as long as it must, with the interpreter lock released meanwhile.

What the reader cannot take is dropped, never queued without bound: past
``max_pending`` bytes waiting (``DS_ACCESS_LOG_BUFFER_BYTES``, 4 MiB), whole
batches are dropped and counted (``dropped_lines``, and
``durable_streams_request_log_dropped_lines_total`` when metrics are on), and
once writing resumes the log itself says how many lines are missing, at the
place of the gap.
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque
from collections.abc import Callable

# Lines waiting for a slow reader, at most (about 25,000 lines).
MAX_PENDING_BYTES = 4 * 1024 * 1024
# At shutdown, how long the last lines may take to leave.
CLOSE_TIMEOUT_S = 2.0


class LogWriter:
    """Writes batches of log lines to ``fd`` from a daemon thread."""

    def __init__(
        self,
        fd: int,
        *,
        max_pending: int = MAX_PENDING_BYTES,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self.fd = fd
        self.max_pending = max_pending
        self.dropped_lines = 0  # since the start, for tests and metrics
        self._on_drop = on_drop
        # Batches to write, and where lines were dropped: the count of lines
        # dropped at that point, written there as a notice.
        self._queue: deque[bytes | int] = deque()
        self._pending = 0  # bytes queued, not yet taken by the thread
        self._closing = False
        self._ready = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def write(self, data: bytes, lines: int) -> None:
        """Queue ``data`` (``lines`` whole lines); never blocks on the reader."""
        with self._ready:
            if self._pending + len(data) > self.max_pending:
                self.dropped_lines += lines
                queue = self._queue
                if queue and isinstance(queue[-1], int):
                    queue[-1] += lines
                else:
                    queue.append(lines)
                dropped = True
            else:
                self._queue.append(data)
                self._pending += len(data)
                self._ready.notify()
                dropped = False
        if dropped and self._on_drop is not None:
            self._on_drop(lines)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued, waiting at most ``timeout`` for the reader."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closing:
                    self._ready.wait()
                if not self._queue:
                    return  # closing, and everything is written
                items = list(self._queue)
                self._queue.clear()
                self._pending = 0
            data = b"".join([_notice(item) if isinstance(item, int) else item for item in items])
            if not _write_all(self.fd, data):
                return  # the output is gone (closed): nobody to write to


def _notice(dropped: int) -> bytes:
    return f"request log: {dropped} lines dropped here (standard output was not read)\n".encode()


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data``, waiting for a slow reader (even on a non-blocking
    fd); False once the output is closed."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
        except InterruptedError:
            continue
        except OSError:
            return False
    return True
