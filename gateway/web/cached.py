"""A page made by a blocking function, at most once per ``ttl_s``.

For ``/metrics`` on the main port (``DS_METRICS=1``): one exposition costs a
worker milliseconds (it reads every worker's files), some hundred times what
a health check does, so a flood of scrapes on a public port would take the CPU
that appends need. Scrapes within ``ttl_s`` of the last page get that page;
those that arrive while one is being made wait for it. Workers hand their counts
over once a second anyway, so a one-second page shows nothing later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class CachedPage:
    """``make`` runs in a thread; ``prepare``, if any, on the loop just before."""

    def __init__(
        self, make: Callable[[], bytes], ttl_s: float, prepare: Callable[[], None] | None = None
    ) -> None:
        self._make = make
        self._prepare = prepare
        self._ttl_s = ttl_s
        self._page: tuple[float, bytes] | None = None  # (fresh until, body)
        self._making: asyncio.Future[bytes] | None = None

    async def get(self) -> bytes:
        loop = asyncio.get_running_loop()
        page = self._page
        if page is not None and loop.time() < page[0]:
            return page[1]
        making = self._making
        if making is None:
            if self._prepare is not None:
                self._prepare()
            making = self._making = asyncio.ensure_future(asyncio.to_thread(self._make))
            making.add_done_callback(self._made)
        # (shielded: a scrape that goes away does not cancel the others' page)
        return await asyncio.shield(making)

    def _made(self, making: asyncio.Future[bytes]) -> None:
        self._making = None
        if not making.cancelled() and making.exception() is None:
            self._page = (making.get_loop().time() + self._ttl_s, making.result())
