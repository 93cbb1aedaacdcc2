"""Failover: the master dies (SIGKILL by pid) under a producer appending
continuously through the gateway.

Behind Sentinel (a master, two replicas, three sentinels) and on Redis Cluster
(three masters with two replicas each), with and without DS_WAIT_REPLICAS=1,
the master killed outright ("kill") or after its replicas lost their link to
it ("cut-then-kill": it acknowledges alone for CUT_S first):
- while no master serves the stream, every write gets a 503 with Retry-After
  (never a 500, never a hang), and the gateway follows the promotion by itself;
  a second gateway's long-poll is then woken through pub/sub;
- with DS_WAIT_REPLICAS=1, every acknowledged append is read back afterwards;
- without it, acknowledged appends may be lost (replication is asynchronous):
  how many is measured and printed (``-s``), not asserted.
Two replicas per master, because after a failover the promoted replica must
itself have a replica for a write to be acknowledged with DS_WAIT_REPLICAS=1.
And a forced Sentinel failover with the old master alive (a partition): the
losses measured, with WAIT too, which narrows the window but cannot close it.

Plus DS_WAIT_REPLICAS without a failover: no replica means 503, never a 2xx;
WAIT follows each script run on its own connection (MONITOR); and WAIT costs
one command per group-commit run, none when it is unset.

Select with ``-m failover``. DS_FAILOVER_RUNS=N repeats each failover N times
(to measure the loss window; the figures are in deploy/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest
import redis
from support.gateway_server import GatewayServer
from support.redis_cluster import RedisCluster
from support.redis_sentinel import SentinelGroup
from support.redis_server import RedisServer, redis7_binary, redis62_binary

pytestmark = [pytest.mark.failover, pytest.mark.timeout(180)]

BINARY = redis7_binary() or redis62_binary()
RUNS = int(os.environ.get("DS_FAILOVER_RUNS", "1"))
PRODUCERS = 8
# Appends acknowledged before the kill, and after the gateway recovered.
BEFORE_KILL = 300
AFTER_RECOVERY = 100
# Generous: Sentinel needs down-after (1 s) plus an election; a loaded 2-core
# machine stretches both.
RECOVERY_DEADLINE_S = 45.0
# How long the master acknowledges alone before it dies (cut-then-kill).
CUT_S = 0.5
# A second gateway serving a long-poll across the failover.
READER_ENV = {"DS_LONG_POLL_TIMEOUT_MS": "20000"}
# Replicas sync at once rather than after the default 5 s diskless-sync delay.
FAST_SYNC = ("--repl-diskless-sync-delay", "0")
GATEWAY_ENV = {"DS_REDIS_COMMAND_TIMEOUT_MS": "2000", "DS_REDIS_CONNECT_TIMEOUT_MS": "1000"}


@dataclass
class Produced:
    """What the producers saw."""

    acked: dict[str, float] = field(default_factory=dict)  # message id -> ack time
    acked_after_settled: int = 0  # of requests sent after settled_at
    statuses: Counter[int] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    kill_at: float | None = None
    settled_at: float | None = None  # the failover is over (or: kill_at)
    first_ok_after_kill: float | None = None  # of a request sent after the kill
    max_latency_s: float = 0.0


async def _produce(
    client: httpx.AsyncClient, url: str, name: str, out: Produced, stop: asyncio.Event
) -> None:
    number = 0
    while not stop.is_set():
        number += 1
        message_id = f"{name}-{number}"
        sent = time.monotonic()
        try:
            response = await client.post(
                url,
                content=orjson.dumps({"id": message_id}),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:  # a hang (timeout) or a dropped connection
            out.unexpected.append(f"{message_id}: {exc!r}")
            continue
        now = time.monotonic()
        out.max_latency_s = max(out.max_latency_s, now - sent)
        out.statuses[response.status_code] += 1
        if response.status_code in (200, 204):
            out.acked[message_id] = now
            if out.kill_at is not None and sent > out.kill_at and out.first_ok_after_kill is None:
                out.first_ok_after_kill = now
            if out.settled_at is not None and sent > out.settled_at:
                out.acked_after_settled += 1
        elif response.status_code == 503 and response.headers.get("retry-after"):
            # A client would wait Retry-After; a short pause measures the window finer.
            await asyncio.sleep(0.05)
        else:
            out.unexpected.append(
                f"{message_id}: {response.status_code} {dict(response.headers)} {response.text}"
            )
            await asyncio.sleep(0.05)


async def _wait_for(predicate, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s}s: {what}")
        await asyncio.sleep(0.05)  # poll interval, not a wait for readiness


async def _read_all(client: httpx.AsyncClient, url: str) -> set[str]:
    """Every message id in the stream, read page by page from the start."""
    ids: set[str] = set()
    offset = "-1"
    for _ in range(10_000):
        response = await client.get(url, params={"offset": offset})
        assert response.status_code == 200, response.text
        ids.update(message["id"] for message in response.json())
        offset = response.headers["stream-next-offset"]
        if "stream-up-to-date" in response.headers:
            return ids
    raise AssertionError("stream never up to date")


async def _failover_run(
    base: str, path: str, fail: Callable[[], object], settled: Callable[[], bool] | None = None
) -> tuple[Produced, set[str]]:
    """Producers append to ``path`` until BEFORE_KILL acks; ``fail()`` runs;
    they go on until ``settled()`` (polled; at once if None) and then until
    AFTER_RECOVERY appends sent after that were acknowledged."""
    url = f"{base}/v1/stream/{path}"
    out = Produced()
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=15.0) as client:
        created = await client.put(url, headers={"Content-Type": "application/json"})
        assert created.status_code == 201, created.text
        producers = [
            asyncio.create_task(_produce(client, url, f"p{i}", out, stop)) for i in range(PRODUCERS)
        ]
        try:
            await _wait_for(lambda: len(out.acked) >= BEFORE_KILL, 30, "appends before the kill")
            await asyncio.to_thread(fail)
            out.kill_at = time.monotonic()
            if settled is not None:
                deadline = out.kill_at + RECOVERY_DEADLINE_S
                while not await asyncio.to_thread(settled):
                    assert time.monotonic() < deadline, "the failover never settled"
                    await asyncio.sleep(0.1)  # poll interval
            out.settled_at = time.monotonic()
            await _wait_for(
                lambda: out.acked_after_settled >= AFTER_RECOVERY or out.unexpected,
                RECOVERY_DEADLINE_S,
                f"the gateway recovering after the kill ({out.statuses})",
            )
        finally:
            stop.set()
            await asyncio.gather(*producers)
        stored = await _read_all(client, url)
    return out, stored


def _report(label: str, run: int, out: Produced, stored: set[str]) -> list[str]:
    lost = sorted(set(out.acked) - stored, key=out.acked.__getitem__)
    assert out.kill_at is not None and out.first_ok_after_kill is not None
    # When the lost appends were acknowledged, relative to the failure (ms).
    window = [(out.acked[message_id] - out.kill_at) * 1000 for message_id in lost]
    print(
        f"\nFAILOVER {label} run {run}: acked {len(out.acked)}, lost {len(lost)} acked "
        f"(acked {min(window, default=0):+.0f}..{max(window, default=0):+.0f} ms from the "
        f"failure), writes unavailable {out.first_ok_after_kill - out.kill_at:.2f} s, "
        f"statuses {dict(out.statuses)}, slowest answer {out.max_latency_s:.2f} s"
    )
    assert not out.unexpected, out.unexpected[:5]
    assert set(out.statuses) <= {200, 204, 503}, out.statuses
    # Never a hang: every answer within the command timeout plus a margin.
    assert out.max_latency_s < 10, out.max_latency_s
    return lost


async def _woken_across_gateways(reader: str, writer: str, path: str) -> None:
    """A long-poll on ``reader`` (another process, whose wake-up listener lived
    through the failover) answers an append made on ``writer`` with its data:
    the wake-up came through Redis pub/sub on the new topology, well before
    the long-poll's timeout."""
    url = f"{{}}/v1/stream/{path}"
    async with httpx.AsyncClient(timeout=30.0) as client:
        for _ in range(100):
            # Its first requests after the failover may meet the dead master: 503.
            head = await client.head(url.format(reader))
            if head.status_code != 503:
                break
            assert head.headers["retry-after"]
            await asyncio.sleep(0.1)
        assert head.status_code == 200, head.status_code
        tail = head.headers["stream-next-offset"]
        poll = asyncio.create_task(
            client.get(url.format(reader), params={"offset": tail, "live": "long-poll"})
        )
        await asyncio.sleep(0.5)  # the long-poll is waiting (a 204 would take 20 s)
        started = time.monotonic()
        appended = await client.post(
            url.format(writer),
            content=orjson.dumps({"id": "after-failover"}),
            headers={"Content-Type": "application/json"},
        )
        assert appended.status_code == 204, appended.text
        response = await poll
        assert response.status_code == 200, response.text
        assert response.json() == [{"id": "after-failover"}]
        assert time.monotonic() - started < 10


