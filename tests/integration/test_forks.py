"""Stream forking (protocol section 4.2) against a real redis-server.

Mostly ``gateway.store.Store`` driven directly, with Redis inspected afterwards
(reference counts, soft-delete flags, key existence and expiry); a few tests go
through the real gateway where the behaviour lives in the HTTP layer.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import redis.asyncio as aioredis
from support.live import parked
from support.store_reads import read_all, store_client

from gateway.protocol import jsonmode
from gateway.protocol import offsets as off
from gateway.protocol.errors import BadRequest, Conflict, Gone, NotFound
from gateway.protocol.headers import Producer
from gateway.storage.models import AppendRequest, CreateRequest
from gateway.storage.store import Store

pytestmark = pytest.mark.timeout(30)

OCTET = "application/octet-stream"
JSON = "application/json"


@pytest.fixture
async def store(redis_client: aioredis.Redis) -> Store:
    s = Store(store_client(redis_client), "ds", 1024 * 1024)
    await s.load_scripts()
    return s


def data(body: bytes, media_type: str = OCTET, close: bool = False) -> AppendRequest:
    return AppendRequest(media_type, body, None, close, None, None)


def json_data(body: bytes) -> AppendRequest:
    messages = jsonmode.flatten(body, allow_empty=False)
    return AppendRequest(JSON, jsonmode.join(messages), len(messages), False, None, None)


def fork(
    source: str,
    offset: str | None = None,
    sub: int | None = None,
    content_type: str = "",
    **kw: object,
) -> CreateRequest:
    return CreateRequest(
        content_type, fork_source=source, fork_offset=offset, fork_sub_offset=sub, **kw
    )  # type: ignore[arg-type]


async def refs(client: aioredis.Redis, store: Store, path: str) -> int:
    raw = await client.hget(store.keys(path).meta, "refs")
    return int(raw or 0)


async def keys_exist(client: aioredis.Redis, store: Store, path: str) -> int:
    k = store.keys(path)
    return await client.exists(k.meta, k.data, k.producers)


async def source_with_three_entries(store: Store, path: str = "src") -> list[str]:
    """A source holding b"aaa", b"bbb", b"ccc"; returns the tail after each."""
    await store.create(path, CreateRequest(OCTET))
    return [(await store.append(path, data(chunk))).tail for chunk in (b"aaa", b"bbb", b"ccc")]


# -- fork points -----------------------------------------------------------------------


async def test_fork_at_zero_mid_and_tail(store: Store, redis_client: aioredis.Redis) -> None:
    o1, o2, o3 = await source_with_three_entries(store)

    await store.create("f-zero", fork("src", off.ZERO))
    await store.create("f-mid", fork("src", o2))
    tail_fork = await store.create("f-tail", fork("src"))  # no offset: the source's tail
    assert tail_fork.tail == o3
    assert await refs(redis_client, store, "src") == 3

    assert (await read_all(store, "f-zero"))[0] == b""
    assert (await read_all(store, "f-mid"))[0] == b"aaabbb"
    assert (await read_all(store, "f-tail"))[0] == b"aaabbbccc"
    # Forks share the source's offsets up to the fork point.
    assert (await store.read("f-mid", o1)).body == b"bbb"
    assert (await store.read("f-mid", o2)).body == b""
    assert (await store.head("f-mid")).tail == o2

    # Appends diverge: the fork continues after the fork offset, the source is untouched.
    mine = await store.append("f-mid", data(b"XYZ"))
    assert mine.tail > o2
    await store.append("src", data(b"ddd"))
    assert (await read_all(store, "f-mid"))[0] == b"aaabbbXYZ"
    assert (await store.read("f-mid", o1)).body == b"bbbXYZ"
    assert (await read_all(store, "src"))[0] == b"aaabbbcccddd"
    assert (await read_all(store, "f-zero"))[0] == b""
    # The fork's content type is inherited.
    assert (await store.head("f-mid")).content_type == OCTET


async def test_fork_offset_beyond_the_tail_is_rejected_without_a_reference(
    store: Store, redis_client: aioredis.Redis
) -> None:
    _, _, o3 = await source_with_three_entries(store)
    ms, _, seq = o3.partition("_")
    beyond = ms + "_" + str(int(seq) + 1).zfill(16)
    with pytest.raises(BadRequest):
        await store.create("f", fork("src", beyond))
    with pytest.raises(NotFound):
        await store.create("f", fork("missing"))
    with pytest.raises(BadRequest):
        await store.create("src", fork("src"))  # a stream cannot fork itself
    assert await refs(redis_client, store, "src") == 0
    assert await keys_exist(redis_client, store, "f") == 0


async def test_closed_source_forks_open(store: Store) -> None:
    await store.create("src", CreateRequest(OCTET, closed=True, entries=((b"final", None),)))
    result = await store.create("f", fork("src"))
    assert not result.closed
    await store.append("f", data(b"+more"))
    assert (await read_all(store, "f"))[0] == b"final+more"


async def test_fork_does_not_inherit_producer_or_stream_seq_state(store: Store) -> None:
    await store.create("src", CreateRequest(OCTET))
    await store.append("src", AppendRequest(OCTET, b"a", None, False, "m", Producer("p", 3, 0)))
    await store.create("f", fork("src"))
    # Epoch 0 < 3 and Stream-Seq "a" < "m" are both fine on the fork.
    result = await store.append(
        "f", AppendRequest(OCTET, b"b", None, False, "a", Producer("p", 0, 0))
    )
    assert (result.status, result.producer_epoch) == ("ok", "0")


# -- sub-offsets ----------------------------------------------------------------------------


async def test_byte_sub_offsets(store: Store, redis_client: aioredis.Redis) -> None:
    o1, _, o3 = await source_with_three_entries(store)

    await store.create("f2", fork("src", o1, sub=2))
    assert (await read_all(store, "f2"))[0] == b"aaabb"
    await store.create("f0", fork("src", o1, sub=0))  # 0 is the same as no sub-offset
    assert (await read_all(store, "f0"))[0] == b"aaa"
    await store.create("f-full", fork("src", off.ZERO, sub=3))  # the whole next entry
    assert (await read_all(store, "f-full"))[0] == b"aaa"
    assert await refs(redis_client, store, "src") == 3

    # The fork goes on after the inherited part.
    await store.append("f2", data(b"!"))
    assert (await read_all(store, "f2"))[0] == b"aaabb!"
    # The source is untouched.
    assert (await read_all(store, "src"))[0] == b"aaabbbccc"

    # Past the next entry, or at the tail (no next entry): 400, no reference kept.
    for bad in ((o1, 4), (o3, 1)):
        with pytest.raises(BadRequest):
            await store.create("bad", fork("src", bad[0], sub=bad[1]))
    # A sub-offset needs an explicit offset.
    with pytest.raises(BadRequest):
        await store.create("bad", fork("src", None, sub=1))
    assert await refs(redis_client, store, "src") == 3
    assert await keys_exist(redis_client, store, "bad") == 0
    # Idempotent re-creation of a sub-offset fork.
    again = await store.create("f2", fork("src", o1, sub=2))
    assert not again.created
    assert await refs(redis_client, store, "src") == 3


async def test_json_sub_offsets_count_messages(store: Store, redis_client: aioredis.Redis) -> None:
    await store.create("src", CreateRequest(JSON))
    first = await store.append("src", json_data(b'[{"m": 1}, {"m": 2}, {"m": 3}]'))
    await store.append("src", json_data(b'{"m": 4}'))

    await store.create("f", fork("src", off.ZERO, sub=2))
    body, _ = await read_all(store, "f")
    assert json.loads(b"[" + body + b"]") == [{"m": 1}, {"m": 2}]
    await store.append("f", json_data(b'["fork"]'))
    body, _ = await read_all(store, "f")
    assert json.loads(b"[" + body + b"]") == [{"m": 1}, {"m": 2}, "fork"]

    await store.create("g", fork("src", first.tail, sub=1))
    body, _ = await read_all(store, "g")
    assert json.loads(b"[" + body + b"]") == [{"m": 1}, {"m": 2}, {"m": 3}, {"m": 4}]

    with pytest.raises(BadRequest):
        await store.create("bad", fork("src", off.ZERO, sub=4))  # the entry holds 3
    assert await refs(redis_client, store, "src") == 2


# -- chains, soft delete and garbage collection ------------------------------------------------


async def test_three_level_chain_reads_and_cascading_gc(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("a", CreateRequest("text/plain"))
    a1 = (await store.append("a", data(b"a1.", "text/plain"))).tail
    await store.append("a", data(b"a2.", "text/plain"))
    await store.create("b", fork("a", a1))
    b1 = (await store.append("b", data(b"b1.", "text/plain"))).tail
    await store.append("b", data(b"b2.", "text/plain"))
    await store.create("c", fork("b", b1))
    await store.append("c", data(b"c1.", "text/plain"))

    assert (await read_all(store, "c"))[0] == b"a1.b1.c1."
    assert (await store.read("c", a1)).body == b"b1.c1."
    assert (await read_all(store, "b"))[0] == b"a1.b1.b2."
    assert (await refs(redis_client, store, "a"), await refs(redis_client, store, "b")) == (1, 1)

    # Deleting the ancestors only soft-deletes them: the chain still reads.
    await store.delete("a")
    await store.delete("b")
    for gone in ("a", "b"):
        with pytest.raises(Gone):
            await store.read(gone, off.ZERO)
        assert await keys_exist(redis_client, store, gone) >= 1
    assert (await read_all(store, "c"))[0] == b"a1.b1.c1."

    # Deleting the last fork cleans up the whole chain.
    await store.delete("c")
    for path in ("a", "b", "c"):
        assert await keys_exist(redis_client, store, path) == 0, path
    assert await redis_client.keys("*") == []


async def test_soft_deleted_source(store: Store, redis_client: aioredis.Redis) -> None:
    _, o2, _ = await source_with_three_entries(store)
    await store.create("f", fork("src", o2))
    await store.delete("src")

    assert (await redis_client.hget(store.keys("src").meta, "del")) == b"1"
    with pytest.raises(Gone) as exc:
        await store.read("src", off.ZERO)
    assert exc.value.status == 410
    with pytest.raises(Gone):
        await store.head("src")
    with pytest.raises(Gone):
        await store.append("src", data(b"x"))
    with pytest.raises(Gone):
        await store.delete("src")
    with pytest.raises(Conflict) as exc:
        await store.create("src", CreateRequest(OCTET))
    assert exc.value.status == 409
    with pytest.raises(Conflict):
        await store.create("f2", fork("src"))  # forking a soft-deleted source
    assert await keys_exist(redis_client, store, "f2") == 0
    assert await refs(redis_client, store, "src") == 1

    # The fork still reads the inherited data, and lives on independently.
    await store.append("f", data(b"own"))
    assert (await read_all(store, "f"))[0] == b"aaabbbown"

    await store.delete("f")
    assert await keys_exist(redis_client, store, "src") == 0
    assert await keys_exist(redis_client, store, "f") == 0
    # The path is free again.
    assert (await store.create("src", CreateRequest(OCTET))).created


async def test_a_soft_deleted_source_stays_until_its_last_fork_is_gone(
    store: Store, redis_client: aioredis.Redis
) -> None:
    """Two forks read a soft-deleted source: deleting one of them leaves the
    source (and the other fork's inherited data) in place; deleting the last
    one removes the source."""
    await source_with_three_entries(store)
    await store.create("f1", fork("src"))
    await store.create("f2", fork("src"))
    await store.delete("src")
    assert await refs(redis_client, store, "src") == 2

    await store.delete("f1")
    assert await refs(redis_client, store, "src") == 1
    assert await keys_exist(redis_client, store, "src") > 0
    assert (await read_all(store, "f2"))[0] == b"aaabbbccc"

    await store.delete("f2")
    assert await keys_exist(redis_client, store, "src") == 0


async def test_deleting_a_source_without_forks_is_a_hard_delete(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await source_with_three_entries(store)
    await store.create("f", fork("src"))
    await store.delete("f")  # the only fork goes first
    assert await refs(redis_client, store, "src") == 0
    await store.delete("src")
    assert await redis_client.keys("*") == []


async def test_refcount_after_rejected_fork_creation(
    store: Store, redis_client: aioredis.Redis
) -> None:
    o1, _, _ = await source_with_three_entries(store)
    await store.create("f", fork("src", o1))
    assert await refs(redis_client, store, "src") == 1

    rejected = [
        ("other", fork("src", o1, content_type="text/plain"), Conflict),  # type mismatch
        ("other", fork("src", o1, sub=99), BadRequest),  # sub-offset overshoot
        ("f", fork("src", off.ZERO), Conflict),  # "f" exists with another fork offset
    ]
    for target, request, error in rejected:
        with pytest.raises(error):
            await store.create(target, request)
        assert await refs(redis_client, store, "src") == 1, request
    # An identical fork PUT is idempotent and takes no extra reference.
    assert not (await store.create("f", fork("src", o1))).created
    assert not (await store.create("f", fork("src", o1, content_type=OCTET))).created
    assert await refs(redis_client, store, "src") == 1
    # A plain stream in the target's way: 409, reference given back.
    await store.create("plain", CreateRequest(OCTET))
    with pytest.raises(Conflict):
        await store.create("plain", fork("src", o1))
    assert await refs(redis_client, store, "src") == 1
    assert await keys_exist(redis_client, store, "other") == 0

    # With the count right, deleting the one fork really frees a deleted source.
    await store.delete("src")
    await store.delete("f")
    assert await keys_exist(redis_client, store, "src") == 0


async def test_concurrent_fork_creation_counts_references_exactly(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await source_with_three_entries(store)
    results = await asyncio.gather(
        *(store.create(f"f{i % 5}", fork("src", off.ZERO)) for i in range(40)),
        return_exceptions=True,
    )
    assert not [r for r in results if isinstance(r, BaseException)]
    assert sum(r.created for r in results) == 5  # type: ignore[union-attr]
    assert await refs(redis_client, store, "src") == 5
    for i in range(5):
        await store.delete(f"f{i}")
    assert await refs(redis_client, store, "src") == 0


# -- expiry --------------------------------------------------------------------------------


async def test_fork_of_an_expiring_source_pins_its_keys(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("src", CreateRequest(OCTET, ttl=3600, entries=((b"data", None),)))
    await store.append("src", AppendRequest(OCTET, b"+", None, False, None, Producer("p", 0, 0)))
    k = store.keys("src")
    assert all(p > 0 for p in [await redis_client.pttl(x) for x in (k.meta, k.data, k.producers)])

    await store.create("f", fork("src"))
    # Pinned: Redis no longer expires the source's keys on its own.
    assert [await redis_client.pttl(x) for x in (k.meta, k.data, k.producers)] == [-1, -1, -1]
    # The fork inherits the source's TTL (section 4.2 table) and expires on its own.
    assert (await store.head("f")).ttl == 3600
    assert 0 < await redis_client.pttl(store.keys("f").meta) <= 3_600_000
    # A read of the source while pinned does not re-arm Redis expiry either.
    await store.read("src", off.ZERO)
    assert await redis_client.pttl(k.meta) == -1

    # The last fork gone: expiry is handed back to Redis.
    await store.delete("f")
    assert all(
        0 < p <= 3_600_000
        for p in [await redis_client.pttl(x) for x in (k.meta, k.data, k.producers)]
    )


async def test_fork_keeps_the_data_of_a_source_that_expired(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("src", CreateRequest(OCTET, ttl=1, entries=((b"inherited", None),)))
    await store.create("f", fork("src", ttl=3600))
    deadline = time.monotonic() + 5
    while True:  # the source's 1 s TTL runs out (HEAD does not refresh it)
        try:
            await store.head("src")
        except Gone:
            break
        assert time.monotonic() < deadline, "the source never expired"
        await asyncio.sleep(0.05)
    # Expired for clients, but its data is kept for the fork.
    assert await keys_exist(redis_client, store, "src") == 2
    assert (await read_all(store, "f"))[0] == b"inherited"
    with pytest.raises(Conflict):  # the path stays blocked while forks read it
        await store.create("src", CreateRequest(OCTET, ttl=1))

    await store.delete("f")
    assert await redis_client.keys("*") == []


async def test_fork_expiry_follows_the_table_of_section_4_2(store: Store) -> None:
    far = int(time.time() * 1000) + 86_400_000
    await store.create("plain", CreateRequest(OCTET))
    await store.create("ttl", CreateRequest(OCTET, ttl=600))
    await store.create("abs", CreateRequest(OCTET, expires_at=far))
    cases = [
        ("plain", {}, (None, None)),
        ("plain", {"ttl": 60}, (60, None)),
        ("plain", {"expires_at": far + 1}, (None, far + 1)),
        ("ttl", {}, (600, None)),
        ("ttl", {"ttl": 60}, (60, None)),
        ("ttl", {"expires_at": far + 1}, (None, far + 1)),
        ("abs", {}, (None, far)),
        ("abs", {"ttl": 60}, (60, None)),
        ("abs", {"expires_at": far + 1}, (None, far + 1)),
    ]
    for i, (source, requested, expected) in enumerate(cases):
        await store.create(f"f{i}", fork(source, **requested))
        info = await store.head(f"f{i}")
        assert (info.ttl, info.expires_at) == expected, (source, requested)


async def test_an_expired_fork_releases_its_source(
    store: Store, redis_client: aioredis.Redis
) -> None:
    """When a fork expires, its reference on the source must go with it: a
    soft-deleted source is then cleaned up (section 4.2: "when the last fork
    referencing the stream is deleted, the server cleans up the stream's data";
    expiry ends a stream's life like a delete does) and its path is usable again."""
    await store.create("src", CreateRequest(OCTET, entries=((b"data", None),)))
    await store.create("f", fork("src", ttl=1))
    await store.delete("src")  # soft: the fork still reads it
    deadline = time.monotonic() + 5
    while await keys_exist(redis_client, store, "f"):
        assert time.monotonic() < deadline, "fork with Stream-TTL 1 never expired"
        await asyncio.sleep(0.05)
    # Clean-up may be lazy (on the next access to the source's path) but must happen.
    deadline = time.monotonic() + 3
    while True:
        try:
            recreated = await store.create("src", CreateRequest(OCTET))
            assert recreated.created
            break
        except Conflict:
            assert time.monotonic() < deadline, (
                "source stays soft-deleted (PUT 409) forever after its only fork expired; "
                f"meta={await redis_client.hgetall(store.keys('src').meta)}"
            )
            await asyncio.sleep(0.1)
    assert (await read_all(store, "src"))[0] == b""


# -- reads across the fork boundary -------------------------------------------------------------


async def test_small_pages_across_the_fork_boundary(redis_client: aioredis.Redis) -> None:
    store = Store(store_client(redis_client), "ds", 25)
    await store.create("src", CreateRequest(OCTET))
    source_tails = [(await store.append("src", data(b"s%09d" % i))).tail for i in range(5)]
    # Two inherited entries fill most of the first page (20 of 25 bytes).
    await store.create("f", fork("src", source_tails[1]))
    for i in range(4):
        await store.append("f", data(b"f%09d" % i))

    expected = b"".join(b"s%09d" % i for i in range(2)) + b"".join(b"f%09d" % i for i in range(4))
    body, pages = await read_all(store, "f")
    assert body == expected
    offsets = [p.next_offset for p in pages]
    assert offsets == sorted(set(offsets)), "next offsets must strictly increase"
    assert all(not p.up_to_date for p in pages[:-1]) and pages[-1].up_to_date
    assert all(p.more for p in pages[:-1])
    # Pages are cut between entries and hold at most max_read_bytes (25 = 2 entries).
    for page in pages:
        assert len(page.body) % 10 == 0 and len(page.body) <= 25, page

    # Resuming from every offset the pages handed out never loses or repeats data.
    for i, page in enumerate(pages[:-1]):
        rest, _ = await read_all(store, "f", page.next_offset)
        assert b"".join(p.body for p in pages[: i + 1]) + rest == expected


async def test_small_json_pages_across_the_fork_boundary(redis_client: aioredis.Redis) -> None:
    store = Store(store_client(redis_client), "ds", 20)
    await store.create("src", CreateRequest(JSON))
    for i in range(4):
        await store.append("src", json_data(json.dumps([{"s": i}, {"s": i}]).encode()))
    fork_at = (await store.head("src")).tail
    await store.create("f", fork("src", fork_at))
    await store.append("src", json_data(b'{"never": true}'))
    for i in range(3):
        await store.append("f", json_data(json.dumps({"f": i}).encode()))

    _, pages = await read_all(store, "f")
    got = []
    for page in pages:
        got += json.loads(b"[" + page.body + b"]")  # every page is a valid array
    expected = [{"s": i} for i in range(4) for _ in range(2)] + [{"f": i} for i in range(3)]
    assert got == expected


# -- through the gateway ----------------------------------------------------------------------


async def test_http_fork_with_a_body_of_a_soft_deleted_source_is_409(
    gateway: str, redis_client: aioredis.Redis
) -> None:
    """Section 4.2: "Source is soft-deleted -> 409 Conflict". A fork PUT with a
    body and no Content-Type must answer that too (not 410 from looking the
    source's type up)."""
    base = f"{gateway}/v1/stream"
    async with httpx.AsyncClient(timeout=5) as client:
        assert (
            await client.put(f"{base}/hs", content=b"x", headers={"Content-Type": "text/plain"})
        ).status_code == 201
        forked = await client.put(f"{base}/hs-f1", headers={"Stream-Forked-From": "/v1/stream/hs"})
        assert forked.status_code == 201
        assert (await client.delete(f"{base}/hs")).status_code == 204

        without_body = await client.put(f"{base}/hs-f2", headers={"Stream-Forked-From": "hs"})
        assert without_body.status_code == 409
        with_body = await client.put(
            f"{base}/hs-f3", content=b"y", headers={"Stream-Forked-From": "hs"}
        )
        assert with_body.status_code == 409, (with_body.status_code, with_body.text)
    assert await redis_client.exists("ds:{hs-f2}:meta", "ds:{hs-f3}:meta") == 0


async def test_http_fork_with_a_body_inherits_the_content_type(
    gateway: str, redis_client: aioredis.Redis
) -> None:
    base = f"{gateway}/v1/stream"
    async with httpx.AsyncClient(timeout=5) as client:
        await client.put(
            f"{base}/hj", content=b'[{"a":1}]', headers={"Content-Type": "application/json"}
        )
        created = await client.put(
            f"{base}/hj-f",
            content=b'[{"b":2},{"c":3}]',
            headers={"Stream-Forked-From": "/v1/stream/hj"},
        )
        assert created.status_code == 201
        assert created.headers["content-type"] == "application/json"
        read = await client.get(f"{base}/hj-f", params={"offset": "-1"})
        assert read.json() == [{"a": 1}, {"b": 2}, {"c": 3}]
        # Long-poll on the fork's tail is not woken by the source (section 5.7).
        tail = read.headers["stream-next-offset"]
        poll = asyncio.create_task(
            client.get(f"{base}/hj-f", params={"offset": tail, "live": "long-poll"}, timeout=10)
        )
        await parked(redis_client, "hj-f")
        await client.post(
            f"{base}/hj", content=b'{"src":1}', headers={"Content-Type": "application/json"}
        )
        # The fork's own append comes after the source's: a reader woken (and
        # answered) by the source's append would not answer with exactly this.
        await client.post(
            f"{base}/hj-f", content=b'{"fork":1}', headers={"Content-Type": "application/json"}
        )
        woken = await asyncio.wait_for(poll, 10)
        assert woken.status_code == 200 and woken.json() == [{"fork": 1}]
