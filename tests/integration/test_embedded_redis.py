"""The embedded redis-server for real: durability, sharing, and clean stops."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.config import Settings
from gateway.storage.embedded import EmbeddedRedis, EmbeddedRedisError, start_embedded

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (an unreaped zombie has exited and does not count)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@pytest.fixture
def servers() -> Iterator[list[EmbeddedRedis]]:
    """Every server a test starts is stopped afterwards, even when the test fails."""
    started: list[EmbeddedRedis] = []
    yield started
    for server in started:
        server.stop()
    for server in started:
        if _running(server.pid):  # never leave a redis-server behind
            os.kill(server.pid, signal.SIGKILL)


def _start(data_dir: Path, servers: list[EmbeddedRedis]) -> EmbeddedRedis:
    server = start_embedded(Settings(data_dir=str(data_dir)))
    servers.append(server)
    return server


def _client(server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(
        server.url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True
    )


def test_data_survives_a_restart_on_the_same_dir(
    tmp_path: Path, servers: list[EmbeddedRedis]
) -> None:
    first = _start(tmp_path / "data", servers)
    assert first.owned
    with _client(first) as client:
        client.set("greeting", "hello")
        client.xadd("stream", {"data": "1"})
    first.stop()
    assert not _running(first.pid)

    second = _start(tmp_path / "data", servers)
    assert second.owned
    assert second.pid != first.pid
    with _client(second) as client:
        assert client.get("greeting") == "hello"
        assert client.xlen("stream") == 1
    second.stop()
    assert not _running(second.pid)
    # AOF only: no RDB snapshot was written.
    assert (tmp_path / "data" / "appendonly.aof").stat().st_size > 0
    assert not (tmp_path / "data" / "dump.rdb").exists()


def test_listens_on_a_private_unix_socket_and_no_tcp_port(
    tmp_path: Path, servers: list[EmbeddedRedis]
) -> None:
    server = _start(tmp_path / "data", servers)
    socket_path = str(tmp_path / "data" / "redis.sock")
    assert server.url.startswith("unix://")
    assert server.data_dir == str(tmp_path / "data")
    assert os.stat(server.data_dir).st_mode & 0o777 == 0o700
    with _client(server) as client:
        config = client.config_get("*")
    assert config["port"] == "0"
    assert config["unixsocket"] == socket_path
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["save"] == ""


def test_concurrent_starts_share_one_server(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    barrier = threading.Barrier(2, timeout=10)
    results: list[EmbeddedRedis] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            barrier.wait()
            results.append(_start(tmp_path / "data", servers))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert sorted(server.owned for server in results) == [False, True]
    owner = next(server for server in results if server.owned)
    guest = next(server for server in results if not server.owned)
    assert (guest.url, guest.pid) == (owner.url, owner.pid)

    # The owner leaving first must not pull the server from under the guest.
    owner.stop()
    with _client(guest) as client:
        assert client.ping()
    guest.stop()
    assert not _running(owner.pid)


_OTHER_PROCESS = """
import json, sys
from gateway.config import Settings
from gateway.storage.embedded import start_embedded

