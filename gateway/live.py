"""Live reads: long-poll (section 5.7) and SSE (section 5.8).

Both follow the same loop: read; if there is nothing new, wait on the stream's
watch (gateway/wakeups.py) and read again. Every error status is decided by the
first read, before the first byte of the response is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from . import headers as h
from . import sse
from .cursor import next_cursor
from .errors import ProtocolError, Unavailable
from .handlers import Context, ReadParams, page_body, page_headers
from .http import Request, Response
from .store import Page
from .wakeups import WakeHub, Watch


class Live:
    def __init__(self, ctx: Context, hub: WakeHub) -> None:
        self.ctx = ctx
        self.hub = hub
        self.draining = asyncio.Event()  # set on shutdown: end live reads now

    def drain(self) -> None:
        """End every live read promptly with a valid response (shutdown)."""
        self.draining.set()
        self.hub.wake_all()

    def cursor(self, params: ReadParams) -> str:
        return next_cursor(params.cursor, self.ctx.settings.cursor_interval_s)

    # -- long-poll -----------------------------------------------------------------

    async def long_poll(self, req: Request, path: str, params: ReadParams, res: Response) -> None:
        store = self.ctx.store
        page = await store.read(path, params.offset)
        # offset=now starts waiting at the tail, without returning what is there.
        offset = page.info.tail if params.offset is None else params.offset
        if params.offset is None:
            page = _empty_at(page, offset)
        if not _has_data(page) and not page.at_closed_tail:
            try:
                page = await self._wait(path, offset, page)
            except asyncio.CancelledError:
                # The server is stopping and gave up waiting for us: still answer
                # with a valid 204 so the client simply polls again elsewhere.
                out = page_headers(
                    self.ctx, page, stream_cursor=self.cursor(params), cache_control="no-store"
                )
                with contextlib.suppress(Exception):
                    await asyncio.shield(res.send(204, out))
                raise
        cursor = None if page.at_closed_tail else self.cursor(params)
        if _has_data(page):
            out = page_headers(
                self.ctx,
                page,
                stream_cursor=cursor,
                cache_control=self.ctx.catch_up_cache_control,
            )
            await res.send(200, out, page_body(page))
            return
        # Timed out (or closed at the tail): 204 with the tail offset.
        out = page_headers(self.ctx, page, stream_cursor=cursor, cache_control="no-store")
        await res.send(204, out)

    async def _wait(self, path: str, offset: str, page: Page) -> Page:
        """Wait until data after ``offset`` exists, the stream closes, or timeout."""
        settings = self.ctx.settings
        deadline = time.monotonic() + settings.long_poll_timeout_ms / 1000
        channel = self.ctx.store.keys(path).wake
        try:
            async with self.hub.watch(channel, within_s=_remaining(deadline)) as watch:
                while True:
                    event = watch.event
                    page = await self.ctx.store.read_coalesced(path, offset)
                    if _has_data(page) or page.at_closed_tail or self.draining.is_set():
                        return page
                    remaining = _remaining(deadline)
                    if remaining <= 0:
                        return page
                    await _wait_event(event, remaining)
        except TimeoutError as exc:
            raise Unavailable() from exc

    # -- SSE -------------------------------------------------------------------------

    async def sse(self, req: Request, path: str, params: ReadParams, res: Response) -> None:
        settings = self.ctx.settings
        store = self.ctx.store
        page = await store.read(path, params.offset)  # decides 404/410 before any byte
        offset = page.info.tail if params.offset is None else params.offset
        if params.offset is None:
            page = _empty_at(page, offset)
        binary = not h.is_text(page.info.content_type)
        out = self.ctx.response_headers(
            content_type="text/event-stream",
            cache_control="no-cache",
            stream_sse_data_encoding="base64" if binary else None,
            x_accel_buffering="no",
        )
        await res.start_stream(200, out)

        deadline = time.monotonic() + settings.sse_max_duration_ms / 1000
        channel = store.keys(path).wake
        try:
            async with self.hub.watch(channel, within_s=_remaining(deadline)) as watch:
                # `event` is always captured before the read that produced `page`,
                # so an append after that read cannot be missed. The first page
                # was read before subscribing, hence None: read again first.
                event: asyncio.Event | None = None
                while True:
                    await self._emit(res, page, params, binary)
                    if page.at_closed_tail:
                        return  # final control event sent: close (section 5.8)
                    if page.more:
                        event = watch.event
                        page = await store.read(path, page.next_offset)
                        continue
                    found = await self._next_page(
                        path, page.next_offset, deadline, watch, event, res
                    )
                    if found is None:
                        return  # connection lifetime over, or shutting down
                    page, event = found
        except (ProtocolError, TimeoutError):
            # The stream went away or storage failed mid-stream: the status is
            # already sent, so end the event stream; the client reconnects.
            pass
        finally:
            with contextlib.suppress(Exception):
                await res.end_stream()

    async def _next_page(
        self,
        path: str,
        offset: str,
        deadline: float,
        watch: Watch,
        event: asyncio.Event | None,
        res: Response,
    ) -> tuple[Page, asyncio.Event] | None:
        """The next page with data (or the closure) after ``offset``, sending
        keep-alive comments while waiting; None when the connection should end."""
        keepalive = self.ctx.settings.sse_keepalive_ms / 1000
        while True:
            while event is not None:
                remaining = _remaining(deadline)
                if remaining <= 0 or self.draining.is_set():
                    return None
                if await _wait_event(event, min(remaining, keepalive)):
                    break
                await res.write(sse.KEEPALIVE)
            if self.draining.is_set():
                return None
            event = watch.event
            page = await self.ctx.store.read_coalesced(path, offset)
            if _has_data(page) or page.at_closed_tail:
                return page, event

    async def _emit(self, res: Response, page: Page, params: ReadParams, binary: bool) -> None:
        # Every data event is followed by a control event (section 5.8).
        chunks = []
        if _has_data(page):
            chunks.append(sse.data_event(page_body(page), base64_encoded=binary))
        chunks.append(
            sse.control_event(
                page.next_offset,
                cursor=None if page.at_closed_tail else self.cursor(params),
                up_to_date=page.up_to_date,
                closed=page.at_closed_tail,
            )
        )
        await res.write(b"".join(chunks))


def _has_data(page: Page) -> bool:
    return bool(page.body)


def _empty_at(page: Page, offset: str) -> Page:
    return Page(page.info, b"", offset, False)


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


async def _wait_event(event: asyncio.Event, wait_s: float) -> bool:
    """Wait up to ``wait_s`` seconds for ``event``; True if it was set.

    Shutdown sets every watch's event (Live.drain), so waits end promptly then.
    """
    if event.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            await event.wait()
    return event.is_set()
