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
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

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


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for: the credential's subject (a JWT ``sub``), or
    None when nobody is named; and the client's address (from forwarded headers
    of trusted peers). Rate limits count per subject, else per address."""

    subject: str | None
    client: str | None

    @property
    def rate_key(self) -> str:
        return f"sub:{self.subject}" if self.subject is not None else f"ip:{self.client}"


class Authorizer(Protocol):
    """Decides whether ``req`` may perform ``operation`` on stream ``path``:
    returns the principal, or raises Unauthorized (401) / Forbidden (403)."""

    async def authorize(self, req: Request, operation: Operation, path: str) -> Principal: ...


__all__ = ["OPERATION_OF_METHOD", "Authorizer", "Operation", "Principal"]
