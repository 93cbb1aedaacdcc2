"""The ``durable-streams-gateway`` console script (also ``python -m gateway``).

Serves the app with the gateway's own server (gateway/server.py, the default),
granian (its native RSGI, or ASGI) or hypercorn.
With neither REDIS_URL nor REDIS_CLUSTER_URL set it starts the embedded Redis
once, here in the parent process, and exports its URL as REDIS_URL so every
worker shares that server; it stops that server after the HTTP server exits.
Should this process end without stopping it (SIGKILL; with ``--workers 1`` the
one worker is this process, and nothing restarts it), the embedded Redis's
watchdog stops the server once no gateway process is left.

With metrics on (``--metrics-port``, DS_METRICS=1) it gives the workers a fresh
PROMETHEUS_MULTIPROC_DIR, serves ``--metrics-port`` from a small process of its
own (``serve_metrics``), and removes the directory on exit. The request log is
on unless ``--no-access-log``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import ipaddress
import logging
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from gateway.config import Settings
from gateway.servers.native.server import ServerOptions, die_with_parent
from gateway.servers.native.tls import TLSConfigError, server_context
from gateway.servers.signals import exit_if_stop_requested, exit_on_stop_signals
from gateway.storage.embedded import EmbeddedRedis, EmbeddedRedisError, start_embedded
from gateway.web.auth import build_authorizer
from gateway.web.forwarded import TrustedProxies
from gateway.web.log_writer import NonBlockingLogHandler

APP = "gateway.main:app"
DEFAULT_PORT = 4437  # IANA-registered port of the Durable Streams protocol
DEFAULT_MAX_CONNECTIONS = 100_000
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# After its graceful shutdown a hypercorn child gets this long before SIGKILL.
CHILD_STOP_TIMEOUT_S = 30.0
# The metrics port serves scrapers, a few at a time: at most this many
# connections at once (more are closed on arrival), each closed once it has
# waited this long for the client to send or to read.
METRICS_CONNECTIONS_MAX = 64
METRICS_IO_TIMEOUT_S = 10.0

logger = logging.getLogger("gateway.cli")


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {value}")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="durable-streams-gateway",
        description="Durable Streams protocol gateway backed by Redis. Without REDIS_URL or "
        "REDIS_CLUSTER_URL an embedded Redis keeps its data in DS_DATA_DIR "
        "(default ./.durable-streams-data); it is meant for development and single-node use.",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default: 0.0.0.0)")
    parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"port to bind (default: {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--workers", type=_positive_int, default=1, help="worker processes (default: 1)"
    )
    parser.add_argument(
        "--server",
        choices=("native", "granian", "hypercorn"),
        default="native",
        help="HTTP server (default: native, the gateway's own HTTP/1.1 and HTTP/2 server "
        "on uvloop: the least CPU per request and memory per live reader)",
    )
    parser.add_argument(
        "--interface",
        choices=("asgi", "rsgi"),
        default="rsgi",
        help="with --server granian: its interface to the app (default: rsgi, granian's "
        "native interface, which costs markedly less CPU per request than asgi)",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="per worker: open connections (native) or concurrent requests (granian), "
        f"live readers included (default: {DEFAULT_MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--keep-alive-timeout",
        type=_positive_float,
        default=ServerOptions.keep_alive_timeout,
        help="native: seconds an idle connection stays open between requests "
        f"(default: {ServerOptions.keep_alive_timeout:g})",
    )
    parser.add_argument(
        "--read-timeout",
        type=_positive_float,
        default=ServerOptions.read_timeout,
        help="native: seconds a client may take to send a request's headers (from their "
        "first byte) and may pause while sending its body, before it gets 408 or is "
        "disconnected, and may leave a response unread before it is disconnected "
        f"(default: {ServerOptions.read_timeout:g})",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=_positive_float,
        default=ServerOptions.graceful_timeout,
        help="seconds requests in flight get to finish on SIGTERM (native; granian: "
        "then a worker still running is killed) "
        f"(default: {ServerOptions.graceful_timeout:g})",
    )
    parser.add_argument(
        "--forwarded-allow-ips",
        default=None,
        metavar="ADDRESSES",
        help="peers whose X-Forwarded-Proto/-Host/-For and Forwarded headers are believed: "
        "addresses or networks, comma-separated, '*' for any (default: "
        "DS_FORWARDED_ALLOW_IPS, else 127.0.0.1)",
    )
    parser.add_argument(
        "--certfile",
        default=os.environ.get("DS_TLS_CERTFILE") or None,
        help="native: serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) with this PEM certificate "
        "chain; needs --keyfile (default: $DS_TLS_CERTFILE)",
    )
    parser.add_argument(
        "--keyfile",
        default=os.environ.get("DS_TLS_KEYFILE") or None,
        help="native: the certificate's PEM private key, unencrypted (default: $DS_TLS_KEYFILE)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help="serve Prometheus metrics of every worker on this port, at /metrics "
        "(default: $DS_METRICS_PORT; none). DS_METRICS=1 serves them on the main port too",
    )
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("DS_ACCESS_LOG", "1").strip().lower() not in ("0", "false", "no"),
        help="one line per request on stdout (default: on; DS_LOG_FORMAT=json for JSON lines)",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    parser.add_argument("--app", default=APP, help=f"app to serve, RSGI and ASGI (default: {APP})")
    return parser


def _raise_open_file_limit() -> None:
    """Each live reader is a socket: allow as many as the hard limit permits."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        logger.debug("could not raise the open-file limit", exc_info=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sign"]:
        return sign_main(argv[1:])
    # Until the server installs its own handlers, SIGTERM and SIGINT unwind through
    # the finally below, which stops the embedded Redis; SIGTERM's default action
    # would end the process on the spot. One whose SystemExit Python ignored (raised
    # in a finalizer) the server acts on when it takes over (gateway/servers/signals.py).
    # Should the process end without the finally (SIGKILL), the embedded Redis's
    # watchdog stops the server (gateway/storage/embedded.py).
    exit_on_stop_signals()
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    if args.forwarded_allow_ips is not None:
        # Through the environment, so every worker and every server sees it.
        os.environ["DS_FORWARDED_ALLOW_IPS"] = args.forwarded_allow_ips
    if args.metrics_port is not None:
        os.environ["DS_METRICS_PORT"] = str(args.metrics_port)
    os.environ["DS_ACCESS_LOG"] = "1" if args.access_log else "0"
    try:
        args.tls = _tls_context(args)
    except TLSConfigError as exc:
        parser.error(str(exc))
    try:
        settings = Settings.from_env()
        trusted = TrustedProxies(settings.forwarded_allow_ips)  # refuse a malformed list
        build_authorizer(settings, trusted)  # and an incomplete DS_AUTH configuration
    except ValueError as exc:
        parser.error(str(exc))
    _warn_if_unprotected(settings, args.host)
    _raise_open_file_limit()
    metrics_dir = _metrics_dir(settings)
    try:
        exporter = _start_metrics_exporter(args.host, settings.metrics_port)
    except OSError as exc:
        _remove_metrics_dir(metrics_dir)
        parser.error(f"cannot serve metrics on port {settings.metrics_port}: {exc}")
    embedded = _start_embedded_if_needed(settings)
    try:
        return SERVERS[args.server](args)
    finally:
        # After the server (and so every worker) has exited, so nothing still writes.
        if embedded is not None:
            embedded.stop()
        if exporter is not None:
            _reap(exporter)
        _remove_metrics_dir(metrics_dir)


