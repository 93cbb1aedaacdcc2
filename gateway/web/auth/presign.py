"""Pre-signed URLs: one stream, a set of operations, until an expiry.

An application that holds DS_URL_SIGNING_KEY hands a browser a URL such as::

    https://streams.example/v1/stream/chat/42?expires=1767225600&ops=read&signature=...

``signature`` is the base64url (unpadded) HMAC-SHA256, under the key, of the
canonical string ``ds-presign-v1\\n<stream path>\\n<ops>\\n<expires>`` (the stream
path as the gateway names it, e.g. ``chat/42``; ``ops`` exactly as in the URL).
Changing the path, the operations or the expiry breaks the signature; the
comparison is constant-time. A request that carries ``signature`` is judged by
it alone (any bearer token is ignored); others go to the configured
authorizer. Pre-signed URLs are honoured whenever DS_URL_SIGNING_KEY is set
and DS_AUTH is jwt or forward (with DS_AUTH=none everything is allowed anyway).

Applications sign with ``sign_url`` (or ``durable-streams-gateway sign``)::

    from gateway.web.auth.presign import sign_url
    url = sign_url("https://streams.example", "chat/42", ["read"], ttl_s=3600, key=KEY)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable
from urllib.parse import quote, urlencode

from gateway.protocol.errors import Forbidden, Unauthorized
from gateway.protocol.paths import stream_path

from ..forwarded import TrustedProxies, client_address
from ..request import Request
from . import Authorizer, Operation, Principal

EXPIRES_PARAM = "expires"
OPS_PARAM = "ops"
SIGNATURE_PARAM = "signature"
_VERSION = "ds-presign-v1"
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


def canonical(path: str, ops: str, expires: str) -> bytes:
    return f"{_VERSION}\n{path}\n{ops}\n{expires}".encode()


def signature(key: bytes, path: str, ops: str, expires: str) -> str:
    digest = hmac.new(key, canonical(path, ops, expires), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def canonical_ops(ops: Iterable[str | Operation]) -> str:
    """``read,append``: known operation names, sorted, each once."""
    names = {op.value if isinstance(op, Operation) else Operation(op.strip()).value for op in ops}
    if not names:
        raise ValueError("name at least one operation")
    return ",".join(sorted(names))


def sign_query(
    path: str, ops: Iterable[str | Operation], ttl_s: int, key: str | bytes, *, now: float | None
) -> str:
    """The query string (``expires=…&ops=…&signature=…``) granting ``ops`` on
    stream ``path`` for ``ttl_s`` seconds."""
    if ttl_s < 1:
        raise ValueError("ttl_s must be >= 1")
    key_bytes = key.encode() if isinstance(key, str) else key
    ops_text = canonical_ops(ops)
    expires = str(int(now if now is not None else time.time()) + ttl_s)
    return urlencode(
        {
            EXPIRES_PARAM: expires,
            OPS_PARAM: ops_text,
            SIGNATURE_PARAM: signature(key_bytes, path, ops_text, expires),
        },
        safe=",",
    )


def sign_url(
    base_url: str,
    path: str,
    ops: Iterable[str | Operation],
    ttl_s: int,
    key: str | bytes,
    *,
    stream_prefix: str = "/v1/stream",
    now: float | None = None,
) -> str:
    """A URL of stream ``path`` (e.g. ``chat/42``) under ``base_url`` (e.g.
    ``https://streams.example``) that grants ``ops`` (``read``, ``append``,
    ``create``, ``delete``) for ``ttl_s`` seconds to whoever holds it.
    Add ``offset``/``live`` parameters to it as usual: they are not signed."""
    path = path.strip("/")
    url_path = stream_prefix.rstrip("/") + "/" + quote(path, safe=_PATH_SAFE)
    return f"{base_url.rstrip('/')}{url_path}?{sign_query(path, ops, ttl_s, key, now=now)}"


def verify(key: bytes, req: Request, path: str, now: float) -> frozenset[Operation]:
    """The operations a pre-signed request grants on ``path``; 401 when the
    signature is missing, malformed, wrong or expired."""
    query = req.query
    values = [query.get(name, []) for name in (EXPIRES_PARAM, OPS_PARAM, SIGNATURE_PARAM)]
    if any(len(value) != 1 for value in values):
        raise Unauthorized("a signed URL needs expires, ops and signature once each")
    expires, ops, given = (value[0] for value in values)
    if not expires.isdigit() or len(expires) > 12:
        raise Unauthorized("malformed expires in signed URL", "invalid_request")
    expected = signature(key, path, ops, expires)
    if not hmac.compare_digest(expected.encode(), given.encode()):
        raise Unauthorized("signature does not match this URL")
    if int(expires) <= now:
        raise Unauthorized("signed URL expired")
    try:
        return frozenset(Operation(op) for op in ops.split(","))
    except ValueError:
        raise Unauthorized("malformed ops in signed URL", "invalid_request") from None


class PresignedOr:
    """Pre-signed URLs first, ``inner`` (the mode's authorizer) otherwise.

    The signature covers the stream the URL names; a request that asks about
    another stream (a fork's source) gets 403: the URL grants one stream only.
    """

    def __init__(
        self, key: bytes, inner: Authorizer, trusted: TrustedProxies, stream_prefix: str
    ) -> None:
        self.key = key
        self.inner = inner
        self.trusted = trusted
        self.prefix_length = len(stream_prefix) + 1

    async def authorize(self, req: Request, operation: Operation, path: str) -> Principal:
        if not req.query_string or SIGNATURE_PARAM not in req.query:
            return await self.inner.authorize(req, operation, path)
        signed_path = stream_path(req.path[self.prefix_length :])
        granted = verify(self.key, req, signed_path, time.time())
        if path != signed_path or operation not in granted:
            raise Forbidden(f"signed URL does not grant {operation.value} on this stream")
        return Principal(None, client_address(req, self.trusted))
