"""Rate limits and live-reader quotas per principal (``DS_RATE_LIMIT``,
``DS_MAX_LIVE_READERS``).

``RateLimited`` wraps whatever authorizer is configured (or none) and is an
Authorizer itself: its principal is the inner one's (a subject), or without an
inner authorizer ``Principal(None, <client address>)``. Requests count per
principal and operation in Redis (gateway/storage/quotas.py), so every replica
shares the limits; a request over its rate gets 429 with ``Retry-After``.

Live readers (long-poll and SSE) each hold a lease in Redis while they wait: a
principal holding ``DS_MAX_LIVE_READERS`` leases gets 429 for another. A
lease is released when its read ends and expires by itself a margin after the
read's longest lifetime, so a crashed replica's readers do not count forever.

When Redis cannot be asked, limits fail open: the request goes on (and meets
the same Redis in its handler, which answers 503 if it is still down). A
limiter must never be the reason a working gateway refuses everyone.

Neither setting configured: no wrapper at all (``with_limits``).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from gateway.config import Settings
from gateway.protocol.errors import TooManyRequests, Unavailable
from gateway.storage.quotas import Quotas

from ..forwarded import TrustedProxies, client_address
from ..request import Request
from . import Authorizer, Operation, Principal
from .throttled import ThrottledWarning

_PERIODS_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000}
_RATE = re.compile(r"\A\s*([a-z]+)\s*=\s*([0-9]+)\s*/\s*([smh])\s*\Z")

# A lease outlives its read's longest lifetime by this much: a reader ends a
# little after its timeout (the answer still has to be written).
LEASE_MARGIN_MS = 15_000
# A refused live reader is told to retry within this many seconds at most:
# readers usually end long before their leases expire.
LIVE_RETRY_AFTER_MAX_S = 5


@dataclass(frozen=True, slots=True)
class Rate:
    count: int
    period_ms: int

    def __str__(self) -> str:
        unit = next(u for u, ms in _PERIODS_MS.items() if ms == self.period_ms)
        return f"{self.count}/{unit}"


def parse_rates(spec: str | None) -> dict[Operation, Rate]:
    """``DS_RATE_LIMIT``: ``op=count/unit`` items separated by ``;`` (or ``,``),
    op one of read, append, create, delete, unit s, m or h; e.g.
    ``append=200/s;read=50/s;create=10/m``. Operations not named are unlimited."""
    rates: dict[Operation, Rate] = {}
    if spec is None:
        return rates
    for item in re.split(r"[;,]", spec):
        if not item.strip():
            continue
        match = _RATE.match(item.lower())
        if match is None:
            raise ValueError(
                f"DS_RATE_LIMIT: {item.strip()!r} is not operation=count/unit "
                "(e.g. append=200/s; units s, m, h)"
            )
        name, count, unit = match.groups()
        try:
            operation = Operation(name)
        except ValueError:
            names = ", ".join(op.value for op in Operation)
            message = f"DS_RATE_LIMIT: unknown operation {name!r} (one of {names})"
            raise ValueError(message) from None
        if operation in rates:
            raise ValueError(f"DS_RATE_LIMIT: {name} given more than once")
        if int(count) < 1:
            raise ValueError(f"DS_RATE_LIMIT: {name} needs a count of at least 1")
        rates[operation] = Rate(int(count), _PERIODS_MS[unit])
    return rates


class LiveReaderQuota:
    """At most ``most`` live readers per principal across all replicas."""

    def __init__(self, quotas: Quotas, most: int, long_poll_ms: int, sse_ms: int) -> None:
        self.quotas = quotas
        self.most = most
        self.lease_ms = {
            "long-poll": long_poll_ms + LEASE_MARGIN_MS,
            "sse": sse_ms + LEASE_MARGIN_MS,
        }
        # Reader ids unique across replicas: a random prefix per process.
        self._ids = (f"{os.urandom(6).hex()}:{n}" for n in itertools.count())
        self._releases: set[asyncio.Task[None]] = set()
        self._warn = ThrottledWarning()

    @asynccontextmanager
    async def lease(self, principal: Principal, live: str) -> AsyncIterator[None]:
        """Hold a lease for the duration of one live read (429 without one)."""
        key = principal.rate_key
        reader = next(self._ids)
        try:
            wait_ms: int | None = await self.quotas.acquire_lease(
                key, reader, self.lease_ms[live], self.most
            )
        except Unavailable as exc:
            self._warn("live-reader quota not checked: %s", exc.reason)
            wait_ms = None
        if wait_ms is None:  # fail open, without a lease to release
            yield
            return
        if wait_ms:
            retry_after = min(LIVE_RETRY_AFTER_MAX_S, math.ceil(wait_ms / 1000))
            raise TooManyRequests(f"at most {self.most} live readers at once", retry_after)
        try:
            yield
        finally:
            # A task of its own: the read may end by cancellation, and a release
            # must not delay the response. A lost release expires with its lease.
            task = asyncio.get_running_loop().create_task(self._release(key, reader))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release(self, key: str, reader: str) -> None:
        try:
            await self.quotas.release_lease(key, reader)
        except Unavailable as exc:
            self._warn("live-reader lease not released (it expires): %s", exc.reason)


class RateLimited:
    """An Authorizer: ``inner``'s decision (or none), then the principal's rate."""

    def __init__(
        self,
        inner: Authorizer | None,
        trusted: TrustedProxies,
        quotas: Quotas,
        rates: dict[Operation, Rate],
        live_readers: LiveReaderQuota | None = None,
    ) -> None:
        self.inner = inner
        self.trusted = trusted
        self.quotas = quotas
        self.rates = rates
        self.live_readers = live_readers
        self._warn = ThrottledWarning()

    async def authorize(self, req: Request, operation: Operation, path: str) -> Principal:
        if self.inner is not None:
            principal = await self.inner.authorize(req, operation, path)
        else:
            principal = Principal(None, client_address(req, self.trusted))
        rate = self.rates.get(operation)
        if rate is not None:
            try:
                wait_ms = await self.quotas.hit(
                    principal.rate_key, operation.value, rate.count, rate.period_ms
                )
            except Unavailable as exc:
                self._warn("rate limits not checked: %s", exc.reason)
                return principal
            if wait_ms:
                raise TooManyRequests(
                    f"rate limit of {rate} {operation.value} requests exceeded",
                    math.ceil(wait_ms / 1000),
                )
        return principal

    async def aclose(self) -> None:
        closer = getattr(self.inner, "aclose", None)
        if closer is not None:
            await closer()


def with_limits(
    inner: Authorizer | None, settings: Settings, trusted: TrustedProxies, quotas: Quotas
) -> Authorizer | None:
    """``inner`` wrapped in ``RateLimited`` when ``DS_RATE_LIMIT`` or
    ``DS_MAX_LIVE_READERS`` is set; else ``inner`` itself (no cost at all)."""
    rates = parse_rates(settings.rate_limit)
    if not rates and not settings.max_live_readers:
        return inner
    live_readers = None
    if settings.max_live_readers:
        live_readers = LiveReaderQuota(
            quotas,
            settings.max_live_readers,
            long_poll_ms=settings.long_poll_timeout_ms,
            sse_ms=settings.sse_max_duration_ms,
        )
    return RateLimited(inner, trusted, quotas, rates, live_readers)
