"""Live reads: long-poll (section 5.7) and SSE (section 5.8).

Both follow the same loop: read; if there is nothing new, wait on the stream's
watch (gateway/wakeups.py) and read again. Every error status is decided by the
first read, before the first byte of the response is sent.
"""

from __future__ import annotations

import asyncio
import contextlib

from . import headers as h
from . import offsets as off
from . import sse
from .cursor import next_cursor
from .errors import ProtocolError, Unavailable
from .handlers import Context, ReadParams, page_body, page_headers
from .http import Request, Response
from .store import Page, StreamInfo
from .wakeups import Alarms, Wake, WakeHub, Watch


class Live:
    def __init__(self, ctx: Context, hub: WakeHub) -> None:
        self.ctx = ctx
        self.hub = hub
        self.draining = asyncio.Event()  # set on shutdown: end live reads now
        self.alarms = Alarms()  # the timers of every waiting reader
        # Reads in flight for woken readers: (path, offset) -> the readers' futures.
        self._reads: dict[tuple[str, str], list[asyncio.Future[Page]]] = {}
        self._read_tasks: set[asyncio.Task[None]] = set()
        # The last SSE chunk built, kept for the next reader of the same page.
        self._last_chunk: tuple[Page, str | None, bool, bytes] | None = None

    def drain(self) -> None:
        """End every live read promptly with a valid response (shutdown)."""
        self.draining.set()
        self.hub.wake_all()

    def cursor(self, params: ReadParams) -> str:
        return next_cursor(params.cursor, self.ctx.settings.cursor_interval_s)

    # -- long-poll -----------------------------------------------------------------

    async def long_poll(self, req: Request, path: str, params: ReadParams, res: Response) -> None:
        store = self.ctx.store
        # When this replica already listens to the stream (other readers, or one
        # that just left), capture the wake-up before the first read: that read
        # then needs no repeat once we wait.
        watch = self.hub.try_join(store.keys(path).wake)
        try:
            event = None if watch is None else watch.event
            page = await store.read(path, params.offset)
            # offset=now starts waiting at the tail, without returning what is there.
            offset = page.info.tail if params.offset is None else params.offset
            if params.offset is None:
                page = _empty_at(page, offset)
            if not _has_data(page) and not page.at_closed_tail:
                try:
                    page = await self._wait(path, offset, page, watch, event)
                except asyncio.CancelledError:
                    # The server is stopping and gave up waiting for us: still answer
                    # with a valid 204 so the client simply polls again elsewhere.
                    out = page_headers(
                        self.ctx, page, stream_cursor=self.cursor(params), cache_control="no-store"
                    )
                    with contextlib.suppress(Exception):
                        await asyncio.shield(res.send(204, out))
                    raise
        finally:
            if watch is not None:
                self.hub.leave(watch)
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

    async def _wait(
        self, path: str, offset: str, page: Page, watch: Watch | None, event: Wake | None
    ) -> Page:
        """Wait until data after ``offset`` exists, the stream closes, or timeout.

        ``event``, when given, was captured from ``watch`` before ``page`` was read.
        """
        alarms = self.alarms
        deadline = alarms.time() + self.ctx.settings.long_poll_timeout_ms / 1000
        joined = None
        try:
            if watch is None:
                watch = joined = await self.hub.join(
                    self.ctx.store.keys(path).wake, within_s=deadline - alarms.time()
                )
            fired: Wake | None = None
            while True:
                if event is None:
                    event = watch.event
                    page = _pushed_page(fired, offset, page.info) or await self._shared_read(
                        path, offset
                    )
                    if _has_data(page) or page.at_closed_tail:
                        return page
                if self.draining.is_set() or alarms.time() >= deadline:
                    return page
                if not event.is_set():
                    fut, slot = alarms.arm(event, deadline)
                    try:
                        await fut
                    finally:
                        alarms.disarm(event, fut, slot)
                fired, event = (event if event.is_set() else None), None
        except TimeoutError as exc:
            raise Unavailable() from exc
        finally:
            if joined is not None:
                self.hub.leave(joined)

    # -- SSE -------------------------------------------------------------------------

    async def sse(self, req: Request, path: str, params: ReadParams, res: Response) -> None:
        settings = self.ctx.settings
        store = self.ctx.store
        # As in long_poll: capture the wake-up before the first read when the
        # stream is already listened to here, so that read needs no repeat.
        channel = store.keys(path).wake
        watch = self.hub.try_join(channel)
        event = None if watch is None else watch.event
        try:
            page = await store.read(path, params.offset)  # decides 404/410 before any byte
            offset = page.info.tail if params.offset is None else params.offset
            if params.offset is None:
                page = _empty_at(page, offset)
            binary = not h.is_text(page.info.content_type)
            await res.start_stream(
                200,
                self.ctx.response_headers(
                    content_type="text/event-stream",
                    cache_control="no-cache",
                    stream_sse_data_encoding="base64" if binary else None,
                    x_accel_buffering="no",
                ),
            )
        except BaseException:
            if watch is not None:
                self.hub.leave(watch)
            raise
        req.release()
        # This one frame is all an idle reader holds (besides the server's own
        # objects): no helper coroutines, no timeout object, no page while idle.
        client_cursor = params.cursor
        alarms = self.alarms
        keepalive = settings.sse_keepalive_ms / 1000
        deadline = alarms.time() + settings.sse_max_duration_ms / 1000
        try:
            if watch is None:
                watch = await self.hub.join(channel, deadline - alarms.time())
            # `event` is always captured before the read that produced `page`,
            # so an append after that read cannot be missed. A first page read
            # before subscribing has none: it is read again first.
            while True:
                await res.write(self._chunk(page, client_cursor, binary))
                if page.at_closed_tail:
                    return  # final control event sent: close (section 5.8)
                offset = page.next_offset
                if page.more:
                    event = watch.event
                    page = await store.read(path, offset)
                    continue
                info = page.info
                del page  # not held while idle
                while True:
                    # Wait for a wake-up, with keep-alive comments meanwhile.
                    while event is not None and not event.is_set():
                        now = alarms.time()
                        if now >= deadline or self.draining.is_set():
                            return  # connection lifetime over, or shutting down
                        fut, slot = alarms.arm(event, min(deadline, now + keepalive))
                        try:
                            woken = await fut
                        finally:
                            alarms.disarm(event, fut, slot)
                        if not woken:
                            await res.write(sse.KEEPALIVE)
                    if self.draining.is_set():
                        return
                    fired, event = event, watch.event
                    page = _pushed_page(fired, offset, info) or await self._shared_read(
                        path, offset
                    )
                    if _has_data(page) or page.at_closed_tail:
                        break
        except (ProtocolError, TimeoutError):
            # The stream went away or storage failed mid-stream: the status is
            # already sent, so end the event stream; the client reconnects.
            pass
        finally:
            if watch is not None:
                self.hub.leave(watch)
            with contextlib.suppress(Exception):
                await res.end_stream()

    def _shared_read(self, path: str, offset: str) -> asyncio.Future[Page]:
        """The page after ``offset``, read once for all readers that ask while
        the read is in flight (woken readers of one stream all ask at once).

        Each reader gets a future of its own, resolved straight from the one
        read: cancelling a reader cancels nobody else's read, and a fan-out to
        thousands of readers costs one future per reader, not a shield (two
        futures, closures and a callback) per reader.
        """
        key = (path, offset)
        loop = self.alarms.loop()
        fut: asyncio.Future[Page] = loop.create_future()
        waiters = self._reads.get(key)
        if waiters is None:
            self._reads[key] = [fut]
            task = loop.create_task(self._read_for(key))
            self._read_tasks.add(task)
            task.add_done_callback(self._read_tasks.discard)
        else:
            waiters.append(fut)
        return fut

    async def _read_for(self, key: tuple[str, str]) -> None:
        try:
            page = await self.ctx.store.read(*key)
        except asyncio.CancelledError:
            for fut in self._reads.pop(key):
                fut.cancel()
            raise
        except Exception as exc:
            for fut in self._reads.pop(key):
                if not fut.done():
                    fut.set_exception(exc)
        else:
            for fut in self._reads.pop(key):
                if not fut.done():
                    fut.set_result(page)

    def _chunk(self, page: Page, client_cursor: str | None, binary: bool) -> bytes:
        """A data event (when the page has data) and its control event (section 5.8).

        Readers woken by one append share the coalesced Page object, and
        usually their cursor: the last chunk is kept and reused for them.
        """
        cursor = (
            None
            if page.at_closed_tail
            else next_cursor(client_cursor, self.ctx.settings.cursor_interval_s)
        )
        last = self._last_chunk
        if last is not None and last[0] is page and last[1] == cursor and last[2] == binary:
            return last[3]
        chunk = sse.control_event(
            page.next_offset,
            cursor=cursor,
            up_to_date=page.up_to_date,
            closed=page.at_closed_tail,
        )
        if _has_data(page):
            chunk = sse.data_event(page_body(page), base64_encoded=binary) + chunk
        self._last_chunk = (page, cursor, binary, chunk)
        return chunk


def _pushed_page(fired: Wake | None, offset: str, info: StreamInfo) -> Page | None:
    """The page after ``offset`` straight from the wake-up that ended the wait,
    when that wake-up carried an append (small ones do) whose entry directly
    follows ``offset``: no read then. Otherwise None, and the reader reads.

    Safe because entries never change once written: the entry right after
    ``offset`` is exactly what a read would return first. Readers woken
    together share the one Page built here (and so its SSE chunk).
    """
    if fired is None or fired.pushed is None:
        return None
    if fired.page is not None:
        built_for, page = fired.page
        return page if built_for == offset else None
    pushed = fired.pushed
    if off.from_entry_id(pushed.prev) != offset:
        return None
    tail = off.from_entry_id(pushed.tail)
    page = Page(
        StreamInfo(info.content_type, tail, pushed.closed, info.ttl, info.expires_at),
        pushed.data,
        tail,
        False,
    )
    fired.page = (offset, page)
    return page


def _has_data(page: Page) -> bool:
    return bool(page.body)


def _empty_at(page: Page, offset: str) -> Page:
    return Page(page.info, b"", offset, False)
