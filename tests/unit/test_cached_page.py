"""gateway/web/cached.py: /metrics on the main port made at most once a second,
however many scrapes come, and never a failure kept."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gateway.web.cached import CachedPage


class Maker:
    def __init__(self, seconds: float = 0.05) -> None:
        self.calls = 0
        self.prepared = 0
        self.seconds = seconds
        self.fail = False
        self.threads: set[int] = set()

    def make(self) -> bytes:
        self.threads.add(threading.get_ident())
        time.sleep(self.seconds)  # (blocking: it runs in a thread)
        self.calls += 1
        if self.fail:
            raise OSError("cannot read the metrics files")
        return f"page {self.calls}".encode()

    def prepare(self) -> None:
        self.prepared += 1


def test_a_flood_of_scrapes_makes_one_page_in_a_thread() -> None:
    maker = Maker()
    page = CachedPage(maker.make, 0.5, prepare=maker.prepare)

    async def flood() -> list[bytes]:
        return await asyncio.gather(*(page.get() for _ in range(500)))

    assert asyncio.run(flood()) == [b"page 1"] * 500
    assert maker.calls == maker.prepared == 1
    assert threading.get_ident() not in maker.threads


def test_a_page_is_made_again_once_it_is_stale() -> None:
    maker = Maker(seconds=0)
    page = CachedPage(maker.make, 0.2)

    async def scrapes() -> list[bytes]:
        first = await page.get()
        again = await page.get()
        await asyncio.sleep(0.3)
        return [first, again, await page.get()]

    assert asyncio.run(scrapes()) == [b"page 1", b"page 1", b"page 2"]


def test_a_failure_is_not_kept() -> None:
    maker = Maker(seconds=0)
    page = CachedPage(maker.make, 60)

    async def scrapes() -> bytes:
        maker.fail = True
        with pytest.raises(OSError):
            await page.get()
        maker.fail = False
        return await page.get()

    assert asyncio.run(scrapes()) == b"page 2"


def test_a_scrape_that_goes_away_does_not_cancel_the_page_of_the_others() -> None:
    maker = Maker(seconds=0.1)
    page = CachedPage(maker.make, 60)

    async def scrapes() -> bytes:
        leaving = asyncio.ensure_future(page.get())
        staying = asyncio.ensure_future(page.get())
        await asyncio.sleep(0.02)
        leaving.cancel()
        return await staying

    assert asyncio.run(scrapes()) == b"page 1"
    assert maker.calls == 1
