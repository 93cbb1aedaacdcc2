"""The trust boundary: who may read, append, create and delete which streams.

Every stream request (OPTIONS preflights aside) passes one ``Guard`` before its
handler runs: the configured ``Authorizer`` (``DS_AUTH``: none, jwt or forward)
turns the request's credentials into a ``Principal`` or refuses it (401 for
missing or bad credentials, 403 outside the principal's scope), and the rate
limits of that principal apply. The check comes before any storage access, so a
refusal never reveals whether a stream exists. A fork needs ``read`` on its
source besides ``create`` on itself (handlers.create asks the guard again).

With ``DS_AUTH=none`` and no rate limit configured there is no guard at all:
the request path costs nothing extra.

The modules: scopes.py (the ``ds`` claim's globs), keys.py (JWT keys and the
algorithms each admits), tokens.py (DS_AUTH=jwt), presign.py (pre-signed URLs),
forward.py (DS_AUTH=forward), limits.py (rate limits and live-reader quotas,
which wrap any mode once storage is up: ``with_limits``).
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Protocol

from gateway.config import Settings

from ..forwarded import TrustedProxies
from ..request import Request


class Operation(enum.Enum):
    """What a request does to a stream, in the words of the scopes."""

    READ = "read"  # GET, HEAD (catch-up, long-poll, SSE)
    APPEND = "append"  # POST (append, close)
    CREATE = "create"  # PUT (create, fork)
    DELETE = "delete"  # DELETE


OPERATION_OF_METHOD = {
    "GET": Operation.READ,
    "HEAD": Operation.READ,
    "POST": Operation.APPEND,
    "PUT": Operation.CREATE,
    "DELETE": Operation.DELETE,
}


class Principal(NamedTuple):
    """Who a request acts for: the credential's subject (a JWT ``sub``), or
    None when nobody is named; and the client's address (from forwarded headers
    of trusted peers). Rate limits count per subject, else per address.
    (A NamedTuple: one is built per request, and a frozen dataclass costs
    several times as much to build.)"""

    subject: str | None
    client: str | None

    @property
    def rate_key(self) -> str:
        return f"sub:{self.subject}" if self.subject is not None else f"ip:{self.client}"


class Authorizer(Protocol):
    """Decides whether ``req`` may perform ``operation`` on stream ``path``:
    returns the principal, or raises Unauthorized (401) / Forbidden (403)."""

    async def authorize(self, req: Request, operation: Operation, path: str) -> Principal: ...


def build_authorizer(settings: Settings, trusted: TrustedProxies) -> Authorizer | None:
    """The authorizer of ``DS_AUTH``, one branch per mode; ValueError when the
    configuration is incomplete, so a gateway never starts half-protected.
    Pre-signed URLs (DS_URL_SIGNING_KEY) are accepted before any mode's own
    credentials."""
    mode = settings.auth
    if mode == "none":
        return None
    if mode == "jwt":
        authorizer: Authorizer = _jwt_authorizer(settings, trusted)
    elif mode == "forward":
        authorizer = _forward_authorizer(settings, trusted)
    else:
        raise ValueError(f"unknown DS_AUTH {mode!r}")
    if settings.url_signing_key:
        from .keys import hmac_key
        from .presign import PresignedOr

        key = hmac_key(settings.url_signing_key, "DS_URL_SIGNING_KEY")
        authorizer = PresignedOr(key, authorizer, trusted, settings.stream_prefix)
    return authorizer


def _jwt_authorizer(settings: Settings, trusted: TrustedProxies) -> Authorizer:
    # Imported here: DS_AUTH=none never loads PyJWT or cryptography.
    from .keys import (
        JwksKeys,
        KeySource,
        StaticKeys,
        VerificationKey,
        hmac_algorithms,
        hmac_key,
        load_public_key,
    )
    from .tokens import JwtAuthorizer, TokenVerifier

    sources = [settings.jwt_secret, settings.jwt_public_key, settings.jwks_url]
    if sum(source is not None for source in sources) != 1:
        raise ValueError(
            "DS_AUTH=jwt needs exactly one of DS_JWT_SECRET, DS_JWT_PUBLIC_KEY, DS_JWKS_URL"
        )
    keys: KeySource
    if settings.jwt_secret is not None:
        secret = hmac_key(settings.jwt_secret, "DS_JWT_SECRET")
        keys = StaticKeys(VerificationKey(secret, hmac_algorithms(secret)))
    elif settings.jwt_public_key is not None:
        keys = StaticKeys(load_public_key(settings.jwt_public_key))
    else:
        assert settings.jwks_url is not None
        keys = JwksKeys(settings.jwks_url)
    verifier = TokenVerifier(
        keys,
        leeway_s=settings.jwt_leeway_s,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
    )
    return JwtAuthorizer(verifier, trusted)


def _forward_authorizer(settings: Settings, trusted: TrustedProxies) -> Authorizer:
    # Imported here: other modes never load httpx.
    from .forward import ForwardAuth

    if not settings.auth_forward_url:
        raise ValueError("DS_AUTH=forward needs DS_AUTH_FORWARD_URL")
    return ForwardAuth(
        settings.auth_forward_url,
        trusted,
        timeout_ms=settings.auth_forward_timeout_ms,
        cache_s=settings.auth_forward_cache_s,
    )


__all__ = ["OPERATION_OF_METHOD", "Authorizer", "Operation", "Principal", "build_authorizer"]
