"""gateway.offsets: offset tokens <-> Redis entry ids, ordering and strict parsing."""

from __future__ import annotations

import random

import pytest

from gateway.protocol import offsets
from gateway.protocol.errors import BadRequest

MAX_PART = 10**16 - 1  # the largest value a 16-digit part can hold


def _random_ids(rng: random.Random, count: int) -> list[str]:
    """Entry ids spread over small, realistic and huge ms/seq values."""
    ids = []
    for _ in range(count):
        ms = rng.choice(
            [
                rng.randrange(0, 10),
                rng.randrange(0, 10**6),
                rng.randrange(1_600_000_000_000, 2_000_000_000_000),  # real clock times
                rng.randrange(0, MAX_PART + 1),
            ]
        )
        seq = rng.choice([0, rng.randrange(0, 100), rng.randrange(0, MAX_PART + 1)])
        ids.append(f"{ms}-{seq}")
    return ids


# -- constants -----------------------------------------------------------------------


def test_zero_is_the_token_of_entry_id_zero() -> None:
    assert offsets.ZERO == "0000000000000000_0000000000000000"
    assert offsets.from_entry_id(offsets.ZERO_ID) == offsets.ZERO
    assert offsets.parse(offsets.ZERO) == offsets.ZERO_ID


def test_sentinels_are_not_offsets() -> None:
    assert offsets.BEGINNING == "-1"
    assert offsets.NOW == "now"
    assert not offsets.is_offset(offsets.BEGINNING)
    assert not offsets.is_offset(offsets.NOW)


# -- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry_id", "token"),
    [
        ("0-0", "0000000000000000_0000000000000000"),
        ("0-1", "0000000000000000_0000000000000001"),
        ("1732547000123-4", "0001732547000123_0000000000000004"),
        ("1732547000123-0", "0001732547000123_0000000000000000"),
        (f"{MAX_PART}-{MAX_PART}", "9999999999999999_9999999999999999"),
        ("9007199254740993-9007199254740993", "9007199254740993_9007199254740993"),
    ],
)
def test_from_entry_id_renders_fixed_width_token(entry_id: str, token: str) -> None:
    assert offsets.from_entry_id(entry_id) == token
    assert offsets.to_entry_id(token) == entry_id
    assert offsets.parse(token) == entry_id


@pytest.mark.parametrize("seed", range(5))
def test_random_ids_round_trip_through_tokens(seed: int) -> None:
    for entry_id in _random_ids(random.Random(seed), 2000):
        token = offsets.from_entry_id(entry_id)
        assert len(token) == 33
        assert offsets.is_offset(token), token
        assert offsets.to_entry_id(token) == entry_id
        assert offsets.parse(token) == entry_id
        assert offsets.from_entry_id(offsets.parse(token)) == token


def test_to_entry_id_drops_leading_zeros() -> None:
    assert offsets.to_entry_id("0000000000000042_0000000000000007") == "42-7"


# -- ordering ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_token_order_equals_entry_id_order(seed: int) -> None:
    ids = _random_ids(random.Random(seed), 3000)
    by_number = sorted(ids, key=offsets.id_key)
    by_token = sorted(ids, key=offsets.from_entry_id)
    assert [offsets.id_key(i) for i in by_token] == [offsets.id_key(i) for i in by_number]


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("0-9", "0-10"),  # seq gains a digit
        ("5-99", "5-100"),
        ("5-9999999999999999", "6-0"),  # seq at its widest, then the next ms
        ("9-0", "10-0"),  # ms gains a digit
        ("999999999999-5", "1000000000000-0"),
        ("1732547000123-4", "1732547000124-0"),
        ("9999999999999998-9999999999999999", "9999999999999999-0"),
    ],
)
def test_digit_count_changes_keep_lexicographic_order(lower: str, higher: str) -> None:
    assert offsets.id_key(lower) < offsets.id_key(higher)
    assert offsets.from_entry_id(lower) < offsets.from_entry_id(higher)


def test_id_key_is_numeric_not_textual() -> None:
    assert offsets.id_key("10-0") > offsets.id_key("9-0")
    assert offsets.id_key("1-10") > offsets.id_key("1-9")
    assert offsets.id_key("1732547000123-4") == (1732547000123, 4)


# -- token alphabet ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_tokens_never_contain_url_or_list_delimiters(seed: int) -> None:
    for entry_id in _random_ids(random.Random(seed), 2000):
        token = offsets.from_entry_id(entry_id)
        assert not set(token) & set(",&=?/ "), token
        assert set(token) <= set("0123456789_")
        assert token not in (offsets.BEGINNING, offsets.NOW)


# -- strict parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "",
        "-1",  # the beginning sentinel is resolved by the read handler, not parse
        "now",
        "$",
        "+",
        "-",
        ">",
        "0-0",
        "0",
        "_",
        "1732547000123-4",  # a raw entry id is not a token
        "000000000000000_0000000000000000",  # 15-digit ms
        "0000000000000000_000000000000000",  # 15-digit seq
        "00000000000000000_0000000000000000",  # 17-digit ms
        "0000000000000000_00000000000000000",  # 17-digit seq
        "0000000000000000-0000000000000000",  # dash instead of underscore
        "0000000000000000__0000000000000000",
        "0000000000000000_0000000000000000_0000000000000000",
        "000000000000000a_0000000000000000",
        "0000000000000000_000000000000000A",
        "0000000000000000_0x00000000000000",
        "0000000000000000_-000000000000001",
        "0000000000000000_+000000000000001",
        "0000000000000000 0000000000000000",
        "0000000000000000,0000000000000000",
        "0000000000000000_0000000000000000 ",  # trailing space
        " 0000000000000000_0000000000000000",  # leading space
        "0000000000000000_0000000000000000\n",  # `$` would accept this, `\Z` must not
        "\n0000000000000000_0000000000000000",
        "0000000000000000_0000000000000000\r",
        "0000000000000000_0000000000000000\x00",
        "0000000000000000_0000000000000000,0000000000000000_0000000000000001",
        "0000000000000000_0000000000000000&offset=-1",
        "0000000000000000_0000000000000000/",
        "0000000000000000_000000000000000\u0661",  # Arabic-Indic digit one
        "\u0661" * 16 + "_" + "\u0661" * 16,  # all Arabic-Indic digits
        "\uff10000000000000000_0000000000000000",  # fullwidth zero
        "²000000000000000_0000000000000000",  # superscript two (isdigit() is True)
        "0000000000000000\uff3f0000000000000000",  # fullwidth low line
    ],
)
def test_parse_rejects_malformed_tokens(token: str) -> None:
    assert not offsets.is_offset(token)
    with pytest.raises(BadRequest):
        offsets.parse(token)


def test_parse_error_names_what_was_parsed() -> None:
    with pytest.raises(BadRequest, match="malformed Stream-Fork-Offset"):
        offsets.parse("nope", "Stream-Fork-Offset")
    with pytest.raises(BadRequest, match="malformed offset"):
        offsets.parse("nope")


@pytest.mark.parametrize(
    "token",
    [
        "0000000000000000_0000000000000000",
        "0001732547000123_0000000000000004",
        "9999999999999999_9999999999999999",
    ],
)
def test_parse_accepts_well_formed_tokens(token: str) -> None:
    assert offsets.is_offset(token)
    entry_id = offsets.parse(token)
    ms, seq = entry_id.split("-")
    assert ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()
    assert offsets.from_entry_id(entry_id) == token
