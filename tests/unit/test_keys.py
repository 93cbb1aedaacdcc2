"""gateway.keys: every key of one stream lives in one Redis Cluster hash slot."""

from __future__ import annotations

import random

import pytest
from redis.crc import key_slot as redis_py_key_slot

from gateway.protocol.errors import NotFound
from gateway.protocol.paths import stream_path
from gateway.storage.keys import StreamKeys, stream_keys

SLOTS = 16384


def crc16_xmodem(data: bytes) -> int:
    """CRC16-CCITT (XMODEM): poly 0x1021, init 0, no reflection (Redis cluster spec)."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def hash_tag(key: bytes) -> bytes:
    """The part of a key Redis Cluster hashes: the text between the first '{' and
    the first '}' after it, when that is non-empty; otherwise the whole key."""
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def keyslot(key: str) -> int:
    return crc16_xmodem(hash_tag(key.encode())) % SLOTS


def _stream_slots(keys: StreamKeys) -> set[int]:
    return {keyslot(k) for k in (keys.meta, keys.data, keys.producers, keys.forks, keys.wake)}


ADVERSARIAL_PATHS = [
    "a",
    "orders/2024/eu",
    "{",
    "}",
    "{}",
    "}{",
    "{{",
    "}}",
    "{}{}",
    "}a",
    "}{a}",
    "a}b{c",
    "{a}",
    "{a}b",
    "a{b}c",
    "user{1000}",
    "{user1000}.following",
    "x/{y}/z",
    "%",
    "%%",
    "%7B",
    "%7D",
    "%7Bx%7D",
    "%25",
    "a%7Db{c}",
    "{%}",
    "}%{",
    ":meta",
    "}:meta",
    "a:{b}:data",
    "é{ü}",
    "日本/{語}",
    "😀}{😀",
    "a" * 1000,
    "{" * 50 + "}" * 50,
    "}" * 50 + "{" * 50,
]

PREFIXES = ["ds", "app:ds", "tenant-1:ds", "ds}", "x{", "}{"]


# -- the slot function used by these tests ------------------------------------------------


@pytest.mark.parametrize(
    ("key", "slot"),
    [
        ("123456789", 0x31C3 % SLOTS),  # the CRC16/XMODEM check value is 0x31C3
        ("foo", 12182),  # examples from the Redis cluster specification / CLUSTER KEYSLOT
        ("{foo}.bar", 12182),
        ("{user1000}.following", keyslot("user1000")),
        ("foo{}{bar}", crc16_xmodem(b"foo{}{bar}") % SLOTS),  # empty tag: whole key
        ("foo{{bar}}zap", crc16_xmodem(b"{bar") % SLOTS),
        ("foo{bar}{zap}", crc16_xmodem(b"bar") % SLOTS),
    ],
)
def test_keyslot_matches_the_cluster_spec(key: str, slot: int) -> None:
    assert keyslot(key) == slot


@pytest.mark.parametrize("seed", range(3))
def test_keyslot_agrees_with_redis_py(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab{}%:/é"
    for _ in range(2000):
        key = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        assert keyslot(key) == redis_py_key_slot(key.encode()), key


# -- one slot per stream -------------------------------------------------------------------


@pytest.mark.parametrize("path", ADVERSARIAL_PATHS)
def test_all_keys_of_a_stream_share_one_slot(path: str) -> None:
    keys = stream_keys("ds", path)
    assert len(_stream_slots(keys)) == 1, keys


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("path", ["a", "{", "}", "}{", "%7B", "a{b}c"])
def test_all_keys_share_one_slot_under_other_prefixes(prefix: str, path: str) -> None:
    assert len(_stream_slots(stream_keys(prefix, path))) == 1


@pytest.mark.parametrize("path", ADVERSARIAL_PATHS)
def test_hash_tag_is_the_whole_escaped_path(path: str) -> None:
    keys = stream_keys("ds", path)
    tag = hash_tag(keys.meta.encode()).decode()
    assert "{" not in tag and "}" not in tag
    assert tag.replace("%7B", "{").replace("%7D", "}").replace("%25", "%") == path
    for key in (keys.data, keys.producers, keys.forks, keys.wake):
        assert hash_tag(key.encode()).decode() == tag


@pytest.mark.parametrize("seed", range(5))
def test_random_paths_share_one_slot(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = ["{", "}", "%", "7B", "7D", "25", "/", ":", "a", "é", "{}", "}{"]
    for _ in range(500):
        path = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 15)))
        assert len(_stream_slots(stream_keys("ds", path))) == 1, path


# -- layout ------------------------------------------------------------------------------


def test_key_layout() -> None:
    keys = stream_keys("ds", "orders/eu")
    assert keys == StreamKeys(
        meta="ds:{orders/eu}:meta",
        data="ds:{orders/eu}:data",
        producers="ds:{orders/eu}:producers",
        forks="ds:{orders/eu}:forks",
        wake="ds:{orders/eu}:wake",
    )


def test_all_lists_the_script_keys_in_script_order() -> None:
    # The Lua scripts take KEYS 1 meta, 2 data, 3 producers, 4 forks; the channel
    # is an ARGV.
    keys = stream_keys("ds", "p")
    assert keys.all == [keys.meta, keys.data, keys.producers, keys.forks]


@pytest.mark.parametrize(
    ("path", "tagged"),
    [
        ("{", "%7B"),
        ("}", "%7D"),
        ("%", "%25"),
        ("%7B", "%257B"),
        ("a{b}c%d", "a%7Bb%7Dc%25d"),
    ],
)
def test_braces_and_percent_are_percent_encoded(path: str, tagged: str) -> None:
    assert stream_keys("ds", path).meta == f"ds:{{{tagged}}}:meta"


# -- different streams, different keys ------------------------------------------------------


def test_distinct_paths_never_share_keys() -> None:
    # The escaping is injective: "{" and "%7B" and "%257B" stay three streams.
    paths = [*ADVERSARIAL_PATHS, "%257B", "%7B%7D", "{}%", "%{}"]
    assert len(set(paths)) == len(paths)
    metas = {stream_keys("ds", p).meta for p in paths}
    assert len(metas) == len(paths)
    every_key = [k for p in paths for k in vars(stream_keys("ds", p)).values()]
    assert len(set(every_key)) == len(every_key)


def test_distinct_prefixes_never_share_keys() -> None:
    assert stream_keys("a", "p").meta != stream_keys("b", "p").meta


def test_different_paths_spread_over_many_slots() -> None:
    paths = [f"tenant-{i}/stream" for i in range(1000)]
    slots = {keyslot(stream_keys("ds", p).meta) for p in paths}
    # 1000 random draws from 16384 slots give ~970 distinct values.
    assert len(slots) > 900


def test_slot_depends_on_the_path_not_on_the_prefix() -> None:
    for path in ("a", "orders/eu", "{x}"):
        assert keyslot(stream_keys("ds", path).meta) == keyslot(stream_keys("other", path).meta)


@pytest.mark.parametrize("prefix", ["{}", "ds{}"])
def test_prefix_with_empty_braces_keeps_a_stream_in_one_slot(prefix: str) -> None:
    # DS_KEY_PREFIX is not validated: "{}" in it is an empty hash tag, so Redis
    # hashes each whole key and meta/data/producers scatter over three slots.
    assert len(_stream_slots(stream_keys(prefix, "orders"))) == 1


def test_empty_path_never_reaches_the_key_layout() -> None:
    # An empty path would make "{}" an empty hash tag; the router refuses it.
    with pytest.raises(NotFound):
        stream_path("")
