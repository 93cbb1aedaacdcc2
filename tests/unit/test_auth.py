"""gateway/web/auth: scopes, token verification, pre-signed URLs and the
configuration of DS_AUTH, as pure logic (over real sockets:
tests/e2e/test_auth_jwt.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.config import Settings
from gateway.protocol.errors import Forbidden, Unauthorized
from gateway.web.auth import Operation, build_authorizer, presign
from gateway.web.auth.keys import (
    StaticKeys,
    VerificationKey,
    algorithms_for,
    hmac_algorithms,
    parse_jwks,
)
from gateway.web.auth.scopes import Scopes
from gateway.web.auth.tokens import JwtAuthorizer, TokenVerifier, bearer_token
from gateway.web.forwarded import TrustedProxies
from gateway.web.request import Request, collect_headers

SECRET = "s" * 64
SIGNING_KEY = "k" * 32
TRUSTED = TrustedProxies("127.0.0.1")


class FakeRequest(Request):
    def __init__(self, headers: list[tuple[str, str]] = (), query: str = "") -> None:  # type: ignore[assignment]
        super().__init__()
        self._headers, self._repeated = collect_headers(headers)
        self.query_string = query
        self.peer = "10.0.0.7"


def hs_token(claims: dict[str, Any], key: str = SECRET, alg: str = "HS256", **header: Any) -> str:
    return jwt.encode({"exp": time.time() + 300, **claims}, key, algorithm=alg, headers=header)


def hs_verifier(**options: Any) -> TokenVerifier:
    return TokenVerifier(StaticKeys(VerificationKey(SECRET.encode(), ("HS256",))), **options)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(claims: dict[str, Any]) -> str:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims).encode())}."


def hs256_forged(claims: dict[str, Any], key: bytes) -> str:
    """HS256 under ``key`` even when it is a PEM (PyJWT refuses to sign that)."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{header}.{b64(json.dumps(claims).encode())}"
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


# -- scopes ------------------------------------------------------------------------


def test_scopes_grant_each_operation_only_on_matching_paths() -> None:
    scopes = Scopes.from_claim({"read": ["chat/*", "users/alice/**"], "append": ["chat/42"]})
    assert scopes.allows(Operation.READ, "chat/1")
    assert scopes.allows(Operation.READ, "users/alice")
    assert scopes.allows(Operation.READ, "users/alice/a/b")
    assert not scopes.allows(Operation.READ, "chat/1/x")
    assert scopes.allows(Operation.APPEND, "chat/42")
    assert not scopes.allows(Operation.APPEND, "chat/43")
    assert not scopes.allows(Operation.CREATE, "chat/42")
    assert not Scopes.from_claim(None).allows(Operation.READ, "chat/1")


@pytest.mark.parametrize(
    "claim",
    [["read"], {"read": "chat/*"}, {"write": ["x"]}, {"read": ["a/**b"]}, {"read": [1]}],
)
def test_malformed_scope_claims_are_refused(claim: Any) -> None:
    with pytest.raises(ValueError):
        Scopes.from_claim(claim)


# -- keys --------------------------------------------------------------------------


def test_each_key_type_admits_only_its_own_algorithms() -> None:
    assert hmac_algorithms(b"k" * 32) == ("HS256",)
    assert hmac_algorithms(b"k" * 64) == ("HS256", "HS384", "HS512")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    assert algorithms_for(rsa_key) == ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    assert algorithms_for(ec.generate_private_key(ec.SECP256R1()).public_key()) == ("ES256",)
    assert algorithms_for(ec.generate_private_key(ec.SECP384R1()).public_key()) == ("ES384",)
    assert algorithms_for(ed25519.Ed25519PrivateKey.generate().public_key()) == ("EdDSA",)
    with pytest.raises(ValueError):
        algorithms_for(b"secret")


