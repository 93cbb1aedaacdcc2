"""One handler per protocol operation (section 5). Each validates the request,
calls the store once, and writes the response; errors are raised as
ProtocolError and rendered by the application in one place."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote, unquote

from gateway.config import Settings
from gateway.live.reads import Live
from gateway.protocol import headers, jsonmode, offsets
from gateway.protocol.errors import BadRequest, Conflict, Gone
from gateway.storage.models import AppendRequest, CreateRequest, Page, StreamInfo
from gateway.storage.store import Store

from .auth import Authorizer, Operation
from .forwarded import TrustedProxies, base_url
from .request import ALLOWED_METHODS, ALLOWED_REQUEST_HEADERS, Headers, Request, Response


@dataclass
class Context:
    """What every handler needs: settings, storage, live reads, the peers whose
    forwarded headers count, and the common headers."""

    settings: Settings
    store: Store
    live: Live
    trusted: TrustedProxies
    base: Headers
    auth: Authorizer | None = None  # None: no trust boundary (DS_AUTH=none)

    def response_headers(self, **extra: str | None) -> Headers:
        out = list(self.base)
        for name, value in extra.items():
            if value is not None:
                out.append((_header_name(name), value))
        return out

    @property
    def catch_up_cache_control(self) -> str:
        # Behind a trust boundary a response is for its requester only: a
        # shared cache must not hand it to someone who was never authorized.
        # (Rate limits alone guard nothing: they keep the setting.)
        authenticated = self.settings.auth != "none"
        visibility = "private" if authenticated else self.settings.cache_visibility
        return f"{visibility}, max-age=60, stale-while-revalidate=300"


# Characters RFC 3986 allows unescaped in a path; everything else is %-encoded.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


@functools.cache
def _header_name(keyword: str) -> str:
    return keyword.replace("_", "-").lower()


def _json_entries(body: bytes, *, allow_empty: bool) -> tuple[tuple[bytes, int | None], ...]:
    data, count = jsonmode.entry(body, allow_empty=allow_empty)
    return ((data, count),) if count else ()


def _fork_source(raw: str, stream_prefix: str, root_path: str = "") -> str:
    """``Stream-Forked-From`` carries the source's URL path (under the mount
    point, when the gateway is mounted inside another application)."""
    path = unquote(raw.strip())
    if root_path and path.startswith(root_path + "/"):
        path = path[len(root_path) :]
    if path.startswith(stream_prefix + "/"):
        path = path[len(stream_prefix) + 1 :]
    path = path.lstrip("/")
    if not path:
        raise BadRequest("Stream-Forked-From must name a stream")
    return path


# -- PUT: create (section 5.1) and fork (section 4.2) --------------------------


async def create(ctx: Context, req: Request, path: str, res: Response) -> None:
    ttl = headers.parse_ttl(req.header("stream-ttl"))
    expires_at = headers.parse_expires_at(req.header("stream-expires-at"))
    if ttl is not None and expires_at is not None:
        raise BadRequest("send either Stream-TTL or Stream-Expires-At, not both")
    max_age = headers.parse_retention_max_age(req.header("stream-retention-max-age"))
    max_bytes = headers.parse_retention_max_bytes(req.header("stream-retention-max-bytes"))
    closed = headers.is_closed(req.header("stream-closed"))
    content_type = headers.normalize_content_type(req.header("content-type"))
    forked_from = req.header("stream-forked-from")
    fork_offset = req.header("stream-fork-offset")
    sub_offset = headers.parse_sub_offset(req.header("stream-fork-sub-offset"))
    source = None
    if forked_from is None:
        if fork_offset is not None or sub_offset is not None:
            raise BadRequest("fork headers need Stream-Forked-From")
    else:
        source = _fork_source(forked_from, ctx.settings.stream_prefix, req.root_path)
        if ctx.auth is not None:
            # A fork reads its source (section 4.2): it needs read there too.
            await ctx.auth.authorize(req, Operation.READ, source)
        if fork_offset is not None and not offsets.is_offset(fork_offset.strip()):
            raise BadRequest("malformed Stream-Fork-Offset")

    body = await req.body(ctx.settings.max_body_bytes)
    if body and content_type is None and source is not None:
        # A fork without Content-Type inherits its source's; the initial body is
        # parsed according to that type.
        try:
            content_type = (await ctx.store.head(source)).content_type
        except Gone as exc:
            raise Conflict("fork source stream has been deleted") from exc
    entries: tuple[tuple[bytes, int | None], ...] = ()
    if body:
        if headers.is_json(content_type or headers.DEFAULT_CONTENT_TYPE):
            entries = _json_entries(body, allow_empty=True)
        else:
            entries = ((body, None),)

    result = await ctx.store.create(
        path,
        CreateRequest(
            # '' lets a fork inherit its source's type; a plain stream defaults.
            content_type=content_type or ("" if source else headers.DEFAULT_CONTENT_TYPE),
            ttl=ttl,
            expires_at=expires_at,
            closed=closed,
            entries=entries,
            fork_source=source,
            fork_offset=fork_offset.strip() if fork_offset else None,
            fork_sub_offset=sub_offset,
            retention_max_age=max_age,
            retention_max_bytes=max_bytes,
        ),
    )
    out = ctx.response_headers(
        content_type=result.content_type,
        stream_next_offset=result.tail,
        stream_closed="true" if result.closed else None,
        cache_control="no-store",
    )
    if result.created:
        url = base_url(req, ctx.trusted) + req.root_path + quote(req.path, safe=_PATH_SAFE)
        out.append(("location", url))
    await res.send(201 if result.created else 200, out)


# -- POST: append and close (sections 5.2, 5.2.1, 5.3) ---------------------------


async def append(ctx: Context, req: Request, path: str, res: Response) -> None:
    close = headers.is_closed(req.header("stream-closed"))
    producer = headers.parse_producer(
        req.header("producer-id"), req.header("producer-epoch"), req.header("producer-seq")
    )
    stream_seq = headers.parse_stream_seq(req.header("stream-seq"))
    body = await req.body(ctx.settings.max_body_bytes)
    media_type = ""
    json_count = None
    data: bytes | None = None
    if body:
        content_type = headers.normalize_content_type(req.header("content-type"))
        if content_type is None:
            raise BadRequest("Content-Type is required with a body")
        media_type = headers.media_type(content_type)
        if media_type == headers.JSON:
            data, json_count = jsonmode.entry(body, allow_empty=False)
        else:
            data = body
    elif not close:
        raise BadRequest("empty body: send data, or Stream-Closed: true to close")

    result = await ctx.store.append(
        path,
        AppendRequest(
            media_type=media_type,
            body=data,
            json_count=json_count,
            close=close,
            stream_seq=stream_seq,
            producer=producer,
        ),
    )
    # Built directly rather than with ctx.response_headers: this is the
    # hottest response of all.
    out = [*ctx.base, ("stream-next-offset", result.tail), ("cache-control", "no-store")]
    if result.closed:
        out.append(("stream-closed", "true"))
    if result.producer_epoch is not None:
        out.append(("producer-epoch", result.producer_epoch))
    if result.producer_seq is not None:
        out.append(("producer-seq", result.producer_seq))
    # Section 5.2.1: 200 for newly written producer data, 204 otherwise.
    status = 200 if producer and result.status == "ok" and data is not None else 204
    await res.send(status, out)


# -- DELETE (section 5.4) ----------------------------------------------------------


async def delete(ctx: Context, req: Request, path: str, res: Response) -> None:
    await ctx.store.delete(path)
    await res.send(204, ctx.response_headers(cache_control="no-store"))


# -- HEAD (section 5.5) --------------------------------------------------------------


def info_headers(ctx: Context, info: StreamInfo) -> Headers:
    return ctx.response_headers(
        content_type=info.content_type,
        stream_next_offset=info.tail,
        stream_ttl=str(info.ttl) if info.ttl is not None else None,
        stream_expires_at=(
            headers.format_expires_at(info.expires_at) if info.expires_at is not None else None
        ),
        stream_closed="true" if info.closed else None,
        stream_retention_max_age=_optional(info.retention_max_age),
        stream_retention_max_bytes=_optional(info.retention_max_bytes),
        cache_control="no-store",
    )


def _optional(value: int | None) -> str | None:
    return None if value is None else str(value)


async def head(ctx: Context, req: Request, path: str, res: Response) -> None:
    info = await ctx.store.head(path)
    await res.send(200, info_headers(ctx, info), head=True)


# -- GET, catch-up (section 5.6) ---------------------------------------------------


class ReadParams(NamedTuple):
    # An offset token, or -1 (the earliest retained position); None means
    # "now" (the tail).
    offset: str | None
    live: str | None  # None, 'long-poll' or 'sse'
    cursor: str | None


def read_params(req: Request) -> ReadParams:
    raw = req.single("offset")
    live = req.single("live")
    if live is not None and live not in ("long-poll", "sse"):
        raise BadRequest("live must be long-poll or sse")
    if raw is None:
        if live is not None:
            raise BadRequest("live reads need an offset")
        offset: str | None = offsets.ZERO
    elif raw == offsets.BEGINNING:
        offset = offsets.BEGINNING
    elif raw == offsets.NOW:
        offset = None
    else:
        offsets.parse(raw)
        offset = raw
    return ReadParams(offset, live, req.single("cursor"))


def page_body(page: Page) -> bytes:
    return b"[" + page.body + b"]" if page.info.is_json else page.body


def page_headers(ctx: Context, page: Page, **extra: str | None) -> Headers:
    return ctx.response_headers(
        content_type=page.info.content_type,
        stream_next_offset=page.next_offset,
        stream_up_to_date="true" if page.up_to_date else None,
        stream_closed="true" if page.at_closed_tail else None,
        **extra,
    )


def etag(start: str, page: Page) -> str:
    # Varies with closure (section 10.1) so a 304 never hides the EOF signal.
    return f'"{start}:{page.next_offset}{":c" if page.at_closed_tail else ""}"'


def _matches(if_none_match: str | None, tag: str) -> bool:
    if not if_none_match:
        return False
    candidates = [c.strip().removeprefix("W/") for c in if_none_match.split(",")]
    return tag in candidates or "*" in candidates


async def catch_up(
    ctx: Context, req: Request, path: str, params: ReadParams, res: Response
) -> None:
    page = await ctx.store.read(path, params.offset, large=True)
    if params.offset is None:
        # offset=now: no data, the tail, never cached (section 8).
        out = page_headers(ctx, page, cache_control="no-store")
        await res.send(200, out, b"[]" if page.info.is_json else b"")
        return
    tag = etag(offsets.ZERO if params.offset == offsets.BEGINNING else params.offset, page)
    out = page_headers(ctx, page, etag=tag, cache_control=ctx.catch_up_cache_control)
    if _matches(req.header("if-none-match"), tag):
        await res.send(304, out)
        return
    await res.send(200, out, page_body(page))


async def options(ctx: Context, req: Request, path: str, res: Response) -> None:
    """CORS preflight, including If-None-Match (section 10.1)."""
    requested = req.header("access-control-request-headers")
    if requested is not None and not headers.is_token_list(requested):
        requested = None  # echo header names, nothing else: send the default list
    out = ctx.response_headers(
        access_control_allow_methods=ALLOWED_METHODS,
        access_control_allow_headers=requested or None,
        access_control_max_age="86400",
        allow=ALLOWED_METHODS,
    )
    if not requested:
        out.append(("access-control-allow-headers", ALLOWED_REQUEST_HEADERS))
    await res.send(204, out)
