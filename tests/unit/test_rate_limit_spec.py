"""DS_RATE_LIMIT parsing, the auth settings, the forward-auth decision cache
and the Redis keys of rate limits and live-reader quotas."""

from __future__ import annotations

import pytest

from gateway.config import Settings
from gateway.storage.keys import live_readers_key, rate_key
from gateway.web.auth import Operation, Principal
from gateway.web.auth.forward import DecisionCache, _credentials_digest
from gateway.web.auth.limits import Rate, parse_rates


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, {}),
        ("", {}),
        ("append=200/s", {Operation.APPEND: Rate(200, 1_000)}),
        (
            "append=200/s;read=50/s;create=10/s;delete=10/s",
            {
                Operation.APPEND: Rate(200, 1_000),
                Operation.READ: Rate(50, 1_000),
                Operation.CREATE: Rate(10, 1_000),
                Operation.DELETE: Rate(10, 1_000),
            },
        ),
        ("read=600/m", {Operation.READ: Rate(600, 60_000)}),
        ("create=5/h", {Operation.CREATE: Rate(5, 3_600_000)}),
        (
            " Append = 3 / S ; ; read=1/m; ",
            {Operation.APPEND: Rate(3, 1_000), Operation.READ: Rate(1, 60_000)},
        ),
        ("append=1/s,read=2/s", {Operation.APPEND: Rate(1, 1_000), Operation.READ: Rate(2, 1_000)}),
    ],
)
def test_rate_specs_parse_into_a_rate_per_operation(spec, expected) -> None:
    assert parse_rates(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("append=200", "not operation=count/unit"),
        ("append=200/d", "not operation=count/unit"),
        ("append=-1/s", "not operation=count/unit"),
        ("append=1.5/s", "not operation=count/unit"),
        ("write=10/s", "unknown operation 'write'"),
        ("append=0/s", "at least 1"),
        ("append=1/s;append=2/s", "more than once"),
        ("200/s", "not operation=count/unit"),
    ],
)
def test_bad_rate_specs_are_refused_with_the_reason(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rates(spec)


def test_a_rate_prints_as_it_was_written() -> None:
    assert str(Rate(200, 1_000)) == "200/s"
    assert str(Rate(50, 60_000)) == "50/m"


def test_settings_read_auth_and_limits_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("DS_AUTH", "forward")
    monkeypatch.setenv("DS_AUTH_FORWARD_URL", "http://127.0.0.1:9/auth")
    monkeypatch.setenv("DS_AUTH_FORWARD_CACHE_S", "0")
    monkeypatch.setenv("DS_AUTH_FORWARD_TIMEOUT_MS", "250")
    monkeypatch.setenv("DS_RATE_LIMIT", "append=2/s")
    monkeypatch.setenv("DS_MAX_LIVE_READERS", "3")
    settings = Settings.from_env()
    assert settings.auth == "forward"
    assert settings.auth_forward_url == "http://127.0.0.1:9/auth"
    assert settings.auth_forward_cache_s == 0
    assert settings.auth_forward_timeout_ms == 250
    assert settings.rate_limit == "append=2/s"
    assert settings.max_live_readers == 3


def test_settings_default_to_no_auth_and_no_limits(monkeypatch) -> None:
    for name in ("DS_AUTH", "DS_AUTH_FORWARD_URL", "DS_RATE_LIMIT", "DS_MAX_LIVE_READERS"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    assert (settings.auth, settings.rate_limit, settings.max_live_readers) == ("none", None, 0)
    assert settings.auth_forward_cache_s == 5


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DS_AUTH": "basic"}, "DS_AUTH must be"),
        ({"DS_MAX_LIVE_READERS": "-1"}, "DS_MAX_LIVE_READERS must be >= 0"),
    ],
)
def test_bad_auth_settings_fail_at_start(monkeypatch, env, message) -> None:
    monkeypatch.delenv("DS_AUTH_FORWARD_URL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        Settings.from_env()


def test_rate_keys_are_under_the_prefix_with_the_principal_as_hash_tag() -> None:
    assert rate_key("ds", "sub:alice", "append") == "ds:rate:{sub:alice}:append"
    assert live_readers_key("ds", "ip:10.0.0.7") == "ds:live:{ip:10.0.0.7}"
    # Braces in a subject cannot end the hash tag early.
    assert rate_key("ds", "sub:a}b{", "read") == "ds:rate:{sub:a%7Db%7B}:read"


def test_principals_count_per_subject_else_per_address() -> None:
    assert Principal("alice", "10.0.0.1").rate_key == "sub:alice"
    assert Principal(None, "10.0.0.1").rate_key == "ip:10.0.0.1"


def test_credential_digests_tell_each_part_apart() -> None:
    digests = {
        _credentials_digest(None, None, None),
        _credentials_digest("x", None, None),
        _credentials_digest(None, "x", None),
        _credentials_digest(None, None, "x"),
        _credentials_digest("Bearer a", "s=1", None),
    }
    assert len(digests) == 5
    assert _credentials_digest("Bearer a", None, None) == _credentials_digest(
        "Bearer a", None, None
    )


def test_decision_cache_forgets_expired_and_least_recently_used_allows(monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("gateway.web.auth.forward.time.monotonic", lambda: clock[0])
    cache = DecisionCache(ttl_s=5, entries=2)
    a = (b"a", "p", Operation.READ)
    b = (b"b", "p", Operation.READ)
    c = (b"c", "p", Operation.READ)
    cache.put(a, "alice")
    cache.put(b, None)
    assert cache.get(a) == (True, "alice")  # a is now the most recently used
    cache.put(c, "carol")  # evicts b
    assert cache.get(b) == (False, None)
    assert cache.get(c) == (True, "carol")
    clock[0] += 5
    assert cache.get(a) == (False, None)


def test_decision_cache_of_zero_seconds_keeps_nothing() -> None:
    cache = DecisionCache(ttl_s=0)
    cache.put((b"a", "p", Operation.APPEND), None)
    assert cache.get((b"a", "p", Operation.APPEND)) == (False, None)


def test_forward_auth_without_its_url_stops_the_start(monkeypatch) -> None:
    from gateway.web.auth import build_authorizer
    from gateway.web.forwarded import TrustedProxies

    settings = Settings(auth="forward", auth_forward_url=None)
    with pytest.raises(ValueError, match="needs DS_AUTH_FORWARD_URL"):
        build_authorizer(settings, TrustedProxies("127.0.0.1"))
    assert build_authorizer(Settings(), TrustedProxies("127.0.0.1")) is None


def test_without_limits_there_is_no_wrapper_at_all() -> None:
    """Zero cost when unset: the authorizer (or None) is returned as it is."""
    from gateway.web.auth.limits import LiveReaderQuota, RateLimited, with_limits
    from gateway.web.forwarded import TrustedProxies

    trusted, quotas = TrustedProxies("127.0.0.1"), object()
    inner = object()
    assert with_limits(None, Settings(), trusted, quotas) is None  # type: ignore[arg-type]
    assert with_limits(inner, Settings(), trusted, quotas) is inner  # type: ignore[arg-type]
    limited = with_limits(inner, Settings(rate_limit="read=1/s"), trusted, quotas)  # type: ignore[arg-type]
    assert isinstance(limited, RateLimited) and limited.inner is inner
    assert limited.live_readers is None
    quota = with_limits(
        None, Settings(max_live_readers=2, long_poll_timeout_ms=1000), trusted, quotas
    )  # type: ignore[arg-type]
    assert isinstance(quota, RateLimited) and isinstance(quota.live_readers, LiveReaderQuota)
    assert quota.rates == {}
    assert quota.live_readers.lease_ms["long-poll"] == 1000 + 15_000


def test_cookies_split_into_fields_by_http2_clients_are_joined() -> None:
    from gateway.web.request import collect_headers

    headers, repeated = collect_headers([("cookie", "a=1"), ("x", "y"), ("cookie", "b=2")])
    assert headers["cookie"] == "a=1; b=2"
    assert repeated is None
