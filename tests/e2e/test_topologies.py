"""Multi-replica topologies: two gateways behind HAProxy, on standalone Redis and
on a 3-master Redis Cluster.

The conformance suite runs on the same topologies (tests/e2e/test_conformance.py);
these tests check what it cannot see:

* requests really alternate between the replicas (``X-DS-Instance``, echoed by the
  gateway when ``DS_INSTANCE_ID`` is set, and HAProxy's own ``X-LB-Server``);
* a replica's live read is woken by an append made through the other replica;
* in a cluster, streams spread over every master, and a fork whose source lives
  on another master reads across the boundary and cleans up both sides.

HAProxy comes from Debian (``scripts/test`` installs it as root); without it these
tests fail with an install hint.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import httpx
import pytest
from support.gateway_server import GatewayServer
from support.haproxy import HAPROXY_INSTALL_HINT, HAProxy, haproxy_binary
from support.live import parked_sync
from support.redis_cluster import RedisCluster
from support.redis_server import RedisServer, redis7_binary, redis62_binary

from gateway.storage.keys import stream_keys

pytestmark = pytest.mark.timeout(90)

LONG_POLL_MS = 10_000
GATEWAY_ENV = {"DS_LONG_POLL_TIMEOUT_MS": str(LONG_POLL_MS)}
INSTANCES = ("a", "b")
TEXT = {"content-type": "text/plain"}


@dataclass
class Topology:
    lb: HAProxy
    gateways: dict[str, GatewayServer]  # by DS_INSTANCE_ID
    redis_nodes: list[str]  # the URL of every Redis node
    cluster: RedisCluster | None = None

    @property
    def url(self) -> str:
        return self.lb.url


def _start(stack: ExitStack, *, cluster: bool) -> Topology:
    if haproxy_binary() is None:
        pytest.fail(f"haproxy is not installed. {HAPROXY_INSTALL_HINT}")
    binary = redis7_binary() or redis62_binary()
    redis_cluster = None
    if cluster:
        redis_cluster = stack.enter_context(RedisCluster(binary, masters=3))
        url = redis_cluster.url
        nodes = [f"redis://{host}:{port}/0" for host, port in redis_cluster.nodes]
        # An empty REDIS_URL reads as unset: the gateway must use the cluster alone.
        env = {**GATEWAY_ENV, "REDIS_URL": "", "REDIS_CLUSTER_URL": url}
    else:
        url = stack.enter_context(RedisServer(binary)).url
        nodes = [url]
        env = {**GATEWAY_ENV, "REDIS_URL": url}
    gateways = {
        name: stack.enter_context(GatewayServer(redis_url=url, env={**env, "DS_INSTANCE_ID": name}))
        for name in INSTANCES
    }
    lb = stack.enter_context(HAProxy([("127.0.0.1", gw.port) for gw in gateways.values()]))
    return Topology(lb=lb, gateways=gateways, redis_nodes=nodes, cluster=redis_cluster)


@pytest.fixture(scope="module")
def standalone() -> Iterator[Topology]:
    with ExitStack() as stack:
        yield _start(stack, cluster=False)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Topology]:
    with ExitStack() as stack:
        yield _start(stack, cluster=True)


@pytest.fixture(params=["standalone", "cluster"])
def topology(request: pytest.FixtureRequest) -> Topology:
    return request.getfixturevalue(request.param)


def _unique(name: str) -> str:
    return f"topo/{name}-{time.monotonic_ns()}"


# -- (a) requests alternate between the replicas ----------------------------------------


def test_replicas_echo_their_instance_id(standalone: Topology) -> None:
    path = _unique("instance")
    with httpx.Client(timeout=5) as client:
        created = client.put(f"{standalone.url}/v1/stream/{path}", headers=TEXT)
        assert created.status_code == 201, created.text
        for name, gateway in standalone.gateways.items():
            for response in (
                client.head(f"{gateway.url}/v1/stream/{path}"),
                client.get(f"{gateway.url}/v1/stream/{path}", params={"offset": "-1"}),
                client.get(f"{gateway.url}/v1/stream/{path}-missing"),  # an error response
            ):
                assert response.headers.get("x-ds-instance") == name, (
                    f"gateway started with DS_INSTANCE_ID={name} must answer with "
                    f"X-DS-Instance: {name}; {response.request.method} {response.url} "
                    f"got {response.status_code} with headers {dict(response.headers)}"
                )


def test_requests_on_one_connection_alternate_replicas(topology: Topology) -> None:
    """One keep-alive client connection, 20 stream requests: a, b, a, b, ..."""
    path = _unique("alternate")
    stream = f"{topology.url}/v1/stream/{path}"
    instances: list[str | None] = []
    lb_servers: list[str | None] = []
    with httpx.Client(timeout=10, limits=httpx.Limits(max_connections=1)) as client:
        responses = [client.put(stream, headers=TEXT)]
        responses += [client.post(stream, content=f"{i};", headers=TEXT) for i in range(9)]
        responses += [client.get(stream, params={"offset": "-1"}) for _ in range(10)]
        for response in responses:
            assert response.status_code in (200, 201, 204), response.text
            instances.append(response.headers.get("x-ds-instance"))
            lb_servers.append(response.headers.get("x-lb-server"))
        # Every replica sees every append: the last read has all of them.
        assert responses[-1].text == "".join(f"{i};" for i in range(9))

    # HAProxy's own view: strictly alternating servers.
    assert all(lb_servers), lb_servers
    assert all(a != b for a, b in itertools.pairwise(lb_servers)), lb_servers
    # The gateways' view: the same alternation, by DS_INSTANCE_ID.
    assert set(instances) == set(INSTANCES), (
        f"X-DS-Instance missing or wrong (gateway must echo DS_INSTANCE_ID): {instances}"
    )
    assert all(a != b for a, b in itertools.pairwise(instances)), instances
    # HAProxy's log: all 20 requests came over one client connection (one source port).
    clients = _lb_clients(topology.lb, path, expected=len(responses))
    assert len(clients) == 1, clients


def _lb_clients(lb: HAProxy, path: str, expected: int) -> set[str]:
    """Client ``ip:port`` of each HAProxy log line for ``path`` (once all are logged)."""
    deadline = time.monotonic() + 5
    while True:
        with open(lb.log_path) as log:
            lines = [line for line in log if f"/v1/stream/{path}" in line]
        if len(lines) >= expected or time.monotonic() > deadline:
            assert len(lines) == expected, f"{len(lines)} log lines for {path} in {lb.log_path}"
            return {line.split()[0] for line in lines}
        time.sleep(0.05)  # poll interval: HAProxy logs each request when it ends


def test_live_read_on_one_replica_wakes_on_append_through_the_other(
    topology: Topology,
) -> None:
    """A long-poll held by replica a returns as soon as replica b takes an append."""
    a, b = topology.gateways["a"], topology.gateways["b"]
    path = _unique("wake")
    with httpx.Client(timeout=10) as client:
        created = client.put(f"{a.url}/v1/stream/{path}", headers=TEXT)
        assert created.status_code == 201, created.text
        offset = created.headers["stream-next-offset"]

        result: dict[str, object] = {}

        def long_poll() -> None:
            started = time.monotonic()
            with httpx.Client(timeout=LONG_POLL_MS / 1000 + 5) as poller:
                response = poller.get(
                    f"{a.url}/v1/stream/{path}", params={"offset": offset, "live": "long-poll"}
                )
            result["response"] = response
            result["elapsed"] = time.monotonic() - started

        thread = threading.Thread(target=long_poll)
        thread.start()
        # Only replica a has a reader of this fresh stream: a subscription of its
        # wake channel (on any node) is replica a's, and means the reader waits.
        parked_sync(topology.redis_nodes, path)
        assert thread.is_alive(), "the long-poll answered before there was data"
        appended = client.post(f"{b.url}/v1/stream/{path}", content="hello", headers=TEXT)
        assert appended.status_code == 204, appended.text
        thread.join(LONG_POLL_MS / 1000 + 10)
        assert not thread.is_alive()

    response = result["response"]
    assert isinstance(response, httpx.Response)
    assert response.status_code == 200, (response.status_code, response.text)
    assert response.text == "hello"
    assert response.headers.get("x-ds-instance") == "a"
    # Woken, not timed out: well below the long-poll timeout.
    assert result["elapsed"] < LONG_POLL_MS / 1000 - 1, result["elapsed"]


# -- (b) and (c): Redis Cluster -------------------------------------------------------


def _owner(topology: Topology, path: str) -> tuple[str, int]:
    assert topology.cluster is not None
    return topology.cluster.slot_owner(stream_keys("ds", path).meta)


def _exists(topology: Topology, path: str) -> dict[str, int]:
    """EXISTS of each of the stream's keys, asked of the node that owns them."""
    assert topology.cluster is not None
    keys = stream_keys("ds", path)
    with topology.cluster.node_client(_owner(topology, path)) as node:
        return {
            "meta": node.exists(keys.meta),
            "data": node.exists(keys.data),
            "producers": node.exists(keys.producers),
        }


