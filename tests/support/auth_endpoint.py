"""A forward-auth endpoint on a loopback port for tests: records every request
it receives and answers with whatever the test decides.

Usage::

    with AuthEndpoint() as endpoint:
        endpoint.answer = lambda seen: (403, {})
        ...
        assert endpoint.seen[-1].headers["x-ds-operation"] == "append"
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Seen:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names


Answer = Callable[[Seen], tuple[int, dict[str, str]]]


def allow(seen: Seen) -> tuple[int, dict[str, str]]:
    return 200, {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # The gateway hangs up on a slow answer (its timeout): expected here.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class AuthEndpoint:
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.answer: Answer = allow
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/auth"

    def count(self, predicate: Callable[[Seen], bool] = lambda seen: True) -> int:
        with self._lock:
            return sum(1 for seen in self.seen if predicate(seen))

    def start(self, port: int = 0) -> AuthEndpoint:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with endpoint._lock:
                    endpoint._connections.add(self.connection)

            def do_GET(self) -> None:
                seen = Seen("GET", self.path, {k.lower(): v for k, v in self.headers.items()})
                with endpoint._lock:
                    endpoint.seen.append(seen)
                if endpoint.delay_s:
                    time.sleep(endpoint.delay_s)
                status, headers = endpoint.answer(seen)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return None

        server = _Server(("127.0.0.1", port), Handler)
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (kept-alive ones too):
        after this nothing answers on the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> AuthEndpoint:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
