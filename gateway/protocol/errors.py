"""Protocol errors as data.

Handlers raise these; the application turns each into one response in one place
(gateway/web/app.py). Every error carries its status, a short human reason (the body)
and any protocol headers the client needs to react without parsing the body.
"""

from __future__ import annotations


class ProtocolError(Exception):
    status = 400

    def __init__(self, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.headers = headers or {}


class BadRequest(ProtocolError):
    status = 400


class Unauthorized(ProtocolError):
    """No usable credentials (missing, expired, malformed, wrongly signed):
    401 with a ``WWW-Authenticate: Bearer`` challenge (RFC 6750 section 3)."""

    status = 401

    def __init__(self, reason: str, error: str = "invalid_token") -> None:
        challenge = f'Bearer realm="durable-streams", error="{error}"'
        super().__init__(reason, {"WWW-Authenticate": challenge})


class Forbidden(ProtocolError):
    status = 403


class NotFound(ProtocolError):
    status = 404


class MethodNotAllowed(ProtocolError):
    status = 405


class Conflict(ProtocolError):
    status = 409


class Gone(ProtocolError):
    status = 410


class PayloadTooLarge(ProtocolError):
    status = 413


class TooManyRequests(ProtocolError):
    """A rate limit or quota is exhausted (section 12.5)."""

    status = 429

    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(reason, {"Retry-After": str(max(1, retry_after_s))})


class NotImplementedYet(ProtocolError):
    status = 501


class Unavailable(ProtocolError):
    """Redis cannot be reached; clients should retry shortly."""

    status = 503

    def __init__(self, reason: str = "storage unavailable, retry shortly") -> None:
        super().__init__(reason, {"Retry-After": "1"})
