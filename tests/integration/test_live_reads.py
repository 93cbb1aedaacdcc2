"""``gateway.live.Live``'s shared read for woken readers, against a real redis-server.

Woken readers of one stream all re-read the same offset at once; the gateway
makes that one Redis read per replica and hands each reader the same page
through a future of its own.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from support.store_reads import store_client

from gateway.config import Settings
from gateway.live.reads import Live
from gateway.protocol import offsets as off
from gateway.protocol.errors import NotFound
from gateway.storage.models import AppendRequest, CreateRequest
from gateway.storage.store import Store

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def live(redis_client: aioredis.Redis) -> Live:
    store = Store(store_client(redis_client), "ds", 1024 * 1024)
    await store.load_scripts()
    return Live(store, hub=None, settings=Settings())  # type: ignore[arg-type]  # no waiting here: no hub


def text(body: bytes) -> AppendRequest:
    return AppendRequest("text/plain", body, None, False, None, None)


def counting_reads(live: Live, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    read = live.store.read

    async def counted(path: str, offset: str | None) -> object:
        calls.append(path)
        return await read(path, offset)

    monkeypatch.setattr(live.store, "read", counted)
    return calls


async def test_concurrent_readers_share_one_read_and_one_page(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = live.store
    await store.create("s", CreateRequest("text/plain"))
    await store.append("s", text(b"hello"))
    tail = (await store.read("s", off.ZERO)).next_offset
    reads = counting_reads(live, monkeypatch)
    pages = await asyncio.gather(*(live._shared_read("s", off.ZERO) for _ in range(500)))
    assert reads == ["s"]
    assert all(page is pages[0] for page in pages)
    assert pages[0].body == b"hello" and pages[0].next_offset == tail
    # Once answered, the next read goes to Redis again (nothing is cached).
    await store.append("s", text(b" world"))
    assert (await live._shared_read("s", off.ZERO)).body == b"hello world"
    assert reads == ["s", "s"]
    assert live._reads == {}


async def test_a_cancelled_reader_does_not_cancel_the_others(live: Live) -> None:
    store = live.store
    await store.create("c", CreateRequest("text/plain"))
    await store.append("c", text(b"data"))

    async def reader() -> bytes:
        return (await live._shared_read("c", off.ZERO)).body

    tasks = [asyncio.create_task(reader()) for _ in range(10)]
    await asyncio.sleep(0)  # all of them wait on the one read now
    tasks[0].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [b"data"] * 9


async def test_a_failed_read_reaches_every_reader(live: Live) -> None:
    results = await asyncio.gather(
        *(live._shared_read("missing", off.ZERO) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, NotFound) for r in results)
    assert live._reads == {}
