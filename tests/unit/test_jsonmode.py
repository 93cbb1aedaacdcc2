"""gateway.jsonmode: validating, flattening and re-joining JSON messages (section 9.1)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from gateway.protocol import jsonmode
from gateway.protocol.errors import BadRequest


def _reject(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _strict(data: bytes) -> Any:
    """Parse with exact numbers; fails on anything that is not strict JSON."""
    return json.loads(data.decode("utf-8"), parse_float=Decimal, parse_constant=_reject)


# -- flatten: what becomes a message ------------------------------------------------


@pytest.mark.parametrize(
    ("body", "messages"),
    [
        (b"1", [b"1"]),
        (b"null", [b"null"]),
        (b"true", [b"true"]),
        (b'"text"', [b'"text"']),
        (b"{}", [b"{}"]),
        (b'{ "a" : 1 }', [b'{"a":1}']),
        (b"  \n\t[1, 2, 3]  \r\n", [b"1", b"2", b"3"]),
        (b'[{"a": 1}, "b", null]', [b'{"a":1}', b'"b"', b"null"]),
        (b"[[]]", [b"[]"]),
        (b"[[1, 2], [3]]", [b"[1,2]", b"[3]"]),
        (b"[[[1]]]", [b"[[1]]"]),
        (b'["a,b", "[1]"]', [b'"a,b"', b'"[1]"']),
    ],
)
def test_flatten_splits_top_level_array_only(body: bytes, messages: list[bytes]) -> None:
    assert jsonmode.flatten(body, allow_empty=False) == messages


def test_flatten_single_value_is_one_message() -> None:
    assert jsonmode.flatten(b'{"k": [1, 2]}', allow_empty=False) == [b'{"k":[1,2]}']


def test_flatten_rejects_empty_array_for_appends() -> None:
    with pytest.raises(BadRequest, match="empty JSON array"):
        jsonmode.flatten(b"[]", allow_empty=False)
    with pytest.raises(BadRequest, match="empty JSON array"):
        jsonmode.flatten(b" [ ] ", allow_empty=False)


def test_flatten_allows_empty_array_when_asked() -> None:
    assert jsonmode.flatten(b"[]", allow_empty=True) == []


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b" ",
        b"\r\n\t",
        b"[",
        b"[1,",
        b"[1,]",
        b"{'a': 1}",
        b'{"a" 1}',
        b"{a: 1}",
        b"undefined",
        b"01",
        b"1 2",
        b"[1] [2]",
        b"NaN",
        b"[NaN]",
        b"Infinity",
        b"-Infinity",
        b'{"x": [1, -Infinity]}',
        b"nan",
        b"'single'",
        b'"unterminated',
        b'"\\x41"',
        b"\xff",
        b'"\xff"',
        b'"\xc3"',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_flatten_rejects_invalid_json(body: bytes) -> None:
    with pytest.raises(BadRequest, match="not valid JSON"):
        jsonmode.flatten(body, allow_empty=True)


# -- flatten: fidelity ---------------------------------------------------------------


@pytest.mark.parametrize(
    "number",
    [
        b"18446744073709551616",  # 2**64
        b"-18446744073709551617",
        b"123456789012345678901234567890",
        b"9" * 400,  # too large even for a double
    ],
)
def test_flatten_preserves_integers_beyond_64_bits(number: bytes) -> None:
    assert jsonmode.flatten(number, allow_empty=False) == [number]
    assert jsonmode.flatten(b"[" + number + b"]", allow_empty=False) == [number]
    nested = jsonmode.flatten(b'[{"n": ' + number + b', "s": "x"}]', allow_empty=False)
    assert _strict(nested[0]) == {"n": int(number), "s": "x"}


def test_flatten_preserves_64_bit_boundaries() -> None:
    body = b"[9223372036854775807, -9223372036854775808, 18446744073709551615]"
    assert jsonmode.flatten(body, allow_empty=False) == [
        b"9223372036854775807",
        b"-9223372036854775808",
        b"18446744073709551615",
    ]


@pytest.mark.parametrize(
    "body",
    [
        '["héllo", "日本語", "😀", "\u2028"]'.encode(),
        b'["\\u00e9", "\\ud83d\\ude00"]',  # escapes decode to the same characters
        '[["é", 100000000000000000000000]]'.encode(),  # the big-integer fallback path
    ],
)
def test_flatten_preserves_unicode(body: bytes) -> None:
    messages = jsonmode.flatten(body, allow_empty=False)
    assert [_strict(m) for m in messages] == _strict(body)
    for message in messages:
        message.decode("utf-8")  # stored as UTF-8
        assert b"\\u" not in message  # not needlessly escaped


@pytest.mark.parametrize(
    "body",
    [
        b"1e400",
        b'{"a": -1e999}',
        b"[[1e400, 100000000000000000000000]]",
    ],
)
def test_out_of_range_numbers_are_rejected_or_kept(body: bytes) -> None:
    # Never stored as `null` (orjson's rendering of inf) nor as `Infinity`
    # (json.dumps'), which is not JSON at all.
    try:
        messages = jsonmode.flatten(body, allow_empty=False)
    except BadRequest:
        return
    expected = _strict(body)
    if not isinstance(expected, list):
        expected = [expected]
    assert [_strict(m) for m in messages] == expected


@pytest.mark.parametrize("body", [b'"\\ud800"', b'{"k": ["ok", "a\\udc00b"]}'])
def test_lone_surrogate_escape_is_a_bad_request(body: bytes) -> None:
    # JSON's grammar allows the escape, but it names no character and cannot be
    # stored as UTF-8: the client must get a 400, not a crash.
    try:
        messages = jsonmode.flatten(body, allow_empty=False)
    except BadRequest:
        return
    for message in messages:
        _strict(message)


@pytest.mark.parametrize(
    "body",
    [
        b'{"b": 1, "a": 2}',
        b"[1.5, -0.25, 1e-7, 0, -1]",
        b'{"nested": {"deep": [true, false, null, "s"]}}',
        b'"quote \\" and backslash \\\\ and newline \\n"',
    ],
)
def test_flatten_keeps_values(body: bytes) -> None:
    expected = _strict(body)
    if not isinstance(expected, list):
        expected = [expected]
    assert [_strict(m) for m in jsonmode.flatten(body, allow_empty=False)] == expected


def test_flatten_keeps_key_order() -> None:
    assert jsonmode.flatten(b'{"z": 1, "a": 2, "m": 3}', allow_empty=False) == [
        b'{"z":1,"a":2,"m":3}'
    ]


# -- join / split -----------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"1",
        b"[1, 2, 3]",
        b'[[1, 2], {"a": [3, 4]}, "x,y", ",", "]", "["]',
        b'[18446744073709551616, {"big": 123456789012345678901234567890}]',
        '["é", "😀"]'.encode(),
        b"[null, null]",
    ],
)
def test_split_inverts_join(body: bytes) -> None:
    messages = jsonmode.flatten(body, allow_empty=False)
    assert jsonmode.split(jsonmode.join(messages)) == messages


def test_join_uses_commas() -> None:
    assert jsonmode.join([b"1", b'{"a":2}', b"[3]"]) == b'1,{"a":2},[3]'


def test_split_of_empty_fragment_is_no_messages() -> None:
    assert jsonmode.split(b"") == []
    assert jsonmode.join([]) == b""


# -- entry: what one append stores ------------------------------------------------


@pytest.mark.parametrize(
    ("body", "stored", "count"),
    [
        (b'{"a":1}', b'{"a":1}', 1),
        (b' \n{"a": 1}\t', b'{"a": 1}', 1),
        (b"[1, [2, 3]]", b"1, [2, 3]", 2),
        (b" [ 1 ,\n [2,3] ] ", b"1 ,\n [2,3]", 2),
        (b"[[[1,2,3]]]", b"[[1,2,3]]", 1),
        (b'"text"', b'"text"', 1),
        (b"[18446744073709551616, 1e400, -1e999]", b"18446744073709551616, 1e400, -1e999", 3),
        (b'["\\ud800"]', b'"\\ud800"', 1),
    ],
)
def test_entry_stores_the_clients_own_text(body: bytes, stored: bytes, count: int) -> None:
    assert jsonmode.entry(body, allow_empty=False) == (stored, count)
    # A read wraps entries in one array: it must be valid JSON with the same values.
    assert json.loads(b"[" + stored + b"]") == _flattened(body)


def _flattened(body: bytes) -> list:
    value = json.loads(body)
    return value if isinstance(value, list) else [value]


def test_entry_of_an_empty_array() -> None:
    assert jsonmode.entry(b" [ ] ", allow_empty=True) == (b"", 0)
    with pytest.raises(BadRequest):
        jsonmode.entry(b"[]", allow_empty=False)


@pytest.mark.parametrize("body", [b"", b"  ", b"{", b"[1,]", b"NaN", b"[Infinity]", b"\xff"])
def test_entry_rejects_invalid_json(body: bytes) -> None:
    with pytest.raises(BadRequest):
        jsonmode.entry(body, allow_empty=True)


# -- the exact path: literals and lone surrogates ------------------------------------------


def test_exact_path_keeps_true_false_and_null_beside_a_large_number() -> None:
    """A number orjson would round sends the body through the exact path, which
    writes every other value itself, literals included."""
    body = b'[{"n": 123456789012345678901234567890, "t": true, "f": false, "z": null}]'
    (message,) = jsonmode.flatten(body, allow_empty=False)
    assert json.loads(message) == {
        "n": 123456789012345678901234567890,
        "t": True,
        "f": False,
        "z": None,
    }
    assert b"123456789012345678901234567890" in message


def test_a_lone_surrogate_stays_an_escape() -> None:
    """Valid JSON (an escape) that is not encodable as UTF-8: kept escaped."""
    (message,) = jsonmode.flatten(b'["\\ud800x"]', allow_empty=False)
    assert message == b'"\\ud800x"'


@pytest.mark.parametrize("space", [b"\x0c", b"\x0b", b"\x1c", b"\xc2\xa0"])
def test_only_json_whitespace_surrounds_a_body(space: bytes) -> None:
    """RFC 8259 whitespace is space, tab, LF and CR: a form feed (or any other
    space) around a body makes it invalid."""
    with pytest.raises(BadRequest):
        jsonmode.entry(space + b"[1]", allow_empty=False)
    with pytest.raises(BadRequest):
        jsonmode.entry(b"[1]" + space, allow_empty=False)
