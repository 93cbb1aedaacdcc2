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

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support.gateway_server import GatewayServer
from support.haproxy import HAPROXY_INSTALL_HINT, HAProxy, haproxy_binary
from support.live import eventually
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


@dataclass(frozen=True)
class Replicas:
    lb: str  # base URL of HAProxy in front of both
    a: GatewayServer
    b: GatewayServer


@pytest.fixture(scope="module", params=["standalone", "cluster"])
def replicas(request: pytest.FixtureRequest) -> Iterator[Replicas]:
    """HAProxy in front of two gateways (DS_INSTANCE_ID a and b), each of them
    also reachable directly."""
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
        yield Replicas(lb.url, *gateways)


@pytest.fixture
def two_replicas(replicas: Replicas) -> str:
    """Base URL of HAProxy in front of two gateways (DS_INSTANCE_ID a and b)."""
    return replicas.lb


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


# -- forced duplicate delivery across replicas ------------------------------------------------

JSON = {"content-type": "application/json"}


def _producer(producer_id: str, seq: int) -> dict[str, str]:
    return {"Producer-Id": producer_id, "Producer-Epoch": "0", "Producer-Seq": str(seq)}


def _batch(seq: int) -> list[dict[str, int]]:
    return [{"seq": seq, "k": k} for k in range(3)]


async def _create(http: httpx.AsyncClient, url: str) -> None:
    created = await http.put(url, headers=JSON)
    assert created.status_code == 201, created.text


async def test_one_producer_batch_sent_to_both_replicas_is_appended_once(
    replicas: Replicas,
) -> None:
    """Every batch of one producer goes to both replicas: at once (concurrently),
    a then b, and b then a. One delivery appends it (200), the other is
    acknowledged as a duplicate (204), and the stream holds each message once."""
    path = f"dup-both-{time.monotonic_ns()}"
    url_a = f"{replicas.a.url}/v1/stream/{path}"
    url_b = f"{replicas.b.url}/v1/stream/{path}"
    orders = ("concurrent", "a-then-b", "b-then-a")
    async with httpx.AsyncClient(timeout=30) as http:
        await _create(http, f"{replicas.lb}/v1/stream/{path}")

        async def send(url: str, seq: int) -> httpx.Response:
            return await http.post(
                url,
                content=json.dumps(_batch(seq)).encode(),
                headers={**JSON, **_producer("p-both", seq)},
            )

        for seq in range(30):
            order = orders[seq % len(orders)]
            if order == "concurrent":
                first, second = await asyncio.gather(send(url_a, seq), send(url_b, seq))
            elif order == "a-then-b":
                first, second = await send(url_a, seq), await send(url_b, seq)
            else:
                second, first = await send(url_b, seq), await send(url_a, seq)
            statuses = sorted([first.status_code, second.status_code])
            assert statuses == [200, 204], (order, seq, first.text, second.text)
            if order != "concurrent":
                # The first delivery appended it; the second was the duplicate.
                earlier = first if order == "a-then-b" else second
                assert earlier.status_code == 200, (order, seq)
        read = await http.get(url_b, params={"offset": "-1"})
    assert read.status_code == 200
    assert read.json() == [m for seq in range(30) for m in _batch(seq)]


async def _tail(http: httpx.AsyncClient, url: str) -> str:
    head = await http.head(url)
    assert head.status_code == 200, head.status_code
    return head.headers["stream-next-offset"]


async def test_a_write_whose_response_was_lost_is_retried_once_on_either_replica(
    replicas: Replicas,
) -> None:
    """The connection is cut (RST) after the gateway wrote the batch to Redis (the
    tail moved, seen through the other replica) but before the client read any
    response. The client retries the same (producer, epoch, seq) on the other
    replica and again on the first: both are acknowledged as duplicates (204),
    and the stream holds each message exactly once."""
    path = f"dup-cut-{time.monotonic_ns()}"
    url_a = f"{replicas.a.url}/v1/stream/{path}"
    url_b = f"{replicas.b.url}/v1/stream/{path}"
    async with httpx.AsyncClient(timeout=30) as http:
        await _create(http, url_a)
        for seq in range(10):
            # Alternate which replica takes the cut write.
            cut, other = (replicas.a, url_b) if seq % 2 == 0 else (replicas.b, url_a)
            same = url_a if other == url_b else url_b
            before = await _tail(http, other)
            body = json.dumps(_batch(seq)).encode()
            producer = _producer("p-cut", seq)
            head = "".join(f"{name}: {value}\r\n" for name, value in producer.items())
            reader, writer = await asyncio.open_connection("127.0.0.1", cut.port)
            writer.write(
                f"POST /v1/stream/{path} HTTP/1.1\r\nHost: t\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"{head}\r\n".encode()
                + body
            )
            await writer.drain()

            async def written(before: str = before, other: str = other) -> bool:
                return await _tail(http, other) != before

            await eventually(written, what=f"the write of seq {seq}")
            # Cut without reading a byte of the response: RST, not FIN.
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            del reader
            for retry_url in (other, same):
                retried = await http.post(
                    retry_url, content=body, headers={**JSON, **_producer("p-cut", seq)}
                )
                assert retried.status_code == 204, (seq, retry_url, retried.text)
                assert retried.headers["producer-seq"] == str(seq)
        read = await http.get(url_a, params={"offset": "-1"})
    assert read.status_code == 200
    assert read.json() == [m for seq in range(10) for m in _batch(seq)]
