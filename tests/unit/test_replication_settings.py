"""Settings for Sentinel and DS_WAIT_REPLICAS, and the WAIT reply check.

The behaviour against real processes (a master killed under a producer, WAIT
counted per group-commit run) is in tests/e2e/test_failover.py.
"""

from __future__ import annotations

import pytest
from redis import exceptions as redis_errors

from gateway.config import Settings, sentinel_addresses
from gateway.storage.client import ReplicaWait
from gateway.storage.errors import is_unavailable


def test_wait_is_off_unless_ds_wait_replicas_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DS_WAIT_REPLICAS", raising=False)
    settings = Settings.from_env()
    assert (settings.wait_replicas, settings.wait_timeout_ms) == (0, 1000)


def test_wait_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_WAIT_REPLICAS", "2")
    monkeypatch.setenv("DS_WAIT_TIMEOUT_MS", "500")
    settings = Settings.from_env()
    assert (settings.wait_replicas, settings.wait_timeout_ms) == (2, 500)


def test_a_wait_timeout_beyond_the_command_timeout_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DS_WAIT_REPLICAS", "1")
    monkeypatch.setenv("DS_WAIT_TIMEOUT_MS", "2000")
    monkeypatch.setenv("DS_REDIS_COMMAND_TIMEOUT_MS", "2000")
    with pytest.raises(ValueError, match="DS_WAIT_TIMEOUT_MS"):
        Settings.from_env()


def test_a_short_command_timeout_needs_no_wait_setting_without_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DS_WAIT_REPLICAS", raising=False)
    monkeypatch.setenv("DS_REDIS_COMMAND_TIMEOUT_MS", "500")
    assert Settings.from_env().redis_command_timeout_ms == 500


def test_sentinel_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_SENTINELS", "10.0.0.1:26379,10.0.0.2:26379")
    monkeypatch.setenv("REDIS_SENTINEL_MASTER", "streams")
    monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", "secret")
    settings = Settings.from_env()
    assert settings.redis_sentinels == "10.0.0.1:26379,10.0.0.2:26379"
    assert settings.redis_sentinel_master == "streams"
    assert settings.redis_sentinel_password == "secret"
    assert settings.redis_sentinel_username is None


@pytest.mark.parametrize(
    ("value", "addresses"),
    [
        ("127.0.0.1:26379", [("127.0.0.1", 26379)]),
        (" a:1 , b:2 ,", [("a", 1), ("b", 2)]),
        ("[::1]:26379,sentinel-0.redis:26380", [("::1", 26379), ("sentinel-0.redis", 26380)]),
    ],
)
def test_sentinel_addresses_are_host_port_pairs(
    value: str, addresses: list[tuple[str, int]]
) -> None:
    assert sentinel_addresses(value) == addresses


@pytest.mark.parametrize(
    "value",
    ["", ",", "host", "host:", ":26379", "host:port", "host:0", "host:65536", "h:" + "9" * 40],
)
def test_malformed_sentinel_addresses_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="REDIS_SENTINELS"):
        sentinel_addresses(value)


@pytest.mark.parametrize("acknowledged", [1, 2, b"3"])
def test_enough_acknowledgements_pass(acknowledged: int | bytes) -> None:
    ReplicaWait(1, 1000).check(acknowledged)


@pytest.mark.parametrize("acknowledged", [0, 1])
def test_too_few_acknowledgements_are_unavailable_not_an_error(acknowledged: int) -> None:
    with pytest.raises(redis_errors.ResponseError) as raised:
        ReplicaWait(2, 1000).check(acknowledged)
    assert str(raised.value).startswith("NOREPLICAS")
    assert is_unavailable(raised.value)  # a 503 with Retry-After, never a 500