server = start_embedded(Settings(data_dir=sys.argv[1]))
print(json.dumps({"url": server.url, "pid": server.pid, "owned": server.owned}), flush=True)
sys.stdin.readline()
server.stop()
"""


def test_another_process_reuses_it_and_the_last_one_out_stops_it(
    tmp_path: Path, servers: list[EmbeddedRedis]
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", _OTHER_PROCESS, str(tmp_path / "data")]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) as other:
        assert other.stdout is not None and other.stdin is not None
        ready, _, _ = select.select([other.stdout], [], [], 30)
        assert ready, "the other process did not start the embedded Redis"
        theirs = json.loads(other.stdout.readline())
        assert theirs["owned"]

        ours = _start(tmp_path / "data", servers)
        assert not ours.owned
        assert (ours.url, ours.pid) == (theirs["url"], theirs["pid"])

        other.stdin.close()  # the owner stops and exits while we are still attached
        assert other.wait(30) == 0
    with _client(ours) as client:
        assert client.ping()
    ours.stop()
    assert not _running(ours.pid)


def test_falls_back_to_loopback_tcp_when_the_socket_path_is_too_long(
    tmp_path: Path, servers: list[EmbeddedRedis]
) -> None:
    data_dir = tmp_path / ("d" * 110)
    first = _start(data_dir, servers)
    assert first.url.startswith("redis://127.0.0.1:")
    with _client(first) as client:
        client.set("k", "v")
        assert client.config_get("bind")["bind"] == "127.0.0.1"
    guest = _start(data_dir, servers)
    assert (guest.owned, guest.url) == (False, first.url)
    guest.stop()
    first.stop()
    assert not _running(first.pid)

    second = _start(data_dir, servers)
    with _client(second) as client:
        assert client.get("k") == "v"


def test_a_dead_server_is_replaced(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    crashed = _start(tmp_path / "data", servers)
    os.kill(crashed.pid, signal.SIGKILL)

    replacement = _start(tmp_path / "data", servers)
    assert replacement.owned
    assert replacement.pid != crashed.pid
    replacement.stop()
    # `crashed` is still attached, so the replacement stays up until it leaves too.
    with _client(replacement) as client:
        assert client.ping()
    crashed.stop()
    assert not _running(replacement.pid)


def test_refuses_to_start_beside_an_unresponsive_server(
    tmp_path: Path, servers: list[EmbeddedRedis]
) -> None:
    server = _start(tmp_path / "data", servers)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        # A second server appending to the same AOF would corrupt it.
        with pytest.raises(EmbeddedRedisError, match="does not answer"):
            start_embedded(Settings(data_dir=str(tmp_path / "data")))
    finally:
        os.kill(server.pid, signal.SIGCONT)
    server.stop()
    assert not _running(server.pid)


def test_a_failed_start_reports_the_redis_log(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "appendonly.aof").write_bytes(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\nnot-resp")
    with pytest.raises(EmbeddedRedisError, match=r"(?s)exited with code 1.*redis\.log"):
        start_embedded(Settings(data_dir=str(data_dir)))
    assert not (data_dir / "embedded.json").exists()


def test_stop_is_idempotent(tmp_path: Path, servers: list[EmbeddedRedis]) -> None:
    server = _start(tmp_path / "data", servers)
    server.stop()
    server.stop()
    assert server.stopped
    assert not _running(server.pid)
    assert not (tmp_path / "data" / "embedded.json").exists()


def _wait_gone(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while _running(pid):
        assert time.monotonic() < deadline, f"pid {pid} still runs after {timeout}s"
        time.sleep(0.02)


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def test_the_watchdog_stops_the_server_once_its_last_user_is_killed(
    tmp_path: Path, servers: list[EmbeddedRedis]
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", _OTHER_PROCESS, str(tmp_path / "data")]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) as other:
        assert other.stdout is not None
        ready, _, _ = select.select([other.stdout], [], [], 30)
        assert ready, "the other process did not start the embedded Redis"
        theirs = json.loads(other.stdout.readline())
        with redis.Redis.from_url(theirs["url"], socket_timeout=5) as client:
            client.set("k", "written before the kill")
        watchdog = _parent_of(theirs["pid"])
        other.kill()  # no stop(), no atexit: only the kernel drops its lock
        other.wait(30)
    _wait_gone(theirs["pid"])
    _wait_gone(watchdog)
    assert not (tmp_path / "data" / "embedded.json").exists()

    again = _start(tmp_path / "data", servers)
    with _client(again) as client:
        assert client.get("k") == "written before the kill"


def test_a_user_still_attached_keeps_the_server_when_another_is_killed(
    tmp_path: Path, servers: list[EmbeddedRedis]
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", _OTHER_PROCESS, str(tmp_path / "data")]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env) as other:
        assert other.stdout is not None
        ready, _, _ = select.select([other.stdout], [], [], 30)
        assert ready, "the other process did not start the embedded Redis"
        ours = _start(tmp_path / "data", servers)
        assert not ours.owned
        other.kill()
        other.wait(30)
    watchdog = _parent_of(ours.pid)
    # The watchdog looks several times a second; it must keep leaving the server alone.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert _running(ours.pid) and _running(watchdog)
        time.sleep(0.05)
    with _client(ours) as client:
        assert client.ping()
    ours.stop()
    assert not _running(ours.pid)
    _wait_gone(watchdog)


def test_the_server_stops_cleanly_when_its_watchdog_is_killed(
    tmp_path: Path, servers: list[EmbeddedRedis]
) -> None:
    server = _start(tmp_path / "data", servers)
    with _client(server) as client:
        client.set("k", "written before the kill")
    watchdog = _parent_of(server.pid)
    assert watchdog != os.getpid()
    os.kill(watchdog, signal.SIGKILL)  # redis-server then gets SIGTERM (PR_SET_PDEATHSIG)
    _wait_gone(server.pid)
    server.stop()  # nothing left to stop; must not fail

    again = _start(tmp_path / "data", servers)
    with _client(again) as client:
        assert client.get("k") == "written before the kill"
