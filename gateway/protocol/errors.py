"""Protocol errors as data.

Handlers raise these; the application turns each into one response in one place
(gateway/app.py). Every error carries its status, a short human reason (the body)
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


class NotImplementedYet(ProtocolError):
    status = 501


class Unavailable(ProtocolError):
    """Redis cannot be reached; clients should retry shortly."""

    status = 503

    def __init__(self, reason: str = "storage unavailable, retry shortly") -> None:
        super().__init__(reason, {"Retry-After": "1"})
