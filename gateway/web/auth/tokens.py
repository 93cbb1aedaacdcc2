"""DS_AUTH=jwt: bearer tokens verified with PyJWT, scopes from their ``ds`` claim.

The token comes from ``Authorization: Bearer <token>`` or, for clients that
cannot set headers (a browser's EventSource), from the ``token`` query
parameter; never from both. ``exp`` is required, ``nbf`` honoured, both with
DS_JWT_LEEWAY_S of clock skew; ``iss``/``aud`` are checked when configured.

Verified tokens are cached by their SHA-256 for at most ``CACHE_S`` and never
past their ``exp``, so a reader's long-poll loop pays one signature check, not
one per poll. Tokens are never logged, and refusals name the problem, never
the token.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt

from gateway.protocol.errors import Forbidden, Unauthorized

from ..forwarded import TrustedProxies, client_address
from ..request import Request
from . import Operation, Principal
from .keys import KeySource
from .scopes import SCOPE_CLAIM, Scopes

TOKEN_PARAM = "token"
CACHE_S = 60.0
CACHE_ENTRIES = 10_000

# What a refusal says, by PyJWT's exception (the most specific class first).
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token not issued for this audience"),
    (jwt.InvalidIssuerError, "token from an unexpected issuer"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim"),
    (jwt.InvalidSignatureError, "token signature does not verify"),
    (jwt.InvalidAlgorithmError, "token algorithm not allowed for this key"),
)


@dataclass(frozen=True, slots=True)
class Claims:
    """What the gateway keeps of a verified token."""

    subject: str | None
    scopes: Scopes
    expires_at: float


class TokenVerifier:
    """Verifies a token and keeps the result briefly (bounded: the oldest
    entry makes room for a new one)."""

    def __init__(
        self,
        keys: KeySource,
        *,
        leeway_s: int = 30,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        self.keys = keys
        self.leeway_s = leeway_s
        self.issuer = issuer
        self.audience = audience
        self._cache: OrderedDict[bytes, tuple[Claims, float]] = OrderedDict()

    def cached(self, token: str) -> Claims | None:
        """The claims of a token verified recently, without awaiting anything:
        the common case of a client's second and later requests."""
        entry = self._cache.get(hashlib.sha256(token.encode()).digest())
        if entry is not None and time.time() < entry[1]:
            return entry[0]
        return None

    async def verify(self, token: str) -> Claims:
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        now = time.time()
        if cached is not None:
            claims, until = cached
            if now < until:
                return claims
            del self._cache[digest]
        claims = await self._decode(token)
        until = min(claims.expires_at, now + CACHE_S)
        if until > now:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.popitem(last=False)
            self._cache[digest] = (claims, until)
        return claims

    async def _decode(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
            key = await self.keys.key_for(header)
            payload: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=list(key.algorithms),
                options={"require": ["exp"]},
                leeway=self.leeway_s,
                issuer=self.issuer,
                audience=self.audience,
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(_reason(exc)) from None
        subject = payload.get("sub")
        try:
            scopes = Scopes.from_claim(payload.get(SCOPE_CLAIM))
        except ValueError:
            raise Unauthorized("token has a malformed ds claim") from None
        return Claims(subject if isinstance(subject, str) else None, scopes, float(payload["exp"]))


def _reason(exc: Exception) -> str:
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "malformed token"


def bearer_token(req: Request) -> str:
    """The request's token: from Authorization, or the ``token`` parameter."""
    header = req.header("authorization")
    # The query is parsed only when there is one: appends rarely have any.
    in_query = bool(req.query_string) and TOKEN_PARAM in req.query
    if header is not None:
        if in_query:
            raise Unauthorized("send the token in one place only", "invalid_request")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise Unauthorized("Authorization must be 'Bearer <token>'", "invalid_request")
        return token
    if in_query:
        values = req.query[TOKEN_PARAM]
        if len(values) != 1 or not values[0]:
            raise Unauthorized("give the token parameter once", "invalid_request")
        return values[0]
    raise Unauthorized("a bearer token is required", "invalid_request")


class JwtAuthorizer:
    """DS_AUTH=jwt."""

    def __init__(self, verifier: TokenVerifier, trusted: TrustedProxies) -> None:
        self.verifier = verifier
        self.trusted = trusted

    async def authorize(self, req: Request, operation: Operation, path: str) -> Principal:
        token = bearer_token(req)
        claims = self.verifier.cached(token) or await self.verifier.verify(token)
        if not claims.scopes.allows(operation, path):
            # The same refusal whether or not the stream exists: nothing was read.
            raise Forbidden(f"token does not grant {operation.value} on this stream")
        return Principal(claims.subject, client_address(req, self.trusted))