def _assert_clean_log(gateway: GatewayServer) -> None:
    """Redis failing is no client's fault and no bug: no ERROR line, no traceback."""
    log = Path(gateway.log_path).read_text()
    assert "Traceback" not in log and "[ERROR]" not in log, log[-3000:]


# -- Sentinel ------------------------------------------------------------------------


def _kill_sentinel_master(group: SentinelGroup) -> None:
    address = group.master_address()
    assert address is not None
    os.kill(group.server_at(address[1]).pid, signal.SIGKILL)


def _cut_replication_then_kill(
    master: tuple[str, int], master_pid: int, replica_pids: list[int]
) -> None:
    """The replicas lose their link (stopped, their connections closed by the
    master), the master goes on alone for CUT_S, then dies: what a broken
    replication link followed by a crash does. What the master acknowledged
    alone is lost; with DS_WAIT_REPLICAS it acknowledged nothing."""
    for pid in replica_pids:
        os.kill(pid, signal.SIGSTOP)  # they cannot reconnect meanwhile
    try:
        with redis.Redis(*master, socket_timeout=2) as client:
            client.execute_command("CLIENT", "KILL", "TYPE", "replica")
        time.sleep(CUT_S)  # the length of the window, not a wait for a state
        os.kill(master_pid, signal.SIGKILL)
    finally:
        for pid in replica_pids:
            os.kill(pid, signal.SIGCONT)


