"""Run the gateway as a real ``hypercorn`` subprocess for end-to-end tests.

Usage::

    with GatewayServer(redis_url=redis.url, env={"DS_LONG_POLL_TIMEOUT_MS": "3000"}) as gw:
        httpx.get(f"{gw.url}/v1/stream/foo")

Its stdout/stderr go to a log file (``.log_path``) that survives the run and is
named in every failure message.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from .procs import free_port, spawn, stop_process, tail

REPO_ROOT = Path(__file__).resolve().parents[2]


def _command(server: str, app: str, port: int, args: Sequence[str] = ()) -> list[str]:
    """How the gateway is started: ``hypercorn`` (the run contract's command),
    ``hypercorn-workers-0`` (hypercorn serving in its own process) or
    ``console-script`` (``durable-streams-gateway``: its own server, the default),
    ``console-script-rsgi`` (the console script on granian over RSGI) or
    ``console-script-asgi`` (granian over ASGI). ``args`` (console-script servers
    only) are appended to the console script's command line."""
    script = os.path.join(os.path.dirname(sys.executable), "durable-streams-gateway")
    common = [script, "--host", "127.0.0.1", "--port", str(port), "--app", app]
    if server == "console-script":
        return [*common, *args]
    if server in ("console-script-rsgi", "console-script-asgi"):
        interface = server.rsplit("-", 1)[1]
        return [*common, "--server", "granian", "--interface", interface, *args]
    if args:
        raise ValueError(f"args are for the console-script servers, not {server!r}")
    workers = ["--workers", "0"] if server == "hypercorn-workers-0" else []
    if server not in ("hypercorn", "hypercorn-workers-0"):
        raise ValueError(f"unknown server {server!r}")
    return [sys.executable, "-m", "hypercorn", *workers, app, "--bind", f"127.0.0.1:{port}"]


class GatewayServer:
    """The gateway on a free loopback port (``python -m hypercorn gateway.main:app``
    unless ``server`` says otherwise)."""

    def __init__(
        self,
        *,
        redis_url: str,
        env: Mapping[str, str] | None = None,
        app: str = "gateway.main:app",
        server: str = "hypercorn",
        start_timeout: float = 20.0,
        args: Sequence[str] = (),
        tls_ca: str | None = None,
    ) -> None:
        """``tls_ca``: the gateway serves HTTPS (its certificate and key come in
        ``args`` or ``env``) with a certificate this CA file signed; ``url`` then
        says https and the health check trusts that CA."""
        self.redis_url = redis_url
        self.extra_env = dict(env or {})
        self.app = app
        self.server = server
        self.start_timeout = start_timeout
        self.args = tuple(args)
        self.tls_ca = tls_ca
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="ds-gateway-")
        self.log_path = os.path.join(self.dir, "gateway.log")

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT`` (streams live under /v1/stream/)."""
        if self.port is None:
            raise RuntimeError("GatewayServer is not started")
        scheme = "https" if self.tls_ca else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the gateway's certificate (``tls_ca``)."""
        if self.tls_ca is None:
            raise RuntimeError("GatewayServer serves plain HTTP (no tls_ca)")
        return ssl.create_default_context(cafile=self.tls_ca)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> GatewayServer:
        self.port = free_port()
        env = {
            **os.environ,
            # A stray embedded Redis would hide a wrong REDIS_URL: always pass one,
            # and keep any data dir the gateway creates out of the work tree.
            "REDIS_URL": self.redis_url,
            "DS_DATA_DIR": os.path.join(self.dir, "data"),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        args = _command(self.server, self.app, self.port, self.args)
        self.proc = spawn(args, self.log_path, env=env, cwd=REPO_ROOT, append=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = "no answer yet"
        verify = self.ssl_context() if self.tls_ca else True
        with httpx.Client(timeout=1.0, verify=verify) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"gateway exited with code {self.proc.returncode} before /healthz "
                        f"answered; log {self.log_path}:\n{tail(self.log_path)}"
                    )
                try:
                    response = client.get(f"{self.url}/healthz")
                    if response.status_code == 200:
                        return
                    last = f"HTTP {response.status_code}: {response.text[:200]}"
                except httpx.TransportError as exc:
                    last = repr(exc)
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"gateway /healthz not 200 within {self.start_timeout}s ({last}); "
                        f"log {self.log_path}:\n{tail(self.log_path)}"
                    )
                time.sleep(0.05)  # poll interval, not a wait for readiness

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """Stop by pid: SIGTERM (graceful hypercorn shutdown), SIGKILL fallback.

        The log file is kept so that a failure after the run can still point at it.
        """
        if self.proc is None:
            return None
        code = stop_process(self.proc)
        self.proc = None
        return code

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"GatewayServer(url={self.url if self.port else None!r}, log={self.log_path!r})"
