"""The gateway's own HTTP server: ``durable-streams-gateway`` serves with it by
default.

A Durable Streams server spends most of its life holding idle live readers and
answering small appends. A general-purpose server pays per request for a
message dict or a hop between threads, and per connection for buffers sized for
anything; here the event loop (uvloop) owns the sockets and the protocol
objects in gateway/http1.py and gateway/http2.py call the app directly.

This module is the part around the connections:

- the listening socket, created once and shared by ``--workers`` forked worker
  processes (the parent only supervises: it restarts a worker that dies and
  stops them all on SIGTERM/SIGINT);
- per worker: the app's start-up, the connection limit, one sweep a second
  that closes idle keep-alive connections and clients too slow to send their
  request (and refreshes the Date header), and the graceful stop: stop
  accepting, end live reads with valid responses, let requests in flight
  finish (up to ``graceful_timeout``), then the app's shutdown;
- with a TLS context (tls.py), HTTPS: the loop does the handshake (within
  ``read_timeout``) before a connection reaches HTTP/1.1, which hands it to
  HTTP/2 when ALPN chose ``h2``. The connection limit counts connections from
  the end of their handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.servers.native.http1 import Http1Connection
from gateway.servers.native.http2 import Http2Connection
from gateway.servers.native.tls import SHUTDOWN_TIMEOUT_S
from gateway.servers.signals import stop_requested
from gateway.web.request import Request, Response

log = logging.getLogger("gateway.server")

Handler = Callable[[Request, Response], Awaitable[None]]


class Connection(Protocol):
    """What the server asks of a connection, whatever its protocol."""

    transport: Any

    @property
    def idle(self) -> bool: ...

    def has_expired(self, now: float) -> bool:
        """A deadline passed: the client kept an idle connection, sent its
        request or took our response too slowly."""
        ...

    def expire(self) -> None: ...

    def shutdown(self) -> None:
        """The server is stopping: close once the streams in progress end."""
        ...


# A worker that dies sooner than this after its start is not restarted: it
# would only die again (bad configuration, port taken, ...).
MIN_WORKER_LIFETIME_S = 5.0


@dataclass(frozen=True)
class ServerOptions:
    keep_alive_timeout: float = 5.0  # idle connection between requests
    # A request's headers from their first byte to their end; its body between
    # bytes; and a response the client does not read.
    read_timeout: float = 30.0
    graceful_timeout: float = 30.0  # requests in flight at stop
    max_connections: int = 100_000  # per worker
    max_header_bytes: int = 64 * 1024
    max_url_bytes: int = 16 * 1024
    backlog: int = 4096
    # HTTPS (tls.py beside this module builds it); the TLS handshake gets ``read_timeout``.
    tls: ssl.SSLContext | None = None
    # Told the pid of every worker that exited (metrics: drop its live gauges).
    on_worker_exit: Callable[[int], None] | None = None


class ServerState:
    """What every connection of one worker shares."""

    def __init__(
        self, handle: Handler, options: ServerOptions, loop: asyncio.AbstractEventLoop, host: str
    ) -> None:
        self.handle = handle
        self.loop = loop
        self.keep_alive_timeout = options.keep_alive_timeout
        self.read_timeout = options.read_timeout
        self.max_connections = options.max_connections
        self.max_header_bytes = options.max_header_bytes
        self.max_url_bytes = options.max_url_bytes
        self.scheme = "https" if options.tls is not None else "http"
        self.default_host = host  # for base URLs when a request has no Host
        self.connections: set[Connection] = set()
        self.stopping = False
        self.date = b""
        self._closed = asyncio.Event()
        self._sweeper: asyncio.TimerHandle | None = None
        self._tick()

    # -- connections ----------------------------------------------------------------------

    def admit(self, conn: Connection) -> bool:
        if self.stopping or len(self.connections) >= self.max_connections:
            return False
        self.connections.add(conn)
        return True

    def adopt(self, conn: Connection) -> None:
        self.connections.add(conn)

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self.stopping and not self.connections:
            self._closed.set()

    def http2_connection(self) -> Http2Connection:
        return Http2Connection(
            self.handle,
            on_close=self.forget,
            idle_timeout_s=self.keep_alive_timeout,
            write_timeout_s=self.read_timeout,
            read_timeout_s=self.read_timeout,
            scheme=self.scheme,
        )

    # -- once a second --------------------------------------------------------------------

    def _tick(self) -> None:
        self.date = b"date: %s\r\n" % email.utils.formatdate(usegmt=True).encode()
        now = self.loop.time()
        expired = [conn for conn in self.connections if conn.has_expired(now)]
        for conn in expired:
            conn.expire()
        self._sweeper = self.loop.call_at(now + 1.0, self._tick)

    # -- stopping -------------------------------------------------------------------------

    async def stop(self, grace_s: float) -> None:
        """Close idle connections now and the others after their response;
        abort what is still open after ``grace_s`` seconds."""
        self.stopping = True
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), grace_s)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket, shared by every worker."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _host_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


async def serve_app(app: Any, sock: socket.socket, options: ServerOptions) -> None:
    """One worker: start the app, serve ``sock`` until SIGTERM/SIGINT, stop gracefully.

    ``app`` needs ``startup()``, ``handle(request, response)``, ``drain()`` (end
    live reads) and ``shutdown()``: gateway.web.app.Gateway (a ``ServedApp``
    is served through its ``gateway``).
    """
    app = getattr(app, "gateway", app)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    signals = (signal.SIGTERM, signal.SIGINT)

    def on_signal(signum: int) -> None:
        if not stop.done():
            log.info("%s: stopping", signal.Signals(signum).name)
            stop.set_result(None)

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    if (requested := stop_requested()) is not None:
        on_signal(requested)  # it came in before, and its SystemExit was lost
    await app.startup()
    try:
        state = ServerState(app.handle, options, loop, _host_of(sock))
        tls: dict[str, Any] = {}
        if options.tls is not None:
            # A client that connects and never completes its handshake is
            # closed by the loop, like one that never sends its request; a
            # failed handshake is logged by the loop at debug level only.
            tls = {
                "ssl": options.tls,
                "ssl_handshake_timeout": options.read_timeout,
                "ssl_shutdown_timeout": SHUTDOWN_TIMEOUT_S,
            }
        server = await loop.create_server(
            lambda: Http1Connection(state), sock=sock, backlog=options.backlog, **tls
        )
        log.info("worker %d serving %s://%s", os.getpid(), state.scheme, state.default_host)
        await stop
        server.close()  # accept nothing more
        app.drain()  # live readers get their final response now
        await state.stop(options.graceful_timeout)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await app.shutdown()


def run_worker(load_app: Callable[[], Any], sock: socket.socket, options: ServerOptions) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve_app(load_app(), sock, options))
    except Exception:
        log.exception("worker %d failed", os.getpid())
        return 1
    return 0


def run(
    load_app: Callable[[], Any], host: str, port: int, workers: int, options: ServerOptions
) -> int:
    """Serve until SIGTERM/SIGINT; return the exit status."""
    try:
        sock = listen(host, port, options.backlog)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", host, port, exc)
        return 1
    if workers == 1:
        return run_worker(load_app, sock, options)
    return Supervisor(load_app, sock, workers, options).run()


class Supervisor:
    """The parent of ``workers`` forked worker processes sharing one socket."""

    def __init__(
        self,
        load_app: Callable[[], Any],
        sock: socket.socket,
        workers: int,
        options: ServerOptions,
    ) -> None:
        self.load_app = load_app
        self.sock = sock
        self.workers = workers
        self.options = options
        self.children: dict[int, float] = {}  # pid -> start time
        self.stopping = False
        self.status = 0

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        if stop_requested() is not None:
            self.stopping = True  # it came in before, and its SystemExit was lost
        try:
            for _ in range(self.workers):
                if self.stopping:
                    break  # a signal came in while the workers were being started
                self._spawn()
            while self.children:
                pid, status = os.wait()
                started = self.children.pop(pid, None)
                if started is not None and self.options.on_worker_exit is not None:
                    self.options.on_worker_exit(pid)
                if started is None or self.stopping:
                    continue
                code = os.waitstatus_to_exitcode(status)
                if time.monotonic() - started < MIN_WORKER_LIFETIME_S:
                    log.error("worker %d exited with %d right after start; stopping", pid, code)
                    self.status = 1
                    self._stop(signal.SIGTERM)
                else:
                    log.warning("worker %d exited with %d; starting another", pid, code)
                    self._spawn()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.sock.close()
        return self.status

    def _spawn(self) -> None:
        # SIGTERM/SIGINT wait until the new worker has the default handlers: one that
        # came in between would run the supervisor's handler in the worker, where it
        # is lost, and the supervisor would wait for that worker forever.
        stop_signals = {signal.SIGTERM, signal.SIGINT}
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    for sig in stop_signals:
                        signal.signal(sig, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                    die_with_parent()
                    code = run_worker(self.load_app, self.sock, self.options)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    for handler in logging.getLogger().handlers:
                        handler.flush()  # (os._exit runs no atexit: logging's is skipped)
                    os._exit(code)
            self.children[pid] = time.monotonic()  # before a signal may look for it
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _on_signal(self, signum: int, _frame: object) -> None:
        # The first signal stops the workers gracefully, a second one at once.
        self._stop(signal.SIGKILL if self.stopping else signal.SIGTERM)

    def _stop(self, sig: int) -> None:
        self.stopping = True
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def die_with_parent() -> None:
    """Linux: this (forked) process gets SIGTERM if its parent dies without stopping it.

    PR_SET_PDEATHSIG fires when the thread that forked it ends: fork from the main thread.
    """
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
