"""Retention settings: the per-stream headers (section 5.1 style integers) and
the server defaults from the environment."""

from __future__ import annotations

import pytest

from gateway.config import Settings
from gateway.protocol import headers as h
from gateway.protocol.errors import BadRequest


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, None), ("0", 0), ("1", 1), ("86400", 86400), (" 60 ", 60)],
)
def test_retention_max_age_accepts_canonical_seconds(raw: str | None, expected: int | None) -> None:
    assert h.parse_retention_max_age(raw) == expected


@pytest.mark.parametrize("raw", ["", "-1", "1.5", "01", "1e3", "abc", str(h.MAX_TTL_SECONDS + 1)])
def test_retention_max_age_rejects_anything_else(raw: str) -> None:
    with pytest.raises(BadRequest, match="Stream-Retention-Max-Age"):
        h.parse_retention_max_age(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, None), ("0", 0), ("1048576", 1048576), (str(h.MAX_SAFE_INTEGER), h.MAX_SAFE_INTEGER)],
)
def test_retention_max_bytes_accepts_canonical_sizes(raw: str | None, expected: int | None) -> None:
    assert h.parse_retention_max_bytes(raw) == expected


@pytest.mark.parametrize("raw", ["", "-5", "10.0", "007", str(h.MAX_SAFE_INTEGER + 1)])
def test_retention_max_bytes_rejects_anything_else(raw: str) -> None:
    with pytest.raises(BadRequest, match="Stream-Retention-Max-Bytes"):
        h.parse_retention_max_bytes(raw)


def test_retention_defaults_keep_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DS_RETENTION_MAX_AGE_S", raising=False)
    monkeypatch.delenv("DS_RETENTION_MAX_BYTES", raising=False)
    settings = Settings.from_env()
    assert (settings.retention_max_age_s, settings.retention_max_bytes) == (0, 0)


def test_retention_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_RETENTION_MAX_AGE_S", "604800")
    monkeypatch.setenv("DS_RETENTION_MAX_BYTES", "10485760")
    settings = Settings.from_env()
    assert (settings.retention_max_age_s, settings.retention_max_bytes) == (604800, 10485760)


@pytest.mark.parametrize("name", ["DS_RETENTION_MAX_AGE_S", "DS_RETENTION_MAX_BYTES"])
def test_a_negative_or_malformed_default_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    for bad in ("-1", "ten"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            Settings.from_env()
