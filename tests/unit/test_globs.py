"""gateway.protocol.globs: path globs as section 6.2 defines them."""

from __future__ import annotations

import pytest

from gateway.protocol.globs import matches


@pytest.mark.parametrize(
    "pattern, path, expected",
    [
        ("chat/*", "chat/42", True),
        ("chat/*", "chat/42/x", False),
        ("chat/*", "chat", False),
        ("chat/*", "chatter/1", False),
        ("users/alice/**", "users/alice", True),
        ("users/alice/**", "users/alice/a", True),
        ("users/alice/**", "users/alice/a/b", True),
        ("users/alice/**", "users/alicex/a", False),
        ("users/alice/**", "users/bob/a", False),
        ("**", "a", True),
        ("**", "a/b/c", True),
        ("**/log", "log", True),
        ("**/log", "a/b/log", True),
        ("**/log", "a/b/logs", False),
        ("a/**/z", "a/z", True),
        ("a/**/z", "a/b/c/z", True),
        ("a/**/z", "a/b/c/y", False),
        ("chat-*/x", "chat-1/x", True),
        ("chat-*/x", "chat-1/2/x", False),
        ("exact/path", "exact/path", True),
        ("exact/path", "exact/path2", False),
        ("a.b/*", "axb/c", False),  # regex characters match only themselves
        ("a+/*", "a+/c", True),
    ],
)
def test_glob_rules(pattern: str, path: str, expected: bool) -> None:
    assert matches(pattern, path) is expected


@pytest.mark.parametrize("pattern", ["", "/a", "a/", "a//b", "a**/b", "a/**b"])
def test_malformed_globs_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        matches(pattern, "a/b")