def test_jwks_parsing_keeps_signature_keys_and_their_declared_algorithm() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    document = {
        "keys": [
            {**jwk, "kid": "a"},
            {**jwk, "kid": "enc", "use": "enc"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
            {**jwk, "kid": "wrong-alg", "alg": "RS256"},
            {"kty": "nonsense", "kid": "x"},
        ]
    }
    keys = parse_jwks(document)
    assert list(keys) == ["a"] and keys["a"].algorithms == ("ES256",)
    with pytest.raises(ValueError):
        parse_jwks({"nokeys": []})


# -- tokens ------------------------------------------------------------------------


async def test_a_valid_token_yields_its_subject_and_scopes() -> None:
    claims = await hs_verifier().verify(hs_token({"sub": "alice", "ds": {"read": ["**"]}}))
    assert claims.subject == "alice"
    assert claims.scopes.allows(Operation.READ, "any/path")


# Tokens are made when the test runs, not when it is collected: the suite may
# take minutes to reach these tests, and their times are relative to now.
@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda: hs_token({"exp": time.time() - 120}), "token expired"),
        (lambda: hs_token({"nbf": time.time() + 120}), "token not yet valid"),
        (
            lambda: jwt.encode({"sub": "x"}, SECRET, algorithm="HS256"),
            "token lacks a required claim",
        ),
        (lambda: hs_token({}, key="other" * 8), "token signature does not verify"),
        (lambda: hs_token({}, alg="HS384"), "token algorithm not allowed for this key"),
        (
            lambda: unsigned_token({"exp": time.time() + 300}),
            "token algorithm not allowed for this key",
        ),
        (lambda: "not.a.token", "malformed token"),
        (lambda: hs_token({"ds": ["read"]}), "token has a malformed ds claim"),
    ],
    ids=[
        "expired",
        "not-yet-valid",
        "no-exp",
        "bad-signature",
        "hs384",
        "alg-none",
        "malformed",
        "bad-ds-claim",
    ],
)
async def test_bad_tokens_are_refused_with_a_reason(
    make_token: Callable[[], str], reason: str
) -> None:
    token = make_token()
    with pytest.raises(Unauthorized, match=reason) as caught:
        await hs_verifier().verify(token)
    assert 'error="invalid_token"' in caught.value.headers["WWW-Authenticate"]
    assert token not in caught.value.reason


async def test_leeway_admits_small_clock_skew_only() -> None:
    verifier = hs_verifier(leeway_s=30)
    await verifier.verify(hs_token({"exp": time.time() - 10, "nbf": time.time() + 10}))
    with pytest.raises(Unauthorized, match="expired"):
        await verifier.verify(hs_token({"exp": time.time() - 60}))


async def test_issuer_and_audience_are_checked_when_configured() -> None:
    verifier = hs_verifier(issuer="https://issuer", audience="streams")
    await verifier.verify(hs_token({"iss": "https://issuer", "aud": "streams"}))
    with pytest.raises(Unauthorized, match="audience"):
        await verifier.verify(hs_token({"iss": "https://issuer", "aud": "other"}))
    with pytest.raises(Unauthorized, match="issuer"):
        await verifier.verify(hs_token({"iss": "https://evil", "aud": "streams"}))


async def test_hmac_over_the_public_key_text_does_not_verify_under_that_key() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    verifier = TokenVerifier(StaticKeys(VerificationKey(public, algorithms_for(public))))
    await verifier.verify(jwt.encode({"exp": time.time() + 60}, private, algorithm="RS256"))
    forged = hs256_forged({"exp": time.time() + 60}, pem)
    with pytest.raises(Unauthorized, match="algorithm not allowed"):
        await verifier.verify(forged)


async def test_verified_tokens_are_cached_but_not_past_their_expiry() -> None:
    calls = 0

    class CountingKeys(StaticKeys):
        async def key_for(self, header: dict[str, Any]) -> VerificationKey:
            nonlocal calls
            calls += 1
            return self.key

    verifier = TokenVerifier(CountingKeys(VerificationKey(SECRET.encode(), ("HS256",))))
    token = hs_token({})
    for _ in range(5):
        await verifier.verify(token)
    assert calls == 1
    # exp already past (within leeway): verified, but not kept.
    leeway_token = hs_token({"exp": time.time() - 1})
    await verifier.verify(leeway_token)
    await verifier.verify(leeway_token)
    assert calls == 3


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ([("authorization", "Bearer abc")], "", "abc"),
        ([("authorization", "bearer  abc ")], "", "abc"),
        ([], "offset=-1&token=abc", "abc"),
    ],
)
def test_the_token_comes_from_the_header_or_the_query(
    headers: list[tuple[str, str]], query: str, expected: str
) -> None:
    assert bearer_token(FakeRequest(headers, query)) == expected


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ([], ""),
        ([("authorization", "Basic abc")], ""),
        ([("authorization", "Bearer")], ""),
        ([("authorization", "Bearer a b")], ""),
        ([("authorization", "Bearer abc")], "token=abc"),
        ([], "token=a&token=b"),
        ([], "token="),
    ],
)
def test_missing_or_malformed_credentials_are_invalid_requests(
    headers: list[tuple[str, str]], query: str
) -> None:
    with pytest.raises(Unauthorized) as caught:
        bearer_token(FakeRequest(headers, query))
    assert 'error="invalid_request"' in caught.value.headers["WWW-Authenticate"]


async def test_the_jwt_authorizer_checks_scope_after_the_token() -> None:
    authorizer = JwtAuthorizer(hs_verifier(), TRUSTED)
    token = hs_token({"sub": "bob", "ds": {"append": ["chat/*"]}})
    req = FakeRequest([("authorization", f"Bearer {token}")])
    principal = await authorizer.authorize(req, Operation.APPEND, "chat/1")
    assert principal.subject == "bob" and principal.client == "10.0.0.7"
    with pytest.raises(Forbidden):
        await authorizer.authorize(req, Operation.READ, "chat/1")
    with pytest.raises(Unauthorized):
        await authorizer.authorize(FakeRequest(), Operation.READ, "chat/1")


