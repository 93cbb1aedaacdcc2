"""The servers under test: the gateway (on a fresh AOF Redis) and the Node reference server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import die_with_parent, free_port, rss_kib, stop_process, tail, tree_pids

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
REDIS_SERVER = os.environ.get("BENCH_REDIS_SERVER", "/usr/bin/redis-server")
NODE_DIR = ROOT / "bench" / "node"

# Gateway settings for the bench: SSE connections are kept open for the whole
# fan-out measurement (the default closes them after 60 s so CDNs can collapse).
GATEWAY_ENV = {"DS_SSE_MAX_DURATION_MS": "900000"}
# The gateway's JWT settings of the bench (bench/cli.py mints the clients' token
# with this secret): for every gateway config with --auth jwt, and always for
# the gw-native-1w-jwt config, the other half of a same-run none/jwt A/B.
JWT_SECRET = "bench-jwt-secret-" + "x" * 48
JWT_GATEWAY_ENV = {"DS_AUTH": "jwt", "DS_JWT_SECRET": JWT_SECRET}


def _wait_port(host: str, port: int, proc: subprocess.Popen, log: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{tail(log)}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{proc.args} did not listen on {port} within {timeout}s:\n{tail(log)}"
            )
        time.sleep(0.05)


def _spawn(args: list[str], log_path: str, env: dict[str, str] | None = None, cwd=None):
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(map(str, args))}\n".encode())
        log.flush()
        return subprocess.Popen(
            [str(a) for a in args],
            cwd=cwd or ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


@dataclass
class Running:
    """A started server: its base address, the pids to measure, and how to stop it."""

    host: str
    port: int
    server_proc: subprocess.Popen
    workdir: str
    redis_proc: subprocess.Popen | None = None
    procs_to_stop: list[subprocess.Popen] = field(default_factory=list)
    config: ServerConfig | None = None

    @property
    def server_pid(self) -> int:
        return self.server_proc.pid

    def server_rss_kib(self) -> int:
        """RSS of the HTTP server's process tree (its workers included, Redis not)."""
        return rss_kib(tree_pids([self.server_proc.pid]))

    def redis_rss_kib(self) -> int | None:
        """RSS of the gateway's redis-server alone (not its AOF-rewrite child), or None."""
        return rss_kib([self.redis_proc.pid]) if self.redis_proc is not None else None

    def cpu_groups(self) -> dict[str, list[int]]:
        groups = {"server": [self.server_proc.pid]}
        if self.redis_proc is not None:
            groups["redis"] = [self.redis_proc.pid]
        return groups

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs_to_stop)

    def restart(self) -> None:
        """Stop, then start the same config afresh (new Redis too), in place."""
        self.stop()
        fresh = self.config.start()
        self.__dict__.update(fresh.__dict__)

    def stop(self) -> None:
        # HTTP server first, then its Redis, so the gateway shuts down cleanly.
        for proc in self.procs_to_stop:
            stop_process(proc)
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass(frozen=True)
class ServerConfig:
    key: str
    label: str
    kind: str  # "gateway" or "node"
    command: str  # for the report
    scenarios: str = "abcde"  # the scenarios this server can serve

    def start(self, start_timeout: float = 30.0) -> Running:
        workdir = tempfile.mkdtemp(prefix=f"ds-bench-{self.key}-")
        log = os.path.join(workdir, "server.log")
        if self.kind == "gateway":
            running = self._start_gateway(workdir, log, start_timeout)
        else:
            running = self._start_node(workdir, log, start_timeout)
        running.config = self
        return running

    def _start_gateway(self, workdir: str, log: str, start_timeout: float) -> Running:
        redis_port = free_port()
        redis_dir = os.path.join(workdir, "redis")
        os.makedirs(redis_dir)
        redis_log = os.path.join(workdir, "redis.log")
        redis = _spawn(
            [
                REDIS_SERVER, "--port", str(redis_port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                "--dir", redis_dir, "--daemonize", "no",
            ],
            redis_log,
        )  # fmt: skip
        try:
            _wait_port("127.0.0.1", redis_port, redis, redis_log, 10)
            port = free_port()
            env = {
                **GATEWAY_ENV,
                "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                "DS_DATA_DIR": os.path.join(workdir, "unused-data"),
                "PYTHONUNBUFFERED": "1",
                **(JWT_GATEWAY_ENV if self.key.endswith("-jwt") else {}),
            }
            args = self.gateway_args(port)
            cwd = baseline_dir() if self.key == "gw-baseline" else None
            proc = _spawn(args, log, env, cwd=cwd)
            running = Running("127.0.0.1", port, proc, workdir, redis, [proc, redis])
            try:
                _wait_port("127.0.0.1", port, proc, log, start_timeout)
                _wait_healthz("127.0.0.1", port, start_timeout)
            except BaseException:
                running.stop()
                raise
            return running
        except BaseException:
            stop_process(redis)
            shutil.rmtree(workdir, ignore_errors=True)
            raise

    def gateway_args(self, port: int) -> list[str]:
        if self.key == "floor-granian":
            return [
                VENV_BIN / "granian", "--interface", "rsgi", "--loop", "uvloop",
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backpressure", "100000", "--log-level", "warning", "bench.floor_app:app",
            ]  # fmt: skip
        if self.key == "gw-granian-1w-bp":
            return [
                VENV_BIN / "granian", "--interface", "asgi", "--host", "127.0.0.1",
                "--port", str(port), "--workers", "1", "--backpressure", "16384",
                "--log-level", "warning", "gateway.main:app",
            ]  # fmt: skip
        if self.key == "gw-hypercorn-1w":
            return [
                VENV_BIN / "hypercorn", "gateway.main:app",
                "--bind", f"127.0.0.1:{port}", "--workers", "1", "--log-level", "warning",
            ]  # fmt: skip
        if self.key == "gw-baseline":
            # The same server from another checkout (bench/run --baseline REV).
            return [
                baseline_dir() / ".venv" / "bin" / "durable-streams-gateway",
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--log-level", "warning",
            ]  # fmt: skip
        workers = "2" if self.key.endswith("-2w") else "1"
        common = [
            VENV_BIN / "durable-streams-gateway", "--host", "127.0.0.1", "--port", str(port),
            "--workers", workers, "--log-level", "warning",
        ]  # fmt: skip
        if self.key == "gw-native-1w-quiet":
            return [*common, "--no-access-log"]
        if self.key == "gw-native-1w-observed":
            return [*common, "--metrics-port", str(free_port())]
        if self.key.startswith("gw-native"):
            return common
        interface = "asgi" if self.key == "gw-granian-1w-asgi" else "rsgi"
        return [*common, "--server", "granian", "--interface", interface]

    def _start_node(self, workdir: str, log: str, start_timeout: float) -> Running:
        port = free_port()
        env = {"PORT": str(port), "HOST": "127.0.0.1"}
        if self.key == "node-file":
            env["DATA_DIR"] = os.path.join(workdir, "data")
        proc = _spawn(["node", NODE_DIR / "server.mjs"], log, env, cwd=NODE_DIR)
        running = Running("127.0.0.1", port, proc, workdir, None, [proc])
        try:
            _wait_port("127.0.0.1", port, proc, log, start_timeout)
        except BaseException:
            running.stop()
            raise
        return running


def _wait_healthz(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    while True:
        try:
            with socket.create_connection((host, port), timeout=1) as sock:
                sock.sendall(request.encode())
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"gateway on {port}: /healthz did not answer 200 in {timeout}s")
        time.sleep(0.1)


CONFIGS: list[ServerConfig] = [
    ServerConfig(
        "gw-native-1w", "gateway (1 worker)", "gateway",
        "durable-streams-gateway --workers 1  (its own server)",
    ),
    ServerConfig(
        "gw-granian-1w", "gateway (granian RSGI, 1 worker)", "gateway",
        "durable-streams-gateway --workers 1 --server granian  (RSGI)",
    ),
    ServerConfig(
        "gw-hypercorn-1w", "gateway (hypercorn, 1 worker)", "gateway",
        "hypercorn gateway.main:app --workers 1",
    ),
    ServerConfig(
        "gw-native-2w", "gateway (2 workers)", "gateway",
        "durable-streams-gateway --workers 2  (its own server)",
    ),
    ServerConfig(
        "node-mem", "Node reference (in memory)", "node",
        "DurableStreamTestServer({port, host})",
    ),
    ServerConfig(
        "node-file", "Node reference (file-backed)", "node",
        "DurableStreamTestServer({port, host, dataDir})",
    ),
]  # fmt: skip
# Not run by default: more ways to serve the gateway, and the floor of granian.
EXTRA_CONFIGS: list[ServerConfig] = [
    ServerConfig(
        "gw-granian-1w-asgi", "gateway (granian ASGI, 1 worker)", "gateway",
        "durable-streams-gateway --workers 1 --server granian --interface asgi",
    ),
    ServerConfig(
        "gw-granian-2w", "gateway (granian RSGI, 2 workers)", "gateway",
        "durable-streams-gateway --workers 2 --server granian  (RSGI)",
    ),
    # The server's own floor for scenario d: granian (RSGI, uvloop, as the
    # console script runs it) with an app that stores nothing (bench/floor_app.py).
    ServerConfig(
        "floor-granian", "floor: do-nothing SSE app on granian RSGI", "gateway",
        "granian --interface rsgi --loop uvloop bench.floor_app:app", scenarios="d",
    ),
    # The granian CLI with its per-worker concurrency limit (--backpressure,
    # default backlog/workers = 1024) raised.
    # The primary configuration with DS_AUTH=jwt, beside gw-native-1w in one run:
    # what the trust boundary costs (clients send a token to every config then).
    ServerConfig(
        "gw-native-1w-jwt", "gateway (1 worker, DS_AUTH=jwt)", "gateway",
        "DS_AUTH=jwt durable-streams-gateway --workers 1  (its own server)",
    ),
    # The two halves of the telemetry A/B (issue: metrics and the request log
    # within 5% of both off): the primary configuration with both off, and with
    # metrics (on a port of their own) and the request log (to the bench's log
    # file) on.
    ServerConfig(
        "gw-native-1w-quiet", "gateway (1 worker, no metrics, no request log)", "gateway",
        "durable-streams-gateway --workers 1 --no-access-log",
    ),
    ServerConfig(
        "gw-native-1w-observed", "gateway (1 worker, metrics and request log)", "gateway",
        "durable-streams-gateway --workers 1 --metrics-port P  (request log on)",
    ),
    # The primary configuration at another commit, for same-run A/B comparisons
    # of a change (bench/run --baseline REV adds it).
    ServerConfig(
        "gw-baseline", "gateway (1 worker) at the baseline commit", "gateway",
        "durable-streams-gateway --workers 1  (its own server, from --baseline REV)",
    ),
    ServerConfig(
        "gw-granian-1w-bp", "gateway (granian CLI, 1 worker, backpressure 16384)", "gateway",
        "granian --interface asgi --workers 1 --backpressure 16384 gateway.main:app",
    ),
]  # fmt: skip
PRIMARY = "gw-native-1w"
BY_KEY = {c.key: c for c in [*CONFIGS, *EXTRA_CONFIGS]}
ALIASES = {
    "gateway": [PRIMARY],
    "gateways": ["gw-native-1w", "gw-granian-1w", "gw-hypercorn-1w", "gw-native-2w"],
    "node": ["node-mem", "node-file"],
    "all": [c.key for c in CONFIGS],
    "extra": [c.key for c in EXTRA_CONFIGS],
    "floor": ["floor-granian"],
}


def baseline_dir() -> Path:
    """The checkout of the baseline commit (prepare_baseline)."""
    path = os.environ.get("BENCH_BASELINE_DIR")
    if not path:
        raise RuntimeError("gw-baseline needs bench/run --baseline REV")
    return Path(path)


def prepare_baseline(rev: str) -> Path:
    """A detached worktree of ``rev`` with its own .venv holding that commit's
    gateway, reused when it exists (under bench/.baseline/<commit>)."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    target = ROOT / "bench" / ".baseline" / commit[:12]
    if not (target / ".git").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(target), commit],
            check=True,
        )
    venv = target / ".venv"
    if not (venv / "bin" / "durable-streams-gateway").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [venv / "bin" / "python", "-m", "pip", "install", "--quiet",
             "--disable-pip-version-check", str(target)],
            check=True,
        )  # fmt: skip
    os.environ["BENCH_BASELINE_DIR"] = str(target)
    return target


def select_configs(spec: str | None) -> list[ServerConfig]:
    if not spec:
        return list(CONFIGS)
    keys: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        expanded = ALIASES.get(item, [item])
        for key in expanded:
            if key not in BY_KEY:
                raise SystemExit(
                    f"unknown server config {key!r}; choose from {', '.join([*BY_KEY, *ALIASES])}"
                )
            if key not in keys:
                keys.append(key)
    return [BY_KEY[k] for k in keys]
