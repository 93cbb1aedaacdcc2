"""The HTTP side of live reads: how a long-poll answers and how SSE events are
written. When to answer and which page is gateway/live/reads.py's business."""

from __future__ import annotations

from collections.abc import Awaitable

from gateway.protocol import headers
from gateway.protocol import sse as sse_framing
from gateway.protocol.cursor import next_cursor
from gateway.storage.models import Page

from .handlers import Context, ReadParams, page_body, page_headers
from .request import Request, Response


def long_poll(
    ctx: Context, req: Request, path: str, params: ReadParams, res: Response
) -> Awaitable[None]:
    """Section 5.7: 200 with data, or 204 with the offset to resume from."""
    cursor_interval = ctx.settings.cursor_interval_s

    async def answer(page: Page) -> None:
        cursor = None if page.at_closed_tail else next_cursor(params.cursor, cursor_interval)
        if page.body:
            out = page_headers(
                ctx, page, stream_cursor=cursor, cache_control=ctx.catch_up_cache_control
            )
            await res.send(200, out, page_body(page))
        else:  # timed out, closed at the tail, or the server is stopping
            out = page_headers(ctx, page, stream_cursor=cursor, cache_control="no-store")
            await res.send(204, out)

    return ctx.live.long_poll(path, params.offset, answer)


def sse(
    ctx: Context, req: Request, path: str, params: ReadParams, res: Response
) -> Awaitable[None]:
    """Section 5.8: an event stream of data and control events."""
    return ctx.live.sse(path, params.offset, SseWriter(ctx, req, res, params.cursor))


# The last SSE chunk built, kept for the next reader of the same page: readers
# woken by one append share the coalesced Page object and usually their cursor.
_last_chunk: tuple[Page, str | None, bool, bytes] | None = None


class SseWriter:
    """One SSE reader's response (gateway/live/reads.py's SseSink). Small: an
    idle reader holds it for the connection's lifetime."""

    __slots__ = ("binary", "client_cursor", "ctx", "req", "res")

    def __init__(self, ctx: Context, req: Request, res: Response, client_cursor: str | None):
        self.ctx = ctx
        self.req = req
        self.res = res
        self.client_cursor = client_cursor
        self.binary = False

    async def open(self, page: Page) -> None:
        self.binary = not headers.is_text(page.info.content_type)
        await self.res.start_stream(
            200,
            self.ctx.response_headers(
                content_type="text/event-stream",
                cache_control="no-cache",
                stream_sse_data_encoding="base64" if self.binary else None,
                x_accel_buffering="no",
            ),
        )
        self.req.release()

    def send(self, page: Page) -> Awaitable[None]:
        return self.res.write(self._chunk(page))

    def keepalive(self) -> Awaitable[None]:
        return self.res.write(sse_framing.KEEPALIVE)

    def end(self) -> Awaitable[None]:
        return self.res.end_stream()

    def _chunk(self, page: Page) -> bytes:
        """A data event (when the page has data) and its control event."""
        global _last_chunk
        cursor = (
            None
            if page.at_closed_tail
            else next_cursor(self.client_cursor, self.ctx.settings.cursor_interval_s)
        )
        binary = self.binary
        last = _last_chunk
        if last is not None and last[0] is page and last[1] == cursor and last[2] == binary:
            return last[3]
        chunk = sse_framing.control_event(
            page.next_offset,
            cursor=cursor,
            up_to_date=page.up_to_date,
            closed=page.at_closed_tail,
        )
        if page.body:
            chunk = sse_framing.data_event(page_body(page), base64_encoded=binary) + chunk
        _last_chunk = (page, cursor, binary, chunk)
        return chunk
