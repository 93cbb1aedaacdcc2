"""Stream cursors for CDN collapsing (protocol section 10.1).

Time is cut into fixed intervals counted from 2024-10-09T00:00:00Z; the cursor is
the current interval number. A client echoing a cursor that is not behind the
current interval gets a strictly greater one (plus 1-3600 s of jitter), so
cursors never go backwards and cached empty responses cannot loop forever.
"""

from __future__ import annotations

import random
import time

CURSOR_EPOCH_S = 1728432000  # 2024-10-09T00:00:00Z


def current_interval(interval_s: int, now_s: float | None = None) -> int:
    now = time.time() if now_s is None else now_s
    return int((now - CURSOR_EPOCH_S) // interval_s)


def next_cursor(client_cursor: str | None, interval_s: int, now_s: float | None = None) -> str:
    current = current_interval(interval_s, now_s)
    if (
        client_cursor is not None
        and client_cursor.isascii()
        and client_cursor.isdigit()
        and len(client_cursor) <= 18
    ):
        echoed = int(client_cursor)
        if echoed >= current:
            jitter_intervals = max(1, random.randint(1, 3600) // interval_s)
            return str(echoed + jitter_intervals)
    return str(current)
