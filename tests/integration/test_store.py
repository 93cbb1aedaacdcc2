"""``gateway.store.Store`` against a real redis-server.

Every test drives the store directly (no HTTP) over a ``redis.asyncio`` client and
then looks at what Redis really holds: key names, key types, stream entries,
producer state and key expiry. These are the guarantees the HTTP layer builds on.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from support.store_reads import read_all, store_client

from gateway.config import Settings
from gateway.protocol import jsonmode
from gateway.protocol import offsets as off
from gateway.protocol.errors import BadRequest, Conflict, Forbidden, NotFound
from gateway.protocol.headers import Producer
from gateway.storage import commit as commit_module
from gateway.storage import store as store_module
from gateway.storage.backend import Backend, connect
from gateway.storage.models import AppendRequest, AppendResult, CreateRequest
from gateway.storage.resp import PipelinedClient
from gateway.storage.store import Store

pytestmark = pytest.mark.timeout(30)

OCTET = "application/octet-stream"
JSON = "application/json"
OFFSET_RE = re.compile(r"\A[0-9]{16}_[0-9]{16}\Z")


# -- helpers ---------------------------------------------------------------------


# Every test runs on both of the store's Redis clients, as connect() makes them:
# the pipelined client and redis-py (same reply shapes, behind one interface).
_backends: list[Backend] = []


@pytest.fixture(autouse=True, params=["pipelined", "redis-py"])
async def store_backend(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Backend]:
    backend = connect(Settings(), redis_url, cluster=False, pipelined=request.param == "pipelined")
    _backends.append(backend)
    try:
        yield backend
    finally:
        _backends.remove(backend)
        await backend.aclose()


def make_store(client: Any, max_read_bytes: int = 1024 * 1024) -> Store:
    """A store on this test's backend (``client``: the test's own redis-py
    client, which stands for it) or on the client given."""
    if isinstance(client, aioredis.Redis):
        client = _backends[-1].client
    return Store(client, "ds", max_read_bytes)


@pytest.fixture
async def store(redis_client: aioredis.Redis) -> Store:
    s = make_store(redis_client)
    await s.load_scripts()
    return s


def data(
    body: bytes,
    *,
    close: bool = False,
    seq: str | None = None,
    producer: tuple[str, int, int] | None = None,
    media_type: str = OCTET,
) -> AppendRequest:
    return AppendRequest(
        media_type=media_type,
        body=body,
        json_count=None,
        close=close,
        stream_seq=seq,
        producer=Producer(*producer) if producer else None,
    )


def json_data(body: bytes, *, producer: tuple[str, int, int] | None = None) -> AppendRequest:
    """What the HTTP handler builds for a JSON append: validated, flattened once."""
    messages = jsonmode.flatten(body, allow_empty=False)
    return AppendRequest(
        media_type=JSON,
        body=jsonmode.join(messages),
        json_count=len(messages),
        close=False,
        stream_seq=None,
        producer=Producer(*producer) if producer else None,
    )


def close_only(producer: tuple[str, int, int] | None = None) -> AppendRequest:
    return AppendRequest(
        media_type="",
        body=None,
        json_count=None,
        close=True,
        stream_seq=None,
        producer=Producer(*producer) if producer else None,
    )


def json_entries(body: bytes) -> tuple[tuple[bytes, int | None], ...]:
    messages = jsonmode.flatten(body, allow_empty=True)
    return ((jsonmode.join(messages), len(messages)),) if messages else ()


async def xrange(client: aioredis.Redis, key: str) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (entry_id.decode(), {k.decode(): v for k, v in fields.items()})
        for entry_id, fields in await client.xrange(key)
    ]


async def meta(client: aioredis.Redis, store: Store, path: str) -> dict[str, str]:
    raw = await client.hgetall(store.keys(path).meta)
    return {k.decode(): v.decode() for k, v in raw.items()}


# -- round trip and key layout ----------------------------------------------------


async def test_create_append_read_round_trip(store: Store) -> None:
    created = await store.create("rt", CreateRequest(OCTET, entries=((b"hello ", None),)))
    assert created.created and not created.closed
    assert OFFSET_RE.match(created.tail)

    tails = [created.tail]
    for chunk in (b"brave ", b"new ", b"\x00\xffworld"):
        result = await store.append("rt", data(chunk))
        assert result.status == "ok"
        assert result.tail > tails[-1], "offsets must strictly increase"
        tails.append(result.tail)

    body, pages = await read_all(store, "rt")
    assert body == b"hello brave new \x00\xffworld"
    assert len(pages) == 1
    assert pages[0].next_offset == tails[-1] == pages[0].info.tail
    assert pages[0].up_to_date and not pages[0].more

    # Reading from any returned offset gives exactly what came after it.
    page = await store.read("rt", tails[1])
    assert page.body == b"new \x00\xffworld"
    # At the tail: nothing, and up to date.
    page = await store.read("rt", tails[-1])
    assert page.body == b"" and page.next_offset == tails[-1] and page.up_to_date

    info = await store.head("rt")
    assert (info.content_type, info.tail, info.closed) == (OCTET, tails[-1], False)


async def test_concurrent_appends_get_distinct_increasing_offsets(
    store: Store,
) -> None:
    await store.create("burst", CreateRequest(OCTET))
    # 50 concurrent appends: redis.asyncio's default pool allows 100 connections.
    results = await asyncio.gather(*(store.append("burst", data(b"%03d" % i)) for i in range(50)))
    tails = [r.tail for r in results]
    assert len(set(tails)) == 50
    body, _ = await read_all(store, "burst")
    # Redis runs the scripts one at a time: the stored order is the offset order.
    by_offset = [b"%03d" % i for _, i in sorted(zip(tails, range(50), strict=True))]
    assert body == b"".join(by_offset)


async def test_key_layout_and_raw_stream_entries(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("orders/eu", CreateRequest("text/plain", entries=((b"first", None),)))
    await store.append(
        "orders/eu", data(b"second", media_type="text/plain", producer=("writer-1", 0, 0))
    )

    keys = sorted(k.decode() for k in await redis_client.keys("*"))
    assert keys == ["ds:{orders/eu}:data", "ds:{orders/eu}:meta", "ds:{orders/eu}:producers"]
    assert await redis_client.type("ds:{orders/eu}:meta") == b"hash"
    assert await redis_client.type("ds:{orders/eu}:data") == b"stream"
    assert await redis_client.type("ds:{orders/eu}:producers") == b"hash"

    entries = await xrange(redis_client, "ds:{orders/eu}:data")
    assert [fields for _, fields in entries] == [{"d": b"first"}, {"d": b"second"}]
    info = await store.head("orders/eu")
    assert off.from_entry_id(entries[-1][0]) == info.tail

    m = await meta(redis_client, store, "orders/eu")
    assert m["ct"] == "text/plain" and m["mt"] == "text/plain"
    assert m["tail"] == entries[-1][0]
    assert await redis_client.hget("ds:{orders/eu}:producers", "writer-1") == b"0:0"


async def test_braces_in_a_path_cannot_break_the_hash_tag(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("a}b{c%d", CreateRequest(OCTET, entries=((b"x", None),)))
    keys = sorted(k.decode() for k in await redis_client.keys("*"))
    assert keys == ["ds:{a%7Db%7Bc%25d}:data", "ds:{a%7Db%7Bc%25d}:meta"]
    # The encoding is injective: the literal encoded name is another stream.
    with pytest.raises(NotFound):
        await store.head("a%7Db%7Bc%25d")


# -- create: idempotency and conflicts --------------------------------------------


async def test_idempotent_create_returns_existing_and_writes_nothing(
    store: Store, redis_client: aioredis.Redis
) -> None:
    first = await store.create("idem", CreateRequest(OCTET, ttl=600, entries=((b"a", None),)))
    assert first.created
    # Same configuration: the existing stream is confirmed, the body is not appended.
    again = await store.create("idem", CreateRequest(OCTET, ttl=600, entries=((b"b", None),)))
    assert not again.created
    assert again.tail == first.tail
    assert again.content_type == OCTET
    assert await redis_client.xlen(store.keys("idem").data) == 1

    # Media type comparison ignores parameters and case; the stored type is reported.
    await store.create("typed", CreateRequest("text/plain; charset=utf-8"))
    same = await store.create("typed", CreateRequest("Text/Plain"))
    assert not same.created and same.content_type == "text/plain; charset=utf-8"


@pytest.mark.parametrize(
    "other",
    [
        CreateRequest("text/plain", ttl=600),
        CreateRequest(OCTET),  # no TTL
        CreateRequest(OCTET, ttl=601),
        CreateRequest(OCTET, expires_at=4_102_444_800_000),
        CreateRequest(OCTET, ttl=600, closed=True),
    ],
    ids=["content-type", "ttl-missing", "ttl-differs", "expires-at", "closed"],
)
async def test_create_with_a_different_configuration_conflicts(
    store: Store, redis_client: aioredis.Redis, other: CreateRequest
) -> None:
    await store.create("cfg", CreateRequest(OCTET, ttl=600, entries=((b"x", None),)))
    before = await meta(redis_client, store, "cfg")
    with pytest.raises(Conflict) as exc:
        await store.create("cfg", other)
    assert exc.value.status == 409
    after = await meta(redis_client, store, "cfg")
    before.pop("acc", None)
    after.pop("acc", None)
    assert after == before
    assert await redis_client.xlen(store.keys("cfg").data) == 1


async def test_closure_status_is_part_of_the_configuration(store: Store) -> None:
    await store.create("c", CreateRequest(OCTET, closed=True, entries=((b"done", None),)))
    again = await store.create("c", CreateRequest(OCTET, closed=True))
    assert not again.created and again.closed
    with pytest.raises(Conflict):
        await store.create("c", CreateRequest(OCTET))

    await store.create("o", CreateRequest(OCTET))
    await store.append("o", close_only())
    # Closed after creation: a plain PUT no longer matches, a closed one does.
    with pytest.raises(Conflict):
        await store.create("o", CreateRequest(OCTET))
    assert (await store.create("o", CreateRequest(OCTET, closed=True))).closed


async def test_append_to_a_missing_stream_is_not_found(
    store: Store, redis_client: aioredis.Redis
) -> None:
    with pytest.raises(NotFound):
        await store.append("nope", data(b"x"))
    with pytest.raises(NotFound):
        await store.read("nope", off.ZERO)
    with pytest.raises(NotFound):
        await store.delete("nope")
    assert await redis_client.keys("*") == []


async def test_content_type_mismatch_is_rejected(store: Store) -> None:
    await store.create("ct", CreateRequest("text/plain"))
    with pytest.raises(Conflict):
        await store.append("ct", data(b"x", media_type="application/octet-stream"))
    assert (await store.head("ct")).tail == off.ZERO


# -- JSON mode ------------------------------------------------------------------------


async def test_json_flattening_is_stored_per_append_with_message_counts(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("j", CreateRequest(JSON, entries=json_entries(b'[{"a": 1}, {"b": 2}]')))
    await store.append("j", json_data(b'{"c": [3, 4]}'))
    await store.append("j", json_data(b"[[1, 2], [3, 4], 5]"))
    await store.append("j", json_data(b'[[["deep"]]]'))

    entries = await xrange(redis_client, store.keys("j").data)
    assert [fields for _, fields in entries] == [
        {"d": b'{"a":1},{"b":2}', "n": b"2"},
        {"d": b'{"c":[3,4]}', "n": b"1"},
        {"d": b"[1,2],[3,4],5", "n": b"3"},
        {"d": b'[["deep"]]', "n": b"1"},
    ]

    body, _ = await read_all(store, "j")
    assert json.loads(b"[" + body + b"]") == [
        {"a": 1},
        {"b": 2},
        {"c": [3, 4]},
        [1, 2],
        [3, 4],
        5,
        [["deep"]],
    ]
    # Every page from every offset is a valid array (entries joined with commas).
    for entry_id, _ in entries:
        page = await store.read("j", off.from_entry_id(entry_id))
        assert isinstance(json.loads(b"[" + page.body + b"]"), list)


async def test_json_create_with_empty_array_makes_an_empty_stream(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("empty", CreateRequest(JSON, entries=json_entries(b"[]")))
    page = await store.read("empty", off.ZERO)
    assert page.body == b"" and page.up_to_date
    assert await redis_client.exists(store.keys("empty").data) == 0


# -- page size --------------------------------------------------------------------------


async def test_pages_are_cut_between_entries_at_the_size_limit(
    redis_client: aioredis.Redis,
) -> None:
    store = make_store(redis_client, max_read_bytes=10)
    await store.create("p", CreateRequest(OCTET))
    chunks = [b"aaaa", b"bbbb", b"cccc", b"dddd", b"eeeeeeeeeeeeeeee", b"ff"]
    for chunk in chunks:
        await store.append("p", data(chunk))

    body, pages = await read_all(store, "p")
    assert body == b"".join(chunks)
    assert [p.body for p in pages] == [b"aaaabbbb", b"ccccdddd", b"eeeeeeeeeeeeeeee", b"ff"]
    # Every page but the last says "more" and is not up to date; the last is.
    assert [p.more for p in pages] == [True, True, True, False]
    assert [p.up_to_date for p in pages] == [False, False, False, True]
    # An entry larger than the page is never split: it comes alone.
    assert all(len(p.body) <= 10 or p.body in chunks for p in pages)


async def test_a_page_that_exactly_fills_the_limit_at_the_tail_is_up_to_date(
    redis_client: aioredis.Redis,
) -> None:
    store = make_store(redis_client, max_read_bytes=8)
    await store.create("x", CreateRequest(OCTET))
    await store.append("x", data(b"1234"))
    last = await store.append("x", data(b"5678"))
    page = await store.read("x", off.ZERO)
    assert page.body == b"12345678"
    assert not page.more and page.up_to_date and page.next_offset == last.tail


async def test_closed_stream_pages_report_closure_only_at_the_tail(
    redis_client: aioredis.Redis,
) -> None:
    store = make_store(redis_client, max_read_bytes=4)
    await store.create("c", CreateRequest(OCTET))
    await store.append("c", data(b"1111"))
    await store.append("c", data(b"2222", close=True))
    first = await store.read("c", off.ZERO)
    assert first.body == b"1111" and first.more and not first.at_closed_tail
    second = await store.read("c", first.next_offset)
    assert second.body == b"2222" and second.at_closed_tail
    eof = await store.read("c", second.next_offset)
    assert eof.body == b"" and eof.at_closed_tail


async def test_pages_hold_at_most_max_page_entries_appends(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "MAX_PAGE_ENTRIES", 3)
    store = make_store(redis_client)
    await store.create("n", CreateRequest(OCTET))
    for i in range(7):
        await store.append("n", data(b"%d" % i))
    body, pages = await read_all(store, "n")
    assert body == b"0123456"
    assert [p.body for p in pages] == [b"012", b"345", b"6"]
    assert [p.more for p in pages] == [True, True, False]
    assert pages[-1].up_to_date


async def test_json_pages_are_valid_arrays(redis_client: aioredis.Redis) -> None:
    store = make_store(redis_client, max_read_bytes=20)
    await store.create("j", CreateRequest(JSON))
    expected = []
    for i in range(12):
        batch = [{"i": i, "k": j} for j in range(i % 3 + 1)]
        expected += batch
        await store.append("j", json_data(json.dumps(batch).encode()))
    body, pages = await read_all(store, "j")
    assert len(pages) > 3
    got = []
    for page in pages:
        got += json.loads(b"[" + page.body + b"]")
    assert got == expected
    assert json.loads(b"[" + body + b"]") == expected


# -- Stream-Seq --------------------------------------------------------------------------


async def test_stream_seq_is_compared_byte_wise(store: Store, redis_client: aioredis.Redis) -> None:
    await store.create("s", CreateRequest(OCTET))
    await store.append("s", data(b"1", seq="a"))
    # "B" (0x42) sorts before "a" (0x61) byte-wise, although it is "later" in a
    # case-insensitive or locale collation.
    for regressed in ("B", "a", "A", "0", "Z"):
        with pytest.raises(Conflict) as exc:
            await store.append("s", data(b"no", seq=regressed))
        assert exc.value.headers["Stream-Next-Offset"]
    await store.append("s", data(b"2", seq="aa"))
    await store.append("s", data(b"3", seq="b"))
    # Numbers are strings: "10" < "9".
    await store.append("s", data(b"4", seq="c9"))
    with pytest.raises(Conflict):
        await store.append("s", data(b"no", seq="c10"))
    # Bytes above 0x7f sort after ASCII.
    await store.append("s", data(b"5", seq="c\u00e9"))
    body, _ = await read_all(store, "s")
    assert body == b"12345"
    assert await redis_client.xlen(store.keys("s").data) == 5
    assert (await meta(redis_client, store, "s"))["seq"] == "c\u00e9"


async def test_stream_seq_conflict_does_not_consume_a_producer_seq(store: Store) -> None:
    await store.create("s", CreateRequest(OCTET))
    await store.append("s", data(b"1", seq="m", producer=("p", 0, 0)))
    with pytest.raises(Conflict):
        await store.append("s", data(b"2", seq="a", producer=("p", 0, 1)))
    # The rejected request wrote no producer state: seq 1 is still the next one.
    ok = await store.append("s", data(b"2", seq="n", producer=("p", 0, 1)))
    assert ok.status == "ok" and ok.producer_seq == "1"


# -- idempotent producers (section 5.2.1) -------------------------------------------------


async def test_producer_validation_table(store: Store, redis_client: aioredis.Redis) -> None:
    await store.create("prod", CreateRequest(OCTET))
    producers_key = store.keys("prod").producers

    # A new producer must start at seq 0.
    with pytest.raises(Conflict) as exc:
        await store.append("prod", data(b"x", producer=("p", 0, 1)))
    assert exc.value.headers["Producer-Expected-Seq"] == "0"
    assert exc.value.headers["Producer-Received-Seq"] == "1"
    assert await redis_client.exists(producers_key) == 0

    r = await store.append("prod", data(b"A", producer=("p", 0, 0)))
    assert (r.status, r.producer_epoch, r.producer_seq) == ("ok", "0", "0")
    r = await store.append("prod", data(b"B", producer=("p", 0, 1)))
    assert (r.status, r.producer_seq) == ("ok", "1")

    # Duplicates (retries) write nothing and report the highest accepted seq.
    for retry in (1, 0):
        dup = await store.append("prod", data(b"dup", producer=("p", 0, retry)))
        assert (dup.status, dup.producer_epoch, dup.producer_seq) == ("dup", "0", "1")

    # A gap names the expected and received seq.
    with pytest.raises(Conflict) as exc:
        await store.append("prod", data(b"x", producer=("p", 0, 5)))
    assert exc.value.headers["Producer-Expected-Seq"] == "2"
    assert exc.value.headers["Producer-Received-Seq"] == "5"

    # A new epoch must start at seq 0.
    with pytest.raises(BadRequest) as exc:
        await store.append("prod", data(b"x", producer=("p", 1, 1)))
    assert exc.value.status == 400

    r = await store.append("prod", data(b"C", producer=("p", 1, 0)))
    assert (r.status, r.producer_epoch, r.producer_seq) == ("ok", "1", "0")
    assert await redis_client.hget(producers_key, "p") == b"1:0"

    # The old epoch is fenced off with the current epoch.
    with pytest.raises(Forbidden) as exc:
        await store.append("prod", data(b"zombie", producer=("p", 0, 2)))
    assert exc.value.status == 403
    assert exc.value.headers["Producer-Epoch"] == "1"

    # Producers are independent of one another.
    other = await store.append("prod", data(b"D", producer=("q", 7, 0)))
    assert (other.status, other.producer_epoch) == ("ok", "7")

    body, _ = await read_all(store, "prod")
    assert body == b"ABCD"
    assert await redis_client.hgetall(producers_key) == {b"p": b"1:0", b"q": b"7:0"}


async def test_producer_limits_at_two_to_the_53(store: Store, redis_client: aioredis.Redis) -> None:
    big = 2**53 - 1
    await store.create("big", CreateRequest(OCTET))
    r = await store.append("big", data(b"a", producer=("p", big, 0)))
    assert r.producer_epoch == str(big)
    await store.append("big", data(b"b", producer=("p", big, 1)))
    with pytest.raises(Conflict) as exc:
        await store.append("big", data(b"c", producer=("p", big, 3)))
    assert exc.value.headers["Producer-Expected-Seq"] == "2"
    with pytest.raises(Forbidden) as exc:
        await store.append("big", data(b"c", producer=("p", big - 1, 0)))
    assert exc.value.headers["Producer-Epoch"] == str(big)
    assert await redis_client.hget(store.keys("big").producers, "p") == f"{big}:1".encode()


async def test_concurrent_duplicates_are_written_once(store: Store) -> None:
    await store.create("race", CreateRequest(OCTET))
    results = await asyncio.gather(
        *(store.append("race", data(b"once", producer=("p", 0, 0))) for _ in range(40))
    )
    assert sorted(r.status for r in results) == ["dup"] * 39 + ["ok"]
    body, _ = await read_all(store, "race")
    assert body == b"once"


# -- close and producers --------------------------------------------------------------------


async def test_close_with_final_append_and_closer_tuple_dedup(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("cl", CreateRequest(OCTET))
    await store.append("cl", data(b"a", producer=("p", 0, 0)))
    final = await store.append("cl", data(b"z", close=True, producer=("p", 1, 0)))
    assert (final.status, final.closed) == ("ok", True)
    assert (await meta(redis_client, store, "cl"))["closer"] == "p:1:0"

    # A retry of the closing request is a duplicate, reported closed.
    retry = await store.append("cl", data(b"z", close=True, producer=("p", 1, 0)))
    assert (retry.status, retry.closed, retry.producer_seq) == ("dup", True, "0")
    assert retry.tail == final.tail

    # Any other tuple gets 409 with Stream-Closed and the final offset.
    for other in (("p", 1, 1), ("p", 2, 0), ("q", 0, 0)):
        with pytest.raises(Conflict) as exc:
            await store.append("cl", data(b"late", producer=other))
        assert exc.value.headers == {"Stream-Next-Offset": final.tail, "Stream-Closed": "true"}
    # A zombie of an older epoch is still fenced as stale.
    with pytest.raises(Forbidden) as exc:
        await store.append("cl", data(b"late", producer=("p", 0, 1)))
    assert exc.value.headers["Producer-Epoch"] == "1"
    # Plain appends get 409 closed; a plain close-only is an idempotent no-op.
    with pytest.raises(Conflict) as exc:
        await store.append("cl", data(b"late"))
    assert exc.value.headers["Stream-Closed"] == "true"
    noop = await store.append("cl", close_only())
    assert (noop.status, noop.closed, noop.tail) == ("closed_noop", True, final.tail)

    body, _ = await read_all(store, "cl")
    assert body == b"az"
    assert (await store.read("cl", final.tail)).at_closed_tail
    assert await redis_client.hget(store.keys("cl").producers, "p") == b"1:0"


async def test_close_only_by_a_producer_is_idempotent(store: Store) -> None:
    await store.create("co", CreateRequest(OCTET, entries=((b"data", None),)))
    first = await store.append("co", close_only(producer=("p", 0, 0)))
    assert (first.status, first.closed) == ("ok", True)
    again = await store.append("co", close_only(producer=("p", 0, 0)))
    assert (again.status, again.closed, again.tail) == ("dup", True, first.tail)
    assert (await store.head("co")).tail == first.tail


async def test_closed_stream_rejects_appends_before_checking_content_type(store: Store) -> None:
    await store.create("cc", CreateRequest("text/plain", closed=True))
    with pytest.raises(Conflict) as exc:
        await store.append("cc", data(b"x", media_type="application/json"))
    assert exc.value.headers.get("Stream-Closed") == "true"


# -- TTL and Expires-At ---------------------------------------------------------------------


async def _pttls(client: aioredis.Redis, store: Store, path: str) -> list[int]:
    k = store.keys(path)
    return [await client.pttl(key) for key in (k.meta, k.data, k.producers)]


async def test_ttl_sets_expiry_on_every_key(store: Store, redis_client: aioredis.Redis) -> None:
    await store.create("t", CreateRequest(OCTET, ttl=100, entries=((b"a", None),)))
    await store.append("t", data(b"b", producer=("p", 0, 0)))
    for pttl in await _pttls(redis_client, store, "t"):
        assert 90_000 < pttl <= 100_000


async def test_reads_refresh_the_ttl_and_head_does_not(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("t", CreateRequest(OCTET, ttl=100, entries=((b"a", None),)))
    await store.append("t", data(b"b", producer=("p", 0, 0)))
    k = store.keys("t")

    async def age_keys() -> None:
        for key in (k.meta, k.data, k.producers):
            await redis_client.pexpire(key, 5_000)

    await age_keys()
    await store.head("t")
    assert all(0 < p <= 5_000 for p in await _pttls(redis_client, store, "t")), "HEAD refreshed"

    await store.read("t", off.ZERO)
    assert all(90_000 < p <= 100_000 for p in await _pttls(redis_client, store, "t"))

    await age_keys()
    await store.read("t", None)  # a metadata-only read (offset=now) is a read, too
    assert all(90_000 < p <= 100_000 for p in await _pttls(redis_client, store, "t"))

    await age_keys()
    await store.append("t", data(b"c"))
    assert all(90_000 < p <= 100_000 for p in await _pttls(redis_client, store, "t"))


async def test_a_stream_without_expiry_has_persistent_keys(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("forever", CreateRequest(OCTET, entries=((b"a", None),)))
    await store.append("forever", data(b"b", producer=("p", 0, 0)))
    await store.read("forever", off.ZERO)
    assert await _pttls(redis_client, store, "forever") == [-1, -1, -1]


async def test_expires_at_sets_an_absolute_expiry_that_reads_do_not_extend(
    store: Store, redis_client: aioredis.Redis
) -> None:
    now_ms = int(time.time() * 1000)
    expires_at = now_ms + 60_000
    await store.create("abs", CreateRequest(OCTET, expires_at=expires_at, entries=((b"a", None),)))
    await store.append("abs", data(b"b", producer=("p", 0, 0)))
    await store.read("abs", off.ZERO)
    await store.append("abs", data(b"c"))
    for pttl in await _pttls(redis_client, store, "abs"):
        remaining = expires_at - int(time.time() * 1000)
        assert abs(pttl - remaining) < 2_000, (pttl, remaining)
    assert (await store.head("abs")).expires_at == expires_at
    assert (await meta(redis_client, store, "abs"))["exp"] == str(expires_at)


async def test_a_ttl_stream_really_expires(store: Store, redis_client: aioredis.Redis) -> None:
    await store.create("short", CreateRequest(OCTET, ttl=1, entries=((b"a", None),)))
    deadline = time.monotonic() + 5
    while True:
        try:
            await store.head("short")  # HEAD does not keep it alive
        except NotFound:
            break
        assert time.monotonic() < deadline, "stream with Stream-TTL 1 still there after 5 s"
        await asyncio.sleep(0.05)
    assert await redis_client.keys("*") == []
    # Its path is free again.
    assert (await store.create("short", CreateRequest("text/plain"))).created


# -- delete and re-create --------------------------------------------------------------------


async def test_recreate_after_delete_has_no_old_data_or_producer_state(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("re", CreateRequest(OCTET, entries=((b"old", None),)))
    for seq in range(3):
        await store.append("re", data(b"old", seq=f"z{seq}", producer=("p", 4, seq)))
    await store.append("re", close_only())

    await store.delete("re")
    k = store.keys("re")
    assert await redis_client.exists(k.meta, k.data, k.producers) == 0
    with pytest.raises(NotFound):
        await store.read("re", off.ZERO)

    created = await store.create("re", CreateRequest("text/plain"))
    assert created.created and not created.closed and created.tail == off.ZERO
    page = await store.read("re", off.ZERO)
    assert page.body == b"" and page.info.content_type == "text/plain"

    # Producer (epoch 0 < old epoch 4) and Stream-Seq ("a" < old "z2") start fresh.
    r = await store.append(
        "re", data(b"new", seq="a", media_type="text/plain", producer=("p", 0, 0))
    )
    assert (r.status, r.producer_epoch, r.producer_seq) == ("ok", "0", "0")
    body, _ = await read_all(store, "re")
    assert body == b"new"


async def test_create_clears_leftover_keys_of_a_previous_incarnation(
    store: Store, redis_client: aioredis.Redis
) -> None:
    """A meta hash that vanished alone (e.g. evicted) must not resurrect old data."""
    await store.create("left", CreateRequest(OCTET, entries=((b"old", None),)))
    await store.append("left", data(b"old", producer=("p", 0, 0)))
    await redis_client.delete(store.keys("left").meta)

    await store.create("left", CreateRequest(OCTET))
    page = await store.read("left", off.ZERO)
    assert page.body == b""
    assert await redis_client.exists(store.keys("left").producers) == 0
    r = await store.append("left", data(b"new", producer=("p", 0, 0)))
    assert r.status == "ok"
    body, _ = await read_all(store, "left")
    assert body == b"new"


async def test_delete_publishes_on_the_wake_channel(
    store: Store, redis_client: aioredis.Redis, redis_url: str
) -> None:
    await store.create("w", CreateRequest(OCTET))
    listener = aioredis.from_url(redis_url)
    pubsub = listener.pubsub()
    try:
        await pubsub.subscribe(store.keys("w").wake)
        assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
        appended = await store.append("w", data(b"x"))
        message = await pubsub.get_message(timeout=2)
        # A small append travels in its wake-up: '+prev next closed\n<data>'.
        tail = off.to_entry_id(appended.tail)
        assert message["data"] == f"+0-0 {tail} \nx".encode()
        large = await store.append("w", data(b"y" * 16385))
        message = await pubsub.get_message(timeout=2)
        assert message["data"] == off.to_entry_id(large.tail).encode()  # just the tail
        closed = await store.append("w", close_only())
        message = await pubsub.get_message(timeout=2)
        assert message["data"] == f"{off.to_entry_id(closed.tail)} closed".encode()
        await store.delete("w")
        message = await pubsub.get_message(timeout=2)
        assert message["data"] == b"deleted"
    finally:
        await pubsub.aclose()
        await listener.aclose()


# -- catch-up reads of large pages (Store.read, large=True) -----------------------------


async def _xranges(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_xrange", {}).get("calls", 0))


async def test_read_large_pages_like_read_with_one_plain_xrange(
    redis_client: aioredis.Redis,
) -> None:
    store = make_store(redis_client, max_read_bytes=10_000)
    await store.load_scripts()
    await store.create("big", CreateRequest(OCTET, entries=((b"i" * 999, None),)))
    for i in range(60):
        await store.append("big", data(bytes([65 + i % 26]) * 1000))
    stored = await meta(redis_client, store, "big")
    assert (stored["b"], stored["mx"]) == ("60999", "1000") and "c" not in stored
    before, scripts = await _xranges(redis_client), await _script_runs(redis_client)
    body, pages = await read_all(store, "big", large=True)
    # Per page: read.lua for the metadata only (no XRANGE in it), and one plain XRANGE.
    assert await _xranges(redis_client) - before == len(pages)
    assert await _script_runs(redis_client) - scripts == len(pages)
    expected, expected_pages = await read_all(store, "big")
    assert body == expected
    assert [(p.next_offset, p.more, len(p.body)) for p in pages] == [
        (p.next_offset, p.more, len(p.body)) for p in expected_pages
    ]
    assert all(len(p.body) <= 10_000 for p in pages) and len(pages) == 7
    # At the tail: an empty page, no XRANGE.
    before = await _xranges(redis_client)
    tail = await store.read("big", pages[-1].next_offset, large=True)
    assert tail.body == b"" and tail.up_to_date and await _xranges(redis_client) == before


async def test_append_drops_the_entry_count_earlier_versions_kept(
    redis_client: aioredis.Redis,
) -> None:
    store = make_store(redis_client)
    await store.load_scripts()
    await store.create("earlier", CreateRequest(OCTET, entries=((b"a" * 10, None),)))
    await redis_client.hset(store.keys("earlier").meta, "c", "1")  # as earlier versions kept it
    await store.append("earlier", data(b"b" * 20))
    stored = await meta(redis_client, store, "earlier")
    assert "c" not in stored and (stored["b"], stored["mx"]) == ("30", "20")


async def test_read_large_pages_of_small_entries_hold_as_many_as_read_lua_s(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small entries: the page is cut by the entry limit, as read.lua's are,
    and still comes from a plain XRANGE."""
    monkeypatch.setattr(store_module, "MAX_PAGE_ENTRIES", 50)
    store = make_store(redis_client, max_read_bytes=10_000)
    await store.load_scripts()
    await store.create("small", CreateRequest(OCTET))
    await asyncio.gather(*(store.append("small", data(b"%09d;" % i)) for i in range(120)))
    before = await _xranges(redis_client)
    body, pages = await read_all(store, "small", large=True)
    assert await _xranges(redis_client) - before == len(pages) == 3
    assert [len(p.body) for p in pages] == [500, 500, 200]
    assert body == (await read_all(store, "small"))[0]