def _cut_sentinel_replication_then_kill(group: SentinelGroup) -> None:
    address = group.master_address()
    assert address is not None
    replicas = [server.pid for server in group.servers if server.port != address[1]]
    _cut_replication_then_kill(address, group.server_at(address[1]).pid, replicas)


FAILURES = {"kill": _kill_sentinel_master, "cut-then-kill": _cut_sentinel_replication_then_kill}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("wait_replicas", [1, 0], ids=["wait-1", "no-wait"])
async def test_sentinel_failover_is_followed_and_with_wait_loses_nothing(
    wait_replicas: int, failure: str
) -> None:
    for run in range(RUNS):
        with SentinelGroup(BINARY, replicas=2) as group:
            env = {
                **GATEWAY_ENV,
                "REDIS_SENTINELS": group.sentinels_env,
                "REDIS_SENTINEL_MASTER": group.name,
                "DS_WAIT_REPLICAS": str(wait_replicas),
            }
            with (
                GatewayServer(redis_url="", env=env, server="console-script") as gateway,
                GatewayServer(redis_url="", env={**env, **READER_ENV}) as reader,
            ):
                out, stored = await _failover_run(
                    gateway.url, "failover/sentinel", lambda: FAILURES[failure](group)
                )
                lost = _report(f"sentinel {failure} wait={wait_replicas}", run, out, stored)
                if wait_replicas:
                    assert not lost, f"acknowledged appends lost with WAIT: {lost[:10]}"
                await _woken_across_gateways(reader.url, gateway.url, "failover/sentinel")
                _assert_clean_log(gateway)
                _assert_clean_log(reader)


