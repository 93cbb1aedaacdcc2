"""Server-Sent Events framing (protocol section 5.8).

Every line of a payload becomes its own ``data:`` line, so bytes in a stream can
never end an event or inject a field: CR, LF and CRLF all split lines. Binary
streams are base64-encoded, which contains no line breaks at all.
"""

from __future__ import annotations

import base64
import re

import orjson

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def data_event(payload: bytes, *, base64_encoded: bool) -> bytes:
    if base64_encoded:
        lines = [base64.b64encode(payload)]
    else:
        lines = _LINE_BREAK.split(payload)
    return b"event: data\n" + b"".join(_data_line(line) for line in lines) + b"\n"


def _data_line(line: bytes) -> bytes:
    # SSE parsers drop one space after "data:"; a line that itself starts with a
    # space gets an extra one so that the line's own space survives.
    return (b"data: " if line[:1] == b" " else b"data:") + line + b"\n"


def control_event(
    next_offset: str,
    *,
    cursor: str | None,
    up_to_date: bool,
    closed: bool,
) -> bytes:
    control: dict[str, object] = {"streamNextOffset": next_offset}
    if closed:
        # A closed stream needs no cursor: clients must not reconnect.
        control["streamClosed"] = True
        control["upToDate"] = True
    else:
        if cursor is not None:
            control["streamCursor"] = cursor
        if up_to_date:
            control["upToDate"] = True
    return b"event: control\ndata:" + orjson.dumps(control) + b"\n\n"


KEEPALIVE = b": keep-alive\n\n"