@pytest.mark.parametrize("small_entries", [10, 11])
async def test_a_final_large_page_of_exactly_the_planned_entries_is_up_to_date(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, small_entries: int
) -> None:
    """The boundary of "more pages follow" on a planned XRANGE page: two 400-byte
    entries make read.lua plan pages of 10 entries (4 x 1000 / 400); after them,
    10 small ones fill the final page exactly, which reaches the tail and keeps
    Stream-Up-To-Date, while 11 leave one for a next page."""
    store = make_store(redis_client, max_read_bytes=1000)
    await store.load_scripts()
    await store.create("edge", CreateRequest(OCTET))
    large = [await store.append("edge", data(b"L" * 400)) for _ in range(2)]
    small = [await store.append("edge", data(b"%09d;" % i)) for i in range(small_entries)]
    planned: list[int] = []
    xrange = store._xrange

    async def recording_xrange(
        path: str, info: object, after: str, budget: int, wanted: int
    ) -> object:
        planned.append(wanted)
        return await xrange(path, info, after, budget, wanted)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_xrange", recording_xrange)
    page = await store.read("edge", large[-1].tail, large=True)
    assert planned == [10], "the page must come from one planned XRANGE of 10 entries"
    assert page.body == b"".join(b"%09d;" % i for i in range(10))
    if small_entries == 10:
        assert page.next_offset == small[-1].tail == page.info.tail
        assert not page.more and page.up_to_date
    else:
        assert page.next_offset == small[9].tail != page.info.tail
        assert page.more and not page.up_to_date
        rest = await store.read("edge", page.next_offset, large=True)
        assert rest.body == b"%09d;" % 10 and rest.up_to_date


