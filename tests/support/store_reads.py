"""Reading a whole stream through gateway.store.Store, page by page."""

from __future__ import annotations

import pytest

from gateway import offsets as off
from gateway.store import Page, Store


async def read_all(
    store: Store, path: str, start: str = off.ZERO, *, large: bool = False
) -> tuple[bytes, list[Page]]:
    """Follow next_offset page by page until up to date; returns the bytes and
    pages. ``large``: as catch-up GETs read (``Store.read(..., large=True)``)."""
    pages: list[Page] = []
    offset = start
    for _ in range(10_000):
        page = await store.read(path, offset, large=large)
        pages.append(page)
        if page.up_to_date:
            break
        assert page.next_offset > offset, "a page that is not up to date must advance"
        offset = page.next_offset
    else:
        pytest.fail("read never became up to date")
    sep = b"," if pages[0].info.is_json else b""
    return sep.join(p.body for p in pages if p.body), pages
