"""The application: start-up and shutdown, routing, and the one place where
protocol errors become responses.

Servers reach it through the request interface (gateway/web/request.py): the
adapters in gateway/servers/ call ``Gateway.handle(request, response)`` and the
life-cycle methods; this module imports none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Awaitable
from typing import Any

from gateway import metrics
from gateway.config import Settings
from gateway.live.reads import Live
from gateway.live.wakeups import WakeHub
from gateway.protocol.errors import (
    MethodNotAllowed,
    NotFound,
    NotImplementedYet,
    ProtocolError,
    Unavailable,
)
from gateway.protocol.paths import is_reserved, stream_path
from gateway.storage import backend
from gateway.storage.client import ReplicaWait
from gateway.storage.quotas import Quotas
from gateway.storage.store import Store

from . import handlers
from . import live as live_http
from .auth import OPERATION_OF_METHOD, Authorizer, Operation, build_authorizer
from .auth.limits import LiveReaderQuota, RateLimited, parse_rates, with_limits
from .cached import CachedPage
from .forwarded import TrustedProxies
from .handlers import Context
from .recorder import CRecorder, PyRecorder
from .request import (
    ALLOWED_METHODS,
    INTERNAL_ERROR_BODY,
    INTERNAL_ERROR_HEADERS,
    INTERNAL_ERROR_STATUS,
    ClientGone,
    Headers,
    Request,
    Response,
    UnsafeHeader,
    base_headers,
)
from .telemetry import Telemetry

log = logging.getLogger("gateway")

# Refusals of the trust boundary (401, 403) and of rate limits (429), counted
# by gateway/metrics.py's auth_refusals_total.
REFUSAL_STATUSES = frozenset({401, 403, 429})


class Gateway:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.trusted = TrustedProxies(self.settings.forwarded_allow_ips)
        self.ctx: Context | None = None
        self.live: Live | None = None
        self.hub: WakeHub | None = None
        self.backend: backend.Backend | None = None
        self.embedded: Any = None
        # The trust boundary; None (DS_AUTH=none) costs the request path nothing.
        # Built here so that an incomplete configuration stops the start; rate
        # limits wrap it at start-up, once storage is there.
        self.auth: Authorizer | None = build_authorizer(self.settings, self.trusted)
        self.live_readers: LiveReaderQuota | None = None
        parse_rates(self.settings.rate_limit)  # a bad DS_RATE_LIMIT stops the start too
        self._prefix = self.settings.stream_prefix + "/"
        self._base = base_headers(self.settings.cors_origin, self.settings.instance_id)
        # Request metrics and the request log, and their recorder; None when both are off.
        self.telemetry: Telemetry | None = None
        self.recorder: PyRecorder | None = None
        self._metrics_path = self.settings.metrics_path
        # (workers hand their counts over at this interval: a fresher page shows nothing more)
        self._metrics_page = CachedPage(
            metrics.exposition, metrics.FLUSH_INTERVAL_S, prepare=metrics.flush
        )

    # -- requests --------------------------------------------------------------------

    async def handle(self, req: Request, res: Response) -> None:
        # What Telemetry records of a request, inline (here and in finally):
        # a Python call of its own would cost the request path more than this.
        recorder = self.recorder
        if recorder is not None and recorder.begin(req, res):
            self.telemetry.live_reader(req, res)  # type: ignore[union-attr]
        try:
            await self.route(req, res)
        except ProtocolError as exc:
            if self.telemetry is not None and exc.status in REFUSAL_STATUSES:
                self.telemetry.refused(exc.status, type(exc).__name__)
            if not res.started:
                await self.send_error(req, res, exc)
        except ClientGone:
            return
        except UnsafeHeader as exc:
            # Inbound values are validated before they are stored or echoed, so
            # only a store edited behind the gateway's back gets here (a content
            # type with a line break, say): the operator's problem, not the
            # client's, and a traceback would say nothing more. The client gets
            # the 500 without the header.
            log.error("%s on %s %s", exc, req.method, req.path)
            await self.send_internal_error(req, res)
        except Exception:
            log.exception("unhandled error on %s %s", req.method, req.path)
            await self.send_internal_error(req, res)
        finally:
            if recorder is not None and recorder.add(req, res):
                self.telemetry.batch_due()  # type: ignore[union-attr]

    async def send_internal_error(self, req: Request, res: Response) -> None:
        if not res.started:
            out = [*self._base, *INTERNAL_ERROR_HEADERS]
            # A HEAD response has no body, whatever its status.
            head = req.method == "HEAD"
            await res.send(INTERNAL_ERROR_STATUS, out, INTERNAL_ERROR_BODY, head=head)

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
        if path == "/metrics" and self._metrics_path:
            return self.metrics_page(req, res)
        raise NotFound("not found")

    def stream_request(self, req: Request, path: str, res: Response) -> Awaitable[None]:
        ctx = self.ctx
        if ctx is None:
            raise Unavailable("gateway is starting")
        if is_reserved(path):
            if req.method == "OPTIONS":
                return handlers.options(ctx, req, path, res)
            raise NotImplementedYet("subscription APIs (__ds) are not supported yet")
        if ctx.auth is not None and req.method != "OPTIONS":
            return self._authorized(ctx, ctx.auth, req, path, res)
        return self._dispatch(ctx, req, path, res)

    async def _authorized(
        self, ctx: Context, auth: Authorizer, req: Request, path: str, res: Response
    ) -> None:
        """The trust boundary (gateway/web/auth/): before the handler, and so
        before anything about the stream is read."""
        operation = OPERATION_OF_METHOD.get(req.method)
        if operation is None:
            raise MethodNotAllowed(f"method {req.method} is not allowed")
        principal = await auth.authorize(req, operation, path)
        quota = self.live_readers
        if quota is not None and operation is Operation.READ and req.method == "GET":
            live = req.single("live")
            if live == "long-poll" or live == "sse":
                # The principal's lease on a live reader, held while it waits.
                async with quota.lease(principal, live):
                    await self._dispatch(ctx, req, path, res)
                return
        await self._dispatch(ctx, req, path, res)

    def _dispatch(self, ctx: Context, req: Request, path: str, res: Response) -> Awaitable[None]:
        method = req.method
        if method == "POST":
            return handlers.append(ctx, req, path, res)
        if method == "GET":
            params = handlers.read_params(req)
            if params.live == "long-poll":
                return live_http.long_poll(ctx, req, path, params, res)
            if params.live == "sse":
                return live_http.sse(ctx, req, path, params, res)
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

    async def metrics_page(self, req: Request, res: Response) -> None:
        """Prometheus' text format: every worker's metrics in multi-process mode."""
        if req.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(f"method {req.method} is not allowed")
        body = await self._metrics_page.get()
        headers = [
            *self._base,
            ("content-type", metrics.CONTENT_TYPE),
            ("cache-control", "no-store"),
        ]
        await res.send(200, headers, body, head=req.method == "HEAD")

    # -- life cycle ----------------------------------------------------------------

    def redis_target(self) -> tuple[str, bool]:
        """(url, is_cluster); starts the embedded Redis when none is configured."""
        settings = self.settings
        if settings.redis_cluster_url:
            return settings.redis_cluster_url, True
        if settings.redis_sentinels:
            return "", False  # the master's address comes from the sentinels
        if settings.redis_url:
            return settings.redis_url, False
        from gateway.storage.embedded import start_embedded

        self.embedded = start_embedded(settings)
        return self.embedded.url, False

    async def startup(self) -> None:
        settings = self.settings
        url, cluster = await asyncio.to_thread(self.redis_target)
        if not url:  # REDIS_SENTINELS
            self.backend = backend.connect_sentinel(settings)
        else:
            self.backend = backend.connect(settings, url, cluster=cluster)
        self.hub = WakeHub(self.backend.pubsub)
        store = Store(
            self.backend.client,
            settings.key_prefix,
            settings.max_read_bytes,
            batch_per_stream=cluster,
            local_wakes=self.hub,
            retention=(settings.retention_max_age_s, settings.retention_max_bytes),
            wait=(
                ReplicaWait(settings.wait_replicas, settings.wait_timeout_ms)
                if settings.wait_replicas
                else None
            ),
        )
        try:
            await store.load_scripts()
        except Unavailable:
            # Start anyway: requests get 503 until Redis is back, then recover.
            log.warning("Redis is unreachable at start-up; serving 503 until it is back")
        self.live = Live(store, self.hub, settings)
        quotas = Quotas(self.backend.client, store.scripts, settings.key_prefix)
        self.auth = with_limits(self.auth, settings, self.trusted, quotas)
        if isinstance(self.auth, RateLimited):
            self.live_readers = self.auth.live_readers
        self.ctx = Context(settings, store, self.live, self.trusted, self._base, self.auth)
        await self.hub.start()
        if settings.metrics_enabled or settings.access_log:
            self.telemetry = Telemetry(settings)
            self.recorder = self.telemetry.recorder
            if CRecorder is None:
                log.warning(
                    "the C request recorder is not built (no C compiler when the package was "
                    "installed): the request log and metrics cost about 1.5 times as much"
                )
        if settings.metrics_enabled:
            metrics.start_flushing(asyncio.get_running_loop())
        # What exists now (modules, scripts, settings) lives as long as the
        # process: keep it out of every later garbage collection.
        gc.freeze()
        log.info(
            "durable streams gateway ready; streams under %s/ on %s; DS_AUTH=%s",
            settings.stream_prefix,
            "Redis Cluster" if cluster else "Redis" if url else "Redis behind Sentinel",
            settings.auth,
        )

    def drain(self) -> None:
        """End live reads now, each with a valid response (the server is stopping)."""
        if self.live is not None:
            self.live.drain()

    async def shutdown(self) -> None:
        self.drain()
        if self.settings.metrics_enabled:
            metrics.stop_flushing()
        if self.telemetry is not None:
            self.telemetry.close()
        if self.hub is not None:
            await self.hub.stop()
        closer = getattr(self.auth, "aclose", None)
        if closer is not None:
            await closer()
        if self.backend is not None:
            await self.backend.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