def _role(server: RedisServer) -> str:
    try:
        with redis.Redis.from_url(server.url, socket_timeout=2) as client:
            return str(client.info("replication")["role"])
    except redis.exceptions.RedisError:
        return "unreachable"


@pytest.mark.parametrize("wait_replicas", [1, 0], ids=["wait-1", "no-wait"])
async def test_sentinel_forced_failover_with_the_old_master_alive(wait_replicas: int) -> None:
    """SENTINEL FAILOVER promotes a replica while the old master still runs:
    what a partition that leaves the gateway on the old master's side does.
    The old master takes writes until Sentinel turns it into a replica (which
    drops them); WAIT does not protect these, as the old master's other replica
    acknowledges them before it is moved too. Measured, not asserted; asserted:
    no 500, no hang, the gateway ends up on the new master."""
    for run in range(RUNS):
        with SentinelGroup(BINARY, replicas=2) as group:
            env = {
                **GATEWAY_ENV,
                "REDIS_SENTINELS": group.sentinels_env,
                "REDIS_SENTINEL_MASTER": group.name,
                "DS_WAIT_REPLICAS": str(wait_replicas),
            }
            old = group.master
            assert old is not None

            def force() -> None:
                with group.sentinels[0].client() as sentinel:
                    sentinel.execute_command("SENTINEL", "FAILOVER", group.name)

            with (
                GatewayServer(redis_url="", env=env, server="console-script") as gateway,
                GatewayServer(redis_url="", env={**env, **READER_ENV}) as reader,
            ):
                out, stored = await _failover_run(
                    gateway.url,
                    "failover/forced",
                    force,
                    settled=lambda old=old: _role(old) == "slave",
                )
                _report(f"sentinel forced wait={wait_replicas}", run, out, stored)
                address = group.master_address()
                assert address is not None and address[1] != old.port
                await _woken_across_gateways(reader.url, gateway.url, "failover/forced")
                _assert_clean_log(gateway)
                _assert_clean_log(reader)


# -- Redis Cluster ------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["kill", "cut-then-kill"])
@pytest.mark.parametrize("wait_replicas", [1, 0], ids=["wait-1", "no-wait"])
async def test_cluster_failover_is_followed_and_with_wait_loses_nothing(
    wait_replicas: int, failure: str
) -> None:
    path = "failover/cluster"
    for run in range(RUNS):
        with RedisCluster(BINARY, masters=3, replicas=2, node_timeout_ms=1000) as cluster:
            owner = cluster.slot_owner(f"ds:{{{path}}}:meta")
            env = {
                **GATEWAY_ENV,
                "DS_WAIT_REPLICAS": str(wait_replicas),
                "REDIS_CLUSTER_URL": cluster.url,
            }
            with (
                GatewayServer(redis_url="", env=env, server="console-script") as gateway,
                GatewayServer(redis_url="", env={**env, **READER_ENV}) as reader,
            ):
                if failure == "kill":
                    fail = functools.partial(os.kill, cluster.pid_of(owner), signal.SIGKILL)
                else:
                    replicas = [cluster.pid_of(node) for node in cluster.replicas_of(owner)]
                    assert len(replicas) == 2
                    fail = functools.partial(
                        _cut_replication_then_kill, owner, cluster.pid_of(owner), replicas
                    )
                out, stored = await _failover_run(gateway.url, path, fail)
                lost = _report(f"cluster {failure} wait={wait_replicas}", run, out, stored)
                if wait_replicas:
                    assert not lost, f"acknowledged appends lost with WAIT: {lost[:10]}"
                assert cluster.slot_owner(f"ds:{{{path}}}:meta") != owner
                await _woken_across_gateways(reader.url, gateway.url, path)
                _assert_clean_log(gateway)
                _assert_clean_log(reader)