def test_cluster_streams_spread_over_every_master(cluster: Topology) -> None:
    assert cluster.cluster is not None
    paths = [_unique(f"spread-{i}") for i in range(30)]
    owners: dict[tuple[str, int], list[str]] = {node: [] for node in cluster.cluster.nodes}
    with httpx.Client(timeout=10) as client:
        for path in paths:
            stream = f"{cluster.url}/v1/stream/{path}"
            assert client.put(stream, headers=TEXT).status_code == 201
            assert client.post(stream, content=path, headers=TEXT).status_code == 204
            owners[_owner(cluster, path)].append(path)
        for path in paths:
            assert client.get(f"{cluster.url}/v1/stream/{path}?offset=-1").text == path

    assert all(owners.values()), {node: len(p) for node, p in owners.items()}
    # Each stream's keys really are on the node CLUSTER SLOTS names.
    for node, node_paths in owners.items():
        with cluster.cluster.node_client(node) as redis_node:
            for path in node_paths:
                keys = stream_keys("ds", path)
                assert redis_node.exists(keys.meta, keys.data) == 2, (node, path)


def _paths_on_different_masters(topology: Topology) -> tuple[str, str]:
    source = _unique("fork-src")
    for i in range(100):
        fork = f"{source}-fork-{i}"
        if _owner(topology, fork) != _owner(topology, source):
            return source, fork
    raise AssertionError("no fork path on another master within 100 tries")


