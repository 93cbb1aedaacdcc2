"""A raw HTTP/2 client for abuse tests: frames built with ``hyperframe`` and
headers with ``hpack`` (the libraries under ``h2``), written to a plain
blocking socket, so a test can send what no well-behaved client would (resets
of every stream it opens, floods of control frames) and choose not to read.

It keeps no stream state and checks nothing it sends; it only reads frames
back when asked to.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import hpack
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

_TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB
NO_ERROR = 0x0
MAX_WINDOW = 2**31 - 1


class RawH2:
    """One connection to ``127.0.0.1:port``, prior-knowledge HTTP/2."""

    def __init__(
        self,
        port: int,
        *,
        settings: dict[int, int] | None = None,
        rcvbuf: int | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the window scale follows it
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.encoder = hpack.Encoder()
        self.next_stream_id = 1
        self.inbox = b""
        self.closed = False  # the server closed or reset the connection
        self.ended = 0  # responses that have ended (END_STREAM seen)
        self.send(PREFACE + SettingsFrame(0, settings=settings or {}).serialize())

    # -- frames out ------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Write ``data``; False when the server has closed or stopped reading
        (a write that cannot finish within the socket timeout)."""
        try:
            self.sock.sendall(data)
        except (TimeoutError, OSError):
            return False
        return True

    def headers_frame(self, path: str, *, method: str = "GET", end_stream: bool = True) -> bytes:
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        frame = HeadersFrame(stream_id)
        frame.data = self.encoder.encode(
            [
                (":method", method),
                (":scheme", "http"),
                (":authority", "127.0.0.1"),
                (":path", path),
            ]
        )
        frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame.serialize()

    def request(self, path: str, *, method: str = "GET", end_stream: bool = True) -> int:
        stream_id = self.next_stream_id
        self.send(self.headers_frame(path, method=method, end_stream=end_stream))
        return stream_id

    @staticmethod
    def rst_frame(stream_id: int, code: int = CANCEL) -> bytes:
        return RstStreamFrame(stream_id, error_code=code).serialize()

    @staticmethod
    def ping_frame(n: int) -> bytes:
        return PingFrame(0, opaque_data=n.to_bytes(8, "big")).serialize()

    @staticmethod
    def settings_frame() -> bytes:
        return SettingsFrame(0).serialize()

    @staticmethod
    def window_update_frame(stream_id: int, increment: int) -> bytes:
        return WindowUpdateFrame(stream_id, window_increment=increment).serialize()

    @staticmethod
    def data_frame(stream_id: int, data: bytes = b"", *, end_stream: bool = False) -> bytes:
        frame = DataFrame(stream_id, data=data)
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame.serialize()

    # -- frames in -------------------------------------------------------------------

    def frames(self, timeout: float) -> Iterator[Frame]:
        """Frames the server sends until ``timeout`` passes or it closes."""
        deadline = time.monotonic() + timeout
        polled = False
        while True:
            while len(self.inbox) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.inbox[:9]))
                if len(self.inbox) < 9 + length:
                    break
                frame.parse_body(memoryview(self.inbox[9 : 9 + length]))
                self.inbox = self.inbox[9 + length :]
                if "END_STREAM" in frame.flags:
                    self.ended += 1
                yield frame
            if self.closed:
                return
            # At least one look at the socket, even with no time left.
            left = deadline - time.monotonic()
            if left <= 0 and polled:
                return
            polled = True
            ready, _, _ = select.select([self.sock], [], [], max(0.0, left))
            if not ready:
                return
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                self.closed = True
            self.inbox += data

    def goaway(self, timeout: float) -> GoAwayFrame | None:
        """The server's GOAWAY, if one comes within ``timeout`` (other frames
        are read and dropped)."""
        for frame in self.frames(timeout):
            if isinstance(frame, GoAwayFrame):
                return frame
        return None

    def wait_closed(self, timeout: float) -> bool:
        """Read and drop everything until the server closes the connection."""
        for _ in self.frames(timeout):
            pass
        return self.closed

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LatencyProbe:
    """A well-behaved client beside the attack (support/latency_probe.py, in
    a process of its own): one GET after another on new HTTP/1.1
    connections. Entering returns once the first was answered; leaving
    waits for three more and sets ``worst_s`` (the slowest answer),
    ``answered`` and ``failures``."""

    def __init__(self, url: str, interval_s: float = 0.02) -> None:
        self.url = url
        self.interval_s = interval_s
        self.worst_s = 0.0
        self.answered = 0
        self.failures: list[str] = []
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> LatencyProbe:
        env = {**os.environ, "PYTHONPATH": _TESTS_DIR}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "support.latency_probe", self.url, str(self.interval_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        ready = self._proc.stdout.readline()  # the first answer (or the probe's end)
        if ready.strip() != "ready":
            self._proc.kill()
            self._proc.wait()
            raise RuntimeError(f"the latency probe did not start: {ready!r}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            out, _ = proc.communicate(input="", timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        result = json.loads(out.strip().splitlines()[-1])
        self.worst_s = result["worst_s"]
        self.answered = result["answered"]
        self.failures = result["failures"]


def server_holds(port: int, client_port: int) -> bool:
    """Whether the server on ``port`` still holds the connection from
    ``client_port`` (Linux /proc/net/tcp: ESTABLISHED, or CLOSE_WAIT once the
    client closed its side)."""
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            local, remote, state = line.split()[1:4]
            if (
                int(local.rsplit(":", 1)[1], 16) == port
                and int(remote.rsplit(":", 1)[1], 16) == client_port
                and state in ("01", "08")
            ):
                return True
    return False


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` in KiB (/proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")