# -- pre-signed URLs ------------------------------------------------------------------


def test_sign_url_builds_a_url_whose_query_verifies() -> None:
    url = presign.sign_url(
        "https://gw.example/", "chat/a b", ["read", "append"], 60, SIGNING_KEY, now=1000
    )
    assert url.startswith("https://gw.example/v1/stream/chat/a%20b?expires=1060&ops=append,read&")
    query = url.partition("?")[2]
    ops = presign.verify(SIGNING_KEY.encode(), FakeRequest(query=query), "chat/a b", now=1059)
    assert ops == {Operation.READ, Operation.APPEND}


@pytest.mark.parametrize(
    ("path", "change", "reason"),
    [
        ("chat/2", None, "does not match"),
        ("chat/1", ("ops=read", "ops=read,delete"), "does not match"),
        ("chat/1", ("expires=1060", "expires=9999"), "does not match"),
        ("chat/1", ("signature=", "signature=A"), "does not match"),
        ("chat/1", ("expires=1060", "expires=-1"), "malformed"),
        ("chat/1", ("&signature=", "&x="), "once each"),
    ],
)
def test_any_change_to_a_signed_url_breaks_it(
    path: str, change: tuple[str, str] | None, reason: str
) -> None:
    query = presign.sign_query("chat/1", ["read"], 60, SIGNING_KEY, now=1000)
    if change is not None:
        query = query.replace(*change)
    with pytest.raises(Unauthorized, match=reason):
        presign.verify(SIGNING_KEY.encode(), FakeRequest(query=query), path, now=1001)


def test_a_signed_url_expires() -> None:
    query = presign.sign_query("chat/1", ["read"], 60, SIGNING_KEY, now=1000)
    with pytest.raises(Unauthorized, match="expired"):
        presign.verify(SIGNING_KEY.encode(), FakeRequest(query=query), "chat/1", now=1060)


def test_signing_refuses_unknown_operations_and_empty_sets() -> None:
    with pytest.raises(ValueError):
        presign.sign_query("chat/1", ["write"], 60, SIGNING_KEY, now=0)
    with pytest.raises(ValueError):
        presign.sign_query("chat/1", [], 60, SIGNING_KEY, now=0)


# -- configuration ------------------------------------------------------------------


def test_ds_auth_none_builds_no_authorizer_and_unknown_modes_stop_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert build_authorizer(Settings(), TRUSTED) is None
    monkeypatch.setenv("DS_AUTH", "jtw")
    with pytest.raises(ValueError, match="DS_AUTH must be one of none, jwt, forward"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "exactly one of"),
        ({"jwt_secret": SECRET, "jwks_url": "http://127.0.0.1:1/"}, "exactly one of"),
        ({"jwt_secret": "short"}, "at least 32 bytes"),
        ({"jwt_public_key": "/nonexistent.pem"}, "cannot read"),
        ({"jwt_public_key": "-----BEGIN PUBLIC KEY-----\nxx\n"}, "not a PEM public key"),
        ({"jwt_secret": SECRET, "url_signing_key": "short"}, "DS_URL_SIGNING_KEY"),
    ],
)
def test_incomplete_jwt_configurations_stop_the_start(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_authorizer(replace(Settings(auth="jwt"), **overrides), TRUSTED)


def test_jwt_mode_with_a_signing_key_accepts_signed_urls_first() -> None:
    settings = Settings(auth="jwt", jwt_secret=SECRET, url_signing_key=SIGNING_KEY)
    assert isinstance(build_authorizer(settings, TRUSTED), presign.PresignedOr)


@pytest.mark.parametrize(
    ("private", "algorithm"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "PS256"),
        (ec.generate_private_key(ec.SECP384R1()), "ES384"),
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    ],
    ids=["rsa", "ec", "ed25519"],
)
async def test_public_keys_load_from_pem_text_or_file_and_verify_their_tokens(
    private: Any, algorithm: str, tmp_path: Path
) -> None:
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "key.pem").write_bytes(pem)
    signed = jwt.encode({"exp": time.time() + 60, "sub": "k"}, private, algorithm=algorithm)
    for value in (pem.decode(), str(tmp_path / "key.pem")):
        settings = Settings(auth="jwt", jwt_public_key=value)
        authorizer = build_authorizer(settings, TRUSTED)
        assert isinstance(authorizer, JwtAuthorizer)
        assert (await authorizer.verifier.verify(signed)).subject == "k"
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="not a PEM public key"):
        build_authorizer(Settings(auth="jwt", jwt_public_key=private_pem.decode()), TRUSTED)
