"""Exactly-once, in-order writes with the official client's IdempotentProducer,
through HAProxy in front of two gateway replicas.

``tests/conformance/idempotent-producer.mjs`` (Node, ``@durable-streams/client``)
writes N JSON messages ``{"i": k}`` with one producer (default maxInFlight 5 and
small batches, so several batches are in flight at once and, with round-robin
balancing, reach the two replicas in any order; the server answers a sequence gap
with 409 and the client retries), flushes, reads the stream back and reports what
it read. Every message must arrive exactly once and in order.

HAProxy comes from Debian (``scripts/test`` installs it as root); without it this
test fails with an install hint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from support.gateway_server import GatewayServer
from support.haproxy import HAPROXY_INSTALL_HINT, HAProxy, haproxy_binary
from support.redis_cluster import RedisCluster
from support.redis_server import RedisServer, redis7_binary, redis62_binary

CONFORMANCE_DIR = Path(__file__).resolve().parents[1] / "conformance"
SCRIPT = CONFORMANCE_DIR / "idempotent-producer.mjs"
MESSAGES = 3000
# Small batches: about 15 messages each, so about 200 batches for 3000 messages.
MAX_BATCH_BYTES = 128
SCRIPT_DEADLINE_S = 50  # the script's own deadline (reports its phase)
SUBPROCESS_TIMEOUT_S = 60  # ours, in case the script cannot even report

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["standalone", "cluster"])
def two_replicas(request: pytest.FixtureRequest) -> Iterator[str]:
    """Base URL of HAProxy in front of two gateways (DS_INSTANCE_ID a and b)."""
    if haproxy_binary() is None:
        pytest.fail(f"haproxy is not installed. {HAPROXY_INSTALL_HINT}")
    binary = redis7_binary() or redis62_binary()
    with ExitStack() as stack:
        if request.param == "cluster":
            url = stack.enter_context(RedisCluster(binary, masters=3)).url
            env = {"REDIS_URL": "", "REDIS_CLUSTER_URL": url}
        else:
            url = stack.enter_context(RedisServer(binary)).url
            env = {"REDIS_URL": url}
        gateways = [
            stack.enter_context(GatewayServer(redis_url=url, env={**env, "DS_INSTANCE_ID": name}))
            for name in ("a", "b")
        ]
        lb = stack.enter_context(HAProxy([("127.0.0.1", gw.port) for gw in gateways]))
        yield lb.url


def test_idempotent_producer_exactly_once_in_order(
    two_replicas: str, capsys: pytest.CaptureFixture[str]
) -> None:
    node = shutil.which("node")
    if node is None or not (CONFORMANCE_DIR / "node_modules" / "@durable-streams").is_dir():
        pytest.fail(
            f"node or @durable-streams/client missing: run scripts/test, or `npm ci` in "
            f"{CONFORMANCE_DIR}"
        )
    path = f"idempotent-producer-{time.monotonic_ns()}"
    started = time.monotonic()
    try:
        run = subprocess.run(
            [node, str(SCRIPT), two_replicas, str(MESSAGES), str(MAX_BATCH_BYTES), path],
            cwd=CONFORMANCE_DIR,
            env={
                **os.environ,
                "NO_COLOR": "1",
                "IDEMPOTENT_PRODUCER_DEADLINE_MS": str(SCRIPT_DEADLINE_S * 1000),
            },
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"idempotent-producer.mjs did not finish in {SUBPROCESS_TIMEOUT_S}s: {exc}")
    wall = time.monotonic() - started
    assert run.returncode == 0, (
        f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(f"\nidempotent producer via {two_replicas}: {json.dumps(result)} ({wall:.1f}s)")

    assert result["errors"] == [], result["errors"]
    assert result["written"] == MESSAGES
    assert result["missing"] == 0, result
    assert result["duplicates"] == 0, result
    assert result["read"] == MESSAGES, result
    assert result["inOrder"] is True, result
    # Both replicas took part; only successes and sequence-gap 409s (which the
    # client waits out and retries) were answered.
    assert set(result["instances"]) == {"a", "b"}, result["instances"]
    assert set(result["statuses"]) <= {"200", "204", "409"}, result["statuses"]

    # An independent read, in Python, through the load balancer.
    response = httpx.get(f"{two_replicas}/v1/stream/{path}", params={"offset": "-1"}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json() == [{"i": k} for k in range(MESSAGES)]
