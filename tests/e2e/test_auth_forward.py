"""Forward auth (DS_AUTH=forward) end to end: a real gateway asks a real HTTP
endpoint on a loopback port (tests/support/auth_endpoint.py), which records what
it received and answers as each test decides."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from support.auth_endpoint import AuthEndpoint, Seen, allow
from support.gateway_server import GatewayServer

pytestmark = pytest.mark.timeout(60)

TEXT = {"content-type": "text/plain"}
_unique = itertools.count()


def unique(name: str) -> str:
    """Paths and credentials of their own per test: the session gateway's
    decision cache outlives each test."""
    return f"{name}-{next(_unique)}"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[AuthEndpoint]:
    with AuthEndpoint() as server:
        yield server


@pytest.fixture(autouse=True)
def _allow_by_default(endpoint: AuthEndpoint) -> Iterator[None]:
    endpoint.answer, endpoint.delay_s = allow, 0.0
    yield
    endpoint.answer, endpoint.delay_s = allow, 0.0


@pytest.fixture(scope="module")
def gateway(endpoint: AuthEndpoint, redis_url: str) -> Iterator[GatewayServer]:
    env = {
        "DS_AUTH": "forward",
        "DS_AUTH_FORWARD_URL": endpoint.url,
        "DS_AUTH_FORWARD_CACHE_S": "30",
        "DS_AUTH_FORWARD_TIMEOUT_MS": "500",
        "DS_LONG_POLL_TIMEOUT_MS": "1000",
    }
    with GatewayServer(redis_url=redis_url, env=env) as server:
        yield server


def _log(gateway: GatewayServer) -> str:
    with open(gateway.log_path, encoding="utf-8", errors="replace") as log:
        return log.read()


def test_the_endpoint_receives_method_path_operation_and_credentials(
    gateway: GatewayServer, endpoint: AuthEndpoint
) -> None:
    path = unique("chat/room one")
    url = f"{gateway.url}/v1/stream/{path}"
    headers = {**TEXT, "authorization": "Bearer t0k3n", "cookie": "session=abc; theme=dark"}
    created = httpx.put(url, headers=headers, params={"token": "signed-xyz"})
    assert created.status_code == 201, created.text
    seen = endpoint.seen[-1]
    assert seen.method == "GET"
    assert seen.target == "/auth"
    encoded = path.replace(" ", "%20")
    assert seen.headers["x-forwarded-method"] == "PUT"
    assert seen.headers["x-forwarded-uri"] == f"/v1/stream/{encoded}"
    assert seen.headers["x-ds-path"] == encoded
    assert seen.headers["x-ds-operation"] == "create"
    assert seen.headers["authorization"] == "Bearer t0k3n"
    assert seen.headers["cookie"] == "session=abc; theme=dark"
    assert seen.headers["x-ds-token"] == "signed-xyz"
    assert seen.headers["x-forwarded-for"] == "127.0.0.1"
    assert seen.headers["x-forwarded-proto"] == "http"
    assert seen.headers["x-forwarded-host"] == f"127.0.0.1:{gateway.port}"
    # Each method is its operation.
    for method, operation in [
        ("POST", "append"),
        ("GET", "read"),
        ("HEAD", "read"),
        ("DELETE", "delete"),
    ]:
        before = endpoint.count()
        answer = httpx.request(
            method, url, headers=headers, content=b"x" if method == "POST" else None
        )
        assert answer.status_code < 300, (method, answer.status_code)
        if method == "HEAD":
            assert endpoint.count() == before  # the GET's allow is cached for HEAD as well
            continue
        assert endpoint.seen[-1].headers["x-ds-operation"] == operation
        assert endpoint.seen[-1].headers["x-forwarded-method"] == method


def test_a_request_without_credentials_is_asked_about_too(
    gateway: GatewayServer, endpoint: AuthEndpoint
) -> None:
    endpoint.answer = lambda seen: (401, {})
    answer = httpx.get(f"{gateway.url}/v1/stream/{unique('open')}?offset=-1")
    assert answer.status_code == 401
    seen = endpoint.seen[-1]
    assert not {"authorization", "cookie", "x-ds-token"} & set(seen.headers)
    # A 401 without a challenge of the endpoint's gets the gateway's.
    assert answer.headers["www-authenticate"].startswith("Bearer ")


def test_401_and_403_pass_through_with_the_endpoints_challenge(
    gateway: GatewayServer, endpoint: AuthEndpoint
) -> None:
    url = f"{gateway.url}/v1/stream/{unique('guarded')}"
    challenge = 'Bearer realm="app", error="invalid_token"'
    endpoint.answer = lambda seen: (401, {"WWW-Authenticate": challenge})
    answer = httpx.put(url, headers={**TEXT, "authorization": f"Bearer {unique('bad')}"})
    assert (answer.status_code, answer.headers["www-authenticate"]) == (401, challenge)
    assert answer.headers["cache-control"] == "no-store"
    scope = 'Bearer realm="app", error="insufficient_scope"'
    endpoint.answer = lambda seen: (403, {"WWW-Authenticate": scope})
    answer = httpx.put(url, headers={**TEXT, "authorization": f"Bearer {unique('weak')}"})
    assert (answer.status_code, answer.headers["www-authenticate"]) == (403, scope)
    endpoint.answer = lambda seen: (403, {})
    answer = httpx.put(url, headers={**TEXT, "authorization": f"Bearer {unique('weak')}"})
    assert answer.status_code == 403
    assert "www-authenticate" not in answer.headers


def test_a_refusal_does_not_reveal_whether_the_stream_exists(
    gateway: GatewayServer, endpoint: AuthEndpoint
) -> None:
    existing = f"{gateway.url}/v1/stream/{unique('exists')}"
    assert httpx.put(existing, headers=TEXT).status_code == 201
    endpoint.answer = lambda seen: (403, {})
    missing = f"{gateway.url}/v1/stream/{unique('missing')}"
    answers = [httpx.get(url, params={"offset": "-1"}) for url in (existing, missing)]
    assert [a.status_code for a in answers] == [403, 403]
    assert answers[0].text == answers[1].text
    assert answers[0].headers.keys() - {"date"} == answers[1].headers.keys() - {"date"}


def test_allows_are_cached_per_credential_path_and_operation(
    gateway: GatewayServer, endpoint: AuthEndpoint
) -> None:
    path = unique("cached")
    url = f"{gateway.url}/v1/stream/{path}"
    alice = {"authorization": f"Bearer {unique('alice')}"}
    assert httpx.put(url, headers={**TEXT, **alice}).status_code == 201

    def asked(seen: Seen) -> bool:
        return seen.headers.get("x-ds-path") == path

    assert endpoint.count(asked) == 1
    for _ in range(5):  # the same credential, path and operation: from the cache
        assert httpx.post(url, headers={**TEXT, **alice}, content=b"a").status_code == 204
    assert endpoint.count(asked) == 2  # the first POST asked
    # Another operation, another path, another credential each ask again.
    read = httpx.get(url, headers=alice, params={"offset": "-1"})
    assert read.text == "aaaaa"
    assert read.headers["cache-control"].startswith("private,")  # for alice only
    assert endpoint.count(asked) == 3
    other = f"{gateway.url}/v1/stream/{path}-2"
    assert httpx.put(other, headers={**TEXT, **alice}).status_code == 201
    assert endpoint.count(lambda seen: seen.headers.get("x-ds-path") == f"{path}-2") == 1
    bob = {"authorization": f"Bearer {unique('bob')}"}
    assert httpx.post(url, headers={**TEXT, **bob}, content=b"b").status_code == 204
    assert endpoint.count(asked) == 4
    # A cookie or a token is a credential of its own as well.
    assert (
        httpx.post(url, headers={**TEXT, **alice, "cookie": "s=1"}, content=b"c").status_code == 204
    )
    assert (
        httpx.post(url, headers={**TEXT, **alice}, params={"token": "t"}, content=b"d").status_code
        == 204
    )
    assert endpoint.count(asked) == 6


async def test_concurrent_identical_questions_share_one_answer(
    gateway: GatewayServer, endpoint: AuthEndpoint
) -> None:
    """Readers reconnecting together with one credential ask the endpoint once."""
    path = unique("herd")
    url = f"{gateway.url}/v1/stream/{path}"

    def reads(seen: Seen) -> bool:
        return seen.headers.get("x-ds-path") == path and seen.headers["x-ds-operation"] == "read"

    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.put(url, headers=TEXT)).status_code == 201
        endpoint.delay_s = 0.3  # the requests all arrive while the first question is open
        credential = {"authorization": f"Bearer {unique('herd')}"}
        answers = await asyncio.gather(
            *(http.get(url, params={"offset": "-1"}, headers=credential) for _ in range(20))
        )
        assert [a.status_code for a in answers] == [200] * 20
        assert endpoint.count(reads) == 1
        # A refusal is shared the same way, and not kept afterwards.
        endpoint.answer = lambda seen: (403, {})
        other = {"authorization": f"Bearer {unique('herd')}"}
        answers = await asyncio.gather(
            *(http.get(url, params={"offset": "-1"}, headers=other) for _ in range(10))
        )
        assert [a.status_code for a in answers] == [403] * 10
        assert endpoint.count(reads) == 2
        endpoint.delay_s = 0.0
        assert (await http.get(url, params={"offset": "-1"}, headers=other)).status_code == 403
        assert endpoint.count(reads) == 3


def test_refusals_are_not_cached(gateway: GatewayServer, endpoint: AuthEndpoint) -> None:
    url = f"{gateway.url}/v1/stream/{unique('later')}"
    carol = {**TEXT, "authorization": f"Bearer {unique('carol')}"}
    endpoint.answer = lambda seen: (403, {})
    assert httpx.put(url, headers=carol).status_code == 403
    endpoint.answer = allow
    assert httpx.put(url, headers=carol).status_code == 201


@pytest.mark.parametrize("failure", ["stopped", "timeout", "500", "302"])
def test_an_endpoint_failure_is_503_never_an_open_door(
    gateway: GatewayServer, endpoint: AuthEndpoint, failure: str
) -> None:
    url = f"{gateway.url}/v1/stream/{unique('outage')}"
    headers = {**TEXT, "authorization": f"Bearer {unique('dan')}"}
    if failure == "stopped":
        port = endpoint.port
        endpoint.stop()
    elif failure == "timeout":
        endpoint.delay_s = 1.5  # DS_AUTH_FORWARD_TIMEOUT_MS is 500
    else:
        status = int(failure)
        endpoint.answer = lambda seen: (status, {"Location": "http://127.0.0.1:1/login"})
    try:
        for _ in range(3):
            answer = httpx.put(url, headers=headers, timeout=10)
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"] == "1"
    finally:
        if failure == "stopped":
            endpoint.start(port)
        endpoint.delay_s = 0.0
    # Nothing was created behind the refusals, and the endpoint's return is enough
    # (a connection the outage cut may cost one more 503).
    endpoint.answer = allow
    deadline = time.monotonic() + 10
    while (status := httpx.put(url, headers=headers).status_code) != 201:
        assert status == 503
        assert time.monotonic() < deadline, "no recovery after the endpoint's return"
        time.sleep(0.05)
    log = _log(gateway)
    assert "Traceback" not in log
    assert not re.search(r"\bERROR\b", log)


def test_a_subject_named_by_the_endpoint_is_the_principal(redis_url: str) -> None:
    """X-DS-Subject: rate limits count per subject, whichever credential it used."""
    with AuthEndpoint() as endpoint:
        endpoint.answer = lambda seen: (
            200,
            {"X-DS-Subject": seen.headers["authorization"].split(":")[0].removeprefix("Bearer ")},
        )
        env = {
            "DS_AUTH": "forward",
            "DS_AUTH_FORWARD_URL": endpoint.url,
            "DS_RATE_LIMIT": "create=3/m",
            "DS_KEY_PREFIX": unique("subj"),
        }
        with GatewayServer(redis_url=redis_url, env=env) as gw:

            def create(credential: str) -> int:
                url = f"{gw.url}/v1/stream/{unique('s')}"
                return httpx.put(
                    url, headers={**TEXT, "authorization": f"Bearer {credential}"}
                ).status_code

            # alice:1, alice:2 and alice:3 are three credentials of one subject.
            assert [create(f"alice:{n}") for n in (1, 2, 3)] == [201, 201, 201]
            refused = httpx.put(
                f"{gw.url}/v1/stream/{unique('s')}",
                headers={**TEXT, "authorization": "Bearer alice:4"},
            )
            assert refused.status_code == 429
            assert 1 <= int(refused.headers["retry-after"]) <= 20
            assert create("bob:1") == 201


def test_credentials_never_reach_the_log(gateway: GatewayServer, endpoint: AuthEndpoint) -> None:
    secret = unique("sup3r-secret")
    url = f"{gateway.url}/v1/stream/{unique('quiet')}"
    httpx.put(url, headers={**TEXT, "authorization": f"Bearer {secret}", "cookie": f"s={secret}"})
    endpoint.delay_s = 1.5
    httpx.put(
        url,
        headers={**TEXT, "authorization": f"Bearer {secret}x"},
        params={"token": secret},
        timeout=10,
    )
    log = _log(gateway)
    assert secret not in log
    # Nor a line per request to the endpoint (httpx's own INFO lines).
    assert endpoint.url not in log
