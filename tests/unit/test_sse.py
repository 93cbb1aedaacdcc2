"""gateway.sse: framing of data and control events (protocol section 5.8).

The produced bytes are read back with an event-stream parser written here from
the WHATWG HTML "server-sent events" interpretation rules, so the tests check
what a browser's EventSource would see, not the gateway's own idea of framing.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import re
from dataclasses import dataclass, field

import pytest

from gateway.protocol import sse
from gateway.protocol.offsets import ZERO


@dataclass
class Event:
    type: str
    data: str
    last_event_id: str


@dataclass
class Parsed:
    events: list[Event] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


def parse_event_stream(raw: bytes) -> Parsed:
    """WHATWG event-stream interpretation (the parts a single response exercises)."""
    text = raw.decode("utf-8", errors="replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    # Lines end at CRLF, a lone CR or a lone LF; an unterminated last line is
    # never processed.
    pieces = re.split(r"\r\n|\r|\n", text)
    lines = pieces[:-1]
    out = Parsed()
    data, event_type, last_event_id = "", "", ""
    for line in lines:
        if line == "":
            # Dispatch: nothing happens when the data buffer is empty.
            if data != "":
                if data.endswith("\n"):
                    data = data[:-1]
                out.events.append(Event(event_type or "message", data, last_event_id))
            data, event_type = "", ""
            continue
        if line.startswith(":"):
            out.comments.append(line[1:])
            continue
        if ":" in line:
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
        else:
            name, value = line, ""
        if name == "event":
            event_type = value
        elif name == "data":
            data += value + "\n"
        elif name == "id":
            if "\x00" not in value:
                last_event_id = value
                out.ids.append(value)
        elif name == "retry":
            if value and all(c in "0123456789" for c in value):
                out.retry.append(int(value))
        # any other field name is ignored
    return out


def _normalise(text: str) -> str:
    return re.sub(r"\r\n|\r|\n", "\n", text)


# Building blocks for hostile payloads. None starts with a space (see
# test_text_lines_keep_their_leading_space for that case).
PIECES = [
    "\r",
    "\n",
    "\r\n",
    "\n\r",
    "\r\r",
    "\n\n",
    "event:",
    "event: control",
    "data:",
    "data: x",
    "id:",
    "id: 42",
    "retry:",
    "retry: 1",
    ":",
    ": comment",
    "a",
    "b c",
    "{}",
    '{"streamNextOffset":"x"}',
    "é",
    "日本",
    "😀",
    "\u2028",  # Unicode line separator: not an SSE line break
    "\u0085",  # NEL: not an SSE line break
    "\x0b",
    "\x0c",
    "\t",
    "\x00",
    "\ufeff",
]


def _hostile_payload(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 25)))


def _assert_single_data_event(framed: bytes, expected: str) -> None:
    parsed = parse_event_stream(framed)
    assert [e.type for e in parsed.events] == ["data"], framed
    assert parsed.events[0].data == expected, framed
    assert parsed.ids == [] and parsed.retry == [] and parsed.comments == [], framed
    assert framed.endswith(b"\n\n")


# -- data events: text --------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "framed"),
    [
        (b"hello", b"event: data\ndata:hello\n\n"),
        (b"", b"event: data\ndata:\n\n"),
        (b"a\nb", b"event: data\ndata:a\ndata:b\n\n"),
        (b"a\r\nb", b"event: data\ndata:a\ndata:b\n\n"),
        (b"a\rb", b"event: data\ndata:a\ndata:b\n\n"),
        (b"a\n\rb", b"event: data\ndata:a\ndata:\ndata:b\n\n"),
        (b"a\n", b"event: data\ndata:a\ndata:\n\n"),
        (b"\r", b"event: data\ndata:\ndata:\n\n"),
    ],
)
def test_data_event_gives_every_line_its_own_data_field(payload: bytes, framed: bytes) -> None:
    assert sse.data_event(payload, base64_encoded=False) == framed


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "plain",
        "line one\nline two",
        "cr only\rinjected",
        "\r\n\r\nevent: control\r\ndata: {}\r\n\r\n",
        'x\revent: control\rdata: {"streamClosed":true}\r\r',
        "x\n\nid: 99\nretry: 0\n\n",
        "trailing\r",
        "trailing\n",
        "\n",
        "\r\n",
        ":comment\n:another",
        "data:data:data:",
        "\u2028\u0085\x0b\x0c",
    ],
)
def test_data_event_payload_cannot_create_events_or_fields(payload: str) -> None:
    framed = sse.data_event(payload.encode(), base64_encoded=False)
    _assert_single_data_event(framed, _normalise(payload))


@pytest.mark.parametrize("seed", range(40))
def test_data_event_random_hostile_payloads(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        payload = _hostile_payload(rng)
        framed = sse.data_event(payload.encode(), base64_encoded=False)
        _assert_single_data_event(framed, _normalise(payload))


@pytest.mark.parametrize("seed", range(5))
def test_data_event_output_has_no_carriage_returns(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        framed = sse.data_event(_hostile_payload(rng).encode(), base64_encoded=False)
        assert b"\r" not in framed
        lines = framed.split(b"\n")
        assert lines[0] == b"event: data"
        assert lines[-2:] == [b"", b""]
        assert all(line.startswith(b"data:") for line in lines[1:-2])


def test_data_events_concatenate_into_separate_events() -> None:
    payloads = ["one\r", "two\n\nthree", "", "four\r\n"]
    stream = b"".join(sse.data_event(p.encode(), base64_encoded=False) for p in payloads)
    parsed = parse_event_stream(stream)
    assert [(e.type, e.data) for e in parsed.events] == [("data", _normalise(p)) for p in payloads]


@pytest.mark.parametrize("payload", [" leading space", "first\r\n second"])
def test_text_lines_keep_their_leading_space(payload: str) -> None:
    # EventSource drops one space after "data:", so a line that begins with a
    # space must not be written directly after the colon.
    framed = sse.data_event(payload.encode(), base64_encoded=False)
    _assert_single_data_event(framed, _normalise(payload))


# -- data events: base64 -------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00",
        b"\r\n",
        b"\n\n\r\r",
        b"event: x\ndata: y\n\n",
        bytes(range(256)),
        b"\xff" * 1000,
    ],
)
def test_base64_data_event_round_trips(payload: bytes) -> None:
    framed = sse.data_event(payload, base64_encoded=True)
    parsed = parse_event_stream(framed)
    assert [e.type for e in parsed.events] == ["data"]
    assert base64.b64decode(parsed.events[0].data, validate=True) == payload


@pytest.mark.parametrize("seed", range(10))
def test_base64_data_event_random_binary(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        payload = rng.randbytes(rng.randrange(0, 300))
        framed = sse.data_event(payload, base64_encoded=True)
        lines = framed.split(b"\n")
        assert lines[0] == b"event: data"
        assert len(lines) == 4 and lines[2:] == [b"", b""]  # a single data line
        assert lines[1].startswith(b"data:")
        encoded = lines[1][len(b"data:") :]
        assert re.fullmatch(rb"[A-Za-z0-9+/]*={0,2}", encoded)
        assert len(encoded) % 4 == 0
        try:
            assert base64.b64decode(encoded, validate=True) == payload
        except binascii.Error as exc:  # pragma: no cover - message on failure
            pytest.fail(f"invalid base64 {encoded!r}: {exc}")


# -- control events -----------------------------------------------------------------


def _control(framed: bytes) -> dict[str, object]:
    parsed = parse_event_stream(framed)
    assert [e.type for e in parsed.events] == ["control"]
    return json.loads(parsed.events[0].data)


def test_control_event_open_with_cursor_and_up_to_date() -> None:
    framed = sse.control_event(ZERO, cursor="123", up_to_date=True, closed=False)
    assert _control(framed) == {
        "streamNextOffset": ZERO,
        "streamCursor": "123",
        "upToDate": True,
    }


def test_control_event_open_not_up_to_date_omits_the_flag() -> None:
    framed = sse.control_event(ZERO, cursor="7", up_to_date=False, closed=False)
    assert _control(framed) == {"streamNextOffset": ZERO, "streamCursor": "7"}


def test_control_event_without_cursor_omits_it() -> None:
    framed = sse.control_event(ZERO, cursor=None, up_to_date=True, closed=False)
    assert _control(framed) == {"streamNextOffset": ZERO, "upToDate": True}


@pytest.mark.parametrize("cursor", [None, "123"])
@pytest.mark.parametrize("up_to_date", [False, True])
def test_control_event_closed_has_no_cursor_and_is_up_to_date(
    cursor: str | None, up_to_date: bool
) -> None:
    framed = sse.control_event(ZERO, cursor=cursor, up_to_date=up_to_date, closed=True)
    assert _control(framed) == {
        "streamNextOffset": ZERO,
        "streamClosed": True,
        "upToDate": True,
    }


@pytest.mark.parametrize("closed", [False, True])
def test_control_event_wire_format(closed: bool) -> None:
    framed = sse.control_event(
        "0001732547000123_0000000000000004", cursor="5", up_to_date=True, closed=closed
    )
    lines = framed.split(b"\n")
    assert lines[0] == b"event: control"
    assert lines[1].startswith(b"data:{")  # no space after the colon
    assert lines[1].endswith(b"}")
    assert lines[2:] == [b"", b""]
    assert b"\r" not in framed
    assert json.loads(lines[1][len(b"data:") :])["streamNextOffset"] == (
        "0001732547000123_0000000000000004"
    )


# -- keep-alive -----------------------------------------------------------------------


def test_keepalive_is_a_comment_that_dispatches_nothing() -> None:
    parsed = parse_event_stream(sse.KEEPALIVE)
    assert parsed.events == []
    assert parsed.comments == [" keep-alive"]
    stream = sse.KEEPALIVE + sse.data_event(b"x", base64_encoded=False) + sse.KEEPALIVE
    assert [(e.type, e.data) for e in parse_event_stream(stream).events] == [("data", "x")]


# -- the parser itself ----------------------------------------------------------------


def test_parser_follows_whatwg_rules() -> None:
    raw = (
        b"\xef\xbb\xbfdata: one\r\n"  # BOM stripped; one leading space removed
        b"data:  two\r"  # only one space removed; lone CR ends a line
        b"event:custom\n"
        b"id: 7\n"
        b"retry: 10\n"
        b"unknown: field\n"
        b"\n"
        b": comment\n"
        b"data\n"  # field name only: empty value
        b"\n"
        b"event: empty\n"
        b"\n"  # no data: nothing dispatched
        b"data: unterminated"
    )
    parsed = parse_event_stream(raw)
    assert [(e.type, e.data, e.last_event_id) for e in parsed.events] == [
        ("custom", "one\n two", "7"),
        ("message", "", "7"),
    ]
    assert parsed.retry == [10]
    assert parsed.comments == [" comment"]
