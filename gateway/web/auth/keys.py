"""Where JWT verification keys come from, and which algorithms each key admits.

The algorithms are derived from the key itself, never from the token: an HMAC
secret admits HS256/384/512 only, an RSA key RS*/PS*, an EC key the one ES*
of its curve, an Ed25519/Ed448 key EdDSA. So ``alg: none`` and HS/RS confusion
(a token signed with HMAC under the text of a public key) cannot verify.

- ``StaticKeys``: DS_JWT_SECRET or DS_JWT_PUBLIC_KEY, one key for every token.
- ``JwksKeys``: DS_JWKS_URL, fetched with an async HTTP client (the event loop
  never blocks on it), cached, and fetched again when a token names an unknown
  ``kid`` (at most once per ``min_refetch_s``), so keys rotate without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from gateway.protocol.errors import Unauthorized, Unavailable

log = logging.getLogger("gateway.auth")

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": ("ES256",), "secp384r1": ("ES384",), "secp521r1": ("ES512",)}
# RFC 7518 section 3.2: an HMAC key at least as long as the hash.
MIN_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class VerificationKey:
    key: Any  # bytes (HMAC) or a cryptography public key
    algorithms: tuple[str, ...]


class KeySource(Protocol):
    async def key_for(self, header: dict[str, Any]) -> VerificationKey: ...


def algorithms_for(key: Any) -> tuple[str, ...]:
    """The algorithms a public key admits (ValueError for anything else)."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in EC_ALGORITHMS:
            raise ValueError(f"unsupported EC curve {key.curve.name}")
        return EC_ALGORITHMS[key.curve.name]
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def load_public_key(value: str) -> VerificationKey:
    """DS_JWT_PUBLIC_KEY: PEM text, or the path of a PEM file."""
    if "-----BEGIN" in value:
        pem = value.encode()
    else:
        try:
            with open(os.path.expanduser(value), "rb") as file:
                pem = file.read()
        except OSError as exc:
            raise ValueError(f"DS_JWT_PUBLIC_KEY: cannot read {value!r}: {exc}") from exc
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(f"DS_JWT_PUBLIC_KEY is not a PEM public key: {exc}") from exc
    return VerificationKey(key, algorithms_for(key))


def hmac_algorithms(key: bytes) -> tuple[str, ...]:
    """HS256, and HS384/HS512 when the key is as long as their hash."""
    sizes = zip(HMAC_ALGORITHMS, (32, 48, 64), strict=True)
    return tuple(alg for alg, size in sizes if len(key) >= size)


def hmac_key(secret: str, name: str) -> bytes:
    key = secret.encode()
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"{name} must be at least {MIN_SECRET_BYTES} bytes long")
    return key


class StaticKeys:
    """One key for every token (DS_JWT_SECRET or DS_JWT_PUBLIC_KEY)."""

    def __init__(self, key: VerificationKey) -> None:
        self.key = key

    async def key_for(self, header: dict[str, Any]) -> VerificationKey:
        return self.key


class JwksKeys:
    """Keys from a JWKS document, by ``kid``."""

    def __init__(
        self,
        url: str,
        *,
        min_refetch_s: float = 5.0,
        max_age_s: float = 300.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self.min_refetch_s = min_refetch_s
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self.keys: dict[str | None, VerificationKey] = {}
        self.fetched_at = 0.0  # monotonic time of the last successful fetch
        self.attempted_at = float("-inf")  # of the last attempt, successful or not
        self._lock = asyncio.Lock()

    async def key_for(self, header: dict[str, Any]) -> VerificationKey:
        kid = header.get("kid")
        if not isinstance(kid, str | None):
            raise Unauthorized("malformed token")
        key = self._find(kid)
        stale = time.monotonic() - self.fetched_at > self.max_age_s
        if key is None or stale:
            await self._refresh()
            key = self._find(kid)
        if key is None:
            if not self.keys:
                raise Unavailable("signing keys are unavailable, retry shortly")
            raise Unauthorized("token signed with an unknown key")
        return key

    def _find(self, kid: str | None) -> VerificationKey | None:
        if kid is None and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        return self.keys.get(kid)

    async def _refresh(self) -> None:
        async with self._lock:
            # One fetch at a time, and at most one per min_refetch_s: a stream
            # of tokens naming unknown kids must not become a stream of fetches.
            if time.monotonic() - self.attempted_at < self.min_refetch_s:
                return
            self.attempted_at = time.monotonic()
            try:
                async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                    response = await client.get(self.url)
                    response.raise_for_status()
                    document = response.json()
                self.keys = parse_jwks(document)
                self.fetched_at = time.monotonic()
                log.info("fetched %d signing keys from the JWKS URL", len(self.keys))
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("cannot fetch the JWKS URL %s: %s", self.url, exc)


def parse_jwks(document: Any) -> dict[str | None, VerificationKey]:
    """The usable signature keys of a JWKS document by ``kid``; keys for
    encryption, symmetric keys and unsupported types are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: dict[str | None, VerificationKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry).key
            algorithms = algorithms_for(key)
        except (jwt.PyJWTError, ValueError):
            continue
        declared = entry.get("alg")
        if declared is not None:
            if declared not in algorithms:
                continue
            algorithms = (declared,)
        keys[entry.get("kid")] = VerificationKey(key, algorithms)
    return keys
