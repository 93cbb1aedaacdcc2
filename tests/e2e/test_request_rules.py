"""The rules of the request interface (gateway/web/request.py), the same under
every server: hypercorn (ASGI), the console script's own server over HTTP/1.1
and HTTP/2, granian over RSGI and over ASGI.

- a single-valued protocol header sent twice is a 400 (never "first wins" here
  and "last wins" there), while a list header (If-None-Match) is one list;
- forwarded headers name the gateway's URL (the 201 ``Location``) only when the
  connection comes from a trusted peer (DS_FORWARDED_ALLOW_IPS), and are
  ignored from anyone else.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest
from support.gateway_server import GatewayServer

pytestmark = pytest.mark.timeout(60)

SERVERS = ["hypercorn", "console-script", "console-script-rsgi", "console-script-asgi"]


@pytest.fixture(scope="module", params=SERVERS)
def trusting(request: pytest.FixtureRequest, redis_url: str) -> Iterator[GatewayServer]:
    """A gateway that trusts forwarded headers from loopback (the default)."""
    with GatewayServer(redis_url=redis_url, server=request.param) as server:
        yield server


@pytest.fixture(scope="module", params=SERVERS)
def distrusting(request: pytest.FixtureRequest, redis_url: str) -> Iterator[GatewayServer]:
    """A gateway that trusts only a proxy address the tests never connect from."""
    env = {"DS_FORWARDED_ALLOW_IPS": "192.0.2.10, 198.51.100.0/24"}
    with GatewayServer(redis_url=redis_url, env=env, server=request.param) as server:
        yield server


def _stream_url(gw: GatewayServer) -> str:
    return f"{gw.url}/v1/stream/rules/{uuid.uuid4().hex}"


def _no_tracebacks(gw: GatewayServer) -> None:
    with open(gw.log_path, encoding="utf-8", errors="replace") as log:
        text = log.read()
    assert "Traceback" not in text and "unhandled error" not in text, text[-4000:]


# -- repeated headers -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, values",
    [
        ("Producer-Seq", ["0", "1"]),
        ("Producer-Seq", ["0", "0"]),  # even equal values: one meaning per header
        ("Stream-Seq", ["a", "b"]),
        ("Content-Type", ["text/plain", "application/json"]),
        ("Stream-Closed", ["true", "false"]),
    ],
)
async def test_a_single_valued_header_sent_twice_is_refused(
    trusting: GatewayServer, name: str, values: list[str]
) -> None:
    url = _stream_url(trusting)
    async with httpx.AsyncClient(timeout=5) as http:
        created = await http.put(url, headers={"Content-Type": "text/plain"})
        assert created.status_code == 201
        headers = [("Content-Type", "text/plain")] if name != "Content-Type" else []
        headers += [("Producer-Id", "p"), ("Producer-Epoch", "0")]
        if name != "Producer-Seq":
            headers.append(("Producer-Seq", "0"))
        headers += [(name, value) for value in values]
        res = await http.post(url, content=b"x", headers=headers)
        assert res.status_code == 400, res.text
        assert "more than once" in res.text
        # Nothing was written.
        read = await http.get(url, params={"offset": "-1"})
        assert read.content == b""
    _no_tracebacks(trusting)


async def test_a_list_header_sent_twice_is_one_list(trusting: GatewayServer) -> None:
    url = _stream_url(trusting)
    async with httpx.AsyncClient(timeout=5) as http:
        await http.put(url, headers={"Content-Type": "text/plain"})
        await http.post(url, content=b"hello", headers={"Content-Type": "text/plain"})
        first = await http.get(url, params={"offset": "-1"})
        etag = first.headers["etag"]
        again = await http.get(
            url,
            params={"offset": "-1"},
            headers=[("If-None-Match", '"other"'), ("If-None-Match", etag)],
        )
        assert again.status_code == 304


async def test_a_repeated_header_over_http2_is_refused_too(redis_url: str) -> None:
    with GatewayServer(redis_url=redis_url, server="console-script") as gw:
        url = _stream_url(gw)
        async with httpx.AsyncClient(http1=False, http2=True, timeout=5) as http:
            await http.put(url, headers={"Content-Type": "text/plain"})
            res = await http.post(
                url,
                content=b"x",
                headers=[("content-type", "text/plain"), ("stream-seq", "a"), ("stream-seq", "b")],
            )
            assert res.http_version == "HTTP/2"
            assert res.status_code == 400 and "more than once" in res.text
        _no_tracebacks(gw)


# -- forwarded headers ------------------------------------------------------------

FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "streams.example.com"}


async def test_location_follows_forwarded_headers_from_a_trusted_peer(
    trusting: GatewayServer,
) -> None:
    url = _stream_url(trusting)
    path = url.removeprefix(trusting.url)
    async with httpx.AsyncClient(timeout=5) as http:
        res = await http.put(url, headers=FORWARDED)
    assert res.status_code == 201
    assert res.headers["location"] == f"https://streams.example.com{path}"


async def test_rfc7239_forwarded_from_a_trusted_peer(trusting: GatewayServer) -> None:
    url = _stream_url(trusting)
    path = url.removeprefix(trusting.url)
    forwarded = 'for=203.0.113.7;proto=https;host="edge.example.com:8443", for=10.0.0.1'
    async with httpx.AsyncClient(timeout=5) as http:
        res = await http.put(url, headers={"Forwarded": forwarded})
    assert res.headers["location"] == f"https://edge.example.com:8443{path}"


async def test_forwarded_headers_from_an_untrusted_peer_are_ignored(
    distrusting: GatewayServer,
) -> None:
    url = _stream_url(distrusting)
    async with httpx.AsyncClient(timeout=5) as http:
        res = await http.put(url, headers={**FORWARDED, "Forwarded": "proto=https;host=evil"})
    assert res.status_code == 201
    # The gateway's own scheme and the Host the client sent.
    assert res.headers["location"] == url


async def test_a_malformed_forwarded_host_is_ignored(trusting: GatewayServer) -> None:
    url = _stream_url(trusting)
    async with httpx.AsyncClient(timeout=5) as http:
        res = await http.put(
            url, headers={"X-Forwarded-Proto": "gopher", "X-Forwarded-Host": "a b/c"}
        )
    assert res.headers["location"] == url


async def test_concurrent_requests_keep_their_own_forwarded_view(trusting: GatewayServer) -> None:
    """The trust decision is per connection: an untrusted-looking request and a
    forwarded one at the same time each get their own Location."""
    async with httpx.AsyncClient(timeout=5) as http:
        urls = [_stream_url(trusting) for _ in range(20)]
        results = await asyncio.gather(
            *(http.put(u, headers=FORWARDED if i % 2 else {}) for i, u in enumerate(urls))
        )
    for i, (u, res) in enumerate(zip(urls, results, strict=True)):
        path = u.removeprefix(trusting.url)
        expected = f"https://streams.example.com{path}" if i % 2 else u
        assert res.headers["location"] == expected


def test_a_malformed_allow_list_is_refused_at_start(redis_url: str) -> None:
    server = GatewayServer(
        redis_url=redis_url,
        env={"DS_FORWARDED_ALLOW_IPS": "10.0.0.1, not-an-address"},
        server="console-script",
        start_timeout=10,
    )
    with pytest.raises(RuntimeError, match="not an IP address or network"):
        server.start()


# -- header values on the way out -----------------------------------------------------


async def _corrupt_content_type(gw: GatewayServer, redis_url: str) -> str:
    """A stream whose stored content type was edited in Redis to hold CR/LF (the
    only way such a value can exist: inbound parsers refuse it)."""
    import redis.asyncio as aioredis

    url = _stream_url(gw)
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.put(url, headers={"Content-Type": "text/plain"})).status_code == 201
    path = url.split("/v1/stream/", 1)[1]
    edit = aioredis.from_url(redis_url)
    try:
        await edit.hset(f"ds:{{{path}}}:meta", "ct", b"text/plain\r\nX-Injected: 1")
    finally:
        await edit.aclose()
    return url


async def test_a_stored_header_value_with_crlf_never_splits_a_response(
    trusting: GatewayServer, redis_url: str
) -> None:
    url = await _corrupt_content_type(trusting, redis_url)
    async with httpx.AsyncClient(timeout=5) as http:
        for method in ("GET", "HEAD"):
            res = await http.request(method, url, params={"offset": "-1"})
            assert res.status_code == 500
            assert "x-injected" not in res.headers
            assert "\n" not in res.headers.get("content-type", "")


async def test_a_stored_header_value_with_crlf_never_splits_an_http2_response(
    redis_url: str,
) -> None:
    with GatewayServer(redis_url=redis_url, server="console-script") as gw:
        url = await _corrupt_content_type(gw, redis_url)
        async with httpx.AsyncClient(http1=False, http2=True, timeout=5) as http:
            res = await http.get(url, params={"offset": "-1"})
            assert res.http_version == "HTTP/2"
            assert res.status_code == 500 and res.text == "internal error\n"
            assert "x-injected" not in res.headers
            # The connection stays usable.
            assert (await http.get(f"{gw.url}/healthz")).status_code == 200
