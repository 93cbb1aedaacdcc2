"""gateway.headers: parsing and validation of request headers."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

import pytest

from gateway.protocol import headers
from gateway.protocol.errors import BadRequest
from gateway.protocol.headers import MAX_SAFE_INTEGER, MAX_TTL_SECONDS, Producer

# Strings that are not canonical non-negative integers (protocol section 5.1).
NOT_CANONICAL_UINTS = [
    "",
    " ",
    "00",
    "01",
    "00060",
    "+60",
    "+0",
    "-0",
    "-1",
    "60.5",
    "60.",
    ".5",
    "1e3",
    "1E3",
    "0x10",
    "0xyz",
    "1abc",
    "abc",
    "1_000",
    "1,000",
    "1 000",
    "Infinity",
    "NaN",
    "\u0663",  # Arabic-Indic digit three: str.isdigit() and int() accept it
    "²",  # superscript two: str.isdigit() accepts it
    "\uff11",  # fullwidth digit one
]


def _epoch_ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp()) * 1000


# -- Stream-TTL ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("0", 0),
        ("1", 1),
        ("3600", 3600),
        (str(MAX_TTL_SECONDS), MAX_TTL_SECONDS),
    ],
)
def test_parse_ttl_accepts_canonical_integers(raw: str | None, expected: int | None) -> None:
    assert headers.parse_ttl(raw) == expected


@pytest.mark.parametrize(
    "raw",
    # (5,000 digits: past what int() converts, 4,300)
    [*NOT_CANONICAL_UINTS, str(MAX_TTL_SECONDS + 1), "9" * 30, str(2**64), "9" * 5000],
)
def test_parse_ttl_rejects_non_canonical_or_too_large(raw: str) -> None:
    with pytest.raises(BadRequest, match="Stream-TTL"):
        headers.parse_ttl(raw)


# -- Stream-Expires-At ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        ("2025-01-01T00:00:00Z", _epoch_ms(2025, 1, 1)),
        ("2025-01-01T00:00:00z", _epoch_ms(2025, 1, 1)),
        ("2025-01-01t00:00:00Z", _epoch_ms(2025, 1, 1)),
        ("2025-01-01 00:00:00Z", _epoch_ms(2025, 1, 1)),
        ("2025-01-01T00:00:00+00:00", _epoch_ms(2025, 1, 1)),
        ("2025-01-01T00:00:00-00:00", _epoch_ms(2025, 1, 1)),
        ("2025-01-01T01:00:00+01:00", _epoch_ms(2025, 1, 1)),
        ("2024-12-31T19:00:00-05:00", _epoch_ms(2025, 1, 1)),
        ("2025-01-01T00:00:00.5Z", _epoch_ms(2025, 1, 1) + 500),
        ("2025-01-01T00:00:00.123Z", _epoch_ms(2025, 1, 1) + 123),
        ("2025-01-01T00:00:00.123456Z", _epoch_ms(2025, 1, 1) + 123),
        ("2025-01-01T00:00:00.999+00:00", _epoch_ms(2025, 1, 1) + 999),
        ("1970-01-01T00:00:00Z", 0),
        ("2024-02-29T12:00:00Z", _epoch_ms(2024, 2, 29, 12)),
    ],
)
def test_parse_expires_at_accepts_rfc3339(raw: str | None, expected: int | None) -> None:
    assert headers.parse_expires_at(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " ",
        "not-a-timestamp",
        "2025-01-01",  # date only
        "2025-01-01T00:00:00",  # naive: no zone
        "2025-01-01T00:00",  # no seconds
        "2025-01-01T00:00Z",
        "00:00:00Z",  # time only
        "2025-01-01T00:00:00+0000",  # zone without colon
        "2025-01-01T00:00:00+00",
        "2025-01-01T00:00:00 Z",
        "2025-01-01T00:00:00.Z",
        "2025-01-01T00:00:00UTC",
        "2025-01-01T00:00:00GMT",
        "20250101T000000Z",  # ISO 8601 basic format is not RFC 3339
        "2025-W01-1T00:00:00Z",
        "2025-13-01T00:00:00Z",
        "2025-02-30T00:00:00Z",
        "2025-01-01T24:00:00Z",
        "2025-01-01T23:60:00Z",
        "2025-01-01T00:00:00+24:00",
        "1735689600",  # epoch seconds
        "1735689600000",
        "Wed, 01 Jan 2025 00:00:00 GMT",  # HTTP date
        "\u0662\u0660\u0662\u0665-\u0660\u0661-\u0660\u0661T00:00:00Z",  # Arabic-Indic digits
        "2025-01-01T00:00:00Z2025-01-01T00:00:00Z",
    ],
)
def test_parse_expires_at_rejects_non_rfc3339(raw: str) -> None:
    with pytest.raises(BadRequest, match="Stream-Expires-At"):
        headers.parse_expires_at(raw)


@pytest.mark.parametrize(
    "epoch_ms",
    [0, 1, 999, 1000, 1735689600000, 1735689600123, 1735689600999, 4102444799999],
)
def test_format_expires_at_round_trips(epoch_ms: int) -> None:
    text = headers.format_expires_at(epoch_ms)
    assert text.endswith("Z")
    assert headers.parse_expires_at(text) == epoch_ms


def test_format_expires_at_renders_milliseconds() -> None:
    assert headers.format_expires_at(1735689600123) == "2025-01-01T00:00:00.123Z"
    assert headers.format_expires_at(1735689600000) == "2025-01-01T00:00:00.000Z"
    assert headers.format_expires_at(5) == "1970-01-01T00:00:00.005Z"


def test_format_expires_at_round_trips_random_times() -> None:
    rng = random.Random(0)
    # 2020-01-01 .. 2100-01-01: timestamps clients may really send.
    for epoch_ms in (rng.randrange(1577836800000, 4102444800000) for _ in range(20000)):
        text = headers.format_expires_at(epoch_ms)
        assert headers.parse_expires_at(text) == epoch_ms, text


def test_parse_expires_at_keeps_milliseconds_after_2038() -> None:
    # Past 2**31 seconds a float timestamp times 1000 falls just below the
    # integer millisecond, and int() truncates it away.
    assert headers.parse_expires_at("2039-07-11T14:17:36.917Z") == 2194006656917


# -- Stream-Closed -----------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["true", "TRUE", "True", "tRuE", " true ", "true\t"])
def test_is_closed_accepts_true_in_any_case(raw: str) -> None:
    assert headers.is_closed(raw) is True


@pytest.mark.parametrize(
    "raw", [None, "", "1", "yes", "on", "false", "t", "truee", "true1", "tru e", '"true"']
)
def test_is_closed_rejects_anything_else(raw: str | None) -> None:
    assert headers.is_closed(raw) is False


# -- Content-Type ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", "application/json"),
        ("Application/JSON; charset=utf-8", "application/json"),
        ("  text/plain  ;charset=UTF-8", "text/plain"),
        ("text/plain;a=b;c=d", "text/plain"),
        ("application/octet-stream", "application/octet-stream"),
    ],
)
def test_media_type_strips_parameters_and_lowercases(content_type: str, expected: str) -> None:
    assert headers.media_type(content_type) == expected


@pytest.mark.parametrize(
    ("content_type", "json", "text"),
    [
        ("application/json", True, True),
        ("APPLICATION/JSON; charset=utf-8", True, True),
        ("application/jsonx", False, False),
        ("application/ld+json", False, False),
        ("application/json-seq", False, False),
        ("text/plain", False, True),
        ("Text/HTML; charset=utf-8", False, True),
        ("text/event-stream", False, True),
        ("textual/plain", False, False),
        ("application/text", False, False),
        ("application/octet-stream", False, False),
        ("image/png", False, False),
    ],
)
def test_json_and_text_classification(content_type: str, json: bool, text: bool) -> None:
    assert headers.is_json(content_type) is json
    assert headers.is_text(content_type) is text


@pytest.mark.parametrize("raw", [None, "", "   "])
def test_normalize_content_type_treats_blank_as_absent(raw: str | None) -> None:
    assert headers.normalize_content_type(raw) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("application/json", "application/json"),
        ("  text/plain; charset=utf-8 ", "text/plain; charset=utf-8"),
        ("Application/Vnd.Example+JSON", "Application/Vnd.Example+JSON"),
        ("application/x-ndjson", "application/x-ndjson"),
    ],
)
def test_normalize_content_type_keeps_the_stripped_value(raw: str, expected: str) -> None:
    assert headers.normalize_content_type(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "json",
        "application",
        "/",
        "text/",
        "/plain",
        "a/b/c",
        "text plain",
        "text /plain",
        "text/pl ain; charset=utf-8",
        "text/plain\x00",
        "tëxt/plain",
        "text/(plain)",
        "text/plain,application/json",
        "; charset=utf-8",
    ],
)
def test_normalize_content_type_rejects_malformed(raw: str) -> None:
    with pytest.raises(BadRequest, match="Content-Type"):
        headers.normalize_content_type(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "text/plain; a=b\r\nX-Injected: 1",
        "text/plain;\ncharset=utf-8",
        "text/plain; charset=utf-8\r",
        "text/plain; a=\x00",
        "text/plain; a=\x01",
        "text/plain; a=\x1f",
        "text/plain; a=\x7f",
    ],
)
def test_normalize_content_type_rejects_control_characters_in_parameters(raw: str) -> None:
    """The value is stored and sent back on every read: a line break in it
    would split those responses."""
    with pytest.raises(BadRequest, match="Content-Type"):
        headers.normalize_content_type(raw)


def test_normalize_content_type_accepts_a_tab_around_parameters() -> None:
    assert headers.normalize_content_type("text/plain;\tcharset=utf-8") == (
        "text/plain;\tcharset=utf-8"
    )


@pytest.mark.parametrize(
    "raw",
    ["content-type", "Content-Type,Producer-Id", " content-type , producer-id ", "x-a,\tx-b"],
)
def test_is_token_list_accepts_comma_separated_header_names(raw: str) -> None:
    assert headers.is_token_list(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " ",
        ",",
        "content-type,",
        ",content-type",
        "content-type,,producer-id",
        "content-type producer-id",
        "content-type;q=1",
        '"content-type"',
        "content-type\r\nx-injected: 1",
        "content-type\x00",
        "x-\u00e9",
    ],
)
def test_is_token_list_rejects_anything_else(raw: str) -> None:
    assert not headers.is_token_list(raw)


# -- Producer-Id / Producer-Epoch / Producer-Seq --------------------------------------------


def test_parse_producer_absent_is_none() -> None:
    assert headers.parse_producer(None, None, None) is None


@pytest.mark.parametrize(
    "triple",
    [
        ("p", None, None),
        (None, "0", None),
        (None, None, "0"),
        ("p", "0", None),
        ("p", None, "0"),
        (None, "0", "0"),
    ],
)
def test_parse_producer_requires_all_three(triple: tuple[str | None, ...]) -> None:
    with pytest.raises(BadRequest, match="together"):
        headers.parse_producer(*triple)


@pytest.mark.parametrize(
    ("pid", "epoch", "seq", "expected"),
    [
        ("p", "0", "0", Producer("p", 0, 0)),
        ("writer-1", "3", "17", Producer("writer-1", 3, 17)),
        ("a:b:c", "1", "2", Producer("a:b:c", 1, 2)),
        ("x" * 256, "0", "0", Producer("x" * 256, 0, 0)),
        ("p", str(MAX_SAFE_INTEGER), str(MAX_SAFE_INTEGER), Producer("p", 2**53 - 1, 2**53 - 1)),
    ],
)
def test_parse_producer_accepts_valid_triples(
    pid: str, epoch: str, seq: str, expected: Producer
) -> None:
    assert headers.parse_producer(pid, epoch, seq) == expected


@pytest.mark.parametrize("pid", ["", " ", "\t"])
def test_parse_producer_rejects_empty_id(pid: str) -> None:
    with pytest.raises(BadRequest, match="Producer-Id"):
        headers.parse_producer(pid, "0", "0")


def test_parse_producer_rejects_overlong_id() -> None:
    with pytest.raises(BadRequest, match="Producer-Id"):
        headers.parse_producer("x" * 257, "0", "0")


@pytest.mark.parametrize("bad", [*NOT_CANONICAL_UINTS, str(2**53), str(2**64), "9" * 40])
def test_parse_producer_rejects_bad_epoch(bad: str) -> None:
    with pytest.raises(BadRequest, match="Producer-Epoch"):
        headers.parse_producer("p", bad, "0")


@pytest.mark.parametrize("bad", [*NOT_CANONICAL_UINTS, str(2**53), str(2**64), "9" * 40])
def test_parse_producer_rejects_bad_seq(bad: str) -> None:
    with pytest.raises(BadRequest, match="Producer-Seq"):
        headers.parse_producer("p", "0", bad)


# -- Stream-Seq ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, "1", "abc", "0001", "a b", "x" * 256])
def test_parse_stream_seq_returns_value_unchanged(raw: str | None) -> None:
    assert headers.parse_stream_seq(raw) == raw


@pytest.mark.parametrize("raw", ["", "x" * 257])
def test_parse_stream_seq_rejects_empty_or_overlong(raw: str) -> None:
    with pytest.raises(BadRequest, match="Stream-Seq"):
        headers.parse_stream_seq(raw)


# -- Stream-Fork-Sub-Offset ---------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [(None, None), ("0", 0), ("5", 5), ("123", 123)])
def test_parse_sub_offset_accepts_canonical(raw: str | None, expected: int | None) -> None:
    assert headers.parse_sub_offset(raw) == expected


@pytest.mark.parametrize("raw", ["-1", "abc", "1.5", "05", "+1", "", "1e3", str(2**53), "\u0663"])
def test_parse_sub_offset_rejects_non_canonical(raw: str) -> None:
    with pytest.raises(BadRequest, match="Stream-Fork-Sub-Offset"):
        headers.parse_sub_offset(raw)


# -- a 400 names what was wrong --------------------------------------------------------------


@pytest.mark.parametrize(
    ("parse", "header"),
    [
        (lambda: headers.parse_ttl("soon"), "Stream-TTL"),
        (lambda: headers.parse_expires_at("tomorrow"), "Stream-Expires-At"),
        (lambda: headers.parse_expires_at("2026-13-01T00:00:00Z"), "Stream-Expires-At"),
        (lambda: headers.parse_producer("p", "1", None), "Producer-Id, Producer-Epoch"),
        (lambda: headers.parse_producer("", "1", "2"), "Producer-Id"),
        (lambda: headers.parse_producer("p", "x", "2"), "Producer-Epoch"),
        (lambda: headers.parse_producer("p", "1", "-2"), "Producer-Seq"),
        (lambda: headers.parse_stream_seq(""), "Stream-Seq"),
        (lambda: headers.parse_sub_offset("01"), "Stream-Fork-Sub-Offset"),
    ],
)
def test_a_refusal_names_the_header_it_refuses(parse, header: str) -> None:
    with pytest.raises(BadRequest) as exc:
        parse()
    assert exc.value.reason.startswith(header), exc.value.reason


def test_expires_at_is_formatted_in_utc_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        epoch_ms = 1_767_225_600_123  # 2026-01-01T00:00:00.123Z
        assert headers.format_expires_at(epoch_ms) == "2026-01-01T00:00:00.123Z"
    finally:
        monkeypatch.undo()
        time.tzset()
