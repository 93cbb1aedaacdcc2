"""Forward auth (``DS_AUTH=forward``): ask an HTTP endpoint of the application
about each request, like nginx ``auth_request`` or Caddy ``forward_auth``.

The gateway sends ``GET DS_AUTH_FORWARD_URL`` with these headers (and no body):

    X-Forwarded-Method   the request's method (GET, HEAD, POST, PUT, DELETE)
    X-Forwarded-Uri      the request's URL path, percent-encoded (no query)
    X-Forwarded-Proto    http or https, X-Forwarded-Host the host the client used
    X-Forwarded-For      the client's address (see gateway/web/forwarded.py)
    X-DS-Path            the stream path, percent-encoded (``chat/42``)
    X-DS-Operation       read, append, create or delete
    Authorization        the caller's, when it sent one
    Cookie               the caller's, when it sent one
    X-DS-Token           the caller's ``token`` query parameter, when it sent one

The answer decides:

    2xx                  allowed; ``X-DS-Subject`` may name the principal (rate
                         limits then count per subject instead of per address)
    401, 403             refused: the same status goes to the caller, with the
                         endpoint's ``WWW-Authenticate`` (a 401 without one gets
                         the gateway's Bearer challenge)
    anything else, no answer within DS_AUTH_FORWARD_TIMEOUT_MS, no connection
                         503 with Retry-After: never an open door

An allow is cached for ``DS_AUTH_FORWARD_CACHE_S`` seconds (0: never) per
(credentials, stream path, operation), in a bounded cache keyed by a SHA-256 of
the credentials, so the cache holds no credential. The decision must therefore
depend on nothing else (not the offset, not the body). Refusals are not cached.
Concurrent requests with the same (credentials, path, operation) share one
question to the endpoint and its answer (unless the cache is off).
Nothing the caller sent is ever logged.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections import OrderedDict
from urllib.parse import quote

import httpx

from gateway.protocol.errors import Forbidden, Unauthorized, Unavailable

from ..forwarded import TrustedProxies, base_url, client_address
from ..request import Request
from . import Operation, Principal
from .throttled import ThrottledWarning

# Characters RFC 3986 allows unescaped in a path; everything else is %-encoded.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
# Most allows cached per process; the least recently used go first.
CACHE_ENTRIES = 10_000
# Connections per process to the endpoint; requests beyond wait (within the
# timeout) for one.
MAX_CONNECTIONS = 64
# Longest subject taken from X-DS-Subject (it becomes part of a Redis key).
MAX_SUBJECT_LENGTH = 256

_CacheKey = tuple[bytes, str, Operation]


class DecisionCache:
    """Allows by (credentials digest, path, operation) until their expiry: an
    LRU bounded by entry count."""

    def __init__(self, ttl_s: float, entries: int = CACHE_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self.entries = entries
        self._allows: OrderedDict[_CacheKey, tuple[float, str | None]] = OrderedDict()

    def get(self, key: _CacheKey) -> tuple[bool, str | None]:
        """(cached, subject)."""
        found = self._allows.get(key)
        if found is None:
            return False, None
        expires, subject = found
        if time.monotonic() >= expires:
            del self._allows[key]
            return False, None
        self._allows.move_to_end(key)
        return True, subject

    def put(self, key: _CacheKey, subject: str | None) -> None:
        if self.ttl_s <= 0:
            return
        self._allows[key] = (time.monotonic() + self.ttl_s, subject)
        self._allows.move_to_end(key)
        while len(self._allows) > self.entries:
            self._allows.popitem(last=False)


def _credentials_digest(authorization: str | None, cookie: str | None, token: str | None) -> bytes:
    hashed = hashlib.sha256()
    for part in (authorization, cookie, token):
        # A marker per part, so that (None, "x") and ("x", None) differ.
        hashed.update(b"\x00" if part is None else b"\x01" + part.encode("utf-8", "replace"))
        hashed.update(b"\xff")
    return hashed.digest()


def _latin1(value: str) -> bytes:
    """A header value as the servers decoded it (latin-1), for the endpoint."""
    return value.encode("latin-1", "replace")


class ForwardAuth:
    """The Authorizer of ``DS_AUTH=forward``: one ``httpx.AsyncClient`` per process."""

    def __init__(
        self,
        url: str,
        trusted: TrustedProxies,
        *,
        timeout_ms: int,
        cache_s: float,
        cache_entries: int = CACHE_ENTRIES,
    ) -> None:
        self.url = url
        self.trusted = trusted
        self.cache = DecisionCache(cache_s, cache_entries)
        timeout = timeout_ms / 1000
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, pool=timeout),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=16),
            follow_redirects=False,
            trust_env=False,  # no proxy from the environment between us and the endpoint
        )
        self._warn = ThrottledWarning()
        self._asking: dict[_CacheKey, asyncio.Future[str | None]] = {}
        # httpx logs every request at INFO: a line per uncached request (and
        # the endpoint's URL, which may carry a key) is not for the log.
        logging.getLogger("httpx").setLevel(logging.WARNING)

    async def authorize(self, req: Request, operation: Operation, path: str) -> Principal:
        authorization = req.header("authorization")
        cookie = req.header("cookie")
        token = req.single("token")
        key = (_credentials_digest(authorization, cookie, token), path, operation)
        cached, subject = self.cache.get(key)
        client = client_address(req, self.trusted)
        if cached:
            return Principal(subject, client)
        headers: list[tuple[bytes, bytes]] = [
            (b"X-Forwarded-Method", req.method.encode("ascii")),
            (b"X-Forwarded-Uri", quote(req.path, safe=_PATH_SAFE).encode("ascii")),
            (b"X-DS-Path", quote(path, safe=_PATH_SAFE).encode("ascii")),
            (b"X-DS-Operation", operation.value.encode("ascii")),
        ]
        scheme, _, host = base_url(req, self.trusted).partition("://")
        headers.append((b"X-Forwarded-Proto", scheme.encode("ascii")))
        headers.append((b"X-Forwarded-Host", _latin1(host)))
        if client:
            headers.append((b"X-Forwarded-For", _latin1(client)))
        if authorization is not None:
            headers.append((b"Authorization", _latin1(authorization)))
        if cookie is not None:
            headers.append((b"Cookie", _latin1(cookie)))
        if token is not None:
            headers.append((b"X-DS-Token", token.encode("utf-8")))
        if self.cache.ttl_s <= 0:
            return Principal(await self._ask(headers), client)
        # Concurrent requests with the same question (readers reconnecting
        # together) share one answer, as they would share its cached allow.
        asking = self._asking.get(key)
        if asking is None:
            asking = asyncio.ensure_future(self._ask(headers, key))
            self._asking[key] = asking
            asking.add_done_callback(functools.partial(self._asked, key))
        # Shielded: a caller that leaves does not cancel the others' answer.
        return Principal(await asyncio.shield(asking), client)

    def _asked(self, key: _CacheKey, asking: asyncio.Future[str | None]) -> None:
        self._asking.pop(key, None)
        if not asking.cancelled():
            # Retrieved here, so that a refusal nobody waits for any more (its
            # callers left) is not logged as an error by asyncio.
            asking.exception()

    async def _ask(
        self, headers: list[tuple[bytes, bytes]], key: _CacheKey | None = None
    ) -> str | None:
        """The endpoint's answer: the subject it named on a 2xx (cached under
        ``key``), else the refusal raised."""
        try:
            answer = await self.client.get(self.url, headers=headers)
        except httpx.TimeoutException:
            self._warn("the forward-auth endpoint did not answer in time")
            raise Unavailable("authorization unavailable, retry shortly") from None
        except httpx.HTTPError as exc:
            self._warn("the forward-auth endpoint cannot be reached: %s", type(exc).__name__)
            raise Unavailable("authorization unavailable, retry shortly") from None
        status = answer.status_code
        if 200 <= status < 300:
            subject = (answer.headers.get("x-ds-subject") or "").strip() or None
            if subject is not None and len(subject) > MAX_SUBJECT_LENGTH:
                subject = subject[:MAX_SUBJECT_LENGTH]
            if key is not None:
                self.cache.put(key, subject)
            return subject
        challenge = answer.headers.get("www-authenticate")
        if status == 401:
            refusal: Unauthorized | Forbidden = Unauthorized("not authorized")
        elif status == 403:
            refusal = Forbidden("forbidden")
        else:
            self._warn("the forward-auth endpoint answered %d (expected 2xx, 401 or 403)", status)
            raise Unavailable("authorization unavailable, retry shortly")
        if challenge:
            refusal.headers = {"WWW-Authenticate": challenge}
        raise refusal

    async def aclose(self) -> None:
        await self.client.aclose()
