"""Run a real HAProxy in front of several gateway replicas for end-to-end tests.

Usage::

    with GatewayServer(...) as a, GatewayServer(...) as b:
        with HAProxy([("127.0.0.1", a.port), ("127.0.0.1", b.port)]) as lb:
            httpx.get(f"{lb.url}/v1/stream/foo")

HAProxy comes from Debian's ``haproxy`` package (``scripts/test`` installs it as
root). Its configuration (see :func:`render_config`) is written to a temp dir
together with its log (``.log_path``, one line per request, named in failures).

Choices, each checked against HAProxy 2.6's behaviour:

* ``balance roundrobin`` with ``option http-server-close``: HAProxy parses and
  balances every request of a client's keep-alive connection and opens a fresh
  server connection per request, so consecutive requests on one client
  connection alternate between the replicas (verified empirically; plain
  ``http-keep-alive`` alternates too on 2.6, but a fresh server connection also
  avoids the race where a replica closes an idle reused connection just as a
  request is sent on it).
* Every response gets ``X-LB-Server: <server name>`` (``s0``, ``s1``, ...), so
  tests can tell which replica answered without help from the gateway.
* No replays: ``retry-on conn-failure`` only retries when the TCP connection to
  a replica could not be established, i.e. before a single byte of the request
  was sent; there are no layer-7 retries (``retry-on`` response conditions),
  so a POST is never sent twice. ``option redispatch`` only applies to those
  connection retries.
* Long-lived responses (long-poll, SSE) are streamed as they come (HAProxy does
  not buffer responses) and outlive their lifetime on the gateway: ``timeout
  client``/``server``/``tunnel`` are 120 s by default.
* Health checks: ``option httpchk GET /healthz`` every second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence

import httpx

from .procs import free_port, spawn, stop_process, tail

HAPROXY_INSTALL_HINT = (
    "HAProxy is needed for the multi-replica tests: run scripts/test (it installs it as "
    "root), or `apt-get update && apt-get install -y haproxy` then `service haproxy stop`."
)


def haproxy_binary() -> str | None:
    """Path of the ``haproxy`` binary, or None when it is not installed."""
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None,
    )


def render_config(
    port: int,
    backends: Sequence[tuple[str, int]],
    *,
    timeout_s: int = 120,
    check_interval_ms: int = 1000,
) -> str:
    servers = "\n".join(
        f"    server s{i} {host}:{bport} check inter {check_interval_ms}ms fall 2 rise 1"
        for i, (host, bport) in enumerate(backends)
    )
    return f"""\
global
    maxconn 4096
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    option http-server-close
    timeout connect 2s
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout queue 5s
    # Longer than any long-poll or SSE lifetime the tests configure.
    timeout client {timeout_s}s
    timeout server {timeout_s}s
    timeout tunnel {timeout_s}s
    timeout client-fin 5s
    timeout server-fin 5s
    # Retry only when the connection to a replica could not be established: the
    # request was not sent then, so nothing (in particular no POST) is replayed.
    retries 2
    retry-on conn-failure
    option redispatch 1

frontend ds
    bind 127.0.0.1:{port}
    default_backend gateways

backend gateways
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    http-response set-header X-LB-Server %[srv_name]
{servers}
"""


class HAProxy:
    """``haproxy -f cfg -db`` on a free loopback port, balancing over ``backends``."""

    def __init__(
        self,
        backends: Sequence[tuple[str, int]],
        *,
        timeout_s: int = 120,
        start_timeout: float = 15.0,
        binary: str | None = None,
    ) -> None:
        if not backends:
            raise ValueError("HAProxy needs at least one backend")
        self.backends = [(host, int(port)) for host, port in backends]
        self.timeout_s = timeout_s
        self.start_timeout = start_timeout
        self.binary = binary or haproxy_binary()
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="ds-haproxy-")
        self.config_path = os.path.join(self.dir, "haproxy.cfg")
        self.log_path = os.path.join(self.dir, "haproxy.log")

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("HAProxy is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> HAProxy:
        if self.binary is None:
            raise RuntimeError(f"haproxy is not installed. {HAPROXY_INSTALL_HINT}")
        last_error: Exception | None = None
        try:
            for _ in range(3):  # a free port can be taken before HAProxy binds it
                try:
                    self._start_once(free_port())
                    return self
                except _PortLost as exc:
                    last_error = exc
            raise RuntimeError(f"haproxy could not bind a free port: {last_error}")
        except BaseException:
            self.stop()
            raise

    def _start_once(self, port: int) -> None:
        self.port = port
        with open(self.config_path, "w") as fh:
            fh.write(render_config(port, self.backends, timeout_s=self.timeout_s))
        args = [self.binary, "-f", self.config_path, "-db"]
        self.proc = spawn(args, self.log_path, cwd=self.dir, append=True)
        self._wait_proxying()

    def _wait_proxying(self) -> None:
        """Until ``/healthz`` through HAProxy answers 200 from every backend."""
        deadline = time.monotonic() + self.start_timeout
        seen: set[str] = set()
        wanted = {f"s{i}" for i in range(len(self.backends))}
        last = "no answer yet"
        with httpx.Client(timeout=1.0) as client:
            while True:
                if self.proc.poll() is not None:
                    log_text = tail(self.log_path)
                    self.proc = None
                    if "cannot bind socket" in log_text or "Address already in use" in log_text:
                        raise _PortLost(f"port {self.port} taken")
                    raise RuntimeError(f"haproxy exited early; log {self.log_path}:\n{log_text}")
                try:
                    response = client.get(f"{self.url}/healthz")
                    if response.status_code == 200:
                        seen.add(response.headers.get("x-lb-server", ""))
                        if wanted <= seen:
                            return
                    last = f"HTTP {response.status_code}; answered so far by {sorted(seen)}"
                except httpx.TransportError as exc:
                    last = repr(exc)
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"haproxy did not proxy /healthz to all of {sorted(wanted)} within "
                        f"{self.start_timeout}s ({last}); log {self.log_path}:\n"
                        f"{tail(self.log_path)}"
                    )
                time.sleep(0.05)  # poll interval, not a wait for readiness

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop by pid (SIGTERM, SIGKILL fallback); the temp dir and log are kept."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        url = self.url if self.port else None
        return f"HAProxy(url={url!r}, backends={self.backends!r}, log={self.log_path!r})"


class _PortLost(Exception):
    """The probed port was taken before HAProxy could bind it."""