# -- WAIT without a failover ----------------------------------------------------------


def _command_calls(url: str) -> Counter[str]:
    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    return Counter({name: int(value["calls"]) for name, value in stats.items()})


async def test_wait_without_enough_replicas_is_503_never_2xx() -> None:
    with RedisServer(BINARY, extra_args=FAST_SYNC) as master, RedisServer(BINARY) as replica:
        env = {**GATEWAY_ENV, "DS_WAIT_REPLICAS": "1", "DS_WAIT_TIMEOUT_MS": "200"}
        with GatewayServer(redis_url=master.url, env=env, server="console-script") as gateway:
            url = f"{gateway.url}/v1/stream/failover/no-replica"
            async with httpx.AsyncClient(timeout=10.0) as client:
                created = await client.put(url, headers={"Content-Type": "text/plain"})
                assert created.status_code == 503 and created.headers["retry-after"]
                # The create ran on the master; only its acknowledgement is missing.
                created = await client.put(url, headers={"Content-Type": "text/plain"})
                assert created.status_code == 503
                appended = await client.post(
                    url, content=b"x", headers={"Content-Type": "text/plain"}
                )
                assert appended.status_code == 503 and appended.headers["retry-after"]

                with redis.Redis.from_url(replica.url) as direct:
                    direct.replicaof("127.0.0.1", master.port)
                    for _ in range(200):
                        if direct.info("replication").get("master_link_status") == "up":
                            break
                        await asyncio.sleep(0.05)  # poll interval
                appended = await client.post(
                    url, content=b"y", headers={"Content-Type": "text/plain"}
                )
                assert appended.status_code == 204, appended.text
                deleted = await client.delete(url)
                assert deleted.status_code == 204
            _assert_clean_log(gateway)


@pytest.mark.parametrize("wait_replicas", [0, 1], ids=["unset", "wait-1"])
async def test_wait_is_one_command_per_commit_run_and_none_when_unset(wait_replicas: int) -> None:
    with RedisServer(BINARY, extra_args=FAST_SYNC) as master, RedisServer(BINARY) as replica:
        with redis.Redis.from_url(replica.url) as direct:
            direct.replicaof("127.0.0.1", master.port)
        env = {**GATEWAY_ENV, "DS_WAIT_REPLICAS": str(wait_replicas)}
        with GatewayServer(redis_url=master.url, env=env, server="console-script") as gateway:
            url = f"{gateway.url}/v1/stream/failover/cost"
            async with httpx.AsyncClient(timeout=10.0) as client:
                await _wait_for_status(client, url)
                before = _command_calls(master.url)
                appends = 400
                results = await asyncio.gather(
                    *(
                        client.post(url, content=b"x", headers={"Content-Type": "text/plain"})
                        for _ in range(appends)
                    )
                )
                assert [r.status_code for r in results] == [204] * appends
                calls = _command_calls(master.url) - before
        runs = calls["cmdstat_evalsha"]
        print(f"\nWAIT cost wait={wait_replicas}: {appends} appends, {dict(calls)}")
        assert 0 < runs <= appends
        if wait_replicas:
            # One WAIT per script run: per group-commit run, however many appends
            # it holds (how many runs the appends need depends on their timing).
            assert calls["cmdstat_wait"] == runs
        else:
            assert calls["cmdstat_wait"] == 0


async def _wait_for_status(client: httpx.AsyncClient, url: str) -> None:
    """Create the stream once the replica's link is up (with WAIT, until then: 503)."""
    for _ in range(200):
        response = await client.put(url, headers={"Content-Type": "text/plain"})
        if response.status_code in (200, 201):
            return
        assert response.status_code == 503, response.text
        await asyncio.sleep(0.05)  # poll interval
    raise AssertionError("stream not created")


