"""DS_AUTH=jwt over real sockets, under the native server and hypercorn.

The matrix: every operation (catch-up, long-poll and SSE reads, HEAD, append,
close, create, fork, delete) against every kind of credential (none, expired,
wrongly signed, wrong audience, wrong scope, right scope in the header or the
query, ``alg: none``, HMAC signed with the RSA public key, and pre-signed URLs:
valid, expired, for another path, for another operation, with a tampered
expiry). Every refusal is compared between an existing and a missing stream:
status, body and challenge must be the same. Plus key rotation through a JWKS
URL served by a tiny HTTP server on 127.0.0.1, the official clients with a
token, browsers' preflight, and what the gateway logs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from support.gateway_server import GatewayServer

from gateway.web.auth.presign import sign_query

AUDIENCE = "streams"
SIGNING_KEY = "presign-" + "k" * 32
SERVERS = ("console-script", "hypercorn")
CONFORMANCE_DIR = Path(__file__).resolve().parents[1] / "conformance"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(ds: dict[str, list[str]], *, key: Any = RSA_KEY, **claims: Any) -> str:
    payload = {"sub": "tester", "aud": AUDIENCE, "exp": int(time.time()) + 600, "ds": ds}
    payload.update(claims)
    return jwt.encode(payload, key, algorithm="RS256")


def unsigned(ds: dict[str, list[str]]) -> str:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = {"aud": AUDIENCE, "exp": int(time.time()) + 600, "ds": ds}
    return f"{header}.{b64(json.dumps(payload).encode())}."


def hmac_with_public_key(ds: dict[str, list[str]]) -> str:
    """The HS/RS confusion attack: HS256 keyed with the server's public key."""
    import hashlib
    import hmac

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = {"aud": AUDIENCE, "exp": int(time.time()) + 600, "ds": ds}
    signing_input = f"{header}.{b64(json.dumps(payload).encode())}"
    mac = hmac.new(PUBLIC_PEM, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


ADMIN = {op: ["**"] for op in ("read", "append", "create", "delete")}


@pytest.fixture(scope="module", params=SERVERS)
def gateway(request: pytest.FixtureRequest, redis_url: str, tmp_path_factory) -> Iterator[Any]:
    pem_path = tmp_path_factory.mktemp("keys") / "public.pem"
    pem_path.write_bytes(PUBLIC_PEM)
    env = {
        "DS_AUTH": "jwt",
        "DS_JWT_PUBLIC_KEY": str(pem_path),
        "DS_JWT_AUDIENCE": AUDIENCE,
        "DS_URL_SIGNING_KEY": SIGNING_KEY,
        "DS_LONG_POLL_TIMEOUT_MS": "1000",
    }
    with GatewayServer(redis_url=redis_url, env=env, server=request.param) as server:
        yield server
    log = Path(server.log_path).read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as http:
        yield http


# -- the matrix ------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """One protocol operation: the scopes it needs, how it is sent, and the
    status it gets when allowed."""

    name: str
    ops: tuple[str, ...]  # the pre-signed operation that grants it
    ok: int

    def scopes(self, path: str, source: str) -> dict[str, list[str]]:
        if self.name == "fork":
            return {"create": [path], "read": [source]}
        return {self.ops[0]: [path]}


OPERATIONS = [
    Operation("catch-up", ("read",), 200),
    Operation("long-poll", ("read",), 200),
    Operation("sse", ("read",), 200),
    Operation("head", ("read",), 200),
    Operation("append", ("append",), 204),
    Operation("close", ("append",), 204),
    Operation("create", ("create",), 201),
    Operation("fork", ("create",), 201),
    Operation("delete", ("delete",), 204),
]


def send(
    http: httpx.Client, base: str, op: Operation, path: str, source: str, auth: dict[str, Any]
) -> tuple[int, dict[str, str], bytes]:
    url = f"{base}/v1/stream/{path}"
    headers = dict(auth.get("headers", {}))
    params = dict(auth.get("params", {}))
    if op.name in ("catch-up", "long-poll", "sse"):
        params["offset"] = "-1"
        if op.name != "catch-up":
            params["live"] = op.name
        with http.stream("GET", url, headers=headers, params=params) as response:
            # SSE stays open: the status and headers are what we judge.
            body = response.read() if op.name != "sse" or response.status_code != 200 else b""
            return response.status_code, dict(response.headers), body
    if op.name == "head":
        response = http.head(url, headers=headers, params=params)
    elif op.name == "append":
        headers["content-type"] = "text/plain"
        response = http.post(url, headers=headers, params=params, content=b"more")
    elif op.name == "close":
        headers["stream-closed"] = "true"
        response = http.post(url, headers=headers, params=params)
    elif op.name == "create":
        headers["content-type"] = "text/plain"
        response = http.put(url, headers=headers, params=params)
    elif op.name == "fork":
        headers["stream-forked-from"] = f"/v1/stream/{source}"
        response = http.put(url, headers=headers, params=params)
    else:
        response = http.delete(url, headers=headers, params=params)
    return response.status_code, dict(response.headers), response.content


def bearer(value: str) -> dict[str, Any]:
    return {"headers": {"authorization": f"Bearer {value}"}}


def presigned(path: str, ops: tuple[str, ...], ttl_s: int = 60, now: float | None = None):
    query = sign_query(path, ops, ttl_s, SIGNING_KEY, now=now)
    return dict(pair.split("=", 1) for pair in query.split("&"))


# Each credential: (name, build(op, path, source) -> auth, expected refusal or None)
Credential = tuple[str, Callable[[Operation, str, str], dict[str, Any]], tuple[int, str] | None]
OTHER = "elsewhere/stream"


def _tampered(op: Operation, path: str, source: str) -> dict[str, Any]:
    params = presigned(path, op.ops)
    params["expires"] = str(int(params["expires"]) + 3600)
    return {"params": params}


CREDENTIALS: list[Credential] = [
    ("no token", lambda op, p, s: {}, (401, "invalid_request")),
    (
        "expired",
        lambda op, p, s: bearer(token(op.scopes(p, s), exp=int(time.time()) - 120)),
        (401, "invalid_token"),
    ),
    (
        "bad signature",
        lambda op, p, s: bearer(token(op.scopes(p, s), key=OTHER_RSA_KEY)),
        (401, "invalid_token"),
    ),
    (
        "wrong audience",
        lambda op, p, s: bearer(token(op.scopes(p, s), aud="other")),
        (401, "invalid_token"),
    ),
    ("wrong scope", lambda op, p, s: bearer(token(op.scopes(OTHER, OTHER))), (403, "")),
    ("right scope", lambda op, p, s: bearer(token(op.scopes(p, s))), None),
    (
        "right scope in query",
        lambda op, p, s: {"params": {"token": token(op.scopes(p, s))}},
        None,
    ),
    ("alg none", lambda op, p, s: bearer(unsigned(op.scopes(p, s))), (401, "invalid_token")),
    (
        "HS/RS confusion",
        lambda op, p, s: bearer(hmac_with_public_key(op.scopes(p, s))),
        (401, "invalid_token"),
    ),
    ("pre-signed", lambda op, p, s: {"params": presigned(p, op.ops)}, None),
    (
        "pre-signed expired",
        lambda op, p, s: {"params": presigned(p, op.ops, 60, now=time.time() - 120)},
        (401, "invalid_token"),
    ),
    (
        "pre-signed other path",
        lambda op, p, s: {"params": {**presigned(OTHER, op.ops), "x": "1"}},
        (401, "invalid_token"),
    ),
    (
        "pre-signed other operation",
        lambda op, p, s: {
            "params": presigned(p, ("delete",) if op.ops != ("delete",) else ("read",))
        },
        (403, ""),
    ),
    ("pre-signed tampered expiry", _tampered, (401, "invalid_token")),
]


def prepare(http: httpx.Client, base: str, op: Operation, tag: str) -> tuple[str, str, str]:
    """An existing stream (with data), a missing one, and a fork source."""
    admin = {"authorization": f"Bearer {token(ADMIN)}"}
    existing, missing, source = f"m/{tag}/existing", f"m/{tag}/missing", f"m/{tag}/source"
    for path in (existing, source):
        response = http.put(
            f"{base}/v1/stream/{path}",
            headers={**admin, "content-type": "text/plain"},
            content=b"hello",
        )
        assert response.status_code == 201, response.text
    return existing, missing, source


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: op.name)
@pytest.mark.parametrize("credential", CREDENTIALS, ids=lambda c: c[0])
def test_every_operation_under_every_credential(
    gateway: GatewayServer, client: httpx.Client, op: Operation, credential: Credential
) -> None:
    name, build, refusal = credential
    if name == "pre-signed" and op.name == "fork":
        # A signed URL names one stream; a fork also reads its source.
        refusal = (403, "")
    existing, missing, source = prepare(client, gateway.url, op, uuid.uuid4().hex)
    # create and fork make a new stream: "existing" is where one already is.
    target = missing if op.name in ("create", "fork") else existing
    status, headers, body = send(client, gateway.url, op, target, source, build(op, target, source))
    if refusal is None:
        assert status == op.ok, (name, status, body)
        return
    expected_status, error = refusal
    assert status == expected_status, (name, status, body)
    if expected_status == 401:
        assert headers["www-authenticate"] == (f'Bearer realm="durable-streams", error="{error}"')
    # The same refusal whether or not the stream exists.
    other = existing if target == missing else missing
    again = send(client, gateway.url, op, other, source, build(op, other, source))
    assert (again[0], again[2], again[1].get("www-authenticate")) == (
        status,
        body,
        headers.get("www-authenticate"),
    )


# -- what authenticated responses carry ------------------------------------------------


def test_authenticated_reads_are_private_and_echo_no_token(
    gateway: GatewayServer, client: httpx.Client
) -> None:
    path = f"t/{uuid.uuid4().hex}"
    secret = token(ADMIN)
    created = client.put(
        f"{gateway.url}/v1/stream/{path}",
        params={"token": secret},
        headers={"content-type": "text/plain"},
        content=b"x",
    )
    assert created.status_code == 201
    assert created.headers["location"] == f"{gateway.url}/v1/stream/{path}"
    read = client.get(f"{gateway.url}/v1/stream/{path}", params={"offset": "-1", "token": secret})
    assert read.status_code == 200 and read.content == b"x"
    assert read.headers["cache-control"].startswith("private,")
    for response in (created, read):
        assert all(secret not in value for value in response.headers.values())
    assert secret not in Path(gateway.log_path).read_text()


def test_browsers_preflight_without_a_token_and_may_send_authorization(
    gateway: GatewayServer, client: httpx.Client
) -> None:
    response = client.options(
        f"{gateway.url}/v1/stream/any/path",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert response.status_code == 204
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    refused = client.get(f"{gateway.url}/v1/stream/any/path")
    assert "WWW-Authenticate" in refused.headers["access-control-expose-headers"]


def test_sse_delivers_data_with_a_query_token(gateway: GatewayServer, client: httpx.Client) -> None:
    path = f"t/{uuid.uuid4().hex}"
    admin = {"authorization": f"Bearer {token(ADMIN)}", "content-type": "text/plain"}
    client.put(f"{gateway.url}/v1/stream/{path}", headers=admin, content=b"first")
    params = {"offset": "-1", "live": "sse", "token": token({"read": [path]})}
    with client.stream("GET", f"{gateway.url}/v1/stream/{path}", params=params) as response:
        assert response.status_code == 200
        seen = ""
        for line in response.iter_lines():
            seen += line + "\n"
            if "first" in seen and "streamNextOffset" in seen:
                break
    assert "data:first" in seen.replace(" ", "")


# -- the official clients ----------------------------------------------------------------


def test_the_python_client_reads_and_writes_with_a_token(gateway: GatewayServer) -> None:
    from durable_streams import DurableStream, DurableStreamError, stream

    url = f"{gateway.url}/v1/stream/py/{uuid.uuid4().hex}"
    scopes = {"read": ["py/**"], "append": ["py/**"], "create": ["py/**"]}
    headers = {"Authorization": f"Bearer {token(scopes)}"}
    with DurableStream.create(url, content_type="application/json", headers=headers) as handle:
        handle.append({"n": 1})
        handle.append({"n": 2})
    with stream(url, live=False, headers=headers) as response:
        assert response.read_json() == [{"n": 1}, {"n": 2}]
    with pytest.raises(DurableStreamError) as refused, stream(url, live=False) as response:
        response.read_json()
    assert refused.value.status == 401


def test_the_typescript_client_reads_and_writes_with_a_token(gateway: GatewayServer) -> None:
    node = shutil.which("node")
    if node is None or not (CONFORMANCE_DIR / "node_modules" / "@durable-streams").is_dir():
        pytest.fail("node or @durable-streams/client missing: run scripts/test first")
    url = f"{gateway.url}/v1/stream/ts/{uuid.uuid4().hex}"
    scopes = {"read": ["ts/**"], "append": ["ts/**"], "create": ["ts/**"]}
    run = subprocess.run(
        [node, str(CONFORMANCE_DIR / "auth-client.mjs"), url, token(scopes)],
        cwd=CONFORMANCE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ},
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"items": [{"k": 0}, {"k": 1}, {"k": 2}], "withoutToken": 401}


# -- JWKS rotation ---------------------------------------------------------------------------


class JwksServer:
    """A JWKS document on 127.0.0.1 that the test can change, counting fetches."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    def publish(self, *keys: tuple[str, Any]) -> None:
        self.document = {
            "keys": [
                {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())), "kid": kid}
                for kid, key in keys
            ]
        }

    def __enter__(self) -> JwksServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_keys_rotate_through_the_jwks_url_without_a_restart(
    redis_url: str, client: httpx.Client
) -> None:
    old_key, new_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )

    def signed(key: Any, kid: str) -> dict[str, str]:
        claims = {"exp": int(time.time()) + 600, "ds": {"read": ["**"], "create": ["**"]}}
        encoded = jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})
        return {"authorization": f"Bearer {encoded}"}

    with JwksServer() as jwks:
        jwks.publish(("old", old_key))
        env = {"DS_AUTH": "jwt", "DS_JWKS_URL": jwks.url}
        with GatewayServer(redis_url=redis_url, env=env, server="console-script") as gw:
            url = f"{gw.url}/v1/stream/rot/{uuid.uuid4().hex}"
            assert client.put(url, headers=signed(old_key, "old")).status_code == 201
            jwks.publish(("new", new_key))
            # Unknown kids refetch at most once per few seconds, however many arrive.
            fetches_before = jwks.fetches
            deadline = time.monotonic() + 30
            statuses = []
            while time.monotonic() < deadline:
                statuses.append(client.head(url, headers=signed(new_key, "new")).status_code)
                if statuses[-1] == 200:
                    break
                assert statuses[-1] == 401
                time.sleep(0.2)  # poll interval
            assert statuses[-1] == 200, statuses
            # A few seconds of polls: the fetch that found "new", maybe one before it.
            assert jwks.fetches - fetches_before <= 2, (jwks.fetches, statuses)
            # The old key is gone from the document: its tokens no longer verify.
            assert client.head(url, headers=signed(old_key, "old")).status_code == 401
            # A flood of unknown kids costs at most a fetch or two.
            before = jwks.fetches
            for _ in range(30):
                assert client.head(url, headers=signed(new_key, "unknown")).status_code == 401
            assert jwks.fetches - before <= 2
        log = Path(gw.log_path).read_text()
        assert "Traceback" not in log and "ERROR" not in log
