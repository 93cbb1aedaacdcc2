"""Live reads: long-poll (section 5.7) and SSE (section 5.8), without HTTP.

Both follow the same loop: read; if there is nothing new, wait on the stream's
watch (gateway/live/wakeups.py) and read again. The web layer supplies how a
page reaches the client (a ``LongPollAnswer``, an ``SseSink``); this module
decides only *when* and *which* page. Every error status is decided by the
first read, before the web layer starts a response.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol

from gateway.config import Settings
from gateway.protocol import offsets
from gateway.protocol.errors import ProtocolError, Unavailable
from gateway.storage.models import Page, StreamInfo
from gateway.storage.store import Store

from .wakeups import Alarms, Wake, WakeHub, Watch

# Called exactly once per long-poll, with the page to answer: data, or an empty
# page at the offset to resume from (timeout, closed tail, or the server stopping).
LongPollAnswer = Callable[[Page], Awaitable[None]]


class SseSink(Protocol):
    """How an SSE reader's pages reach its client (the web layer's side)."""

    def open(self, page: Page) -> Awaitable[None]:
        """The first page was read (so no error status is left): start the response."""
        ...

    def send(self, page: Page) -> Awaitable[None]:
        """Deliver a page (its data, if any, and its control event)."""
        ...

    def keepalive(self) -> Awaitable[None]:
        """Nothing happened for a while: keep the connection alive."""
        ...

    def end(self) -> Awaitable[None]:
        """The read is over (also after the client left)."""
        ...


class Live:
    def __init__(self, store: Store, hub: WakeHub, settings: Settings) -> None:
        self.store = store
        self.hub = hub
        self.long_poll_timeout_s = settings.long_poll_timeout_ms / 1000
        self.sse_max_duration_s = settings.sse_max_duration_ms / 1000
        self.sse_keepalive_s = settings.sse_keepalive_ms / 1000
        self.draining = asyncio.Event()  # set on shutdown: end live reads now
        self.alarms = Alarms()  # the timers of every waiting reader
        # Reads in flight for woken readers: (path, offset) -> the readers' futures.
        self._reads: dict[tuple[str, str], list[asyncio.Future[Page]]] = {}
        self._read_tasks: set[asyncio.Task[None]] = set()

    def drain(self) -> None:
        """End every live read promptly with a valid response (shutdown)."""
        self.draining.set()
        self.hub.wake_all()

    # -- long-poll -----------------------------------------------------------------

    async def long_poll(self, path: str, offset: str | None, answer: LongPollAnswer) -> None:
        """Answer with the page after ``offset`` (None: the tail), waiting for
        data up to the long-poll timeout."""
        store = self.store
        # When this replica already listens to the stream (other readers, or one
        # that just left), capture the wake-up before the first read: that read
        # then needs no repeat once we wait.
        watch = self.hub.try_join(store.keys(path).wake)
        try:
            event = None if watch is None else watch.event
            page = await store.read(path, offset)
            # offset=now starts waiting at the tail, without returning what is there;
            # -1 where the read ended (the earliest retained position).
            start = page.info.tail if offset is None else offset
            if offset == offsets.BEGINNING:
                start = page.next_offset
            if offset is None:
                page = _empty_at(page, start)
            if not _has_data(page) and not page.at_closed_tail:
                try:
                    page = await self._wait(path, start, page, watch, event)
                except asyncio.CancelledError:
                    # The server is stopping and gave up waiting for us: still
                    # answer, so the client simply polls again elsewhere.
                    with contextlib.suppress(Exception):
                        await asyncio.shield(answer(page))
                    raise
        finally:
            if watch is not None:
                self.hub.leave(watch)
        await answer(page)

    async def _wait(
        self, path: str, offset: str, page: Page, watch: Watch | None, event: Wake | None
    ) -> Page:
        """Wait until data after ``offset`` exists, the stream closes, or timeout.

        ``event``, when given, was captured from ``watch`` before ``page`` was read.
        """
        alarms = self.alarms
        deadline = alarms.time() + self.long_poll_timeout_s
        joined = None
        try:
            if watch is None:
                watch = joined = await self.hub.join(
                    self.store.keys(path).wake, within_s=deadline - alarms.time()
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

    async def sse(self, path: str, offset: str | None, sink: SseSink) -> None:
        """Follow the stream from ``offset`` (None: the tail) until the
        connection's lifetime is over, the stream closes, or the server stops."""
        store = self.store
        # As in long_poll: capture the wake-up before the first read when the
        # stream is already listened to here, so that read needs no repeat.
        channel = store.keys(path).wake
        watch = self.hub.try_join(channel)
        event = None if watch is None else watch.event
        try:
            page = await store.read(path, offset)  # decides 404/410 before any byte
            if offset is None:
                page = _empty_at(page, page.info.tail)
            await sink.open(page)
        except BaseException:
            if watch is not None:
                self.hub.leave(watch)
            raise
        # This one frame is all an idle reader holds (besides the sink and the
        # server's own objects): no helper coroutines, no timeout object, no
        # page while idle.
        alarms = self.alarms
        keepalive = self.sse_keepalive_s
        deadline = alarms.time() + self.sse_max_duration_s
        try:
            if watch is None:
                watch = await self.hub.join(channel, deadline - alarms.time())
            # `event` is always captured before the read that produced `page`,
            # so an append after that read cannot be missed. A first page read
            # before subscribing has none: it is read again first.
            while True:
                await sink.send(page)
                if page.at_closed_tail:
                    return  # final control event sent: close (section 5.8)
                at = page.next_offset
                if page.more:
                    event = watch.event
                    page = await store.read(path, at)
                    continue
                info = page.info
                del page  # not held while idle
                while True:
                    # Wait for a wake-up, with keep-alive comments meanwhile.
                    while event is not None and not event.is_set():
                        now = alarms.time()
                        if self.draining.is_set():
                            # Shutting down: a final control event to resume
                            # from (elsewhere), as of the last read.
                            await sink.send(Page(info, b"", at, False))
                            return
                        if now >= deadline:
                            return  # connection lifetime over
                        fut, slot = alarms.arm(event, min(deadline, now + keepalive))
                        try:
                            woken = await fut
                        finally:
                            alarms.disarm(event, fut, slot)
                        if not woken:
                            await sink.keepalive()
                    if self.draining.is_set():
                        await sink.send(Page(info, b"", at, False))
                        return
                    fired, event = event, watch.event
                    page = _pushed_page(fired, at, info) or await self._shared_read(path, at)
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
                await sink.end()

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
            page = await self.store.read(*key)
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
    if offsets.from_entry_id(pushed.prev) != offset:
        return None
    tail = offsets.from_entry_id(pushed.tail)
    page = Page(
        info._replace(tail=tail, closed=pushed.closed),
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
