"""Run a replicated Redis watched by Sentinel on loopback for failover tests.

Usage::

    with SentinelGroup(redis7_binary() or redis62_binary(), replicas=2) as group:
        gateway_env = {"REDIS_SENTINELS": group.sentinels_env, "REDIS_SENTINEL_MASTER": group.name}
        os.kill(group.master.pid, signal.SIGKILL)
        group.wait_for_new_master(old=...)

A master and ``replicas`` replicas (``RedisServer`` processes, the replicas
started with ``--replicaof``) and ``sentinels`` sentinels (``redis-server
--sentinel`` with a config file of their own, which Sentinel rewrites), all on
free loopback ports. Sentinel's timings are tuned down so a failover takes
seconds: the master is judged down after ``down_after_ms`` of silence. Ready
when every replica is online (synchronised) and every sentinel knows the master, every
replica and the other sentinels.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import redis

from .procs import free_port, spawn, stop_process, tail
from .redis_server import RedisServer


class _Sentinel:
    def __init__(
        self, binary: str, root: str, name: str, master_port: int, quorum: int, down_after_ms: int
    ) -> None:
        self.port = free_port()
        self.dir = os.path.join(root, f"sentinel-{self.port}")
        os.makedirs(self.dir)
        self.log_path = os.path.join(self.dir, "sentinel.log")
        config = os.path.join(self.dir, "sentinel.conf")
        with open(config, "w") as fh:
            fh.write(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.dir}\n"
                f"sentinel monitor {name} 127.0.0.1 {master_port} {quorum}\n"
                f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
                f"sentinel failover-timeout {name} 10000\n"
                f"sentinel parallel-syncs {name} 2\n"
            )
        self.proc = spawn([binary, config, "--sentinel"], self.log_path)

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1
        )


class SentinelGroup:
    """A master, its replicas and the sentinels that watch them."""

    def __init__(
        self,
        binary: str,
        *,
        replicas: int = 2,
        sentinels: int = 3,
        name: str = "ds-master",
        down_after_ms: int = 1000,
        start_timeout: float = 30.0,
    ) -> None:
        self.binary = binary
        self.name = name
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.down_after_ms = down_after_ms
        self.start_timeout = start_timeout
        self.master: RedisServer | None = None
        self.replicas: list[RedisServer] = []
        self.sentinels: list[_Sentinel] = []
        self.dir: str | None = None

    @property
    def sentinels_env(self) -> str:
        """REDIS_SENTINELS for the gateway: ``127.0.0.1:p1,127.0.0.1:p2,...``."""
        return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)

    @property
    def servers(self) -> list[RedisServer]:
        return [server for server in [self.master, *self.replicas] if server is not None]

    def start(self) -> SentinelGroup:
        try:
            # Replicas sync at once rather than after the default 5 s delay.
            fast_sync = ("--repl-diskless-sync-delay", "0")
            self.master = RedisServer(self.binary, extra_args=fast_sync).start()
            for _ in range(self.replica_count):
                self.replicas.append(
                    RedisServer(
                        self.binary,
                        extra_args=(*fast_sync, "--replicaof", "127.0.0.1", str(self.master.port)),
                    ).start()
                )
            self.dir = tempfile.mkdtemp(prefix="ds-sentinel-")
            quorum = self.sentinel_count // 2 + 1
            for _ in range(self.sentinel_count):
                self.sentinels.append(
                    _Sentinel(
                        self.binary,
                        self.dir,
                        self.name,
                        self.master.port,
                        quorum,
                        self.down_after_ms,
                    )
                )
            self._wait_ready(time.monotonic() + self.start_timeout)
            return self
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, deadline: float) -> None:
        assert self.master is not None
        last = ""
        while True:
            try:
                with redis.Redis.from_url(self.master.url, socket_timeout=2) as client:
                    replication = client.info("replication")
                links = sum(
                    1
                    for i in range(self.replica_count)
                    if replication.get(f"slave{i}", {}).get("state") == "online"
                )
                states = []
                for sentinel in self.sentinels:
                    if sentinel.proc.poll() is not None:
                        raise RuntimeError(
                            f"sentinel exited; log {sentinel.log_path}:\n{tail(sentinel.log_path)}"
                        )
                    with sentinel.client() as client:
                        state = client.execute_command("SENTINEL", "MASTER", self.name)
                    states.append(_pairs(state))
                last = f"links={links} sentinels={states!r}"
                if links == self.replica_count and all(
                    int(s.get("num-slaves", 0)) == self.replica_count
                    and int(s.get("num-other-sentinels", 0)) == self.sentinel_count - 1
                    for s in states
                ):
                    return
            except redis.exceptions.RedisError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinel group not ready within {self.start_timeout}s: {last}")
            time.sleep(0.1)  # poll interval, not a wait for readiness

    def master_address(self) -> tuple[str, int] | None:
        """The master as the sentinels' majority names it (None without a majority)."""
        votes: dict[tuple[str, int], int] = {}
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    host, port = client.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name
                    )
            except (redis.exceptions.RedisError, TypeError, ValueError):
                continue
            address = (_s(host), int(port))
            votes[address] = votes.get(address, 0) + 1
        for address, count in votes.items():
            if count > len(self.sentinels) // 2:
                return address
        return None

    def server_at(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            stop_process(sentinel.proc)
        self.sentinels = []
        for server in self.servers:
            server.stop()
        self.master, self.replicas = None, []
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _s(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(reply: list | dict) -> dict[str, str]:
    """SENTINEL MASTER's flat [name, value, ...] reply (or redis-py's dict) as a dict."""
    if isinstance(reply, dict):
        return {_s(k): _s(str(v)) if not isinstance(v, bytes) else _s(v) for k, v in reply.items()}
    return {_s(reply[i]): _s(reply[i + 1]) for i in range(0, len(reply) - 1, 2)}