def _metrics_dir(settings: Settings) -> str | None:
    """With metrics on: a fresh PROMETHEUS_MULTIPROC_DIR for this start's
    workers, so counts of every worker add up (and none of a previous start's
    remain). Set before any worker imports prometheus_client."""
    if not settings.metrics_enabled:
        return None
    path = tempfile.mkdtemp(prefix="ds-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def _remove_metrics_dir(path: str | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def _start_metrics_exporter(host: str, port: int | None) -> subprocess.Popen[bytes] | None:
    """``--metrics-port``: a small process of its own serves every worker's
    metrics (read from PROMETHEUS_MULTIPROC_DIR), so that no worker is special
    and no thread runs in the process that forks the workers. The socket is
    bound here, so a port in use stops the start."""
    if port is None:
        return None
    sock = socket.create_server((host, port), reuse_port=False)
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import gateway.cli as c; c.serve_metrics()",
                str(sock.fileno()),
            ],
            pass_fds=(sock.fileno(),),
            stdin=subprocess.DEVNULL,
        )
    finally:
        sock.close()


def serve_metrics() -> None:
    """The metrics exporter's process: /metrics on the socket it inherited.

    A thread per connection, as scrapes are few: ``METRICS_CONNECTIONS_MAX``
    at once and ``METRICS_IO_TIMEOUT_S`` of waiting each, so that clients that
    connect and send nothing (or never read) cannot pile up threads.
    """
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from gateway import metrics

    fd = int(sys.argv[1])
    _die_with_parent()

    class Exporter(ThreadingHTTPServer):
        daemon_threads = True
        slots = threading.BoundedSemaphore(METRICS_CONNECTIONS_MAX)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.slots.acquire(blocking=False):
                self.shutdown_request(request)  # too many at once: closed on arrival
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()  # (no thread started to release it)
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            # A client that went away or stopped reading: its business, not an
            # error of the exporter (socketserver would print a traceback).
            logger.debug("metrics: a scrape from %s failed", client_address, exc_info=True)

    # One page a second, whoever asks (see gateway/web/cached.py for why).
    fresh_until, page = 0.0, b""
    making = threading.Lock()

    def current_page() -> bytes:
        nonlocal fresh_until, page
        with making:
            if time.monotonic() >= fresh_until:
                page = metrics.exposition()
                fresh_until = time.monotonic() + metrics.FLUSH_INTERVAL_S
            return page

    class Handler(BaseHTTPRequestHandler):
        timeout = METRICS_IO_TIMEOUT_S  # (the connection's socket timeout)

        def do_GET(self) -> None:
            if self.path.partition("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = current_page()
            self.send_response(200)
            self.send_header("Content-Type", metrics.CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # scrapes are not requests to the gateway

    server = Exporter(("", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = socket.socket(fileno=fd)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        server.serve_forever()


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _warn_if_unprotected(settings: Settings, host: str) -> None:
    if settings.auth == "none" and not _is_loopback(host):
        logger.warning(
            "DS_AUTH=none on %s: anyone who can reach this address may read, append to, "
            "create and delete every stream; set DS_AUTH=jwt (see README, Authentication)",
            host,
        )
    if settings.auth == "none" and settings.url_signing_key:
        logger.warning("DS_URL_SIGNING_KEY is set but DS_AUTH=none: signed URLs restrict nothing")


def build_sign_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="durable-streams-gateway sign",
        description="Print a pre-signed URL granting operations on one stream until an expiry, "
        "signed with DS_URL_SIGNING_KEY (HMAC-SHA256).",
    )
    parser.add_argument("path", help="stream path, e.g. chat/42")
    parser.add_argument(
        "--ops", required=True, help="comma-separated: read, append, create, delete"
    )
    parser.add_argument("--ttl", type=_positive_int, required=True, help="seconds it stays valid")
    parser.add_argument(
        "--base-url",
        default=f"http://localhost:{DEFAULT_PORT}",
        help=f"the gateway's public URL (default: http://localhost:{DEFAULT_PORT})",
    )
    return parser


def sign_main(argv: Sequence[str]) -> int:
    from gateway.web.auth.presign import sign_url

    parser = build_sign_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if not settings.url_signing_key:
            raise ValueError("set DS_URL_SIGNING_KEY to the gateway's URL signing key")
        url = sign_url(
            args.base_url,
            args.path,
            args.ops.split(","),
            args.ttl,
            settings.url_signing_key,
            stream_prefix=settings.stream_prefix,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(url)
    return 0


def _configure_logging(level: str) -> None:
    # To stderr without ever blocking the event loop (gateway/web/log_writer.py).
    logging.basicConfig(
        level=level.upper(),
        format="[%(levelname)s] %(name)s: %(message)s",
        handlers=[NonBlockingLogHandler()],
    )


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context of --certfile/--keyfile (or DS_TLS_CERTFILE/DS_TLS_KEYFILE),
    checked before anything starts; None without them."""
    if not args.certfile and not args.keyfile:
        return None
    if not (args.certfile and args.keyfile):
        raise TLSConfigError(
            "TLS needs both a certificate and its key: --certfile and --keyfile "
            "(or DS_TLS_CERTFILE and DS_TLS_KEYFILE)"
        )
    if args.server != "native":
        raise TLSConfigError("--certfile/--keyfile are served by --server native only")
    return server_context(args.certfile, args.keyfile)


def _start_embedded_if_needed(settings: Settings) -> EmbeddedRedis | None:
    if settings.redis_url or settings.redis_cluster_url or settings.redis_sentinels:
        return None
    try:
        embedded = start_embedded(settings)
    except EmbeddedRedisError as exc:
        logger.error("%s", exc)
        raise SystemExit(1) from None
    # Workers inherit the environment, so they all use this one server and none
    # of them starts its own from the app lifespan.
    os.environ["REDIS_URL"] = embedded.url
    return embedded


def _run_native(args: argparse.Namespace) -> int:
    from gateway.servers.native import server

    options = ServerOptions(
        keep_alive_timeout=args.keep_alive_timeout,
        read_timeout=args.read_timeout,
        graceful_timeout=args.graceful_timeout,
        max_connections=args.max_connections,
        backlog=max(1024, min(args.max_connections, 65535)),
        tls=args.tls,
        on_worker_exit=_worker_exited,
    )
    # Workers import the app after the fork, each its own.
    return server.run(lambda: _load_app(args.app), args.host, args.port, args.workers, options)


def _worker_exited(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from gateway.metrics import mark_process_dead

        mark_process_dead(pid)


def _run_granian(args: argparse.Namespace) -> int:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.log import LogLevels

    server = Granian(
        target=args.app,
        address=args.host,
        port=args.port,
        # The app object serves both interfaces; see --interface for the trade-off.
        interface=Interfaces.RSGI if args.interface == "rsgi" else Interfaces.ASGI,
        workers=args.workers,
        http=HTTPModes.auto,
        websockets=False,
        log_level=LogLevels(args.log_level),
        # uvloop doubles appends/s here compared with the asyncio loop.
        loop=Loops.uvloop if _has_uvloop() else Loops.auto,
        # Every waiting long-poll and SSE reader is an open request: granian's
        # default (backlog / workers, i.e. 1024) would stop a worker from
        # taking any request, appends included, once 1024 readers wait on it.
        backpressure=args.max_connections,
        backlog=max(1024, min(args.max_connections, 65535)),
        # Granian otherwise waits for each worker to stop, for ever; a worker
        # that got SIGTERM while it was starting has been seen never to stop
        # (under a CPU hog, tests/e2e/test_embedded_lifecycle.py).
        workers_kill_timeout=max(1, math.ceil(args.graceful_timeout)),
    )
    os.register_at_fork(after_in_child=_granian_worker_after_fork)
    exit_if_stop_requested()  # granian installs its handlers next
    # Granian handles SIGINT/SIGTERM itself: it stops and joins the workers, then
    # returns (or raises SystemExit(1) when a worker died unexpectedly).
    server.serve()
    return 0


def _granian_worker_after_fork() -> None:
    # Until a granian worker installs its own handlers it runs the ones inherited
    # from granian's main process, which only set a flag in that process's memory:
    # a SIGTERM then (granian stopping while the worker starts) was lost, and
    # granian waited for that worker forever. The default action ends it instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    # Granian forks its workers from the main thread; should this process die
    # without stopping them (SIGKILL), they stop too instead of serving on, orphaned.
    die_with_parent()


def _run_hypercorn(args: argparse.Namespace) -> int:
    if args.workers > 1:
        return _run_child(_hypercorn_command(args))
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [_bind_address(args.host, args.port)]
    config.loglevel = args.log_level.upper()
    # A Logger (not "-") makes hypercorn log through our root handler, once.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = None
    exit_if_stop_requested()
    # Without a shutdown trigger hypercorn installs its own SIGINT/SIGTERM handlers.
    asyncio.run(serve(_load_app(args.app), config))
    return 0


def _hypercorn_command(args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        "-m",
        "hypercorn",
        "--workers",
        str(args.workers),
        "--bind",
        _bind_address(args.host, args.port),
        "--log-level",
        args.log_level,
        args.app,
    ]


def _bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


def _load_app(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute or "app")


def _run_child(command: list[str]) -> int:
    """Run ``command`` until it exits, forwarding SIGINT/SIGTERM to it."""
    exit_if_stop_requested()
    # The child stops (gracefully) should this process die without stopping it.
    child = subprocess.Popen(command, preexec_fn=die_with_parent)

    def forward(signum: int, _frame: object) -> None:
        # hypercorn's master shuts down gracefully on either; a Ctrl-C reaches it
        # directly too (same process group), and a second request is harmless.
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _reap(child)


def _reap(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(CHILD_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


SERVERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "native": _run_native,
    "granian": _run_granian,
    "hypercorn": _run_hypercorn,
}


if __name__ == "__main__":
    sys.exit(main())
