"""The official Durable Streams conformance suite against the real gateway.

For each Redis version: a fresh redis-server, a gateway on it, then vitest runs
``tests/conformance/conformance.test.mjs`` (the npm package
``@durable-streams/server-conformance-tests``) against the gateway and we read
its JSON report. The 6 opt-in subscription tests stay off (reported skipped).

Redis 7 comes from Debian (``scripts/test`` installs it). Its absence fails the
run instead of skipping it, unless DS_SKIP_REDIS7=1 asks for a skip explicitly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from support.gateway_server import GatewayServer
from support.procs import tail
from support.redis_server import REDIS7_INSTALL_HINT, RedisServer, redis7_binary, redis62_binary

CONFORMANCE_DIR = Path(__file__).resolve().parents[1] / "conformance"
# Tests in @durable-streams/server-conformance-tests@0.3.6 without subscriptions.
EXPECTED_TESTS = 332
LONG_POLL_MS = 3000
# Below the pytest timeout so that a hung vitest is reported with its output.
VITEST_TIMEOUT_S = 780


def _binary_for(variant: str) -> str:
    if variant == "redis-6.2":
        return redis62_binary()
    binary = redis7_binary()
    if binary is None:
        if os.environ.get("DS_SKIP_REDIS7") == "1":
            pytest.skip("DS_SKIP_REDIS7=1: Redis 7 variant skipped on request")
        pytest.fail(f"no Redis >= 7 at /usr/bin/redis-server. {REDIS7_INSTALL_HINT}")
    return binary


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


@pytest.mark.conformance
@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", ["redis-6.2", "redis-7"])
def test_conformance(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    binary = _binary_for(variant)
    vitest = CONFORMANCE_DIR / "node_modules" / ".bin" / "vitest"
    if not vitest.exists() or shutil.which("npx") is None:
        pytest.fail(
            f"conformance runner not installed: run scripts/test, or `npm ci` in {CONFORMANCE_DIR}"
        )

    # Kept after the run (git-ignored) so a human can inspect it.
    report_path = CONFORMANCE_DIR / f"report-{variant}.json"
    log_path = CONFORMANCE_DIR / f"report-{variant}.log"
    report_path.unlink(missing_ok=True)

    with (
        RedisServer(binary) as redis,
        GatewayServer(
            redis_url=redis.url, env={"DS_LONG_POLL_TIMEOUT_MS": str(LONG_POLL_MS)}
        ) as gateway,
    ):
        env = {
            **os.environ,
            "CONFORMANCE_BASE_URL": gateway.url,
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
                    f"{tail(log_path)}\ngateway log {gateway.log_path}:\n{tail(gateway.log_path)}"
                )
        wall = time.monotonic() - started
        gateway_alive = gateway.alive()

    if not report_path.exists():
        pytest.fail(
            f"vitest exited {run.returncode} without a JSON report; output {log_path}:\n"
            f"{tail(log_path)}"
        )
    report = json.loads(report_path.read_text())
    passed = report["numPassedTests"]
    failed = report["numFailedTests"]
    skipped = report["numPendingTests"] + report.get("numTodoTests", 0)
    failures = _failures(report)

    summary = [
        f"conformance [{variant}, Redis {redis.version}]: {passed} passed, {failed} failed, "
        f"{skipped} skipped of {report['numTotalTests']} in {wall:.1f}s "
        f"(report {report_path}, gateway log {gateway.log_path})",
        *(f"  FAILED {name}" for name in failures),
    ]
    with capsys.disabled():  # show the totals even when the test passes
        print("\n" + "\n".join(summary))

    # The list of failing tests is printed above; keep the failure line short.
    if not gateway_alive:
        pytest.fail(
            f"the gateway died during the run; log {gateway.log_path}:\n{tail(gateway.log_path)}",
            pytrace=False,
        )
    if failed or failures:
        pytest.fail(f"{summary[0]}; failing tests are listed above", pytrace=False)
    if passed < EXPECTED_TESTS:
        pytest.fail(f"{summary[0]}; expected at least {EXPECTED_TESTS} passed", pytrace=False)
    if run.returncode != 0:
        pytest.fail(f"vitest exited {run.returncode}; output {log_path}", pytrace=False)
