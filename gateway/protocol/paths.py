"""Stream paths as the URL names them (section 12.2) and the reserved prefix
of the subscription APIs (section 6)."""

from __future__ import annotations

import functools

from .errors import NotFound

MAX_PATH_BYTES = 1024
RESERVED_PREFIX = "__ds"  # section 6: subscription control APIs
_RESERVED_DIR = RESERVED_PREFIX + "/"


@functools.lru_cache(maxsize=4096)
def stream_path(raw: str) -> str:
    """Validate the stream path taken from the URL (section 12.2). Cached: hot
    streams are named on every request."""
    if not raw or raw.endswith("/"):
        raise NotFound("no stream at this URL")
    if len(raw.encode()) > MAX_PATH_BYTES:
        raise NotFound(f"stream paths are limited to {MAX_PATH_BYTES} bytes")
    segments = raw.split("/")
    if any(seg in ("", ".", "..") for seg in segments):
        raise NotFound("stream paths may not contain empty, '.' or '..' segments")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in raw):
        raise NotFound("stream paths may not contain control characters")
    return raw


def is_reserved(path: str) -> bool:
    """Whether ``path`` lies under the reserved ``__ds`` prefix."""
    return path == RESERVED_PREFIX or path.startswith(_RESERVED_DIR)