async def test_read_large_falls_back_to_read_lua_where_its_pages_would_be_small(
    redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few entries far larger than the rest would make the bounded XRANGE
    pages tiny; streams without statistics, and pages starting in a fork's
    source, are read by read.lua too. The bytes are the same either way."""
    store = make_store(redis_client, max_read_bytes=10_000)
    await store.load_scripts()
    await store.create("mixed-sizes", CreateRequest(OCTET))
    for i in range(200):
        await store.append("mixed-sizes", data(b"%03d" % i))
    await store.append("mixed-sizes", data(b"L" * 9000))
    await store.create("old", CreateRequest(JSON))
    for i in range(5):
        await store.append("old", json_data(b"[%d]" % i))
    await redis_client.hdel(store.keys("old").meta, "b", "mx")  # an older stream
    await store.create("src", CreateRequest(OCTET, entries=((b"s" * 100, None),)))
    await store.create("fork", CreateRequest(OCTET, fork_source="src"))
    await store.append("fork", data(b"f" * 100))
    planned: list[str] = []
    xrange = store._xrange

    async def recording_xrange(path: str, *args: object) -> object:
        planned.append(path)
        return await xrange(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_xrange", recording_xrange)
    for path in ("mixed-sizes", "old", "fork"):
        before = await _script_runs(redis_client)
        body, pages = await read_all(store, path, large=True)
        # read.lua reads each page itself, in one script run (no plain XRANGE).
        # (A fork's page: its own script run, its source's, then its own entries.)
        runs = len(pages) * (3 if path == "fork" else 1)
        assert await _script_runs(redis_client) - before == runs
        assert body == (await read_all(store, path))[0]
    assert planned == []
    assert (await read_all(store, "old", large=True))[0] == b"0,1,2,3,4"


async def test_read_large_of_a_json_stream_joins_its_entries(
    redis_client: aioredis.Redis,
) -> None:
    store = make_store(redis_client)
    await store.load_scripts()
    await store.create("js", CreateRequest(JSON, entries=json_entries(b'[{"a": 1}]')))
    for i in range(20):
        await store.append("js", json_data(b"[%d, %d]" % (i, i)))
    body, pages = await read_all(store, "js", large=True)
    assert len(pages) == 1 and pages[0].up_to_date
    assert json.loads(b"[" + body + b"]") == [{"a": 1}] + [n for i in range(20) for n in (i, i)]


# -- group commit: one script run for one turn's appends ----------------------------------


async def _script_runs(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_concurrent_plain_appends_share_one_script_run(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("hot", CreateRequest(OCTET))
    n = commit_module.SEND_AT_APPENDS - 1
    before = await _script_runs(redis_client)
    results = await asyncio.gather(*(store.append("hot", data(b"%03d;" % i)) for i in range(n)))
    # One EVALSHA for all of them (and the INFO call itself is not an EVALSHA).
    assert await _script_runs(redis_client) - before == 1
    tails = [r.tail for r in results]
    assert tails == sorted(tails) and len(set(tails)) == n  # in the order they were issued
    assert all(r.status == "ok" and not r.closed for r in results)
    body, pages = await read_all(store, "hot")
    assert body == b"".join(b"%03d;" % i for i in range(n))
    assert pages[-1].next_offset == tails[-1]
    # Each append is its own entry, as if written alone.
    entries = await xrange(redis_client, store.keys("hot").data)
    assert [fields["d"] for _, fields in entries] == [b"%03d;" % i for i in range(n)]
    assert [off.from_entry_id(entry_id) for entry_id, _ in entries] == tails


async def test_a_batch_goes_to_redis_once_it_holds_enough_appends(
    redis_url: str, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn's batch is sent as soon as it holds SEND_AT_APPENDS appends, not
    at the end of the turn (Redis works on it while the turn goes on); the
    turn's batches still run in the order issued."""
    monkeypatch.setattr(commit_module, "SEND_AT_APPENDS", 4)
    client = PipelinedClient(redis_url, connections=3, connect_timeout=1, command_timeout=2)
    store = make_store(client)  # type: ignore[arg-type]
    await store.load_scripts()
    await store.create("early", CreateRequest(OCTET))
    flushed_at: list[int] = []
    flush = client.flush

    def counting_flush() -> None:
        flushed_at.append(sum(len(p.outgoing) for p in client._slots if p is not None))
        flush()

    monkeypatch.setattr(client, "flush", counting_flush)
    try:
        before = await _script_runs(redis_client)
        results = await asyncio.gather(
            *(store.append("early", data(b"%02d;" % i)) for i in range(10))
        )
        assert await _script_runs(redis_client) - before == 3  # 4 + 4 + 2
        assert flushed_at == [1, 1]  # two full batches, each written at once
        assert [r.tail for r in results] == sorted(r.tail for r in results)
        assert (await read_all(store, "early"))[0] == b"".join(b"%02d;" % i for i in range(10))
    finally:
        await client.aclose()


async def test_appends_to_many_streams_share_one_script_run(
    store: Store, redis_client: aioredis.Redis
) -> None:
    """On a standalone Redis one turn's appends to any streams are one script
    run; each stream still gets its own appends, in the order issued."""
    paths = [f"many/{i}" for i in range(5)]  # 15 appends: fewer than SEND_AT_APPENDS
    for path in paths:
        await store.create(path, CreateRequest(OCTET))
    before = await _script_runs(redis_client)
    results = await asyncio.gather(
        *(
            store.append(path, data(b"%s:%d;" % (path.encode(), n)))
            for n in range(3)
            for path in paths
        )
    )
    assert await _script_runs(redis_client) - before == 1
    assert all(r.status == "ok" for r in results)
    for path in paths:
        body, _ = await read_all(store, path)
        assert body == b"".join(b"%s:%d;" % (path.encode(), n) for n in range(3))


async def test_a_batch_applies_each_request_as_if_alone(
    store: Store, redis_client: aioredis.Redis
) -> None:
    """Producer, Stream-Seq and closing requests share the run too: each sees
    what the requests before it in the batch wrote."""
    await store.create("mixed", CreateRequest(OCTET))
    await store.create("other", CreateRequest(OCTET))
    before = await _script_runs(redis_client)
    outcomes = await asyncio.gather(
        store.append("mixed", data(b"a")),
        store.append("mixed", data(b"p0", producer=("w", 0, 0))),
        store.append("other", data(b"o0", producer=("w", 0, 0))),  # another stream's producer
        store.append("mixed", data(b"p1", producer=("w", 0, 1))),
        store.append("mixed", data(b"p1", producer=("w", 0, 1))),  # a retry: duplicate
        store.append("mixed", data(b"p3", producer=("w", 0, 3))),  # a gap
        store.append("mixed", data(b"s2", seq="0002")),
        store.append("mixed", data(b"s1", seq="0001")),  # does not increase
        store.append("mixed", data(b"z", close=True, producer=("w", 0, 2))),
        store.append("mixed", data(b"late")),  # after the close
        store.append("mixed", data(b"z", close=True, producer=("w", 0, 2))),  # its retry
        return_exceptions=True,
    )
    assert await _script_runs(redis_client) - before == 1
    kinds = [o.status if isinstance(o, AppendResult) else type(o).__name__ for o in outcomes]
    assert kinds == [
        "ok",
        "ok",
        "ok",
        "ok",
        "dup",
        "Conflict",
        "ok",
        "Conflict",
        "ok",
        "Conflict",
        "dup",
    ]
    assert outcomes[5].headers["Producer-Expected-Seq"] == "2"
    assert outcomes[7].reason == "Stream-Seq must increase"
    assert outcomes[9].reason == "stream is closed"
    assert outcomes[8].closed and outcomes[10].closed
    assert outcomes[10].tail == outcomes[8].tail
    body, pages = await read_all(store, "mixed")
    assert body == b"ap0p1s2z"
    assert pages[-1].info.closed
    stored = await meta(redis_client, store, "mixed")
    assert stored["seq"] == "0002" and stored["closed"] == "1" and stored["closer"] == "w:0:2"
    producers = await redis_client.hgetall(store.keys("mixed").producers)
    assert producers == {b"w": b"0:2"}
    assert await redis_client.hgetall(store.keys("other").producers) == {b"w": b"0:0"}


class RecordingWakes:
    """LocalWakes that listens to some channels and records what it is given."""

    def __init__(self, channels: set[str]) -> None:
        self.channels = channels
        self.delivered: list[tuple[str, bytes]] = []

    def watching(self, channel: str) -> bool:
        return channel in self.channels

    def deliver(self, channel: str, message: bytes) -> None:
        self.delivered.append((channel, message))


async def test_own_wake_ups_come_back_with_the_reply_for_watched_streams(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    """For streams this process has readers of, the script returns the very
    wake-up message it published; for the others it returns nothing."""
    wakes = RecordingWakes(set())
    store = Store(store_client(redis_client), "ds", 1024 * 1024, local_wakes=wakes)
    await store.load_scripts()
    await store.create("seen", CreateRequest(OCTET))
    await store.create("unseen", CreateRequest(OCTET))
    wakes.channels.add(store.keys("seen").wake)
    listener = aioredis.from_url(redis_url)
    pubsub = listener.pubsub()
    try:
        await pubsub.subscribe(store.keys("seen").wake)
        assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
        seen, _ = await asyncio.gather(
            store.append("seen", data(b"hi")), store.append("unseen", data(b"x"))
        )
        published = (await pubsub.get_message(timeout=2))["data"]
        assert published == f"+0-0 {off.to_entry_id(seen.tail)} \nhi".encode()
        assert wakes.delivered == [(store.keys("seen").wake, published)]
        # Refused appends publish nothing and deliver nothing.
        with pytest.raises(Conflict):
            await store.append("seen", data(b"y", media_type="text/plain"))
        assert len(wakes.delivered) == 1
    finally:
        await pubsub.aclose()
        await listener.aclose()


async def test_a_crowded_turn_is_split_over_several_runs(
    store: Store, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.create("crowd", CreateRequest(OCTET))
    monkeypatch.setattr(commit_module, "MAX_BATCH_APPENDS", 10)
    monkeypatch.setattr(commit_module, "MAX_BATCH_BYTES", 1000)
    before = await _script_runs(redis_client)
    results = await asyncio.gather(*(store.append("crowd", data(b"%02d" % i)) for i in range(25)))
    assert await _script_runs(redis_client) - before == 3  # 10 + 10 + 5
    # In issue order within each run. (redis-py's pool may hand the runs to
    # Redis on different connections, so the runs themselves may land in any
    # order; the gateway's own client keeps them in order: see
    # test_a_batch_goes_to_redis_once_it_holds_enough_appends.)
    for run in (results[:10], results[10:20], results[20:]):
        assert [r.tail for r in run] == sorted(r.tail for r in run)
    before = await _script_runs(redis_client)
    await asyncio.gather(*(store.append("crowd", data(b"x" * 600)) for _ in range(3)))
    assert await _script_runs(redis_client) - before == 3  # 600 + 600 > 1000
    body, _ = await read_all(store, "crowd")
    assert sorted(body[:50][i : i + 2] for i in range(0, 50, 2)) == [b"%02d" % i for i in range(25)]
    assert body[50:] == b"x" * 1800


async def test_per_stream_batches_for_redis_cluster(redis_client: aioredis.Redis) -> None:
    """Where a script's keys must share a hash slot, only appends to the same
    stream share a run."""
    store = Store(store_client(redis_client), "ds", 1024 * 1024, batch_per_stream=True)
    await store.load_scripts()
    for path in ("c/1", "c/2", "c/3"):
        await store.create(path, CreateRequest(OCTET))
    before = await _script_runs(redis_client)
    await asyncio.gather(*(store.append(f"c/{i % 3 + 1}", data(b"%d" % i)) for i in range(9)))
    assert await _script_runs(redis_client) - before == 3
    assert (await read_all(store, "c/1"))[0] == b"036"


async def test_a_cancelled_request_does_not_stop_the_others(store: Store) -> None:
    await store.create("cx", CreateRequest(OCTET))
    tasks = [asyncio.ensure_future(store.append("cx", data(b"%d" % i))) for i in range(3)]
    await asyncio.sleep(0)  # all three have joined the batch
    tasks[0].cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert [o.status for o in outcomes[1:]] == ["ok", "ok"]
    # The cancelled request's append was already on its way: it landed.
    assert (await read_all(store, "cx"))[0] == b"012"


async def test_wake_ups_of_a_batch(
    store: Store, redis_client: aioredis.Redis, redis_url: str
) -> None:
    """One wake-up per stream per run: carrying the append when the run made one
    small append to that stream, else the new tail (readers read)."""
    await store.create("w1", CreateRequest(OCTET))
    await store.create("w2", CreateRequest(OCTET))
    listener = aioredis.from_url(redis_url)
    pubsub = listener.pubsub()
    try:
        await pubsub.subscribe(store.keys("w1").wake, store.keys("w2").wake)
        for _ in range(2):
            assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
        r1, r2, r3 = await asyncio.gather(
            store.append("w1", data(b"one")),
            store.append("w2", data(b"a")),
            store.append("w2", data(b"b")),
        )
        messages = {}
        for _ in range(2):
            message = await pubsub.get_message(timeout=2)
            messages[message["channel"].decode()] = message["data"]
        assert messages[store.keys("w1").wake] == f"+0-0 {off.to_entry_id(r1.tail)} \none".encode()
        assert messages[store.keys("w2").wake] == off.to_entry_id(r3.tail).encode()
        assert r2.tail < r3.tail
        assert await pubsub.get_message(timeout=0.2) is None  # nothing more
    finally:
        await pubsub.aclose()
        await listener.aclose()


async def test_a_batch_gets_one_refusal_for_every_append(
    store: Store, redis_client: aioredis.Redis
) -> None:
    with pytest.raises(NotFound):
        await asyncio.gather(*(store.append("absent", data(b"x")) for _ in range(3)))
    outcomes = await asyncio.gather(
        *(store.append("absent", data(b"x")) for _ in range(3)), return_exceptions=True
    )
    assert [type(o) for o in outcomes] == [NotFound] * 3

    await store.create("shut", CreateRequest(OCTET, closed=True))
    outcomes = await asyncio.gather(
        *(store.append("shut", data(b"x")) for _ in range(3)), return_exceptions=True
    )
    assert [type(o) for o in outcomes] == [Conflict] * 3
    assert all(o.headers.get("Stream-Closed") == "true" for o in outcomes)

    # Appends of another media type are refused alone.
    await store.create("typed", CreateRequest("text/plain"))
    outcomes = await asyncio.gather(
        store.append("typed", data(b"1", media_type="text/plain")),
        store.append("typed", data(b"x", media_type=OCTET)),
        store.append("typed", data(b"2", media_type="text/plain")),
        store.append("typed", data(b"y", media_type=OCTET)),
        return_exceptions=True,
    )
    assert [type(o).__name__ for o in outcomes] == [
        "AppendResult",
        "Conflict",
        "AppendResult",
        "Conflict",
    ]
    assert (await read_all(store, "typed"))[0] == b"12"
    entries = await xrange(redis_client, store.keys("shut").data)
    assert entries == []


async def test_json_appends_in_one_batch_keep_their_message_counts(
    store: Store, redis_client: aioredis.Redis
) -> None:
    await store.create("jb", CreateRequest(JSON))
    bodies = [b'[{"a": 1}, {"b": 2}]', b'{"c": 3}', b"[4, 5, 6]"]
    await asyncio.gather(*(store.append("jb", json_data(b)) for b in bodies))
    entries = await xrange(redis_client, store.keys("jb").data)
    assert [(fields["d"], fields["n"]) for _, fields in entries] == [
        (b'{"a":1},{"b":2}', b"2"),
        (b'{"c":3}', b"1"),
        (b"4,5,6", b"3"),
    ]
    body, _ = await read_all(store, "jb")
    assert json.loads(b"[" + body + b"]") == [{"a": 1}, {"b": 2}, {"c": 3}, 4, 5, 6]


async def test_a_batch_whose_redis_is_gone_fails_every_append() -> None:
    unreachable = aioredis.Redis(port=1, socket_connect_timeout=0.5)
    store = make_store(store_client(unreachable))
    outcomes = await asyncio.gather(
        *(store.append("any", data(b"x")) for _ in range(3)), return_exceptions=True
    )
    assert [type(o).__name__ for o in outcomes] == ["Unavailable"] * 3
    await unreachable.aclose()
