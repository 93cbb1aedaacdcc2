"""Retention (max age, max bytes) against a real redis-server.

``gateway.store.Store`` driven directly; what Redis holds afterwards (the data's
entries, meta ``b``, ``trim`` and ``first``) is checked against what reads
return: a trimmed stream is one contiguous range after ``trim``, reads before
it are Gone, ``-1`` starts at it, and sources that forks read keep everything.
What the trims remove is counted in ``durable_streams_retention_trimmed_entries_total``,
checked against the entries gone from Redis.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from support.store_reads import read_all, store_client

from gateway import metrics
from gateway.protocol import jsonmode
from gateway.protocol import offsets as off
from gateway.protocol.errors import BadRequest, Conflict, Gone
from gateway.storage.models import AppendRequest, CreateRequest
from gateway.storage.store import Store

pytestmark = pytest.mark.timeout(60)

OCTET = "application/octet-stream"
JSON = "application/json"


def make_store(redis_client: aioredis.Redis, retention: tuple[int, int] = (0, 0)) -> Store:
    return Store(store_client(redis_client), "ds", 1024 * 1024, retention=retention)


@pytest.fixture
async def store(redis_client: aioredis.Redis) -> Store:
    s = make_store(redis_client)
    await s.load_scripts()
    return s


@pytest.fixture
def process_metrics() -> metrics.Metrics:
    """Metrics on, as ``DS_METRICS`` turns them on. ``enable`` makes the metric
    objects once per process (their names are registered in prometheus_client's
    global registry), so they stay on for the rest of the session."""
    return metrics.enable()


@pytest.fixture
def trimmed_total(process_metrics: metrics.Metrics) -> Callable[[], float]:
    """Reads the retention counter as a scrape would; tests compare differences."""

    def value() -> float:
        return REGISTRY.get_sample_value(TRIMMED_TOTAL) or 0.0

    return value


TRIMMED_TOTAL = "durable_streams_retention_trimmed_entries_total"


def data(body: bytes) -> AppendRequest:
    return AppendRequest(OCTET, body, None, False, None, None)


async def append_all(store: Store, path: str, bodies: list[bytes]) -> list[str]:
    """Append one by one (each its own script run); the offsets in order."""
    return [(await store.append(path, data(b))).tail for b in bodies]


async def entries(redis_client: aioredis.Redis, path: str) -> list[tuple[str, bytes]]:
    raw = await redis_client.xrange(f"ds:{{{path}}}:data")
    return [(entry_id.decode(), fields[b"d"]) for entry_id, fields in raw]


async def meta(redis_client: aioredis.Redis, path: str) -> dict[str, str]:
    raw = await redis_client.hgetall(f"ds:{{{path}}}:meta")
    return {k.decode(): v.decode() for k, v in raw.items()}


def body(i: int, size: int = 100) -> bytes:
    return f"{i:06d}".encode().ljust(size, b".")


async def test_max_bytes_trims_the_head_and_keeps_the_byte_count_exact(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("s", CreateRequest(OCTET, retention_max_bytes=1000))
    bodies = [body(i) for i in range(100)]
    offsets = await append_all(store, "s", bodies)

    kept = await entries(redis_client, "s")
    # Trimming starts past the limit plus a sixteenth and trims back to the limit.
    assert sum(len(d) for _, d in kept) <= 1000 + 1000 // 16
    assert len(kept) < 100
    # What is left is the newest appends, contiguous, and meta agrees with it.
    assert [d for _, d in kept] == bodies[-len(kept) :]
    m = await meta(redis_client, "s")
    assert int(m["b"]) == sum(len(d) for _, d in kept)
    assert off.from_entry_id(m["trim"]) == offsets[-len(kept) - 1]

    everything, _ = await read_all(store, "s", off.BEGINNING)
    assert everything == b"".join(bodies[-len(kept) :])
    # The offset of the last trimmed entry is still valid: the reader has all before it.
    at_boundary, _ = await read_all(store, "s", offsets[-len(kept) - 1])
    assert at_boundary == everything
    with pytest.raises(Gone, match="earliest retained position"):
        await store.read("s", offsets[-len(kept) - 2])
    with pytest.raises(Gone):
        await store.read("s", off.ZERO)


async def test_max_bytes_never_trims_the_newest_entry(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("big", CreateRequest(OCTET, retention_max_bytes=100))
    await append_all(store, "big", [b"a" * 500, b"b" * 500])
    assert [d for _, d in await entries(redis_client, "big")] == [b"b" * 500]
    page = await store.read("big", off.BEGINNING)
    assert page.body == b"b" * 500


async def test_max_age_trims_entries_older_than_the_limit(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("aged", CreateRequest(OCTET, retention_max_age=1))
    old = await append_all(store, "aged", [b"old-1", b"old-2", b"old-3"])
    # Appends trim once the oldest entry is past the age (plus a sixteenth):
    # keep appending until the old entries are gone.
    deadline = time.monotonic() + 15
    while (await entries(redis_client, "aged"))[0][1].startswith(b"old"):
        assert time.monotonic() < deadline, "old entries were never trimmed"
        await store.append("aged", data(b"new"))
        await asyncio.sleep(0.05)
    now_ms = int(time.time() * 1000)
    for entry_id, _ in await entries(redis_client, "aged"):
        assert now_ms - int(entry_id.split("-")[0]) < 1000 + 62 + 500
    with pytest.raises(Gone):
        await store.read("aged", old[1])
    page = await store.read("aged", off.BEGINNING)
    assert page.body.startswith(b"new") and b"old" not in page.body
    m = await meta(redis_client, "aged")
    assert int(m["b"]) == sum(len(d) for _, d in await entries(redis_client, "aged"))


async def test_the_server_default_applies_to_streams_without_their_own(
    redis_client: aioredis.Redis,
) -> None:
    store = make_store(redis_client, retention=(0, 500))
    await store.load_scripts()
    await store.create("default", CreateRequest(OCTET))
    await store.create("forever", CreateRequest(OCTET, retention_max_bytes=0))
    for path in ("default", "forever"):
        await append_all(store, path, [body(i) for i in range(30)])
    assert len(await entries(redis_client, "default")) <= 5
    assert len(await entries(redis_client, "forever")) == 30
    info = await store.head("default")
    assert (info.retention_max_bytes, info.retention_max_age) == (500, None)
    assert (await store.head("forever")).retention_max_bytes is None


async def test_put_compares_retention_as_it_applies(redis_client: aioredis.Redis) -> None:
    store = make_store(redis_client, retention=(3600, 0))
    await store.load_scripts()
    first = await store.create("p", CreateRequest(OCTET, retention_max_bytes=4096))
    assert first.created
    again = await store.create("p", CreateRequest(OCTET, retention_max_bytes=4096))
    assert not again.created
    # The server default is what an unset max age means, so naming it is no change.
    same = CreateRequest(OCTET, retention_max_age=3600, retention_max_bytes=4096)
    assert not (await store.create("p", same)).created
    for different in (
        CreateRequest(OCTET),
        CreateRequest(OCTET, retention_max_bytes=8192),
        CreateRequest(OCTET, retention_max_age=60, retention_max_bytes=4096),
        CreateRequest(OCTET, retention_max_age=0, retention_max_bytes=4096),
    ):
        with pytest.raises(Conflict):
            await store.create("p", different)


async def test_a_stream_far_over_its_limit_is_trimmed_a_batch_per_run(
    redis_client: aioredis.Redis,
) -> None:
    unlimited = make_store(redis_client)
    await unlimited.load_scripts()
    await unlimited.create("burst", CreateRequest(OCTET))
    await append_all(unlimited, "burst", [body(i, 10) for i in range(1000)])
    # The operator sets a default: the next appends bring the stream back
    # within it, at most 128 entries per script run.
    limited = make_store(redis_client, retention=(0, 100))
    await limited.load_scripts()
    await limited.append("burst", data(body(1000, 10)))
    assert len(await entries(redis_client, "burst")) == 1001 - 128
    for i in range(1001, 1020):
        await limited.append("burst", data(body(i, 10)))
    kept = await entries(redis_client, "burst")
    assert sum(len(d) for _, d in kept) <= 100
    assert [d for _, d in kept] == [body(i, 10) for i in range(1020 - len(kept), 1020)]
    assert int((await meta(redis_client, "burst"))["b"]) == sum(len(d) for _, d in kept)


async def test_json_stream_reads_from_the_earliest_retained_message(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("j", CreateRequest(JSON, retention_max_bytes=200))
    for i in range(40):
        messages = jsonmode.flatten(json.dumps([{"n": i}]).encode(), allow_empty=False)
        await store.append(
            "j", AppendRequest(JSON, jsonmode.join(messages), len(messages), False, None, None)
        )
    page = await store.read("j", off.BEGINNING)
    values = [m["n"] for m in json.loads(b"[" + page.body + b"]")]
    assert values == list(range(40 - len(values), 40))
    assert 0 < len(values) < 40


async def test_a_source_that_forks_read_is_not_trimmed_until_they_go(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("src", CreateRequest(OCTET, retention_max_bytes=500))
    bodies = [body(i) for i in range(20)]
    offsets = await append_all(store, "src", bodies)
    trimmed = len(bodies) - len(await entries(redis_client, "src"))
    assert trimmed > 0
    fork_at = offsets[-3]
    await store.create("f", CreateRequest("", fork_source="src", fork_offset=fork_at))
    more = [body(i) for i in range(20, 60)]
    await append_all(store, "src", more)
    # Pinned: nothing more was trimmed, and the fork reads its whole inherited range.
    assert len(await entries(redis_client, "src")) == len(bodies) + len(more) - trimmed
    inherited, _ = await read_all(store, "f", off.BEGINNING)
    assert inherited == b"".join(bodies[trimmed:-2])
    with pytest.raises(Gone):
        await read_all(store, "f", off.ZERO)  # before the source's earliest
    # A fork offset before the earliest retained entry is refused.
    with pytest.raises(BadRequest, match="earliest retained"):
        await store.create("f2", CreateRequest("", fork_source="src", fork_offset=off.ZERO))

    await store.delete("f")
    await store.append("src", data(body(60)))
    kept = await entries(redis_client, "src")
    assert len(kept) < len(bodies) + len(more) - trimmed
    assert int((await meta(redis_client, "src"))["b"]) == sum(len(d) for _, d in kept)


async def test_a_fork_trims_its_own_entries_and_reads_from_its_own_earliest(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("base", CreateRequest(OCTET))
    base = await append_all(store, "base", [b"base-1", b"base-2"])
    await store.create("child", CreateRequest("", fork_source="base", retention_max_bytes=300))
    own = await append_all(store, "child", [body(i) for i in range(10)])
    kept = await entries(redis_client, "child")
    assert 0 < len(kept) < 10
    everything, _ = await read_all(store, "child", off.BEGINNING)
    assert everything == b"".join(body(i) for i in range(10 - len(kept), 10))
    with pytest.raises(Gone):
        await store.read("child", base[0])  # inherited range, before the fork's earliest
    page = await store.read("child", own[-len(kept) - 1])
    assert page.body.startswith(body(10 - len(kept)))
    # The source is untouched.
    assert [d for _, d in await entries(redis_client, "base")] == [b"base-1", b"base-2"]


async def test_the_largest_entry_size_comes_down_after_it_is_trimmed(
    store: Store, redis_client: aioredis.Redis
) -> None:
    """read.lua sizes pages from meta mx: after retention trims the largest
    entry, mx follows the retained entries down (within two trims)."""
    await store.create("mx", CreateRequest(OCTET, retention_max_bytes=2000))
    await append_all(store, "mx", [b"L" * 1500])
    sizes_seen = []
    for i in range(60):
        await store.append("mx", data(body(i)))
        m = await meta(redis_client, "mx")
        kept = await entries(redis_client, "mx")
        # Always an upper bound of what is retained, and b exact.
        assert int(m["mx"]) >= max(len(d) for _, d in kept)
        assert int(m["b"]) == sum(len(d) for _, d in kept)
        sizes_seen.append(int(m["mx"]))
    assert sizes_seen[0] == 1500
    assert sizes_seen[-1] == 100
    page = await store.read("mx", off.BEGINNING, large=True)
    assert page.body == b"".join(d for _, d in await entries(redis_client, "mx"))


async def test_age_and_size_limits_apply_together(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("both", CreateRequest(OCTET, retention_max_age=1, retention_max_bytes=1000))
    await append_all(store, "both", [body(i) for i in range(30)])
    assert sum(len(d) for _, d in await entries(redis_client, "both")) <= 1000 + 1000 // 16
    # Then age: the size-trimmed survivors go once they are old enough.
    deadline = time.monotonic() + 15
    while any(d.startswith(b"0000") for _, d in await entries(redis_client, "both")):
        assert time.monotonic() < deadline, "old entries were never trimmed by age"
        await store.append("both", data(b"fresh"))
        await asyncio.sleep(0.05)
    kept = await entries(redis_client, "both")
    assert all(d == b"fresh" for _, d in kept)
    m = await meta(redis_client, "both")
    assert int(m["b"]) == sum(len(d) for _, d in kept)
    assert int(m["mx"]) >= max(len(d) for _, d in kept)
    everything, _ = await read_all(store, "both", off.BEGINNING)
    assert everything == b"".join(d for _, d in kept)


async def test_every_entry_a_size_trim_removes_is_counted(
    store: Store, redis_client: aioredis.Redis, trimmed_total: Callable[[], float]
) -> None:
    await store.create("counted", CreateRequest(OCTET, retention_max_bytes=1000))
    before = trimmed_total()
    # 30-byte entries: each trim (over 1000 + 62 bytes, back to 1000) removes
    # several, so a count of trims would not pass for a count of entries.
    await append_all(store, "counted", [body(i, 30) for i in range(100)])
    left = await redis_client.xlen("ds:{counted}:data")
    assert left < 100
    assert trimmed_total() - before == 100 - left


async def test_a_batch_trimmed_from_a_stream_far_over_its_limit_is_counted(
    redis_client: aioredis.Redis, trimmed_total: Callable[[], float]
) -> None:
    unlimited = make_store(redis_client)
    await unlimited.load_scripts()
    await unlimited.create("far", CreateRequest(OCTET))
    await append_all(unlimited, "far", [body(i, 10) for i in range(300)])
    limited = make_store(redis_client, retention=(0, 100))
    await limited.load_scripts()
    before = trimmed_total()
    await limited.append("far", data(body(300, 10)))
    assert await redis_client.xlen("ds:{far}:data") == 301 - 128
    assert trimmed_total() - before == 128


async def test_one_run_reports_the_sum_of_its_streams_trims(
    store: Store,
    redis_client: aioredis.Redis,
    process_metrics: metrics.Metrics,
    trimmed_total: Callable[[], float],
) -> None:
    paths = ["sum-a", "sum-b", "sum-c"]
    for path in paths:
        await store.create(path, CreateRequest(OCTET, retention_max_bytes=1000))
        # At the limit, not over it by the slack: nothing is trimmed yet.
        await append_all(store, path, [body(i) for i in range(10)])
    assert all([await redis_client.xlen(f"ds:{{{p}}}:data") == 10 for p in paths])
    before = trimmed_total()
    process_metrics.flush()
    runs_before = REGISTRY.get_sample_value("durable_streams_group_commit_batch_appends_count")

    # Three appends to each stream in one event-loop turn: one script run,
    # after which each stream is over its limit and trimmed.
    await asyncio.gather(
        *(store.append(path, data(body(10 + i))) for path in paths for i in range(3))
    )

    process_metrics.flush()
    runs = REGISTRY.get_sample_value("durable_streams_group_commit_batch_appends_count")
    assert runs is not None and runs_before is not None and runs - runs_before == 1
    gone = [13 - await redis_client.xlen(f"ds:{{{p}}}:data") for p in paths]
    assert all(g > 0 for g in gone)
    assert trimmed_total() - before == sum(gone)


async def test_every_entry_an_age_trim_removes_is_counted(
    store: Store, redis_client: aioredis.Redis, trimmed_total: Callable[[], float]
) -> None:
    await store.create("aged", CreateRequest(OCTET, retention_max_age=1))
    before = trimmed_total()
    await append_all(store, "aged", [body(i) for i in range(20)])
    appended = 20
    deadline = time.monotonic() + 15
    while any(d.startswith(b"0000") for _, d in await entries(redis_client, "aged")):
        assert time.monotonic() < deadline, "old entries were never trimmed by age"
        await store.append("aged", data(b"fresh"))
        appended += 1
        await asyncio.sleep(0.05)
    left = await redis_client.xlen("ds:{aged}:data")
    assert trimmed_total() - before == appended - left >= 20
