"""The store with DS_WAIT_REPLICAS, on both clients (pipelined and redis-py),
against the session Redis, which has no replicas.

WAIT 0 is satisfied at once, so every write goes through the WAIT path and
succeeds; WAIT 1 can never be satisfied, so every write is Unavailable (a 503)
after its timeout, although the script did run. Whether WAIT really follows its
script on the same connection is checked with MONITOR in
tests/e2e/test_failover.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from support.store_reads import read_all, store_client

from gateway.protocol.errors import NotFound, Unavailable
from gateway.storage.client import ReplicaWait
from gateway.storage.models import AppendRequest, CreateRequest
from gateway.storage.resp import PipelinedClient
from gateway.storage.store import Store

pytestmark = pytest.mark.timeout(30)

TEXT = "text/plain"


def _append(body: bytes) -> AppendRequest:
    return AppendRequest(
        media_type=TEXT, body=body, json_count=None, close=False, stream_seq=None, producer=None
    )


def _create() -> CreateRequest:
    return CreateRequest(content_type=TEXT)


@pytest.fixture(params=["pipelined", "redis-py"])
async def client(
    request: pytest.FixtureRequest, redis_url: str, redis_client: aioredis.Redis
) -> AsyncIterator[object]:
    if request.param == "redis-py":
        yield store_client(redis_client)
        return
    pipelined = PipelinedClient(redis_url, connections=2, connect_timeout=1.0, command_timeout=2.0)
    try:
        yield pipelined
    finally:
        await pipelined.aclose()


async def _store(client: object, wait: ReplicaWait) -> Store:
    store = Store(client, "ds", 1024 * 1024, wait=wait)  # type: ignore[arg-type]
    await store.load_scripts()
    return store


async def test_writes_through_wait_behave_as_without_it(client: object) -> None:
    store = await _store(client, ReplicaWait(0, 100))
    created = await store.create("w/a", _create())
    assert created.created
    results = [await store.append("w/a", _append(b"x%d" % i)) for i in range(3)]
    assert [r.status for r in results] == ["ok"] * 3
    body, _ = await read_all(store, "w/a")
    assert body == b"x0x1x2"
    await store.delete("w/a")
    with pytest.raises(NotFound):
        await store.read("w/a", None)


async def test_a_script_cache_lost_is_reloaded_and_still_waited_for(
    client: object, redis_client: aioredis.Redis
) -> None:
    store = await _store(client, ReplicaWait(0, 100))
    await store.create("w/b", _create())
    await redis_client.script_flush()
    result = await store.append("w/b", _append(b"after flush"))
    assert result.status == "ok"
    body, _ = await read_all(store, "w/b")
    assert body == b"after flush"


async def test_too_few_replicas_make_every_write_unavailable(
    client: object, redis_client: aioredis.Redis
) -> None:
    store = await _store(client, ReplicaWait(1, 50))
    with pytest.raises(Unavailable):
        await store.create("w/c", _create())
    # The script ran: the stream exists, only the acknowledgement is missing.
    assert await redis_client.exists("ds:{w/c}:meta") == 1
    with pytest.raises(Unavailable):
        await store.append("w/c", _append(b"y"))
    with pytest.raises(Unavailable):
        await store.delete("w/c")