def test_cluster_fork_across_masters(cluster: Topology) -> None:
    assert cluster.cluster is not None
    source, fork = _paths_on_different_masters(cluster)
    src_url = f"{cluster.url}/v1/stream/{source}"
    fork_url = f"{cluster.url}/v1/stream/{fork}"
    src_meta = stream_keys("ds", source).meta
    src_node = _owner(cluster, source)

    def refs() -> int:
        with cluster.cluster.node_client(src_node) as node:
            return int(node.hget(src_meta, "refs") or 0)

    with httpx.Client(timeout=10) as client:
        assert client.put(src_url, headers=TEXT).status_code == 201
        assert client.post(src_url, content="hello ", headers=TEXT).status_code == 204
        second = client.post(src_url, content="world", headers=TEXT)
        assert second.status_code == 204
        fork_offset = second.headers["stream-next-offset"]
        # Appended after the fork point: the fork must not see it.
        assert client.post(src_url, content=" (later)", headers=TEXT).status_code == 204

        created = client.put(
            fork_url,
            headers={
                **TEXT,
                "stream-forked-from": f"/v1/stream/{source}",
                "stream-fork-offset": fork_offset,
            },
        )
        assert created.status_code == 201, created.text
        assert client.post(fork_url, content="!", headers=TEXT).status_code == 204

        # Reads stitch the source's part (one master) to the fork's (another),
        # through both replicas.
        for _ in range(4):
            read = client.get(fork_url, params={"offset": "-1"})
            assert read.status_code == 200, read.text
            assert read.text == "hello world!"
        assert client.get(src_url, params={"offset": "-1"}).text == "hello world (later)"
        assert refs() == 1

        # Deleting the source while the fork lives: soft delete.
        assert client.delete(src_url).status_code == 204
        for _ in range(2):  # both replicas
            assert client.get(src_url, params={"offset": "-1"}).status_code == 410
            assert client.head(src_url).status_code == 410
            read = client.get(fork_url, params={"offset": "-1"})
            assert (read.status_code, read.text) == (200, "hello world!")
        assert _exists(cluster, source)["meta"] == 1, "soft-deleted source must keep its data"
        assert refs() == 1

        # Deleting the fork releases the source, which goes too.
        assert client.delete(fork_url).status_code == 204
        assert client.get(fork_url, params={"offset": "-1"}).status_code == 404
        assert _exists(cluster, fork) == {"meta": 0, "data": 0, "producers": 0}
        assert _exists(cluster, source) == {"meta": 0, "data": 0, "producers": 0}
        assert client.get(src_url, params={"offset": "-1"}).status_code == 404