class _Monitor:
    """Redis MONITOR on one server, in a thread: (client, command name) in order,
    until an ``ECHO`` of its stop marker comes by."""

    STOP = "monitor-stop"

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.client = redis.Redis(host=host, port=port, socket_timeout=30)
        self.seen: list[tuple[str, str]] = []
        self._monitor = self.client.monitor()
        self._monitor.__enter__()  # MONITOR is on before the first append
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            command = self._monitor.next_command()
            if command["client_address"] == "lua":
                continue  # the commands a script runs
            name, _, rest = command["command"].partition(" ")
            if name.upper() == "ECHO" and self.STOP in rest:
                return
            self.seen.append(
                (f"{command['client_address']}:{command['client_port']}", name.upper())
            )

    def stop(self) -> list[tuple[str, str]]:
        with redis.Redis(host=self.address[0], port=self.address[1]) as other:
            other.echo(self.STOP)
        self._thread.join(timeout=20)
        assert not self._thread.is_alive()
        self._monitor.__exit__()
        self.client.close()
        return self.seen


@pytest.mark.parametrize("topology", ["standalone", "sentinel", "cluster"])
async def test_wait_follows_each_script_run_on_its_connection(topology: str) -> None:
    """WAIT counts the replicas that have what its own connection wrote: each
    script run (creates and deletes included) is followed by a WAIT from the
    same client, before any other command of that client."""
    path = "failover/monitored"
    with contextlib.ExitStack() as stack:
        env = {**GATEWAY_ENV, "DS_WAIT_REPLICAS": "1"}
        if topology == "standalone":
            master = stack.enter_context(RedisServer(BINARY, extra_args=FAST_SYNC))
            replica = stack.enter_context(RedisServer(BINARY))
            with redis.Redis.from_url(replica.url) as direct:
                direct.replicaof("127.0.0.1", master.port)
            redis_url, watched = master.url, ("127.0.0.1", master.port)
        elif topology == "sentinel":
            group = stack.enter_context(SentinelGroup(BINARY, replicas=1))
            env |= {"REDIS_SENTINELS": group.sentinels_env, "REDIS_SENTINEL_MASTER": group.name}
            redis_url, watched = "", group.master_address()
        else:
            cluster = stack.enter_context(
                RedisCluster(BINARY, masters=3, replicas=1, node_timeout_ms=2000)
            )
            env["REDIS_CLUSTER_URL"] = cluster.url
            redis_url, watched = "", cluster.slot_owner(f"ds:{{{path}}}:meta")
        assert watched is not None
        gateway = stack.enter_context(
            GatewayServer(redis_url=redis_url, env=env, server="console-script")
        )
        url = f"{gateway.url}/v1/stream/{path}"
        async with httpx.AsyncClient(timeout=10.0) as client:
            await _wait_for_status(client, url)  # until the replica is in sync
            monitor = _Monitor(*watched)
            try:
                results = await asyncio.gather(
                    *(
                        client.post(url, content=b"x", headers={"Content-Type": "text/plain"})
                        for _ in range(100)
                    )
                )
                deleted = await client.delete(url)
            finally:
                seen = await asyncio.to_thread(monitor.stop)
        assert [r.status_code for r in results] == [204] * 100
        assert deleted.status_code == 204
    by_client: dict[str, list[str]] = {}
    for client_id, name in seen:
        by_client.setdefault(client_id, []).append(name)
    scripts = 0
    for names in by_client.values():
        for index, name in enumerate(names):
            if name in ("EVALSHA", "EVAL"):
                scripts += 1
                assert names[index + 1 : index + 2] == ["WAIT"], names[index : index + 5]
    waits = sum(names.count("WAIT") for names in by_client.values())
    assert scripts >= 2 and waits == scripts, by_client
