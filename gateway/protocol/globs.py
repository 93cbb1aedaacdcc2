"""Globs over stream paths (section 6.2): ``*`` matches one path segment and
``**`` matches zero or more segments; every other character matches itself.

The same rules serve subscription patterns and the scopes of credentials
(gateway/web/auth/): ``chat/*`` matches ``chat/42`` but not ``chat/42/x``;
``users/alice/**`` matches ``users/alice``, ``users/alice/a`` and
``users/alice/a/b``; ``**`` matches every path. A ``*`` inside a segment
(``chat-*``) matches any run of characters within that one segment.
"""

from __future__ import annotations

import functools
import re


@functools.lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """The regular expression of ``pattern`` (cached: scopes repeat)."""
    if not pattern or pattern.startswith("/") or pattern.endswith("/") or "//" in pattern:
        raise ValueError(f"malformed path glob {pattern!r}")
    parts: list[str] = []
    segments = pattern.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            # Zero or more whole segments, with the separators around them.
            parts.append("(?:[^/]+(?:/[^/]+)*)?" if last else "(?:[^/]+/)*")
            continue
        if "**" in segment:
            raise ValueError(f"'**' must be a whole segment in {pattern!r}")
        parts.append("[^/]*".join(re.escape(piece) for piece in segment.split("*")))
        if not last:
            parts.append("/")
    regex = "".join(parts)
    # "a/**" also matches "a" itself: the separator before a final ** is optional.
    regex = regex.replace("/(?:[^/]+(?:/[^/]+)*)?", "(?:/[^/]+(?:/[^/]+)*)?")
    return re.compile(rf"\A{regex}\Z")


def matches(pattern: str, path: str) -> bool:
    """Whether stream ``path`` matches glob ``pattern``."""
    return compile_glob(pattern).match(path) is not None


def matches_any(patterns: tuple[str, ...] | list[str], path: str) -> bool:
    return any(compile_glob(pattern).match(path) is not None for pattern in patterns)
