"""The application (ASGI and RSGI): start-up and shutdown, routing, and the one place where
protocol errors become responses."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from . import backend, handlers
from .asgi import AsgiRequest, AsgiResponse
from .config import Settings
from .errors import MethodNotAllowed, NotFound, NotImplementedYet, ProtocolError, Unavailable
from .handlers import Context
from .http import (
    ALLOWED_METHODS,
    ClientGone,
    Headers,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    base_headers,
)
from .live import Live
from .rsgi import RsgiRequest, RsgiResponse
from .store import Store
from .wakeups import WakeHub

log = logging.getLogger("gateway")

MAX_PATH_BYTES = 1024
RESERVED_PREFIX = "__ds"  # section 6: subscription control APIs
_RESERVED_DIR = RESERVED_PREFIX + "/"


@functools.lru_cache(maxsize=4096)
def stream_path(raw: str) -> str:
    """Validate the stream path taken from the URL (section 12.2). Cached: hot
    streams are named on every request."""
    if not raw or raw.endswith("/"):
        raise NotFound("no stream at this URL")
    if len(raw.encode()) > MAX_PATH_BYTES:
        raise NotFound(f"stream paths are limited to {MAX_PATH_BYTES} bytes")
    segments = raw.split("/")
    if any(seg in ("", ".", "..") for seg in segments):
        raise NotFound("stream paths may not contain empty, '.' or '..' segments")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in raw):
        raise NotFound("stream paths may not contain control characters")
    return raw


def _drain_on_signals(drain: Callable[[], None]) -> None:
    """End live reads as soon as SIGTERM/SIGINT arrives, and let the server's own
    handling go on as before.

    Servers stop accepting on SIGTERM but wait for open requests before they run
    the lifespan shutdown; without this, every long-poll and SSE connection would
    hold a stopping replica for up to its full lifetime. Readers get a valid
    protocol response (a 204, or a final SSE control event) and resume elsewhere.

    The hook is a Python-level signal handler that calls the previous one. Event
    loops (asyncio, uvloop) learn of signals through the wake-up fd, which the
    interpreter writes whichever Python handler is installed, so a server's
    ``loop.add_signal_handler`` keeps working underneath.
    """
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def on_signal(signum: int, frame: Any, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(_announce_and_drain, signum, drain)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                # Nobody else handles it: exit the way the default action would,
                # after giving live readers a moment to receive their responses.
                loop.call_soon_threadsafe(loop.call_later, 1.0, _exit_now, signum)

        try:
            signal.signal(sig, on_signal)
        except ValueError:
            return  # not the main thread: lifespan shutdown drains instead


def _announce_and_drain(signum: int, drain: Callable[[], None]) -> None:
    log.info("signal %s: ending live reads", signal.Signals(signum).name)
    drain()


def _exit_now(sig: int) -> None:
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


class Gateway:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.ctx: Context | None = None
        self.live: Live | None = None
        self.hub: WakeHub | None = None
        self.backend: backend.Backend | None = None
        self.embedded: Any = None
        self._prefix = self.settings.stream_prefix + "/"
        self._base = base_headers(self.settings.cors_origin, self.settings.instance_id)

    # -- server interfaces ------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI."""
        kind = scope["type"]
        if kind == "http":
            await self.handle(AsgiRequest(scope, receive), AsgiResponse(send))
        elif kind == "lifespan":
            await self.lifespan(receive, send)

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        """RSGI (granian's native interface)."""
        await self.handle(RsgiRequest(scope, proto), RsgiResponse(proto))

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self.startup())

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self.shutdown())

    # -- requests --------------------------------------------------------------------

    async def handle(self, req: Request, res: Response) -> None:
        try:
            await self.route(req, res)
        except ProtocolError as exc:
            if not res.started:
                await self.send_error(req, res, exc)
        except ClientGone:
            return
        except Exception:
            log.exception("unhandled error on %s %s", req.method, req.path)
            if not res.started:
                out = [*self._base, ("content-type", "text/plain; charset=utf-8")]
                await res.send(500, out, b"internal error\n")

    async def send_error(self, req: Request, res: Response, exc: ProtocolError) -> None:
        out = [
            *self._base,
            ("content-type", "text/plain; charset=utf-8"),
            ("cache-control", "no-store"),
        ]
        out += [(k.lower(), v) for k, v in exc.headers.items()]
        if isinstance(exc, MethodNotAllowed):
            out.append(("allow", ALLOWED_METHODS))
        if req.unread_body and req.http1:
            # The body we did not read is still on the wire: tell the client
            # not to reuse this connection (RFC 9112 section 9.6).
            out.append(("connection", "close"))
        body = (exc.reason + "\n").encode()
        await res.send(exc.status, out, body, head=req.method == "HEAD")

    # route and stream_request return the handler's coroutine for handle to
    # await, rather than awaiting it themselves: two coroutines fewer on every
    # request, and their errors still surface inside handle's try.

    def route(self, req: Request, res: Response) -> Awaitable[None]:
        path = req.path
        if path.startswith(self._prefix):
            return self.stream_request(req, stream_path(path[len(self._prefix) :]), res)
        if path == "/healthz":
            return res.send(200, self._plain_headers(), b"ok\n")
        if path == "/readyz":
            return self.readyz(res)
        raise NotFound("not found")

    def stream_request(self, req: Request, path: str, res: Response) -> Awaitable[None]:
        ctx, live = self.ctx, self.live
        if ctx is None or live is None:
            raise Unavailable("gateway is starting")
        if path == RESERVED_PREFIX or path.startswith(_RESERVED_DIR):
            if req.method == "OPTIONS":
                return handlers.options(ctx, req, path, res)
            raise NotImplementedYet("subscription APIs (__ds) are not supported yet")
        method = req.method
        if method == "POST":
            return handlers.append(ctx, req, path, res)
        if method == "GET":
            params = handlers.read_params(req)
            if params.live == "long-poll":
                return live.long_poll(req, path, params, res)
            if params.live == "sse":
                return live.sse(req, path, params, res)
            return handlers.catch_up(ctx, req, path, params, res)
        if method == "PUT":
            return handlers.create(ctx, req, path, res)
        if method == "HEAD":
            return handlers.head(ctx, req, path, res)
        if method == "DELETE":
            return handlers.delete(ctx, req, path, res)
        if method == "OPTIONS":
            return handlers.options(ctx, req, path, res)
        raise MethodNotAllowed(f"method {method} is not allowed")

    def _plain_headers(self) -> Headers:
        return [*self._base, ("content-type", "text/plain"), ("cache-control", "no-store")]

    async def readyz(self, res: Response) -> None:
        ok = False
        if self.ctx is not None:
            with contextlib.suppress(Exception):
                ok = await asyncio.wait_for(self.ctx.store.ping(), 1.0)
        status = 200 if ok else 503
        await res.send(
            status,
            self._plain_headers(),
            b"ready\n" if ok else b"redis unreachable\n",
        )

    # -- life cycle ----------------------------------------------------------------

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def redis_target(self) -> tuple[str, bool]:
        """(url, is_cluster); starts the embedded Redis when none is configured."""
        settings = self.settings
        if settings.redis_cluster_url:
            return settings.redis_cluster_url, True
        if settings.redis_url:
            return settings.redis_url, False
        from .embedded import start_embedded

        self.embedded = start_embedded(settings)
        return self.embedded.url, False

    async def startup(self) -> None:
        settings = self.settings
        url, cluster = await asyncio.to_thread(self.redis_target)
        self.backend = backend.connect(settings, url, cluster=cluster)
        self.hub = WakeHub(self.backend.pubsub)
        store = Store(
            self.backend.client,
            settings.key_prefix,
            settings.max_read_bytes,
            self.backend.limiter,
            batch_per_stream=cluster,
            local_wakes=self.hub,
        )
        try:
            await store.load_scripts()
        except Unavailable:
            # Start anyway: requests get 503 until Redis is back, then recover.
            log.warning("Redis is unreachable at start-up; serving 503 until it is back")
        self.ctx = Context(settings, store, self._base)
        self.live = Live(self.ctx, self.hub)
        await self.hub.start()
        _drain_on_signals(self.live.drain)
        # What exists now (modules, scripts, settings) lives as long as the
        # process: keep it out of every later garbage collection.
        gc.freeze()
        log.info(
            "durable streams gateway ready; streams under %s/ on %s",
            settings.stream_prefix,
            "Redis Cluster" if cluster else "Redis",
        )

    def drain(self) -> None:
        """End live reads now, each with a valid response (the server is stopping)."""
        if self.live is not None:
            self.live.drain()

    async def shutdown(self) -> None:
        if self.live is not None:
            self.live.drain()
        if self.hub is not None:
            await self.hub.stop()
        if self.backend is not None:
            await self.backend.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
