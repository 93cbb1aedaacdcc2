"""Pure logic of gateway.embedded: no redis-server is started here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from redis.connection import parse_url

from gateway.config import Settings
from gateway.storage import embedded
from gateway.storage.embedded import (
    MAX_SOCKET_PATH_BYTES,
    Endpoint,
    build_url,
    plan_endpoint,
    render_config,
    resolve_data_dir,
    socket_path_fits,
)


def _dir_with_socket_path_length(base: str, total: int) -> str:
    """A directory under ``base`` whose ``redis.sock`` path is exactly ``total`` bytes."""
    fixed = len(os.fsencode(base)) + len("/") + len("/" + embedded.SOCKET_NAME)
    return os.path.join(base, "d" * (total - fixed))


def test_socket_path_limit_is_inclusive() -> None:
    assert socket_path_fits("/" + "a" * (MAX_SOCKET_PATH_BYTES - 1))
    assert not socket_path_fits("/" + "a" * MAX_SOCKET_PATH_BYTES)


def test_socket_path_limit_counts_bytes_not_characters() -> None:
    # "é" is two bytes in UTF-8: 54 of them are 108 bytes, one too many.
    assert len("/" + "é" * 53) < MAX_SOCKET_PATH_BYTES
    assert not socket_path_fits("/" + "é" * 54)


def test_plan_prefers_the_unix_socket_in_the_data_dir() -> None:
    data_dir = _dir_with_socket_path_length("/tmp", MAX_SOCKET_PATH_BYTES)
    endpoint = plan_endpoint(data_dir, free_port=pytest.fail)
    assert endpoint == Endpoint(socket_path=os.path.join(data_dir, "redis.sock"))


def test_plan_falls_back_to_tcp_when_the_socket_path_is_too_long() -> None:
    data_dir = _dir_with_socket_path_length("/tmp", MAX_SOCKET_PATH_BYTES + 1)
    assert plan_endpoint(data_dir, free_port=lambda: 40123) == Endpoint(port=40123)


def test_endpoint_is_either_socket_or_port() -> None:
    with pytest.raises(ValueError):
        Endpoint()
    with pytest.raises(ValueError):
        Endpoint(socket_path="/tmp/x.sock", port=1)


def test_unix_url_round_trips_through_redis_py() -> None:
    path = '/tmp/a dir/with "quotes"?#%/redis.sock'
    url = build_url(Endpoint(socket_path=path))
    assert url.startswith("unix:///tmp/a%20dir/")
    assert url.endswith("/redis.sock?db=0")
    parsed = parse_url(url)
    assert (parsed["path"], parsed["db"]) == (path, 0)


def test_tcp_url_is_loopback_db0() -> None:
    url = build_url(Endpoint(port=40123))
    assert url == "redis://127.0.0.1:40123/0"
    parsed = parse_url(url)
    assert (parsed["host"], parsed["port"], parsed["db"]) == ("127.0.0.1", 40123, 0)


def test_config_for_unix_socket_is_aof_only_and_tcp_off() -> None:
    conf = render_config("/data/dir", Endpoint(socket_path="/data/dir/redis.sock"))
    lines = conf.splitlines()
    for expected in (
        'dir "/data/dir"',
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        "daemonize no",
        "port 0",
        'unixsocket "/data/dir/redis.sock"',
        "unixsocketperm 700",
    ):
        assert expected in lines
    assert not any(line.startswith("bind ") for line in lines)


def test_config_for_tcp_fallback_binds_loopback_only() -> None:
    lines = render_config("/d", Endpoint(port=40123)).splitlines()
    assert "bind 127.0.0.1" in lines
    assert "port 40123" in lines
    assert not any(line.startswith("unixsocket") for line in lines)


def test_config_quotes_awkward_paths() -> None:
    conf = render_config('/a "b"\\c\nd é', Endpoint(port=1))
    # Quotes, backslashes, control and non-ASCII bytes become \xHH escapes that
    # redis-server's config parser decodes, so the line cannot be split or cut short.
    assert 'dir "/a \\x22b\\x22\\x5cc\\x0ad \\xc3\\xa9"' in conf.splitlines()


def test_relative_data_dir_is_made_absolute_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir(Settings().data_dir) == os.path.join(
        os.getcwd(), ".durable-streams-data"
    )
    assert resolve_data_dir("/abs/dir/") == "/abs/dir"


def test_data_dir_comes_from_ds_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_DATA_DIR", "/srv/streams")
    assert Settings.from_env().data_dir == "/srv/streams"


def test_redis_server_binary_is_found() -> None:
    assert os.access(embedded.find_redis_server(), os.X_OK)
