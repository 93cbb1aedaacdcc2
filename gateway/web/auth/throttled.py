"""Warnings at most once per interval: an outage (Redis, the forward-auth
endpoint) would otherwise log one line per request."""

from __future__ import annotations

import logging
import math
import time

log = logging.getLogger("gateway.auth")

INTERVAL_S = 10.0


class ThrottledWarning:
    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.last = -math.inf

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            log.warning(message, *args)
