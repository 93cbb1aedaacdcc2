"""Reading a whole stream through the store page by page, and the store's client in tests."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.protocol import offsets as off
from gateway.storage.client import RedisPyClient
from gateway.storage.models import Page
from gateway.storage.store import Store


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


def store_client(redis_client: Any) -> RedisPyClient:
    """The store's client interface over a test's redis-py client: a Redis
    object of its own on the same connection pool, so the raw reply shapes the
    store asks for do not change what the test's own client returns."""
    return RedisPyClient(aioredis.Redis(connection_pool=redis_client.connection_pool))
